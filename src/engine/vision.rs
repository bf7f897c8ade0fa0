//! The vision encoder on its own thread. Encoding an image's tiles takes seconds on a CPU;
//! on the engine thread it would stall every running stream for that long. Here the
//! engine hands over the tiles of a newly added request and goes on stepping; the request
//! joins the batch once its features come back. Both threads share the CPU's cores
//! (candle's thread pool), so decoding slows down while an image encodes but never stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};

use super::sequence::{SeqId, Sequence};
use super::vision_cache::VisionCache;
use crate::model::VisionLanguageModel;
use crate::processor::ImageKey;

pub struct VisionJob {
    pub seq: SeqId,
    /// The tiles to encode, `[tiles, 3, S, S]`.
    pub pixels: Tensor,
}

pub struct VisionDone {
    pub seq: SeqId,
    pub features: Result<Tensor, String>,
    pub took: Duration,
}

pub struct VisionWorker {
    jobs: Sender<VisionJob>,
    done: Receiver<VisionDone>,
    in_flight: usize,
}

impl VisionWorker {
    pub fn spawn(model: Arc<dyn VisionLanguageModel>) -> Self {
        let (jobs, inbox) = crossbeam_channel::unbounded::<VisionJob>();
        let (results, done) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("ocellus-vision".into())
            .spawn(move || {
                // Ends when the engine drops its sender.
                for job in inbox {
                    let started = Instant::now();
                    let features = job
                        .pixels
                        .to_device(model.device())
                        .and_then(|p| model.encode_images(&p))
                        .map_err(|e| e.to_string());
                    if results
                        .send(VisionDone {
                            seq: job.seq,
                            features,
                            took: started.elapsed(),
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            })
            .expect("the OS can start a thread at startup. This is a bug.");
        Self {
            jobs,
            done,
            in_flight: 0,
        }
    }

    pub fn submit(&mut self, job: VisionJob) {
        self.in_flight += 1;
        self.jobs
            .send(job)
            .expect("the vision thread lives as long as the engine. This is a bug.");
    }

    /// Jobs submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Finished jobs, without waiting.
    pub fn finished(&mut self) -> Vec<VisionDone> {
        let done: Vec<VisionDone> = self.done.try_iter().collect();
        self.in_flight -= done.len();
        done
    }

    /// Waits up to `timeout` for a job to finish; `None` if none did.
    pub fn wait(&mut self, timeout: Duration) -> Option<VisionDone> {
        let done = self.done.recv_timeout(timeout).ok()?;
        self.in_flight -= 1;
        Some(done)
    }

    /// For waiting on results together with other channels (the engine thread's inbox).
    pub fn results(&self) -> &Receiver<VisionDone> {
        &self.done
    }
}

/// What `start` did: images taken from the cache, and the keys of those sent to encode.
pub struct Started {
    pub hits: usize,
    pub encoding: Vec<ImageKey>,
}

/// Starts getting a sequence's image features: cached images are taken now, the others go
/// to the worker (each distinct image once).
pub fn start(seq: &mut Sequence, cache: &mut VisionCache, worker: &mut VisionWorker) -> candle_core::Result<Started> {
    let Some(pixels) = seq.request.prompt.pixel_values.take() else {
        return Ok(Started {
            hits: 0,
            encoding: Vec::new(),
        });
    };
    let images = &seq.request.prompt.images;
    seq.image_parts = images.iter().map(|image| cache.get(&image.key)).collect();
    let hits = seq.image_parts.iter().filter(|p| p.is_some()).count();
    let mut tiles = Vec::new();
    let mut encoding = Vec::new();
    let mut first_tile = 0;
    for (i, image) in images.iter().enumerate() {
        if to_encode(seq, i) {
            tiles.push(pixels.narrow(0, first_tile, image.tiles)?);
            encoding.push(image.key);
        }
        first_tile += image.tiles;
    }
    if tiles.is_empty() {
        assemble(seq)?;
    } else {
        seq.vision_pending = true;
        worker.submit(VisionJob {
            seq: seq.id,
            pixels: Tensor::cat(&tiles, 0)?,
        });
    }
    Ok(Started { hits, encoding })
}

/// Whether a sequence needs an image that another sequence is encoding right now (and that
/// is not cached): it waits for that instead of encoding the same pixels again.
pub fn waits_on(seq: &Sequence, cache: &VisionCache, encoding: &HashMap<SeqId, Vec<ImageKey>>) -> bool {
    seq.request.prompt.pixel_values.is_some()
        && seq
            .request
            .prompt
            .images
            .iter()
            .any(|image| !cache.contains(&image.key) && encoding.values().flatten().any(|key| *key == image.key))
}

/// Completes a sequence's features with the worker's output (the encoded images' rows, in
/// order) and caches each newly encoded image.
pub fn finish(
    seq: &mut Sequence,
    features: Tensor,
    cache: &mut VisionCache,
    rows_per_tile: usize,
) -> candle_core::Result<()> {
    let encoded: Vec<usize> = (0..seq.request.prompt.images.len())
        .filter(|&i| to_encode(seq, i))
        .collect();
    let mut row = 0;
    for &i in &encoded {
        let image = seq.request.prompt.images[i];
        let rows = image.tiles * rows_per_tile;
        // A copy when the output holds several images, so each cache entry owns its rows.
        let own = if encoded.len() == 1 {
            features.clone()
        } else {
            features.narrow(0, row, rows)?.copy()?
        };
        cache.insert(image.key, own.clone());
        seq.image_parts[i] = Some(own);
        row += rows;
    }
    seq.vision_pending = false;
    assemble(seq)
}

/// Whether image `i` of the prompt goes to the encoder: not cached, and not a repeat of an
/// earlier image of the same prompt.
fn to_encode(seq: &Sequence, i: usize) -> bool {
    let images = &seq.request.prompt.images;
    seq.image_parts[i].is_none() && !images[..i].iter().any(|earlier| earlier.key == images[i].key)
}

fn assemble(seq: &mut Sequence) -> candle_core::Result<()> {
    let images = &seq.request.prompt.images;
    let mut parts: Vec<Tensor> = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let part = match &seq.image_parts[i] {
            Some(part) => part.clone(),
            None => {
                let first = images
                    .iter()
                    .position(|e| e.key == image.key)
                    .expect("image i itself matches. This is a bug.");
                seq.image_parts[first]
                    .clone()
                    .expect("a repeat's first occurrence has features. This is a bug.")
            }
        };
        parts.push(part);
    }
    seq.image_features = Some(Tensor::cat(&parts, 0)?);
    seq.image_parts.clear();
    Ok(())
}
