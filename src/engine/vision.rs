//! The vision encoder on its own thread. Encoding an image takes seconds on a CPU;
//! on the engine thread it would stall every running stream for that long. Here the
//! engine hands over the images of a newly added request and goes on stepping; the request
//! joins the batch once its features come back. Both threads share the CPU's cores
//! (candle's thread pool), so decoding slows down while an image encodes but never stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::sequence::{ImageSlot, SeqId, Sequence, Vision};
use super::vision_cache::VisionCache;
use crate::model::lora::Adapter;
use crate::model::{ContentKey, ImageFeatures, Pixels, VisionLanguageModel};

pub struct VisionJob {
    pub seq: SeqId,
    /// The images to encode, in prompt order.
    pub images: Vec<Pixels>,
    /// The sequence's adapter, which may change the vision tower.
    pub adapter: Option<Arc<Adapter>>,
}

pub struct VisionDone {
    pub seq: SeqId,
    /// One result per image of the job.
    pub features: Result<Vec<ImageFeatures>, String>,
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
                    let images: Vec<&Pixels> = job.images.iter().collect();
                    let features = (model.encode_images(&images, job.adapter.as_deref())).map_err(|e| e.to_string());
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
#[derive(Default)]
pub struct Started {
    pub hits: usize,
    pub encoding: Vec<ContentKey>,
}

/// Starts getting a waiting sequence's image features: cached images are taken now, the
/// others go to the worker (each distinct image once).
pub fn start(seq: &mut Sequence, cache: &mut VisionCache, worker: &mut VisionWorker) -> candle_core::Result<Started> {
    let pixels = match std::mem::replace(&mut seq.vision, Vision::Ready(None)) {
        Vision::Waiting(pixels) => pixels,
        started => {
            seq.vision = started;
            return Ok(Started::default());
        }
    };
    let parts: Vec<Option<ImageFeatures>> = seq.images.iter().map(|image| cache.get(&image.key)).collect();
    let hits = parts.iter().filter(|p| p.is_some()).count();
    let mut images = Vec::new();
    let mut encoding = Vec::new();
    for (i, pixels) in pixels.into_iter().enumerate() {
        if to_encode(&seq.images, &parts, i) {
            images.push(pixels);
            encoding.push(seq.images[i].key);
        }
    }
    if images.is_empty() {
        seq.vision = Vision::Ready(Some(assemble(&seq.images, &parts)?));
    } else {
        seq.vision = Vision::Encoding(parts);
        worker.submit(VisionJob {
            seq: seq.id,
            images,
            adapter: seq.adapter.clone(),
        });
    }
    Ok(Started { hits, encoding })
}

/// Whether a sequence needs an image that another sequence is encoding right now (and that
/// is not cached): it waits for that instead of encoding the same pixels again.
pub fn waits_on(seq: &Sequence, cache: &VisionCache, encoding: &HashMap<SeqId, Vec<ContentKey>>) -> bool {
    matches!(seq.vision, Vision::Waiting(_))
        && (seq.images.iter())
            .any(|image| !cache.contains(&image.key) && encoding.values().flatten().any(|key| *key == image.key))
}

/// Completes a sequence's features with the worker's output (one per encoded image, in
/// order) and caches each newly encoded image.
pub fn finish(seq: &mut Sequence, features: Vec<ImageFeatures>, cache: &mut VisionCache) -> candle_core::Result<()> {
    let mut parts = match std::mem::replace(&mut seq.vision, Vision::Ready(None)) {
        Vision::Encoding(parts) => parts,
        other => {
            seq.vision = other;
            candle_core::bail!("vision results for a sequence that is not encoding. This is a bug.")
        }
    };
    let encoded: Vec<usize> = (0..seq.images.len())
        .filter(|&i| to_encode(&seq.images, &parts, i))
        .collect();
    if encoded.len() != features.len() {
        candle_core::bail!(
            "{} images encoded, {} results. This is a bug.",
            encoded.len(),
            features.len()
        )
    }
    for (i, image_features) in encoded.into_iter().zip(features) {
        cache.insert(seq.images[i].key, image_features.clone());
        parts[i] = Some(image_features);
    }
    seq.vision = Vision::Ready(Some(assemble(&seq.images, &parts)?));
    Ok(())
}

/// Whether image `i` of the prompt goes to the encoder: not cached, and not a repeat of an
/// earlier image of the same prompt.
fn to_encode(images: &[ImageSlot], parts: &[Option<ImageFeatures>], i: usize) -> bool {
    parts[i].is_none() && !images[..i].iter().any(|earlier| earlier.key == images[i].key)
}

/// The features of every image, in order: a repeated image takes its first occurrence's.
fn assemble(images: &[ImageSlot], parts: &[Option<ImageFeatures>]) -> candle_core::Result<ImageFeatures> {
    let ordered: Vec<&ImageFeatures> = (0..images.len())
        .map(|i| {
            let first = images.iter().position(|e| e.key == images[i].key).unwrap_or(i);
            parts[i]
                .as_ref()
                .or(parts[first].as_ref())
                .expect("every image or its first occurrence has features. This is a bug.")
        })
        .collect();
    match ordered.as_slice() {
        [one] => Ok((*one).clone()),
        _ => ImageFeatures::cat(&ordered),
    }
}
