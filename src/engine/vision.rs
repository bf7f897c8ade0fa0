//! The vision encoder on its own thread. Encoding an image takes seconds on a CPU;
//! on the engine thread it would stall every running stream for that long. Here the
//! engine hands over the images of a newly added request and goes on stepping; the request
//! joins the batch once its features come back. Both threads share the CPU's cores
//! (candle's thread pool), so decoding slows down while an image encodes but never stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set when the sequence is gone (its `Ticket` dropped): the job is not started.
    abandoned: Arc<AtomicBool>,
}

/// A sequence's claim on its queued vision job. Dropped with the sequence (the client left,
/// the request timed out, the server aborted it), it marks the job abandoned, and the vision
/// thread skips it instead of spending seconds on features nobody will read; an encoding
/// already under way finishes.
pub struct Ticket(Arc<AtomicBool>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

pub struct VisionDone {
    pub seq: SeqId,
    /// One result per image of the job.
    pub features: Result<Vec<ImageFeatures>, String>,
    pub took: Duration,
    /// False for a job skipped as abandoned.
    pub encoded: bool,
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
                    let encoded = !job.abandoned.load(Ordering::Acquire);
                    let features = if encoded {
                        let images: Vec<&Pixels> = job.images.iter().collect();
                        (model.encode_images(&images, job.adapter.as_deref())).map_err(|e| e.to_string())
                    } else {
                        Err("abandoned".into())
                    };
                    let done = VisionDone {
                        seq: job.seq,
                        features,
                        took: started.elapsed(),
                        encoded,
                    };
                    if results.send(done).is_err() {
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
        let abandoned = Arc::new(AtomicBool::new(false));
        seq.vision = Vision::Encoding(parts, Ticket(abandoned.clone()));
        worker.submit(VisionJob {
            seq: seq.id,
            images,
            adapter: seq.adapter.clone(),
            abandoned,
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
        Vision::Encoding(parts, _) => parts,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn job(seq: SeqId, abandoned: &Arc<AtomicBool>) -> VisionJob {
        // One 64x64 view: the fixture SigLIP's input.
        let (pixels, _) = Pixels::keyed(vec![0.5; 3 * 64 * 64], &[1, 3, 64, 64], None).unwrap();
        VisionJob {
            seq,
            images: vec![pixels],
            adapter: None,
            abandoned: abandoned.clone(),
        }
    }

    #[test]
    fn a_job_whose_sequence_is_gone_is_skipped_and_the_rest_are_encoded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-idefics3");
        let files = crate::model::ModelFiles::locate(&dir).unwrap();
        let model = crate::model::load(&files, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut worker = VisionWorker::spawn(Arc::from(model));
        let (kept, gone) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (kept_ticket, gone_ticket) = (Ticket(kept.clone()), Ticket(gone.clone()));
        drop(gone_ticket); // the sequence left before its job started
        assert!(gone.load(Ordering::Acquire) && !kept.load(Ordering::Acquire));
        worker.submit(job(1, &gone));
        worker.submit(job(2, &kept));
        let first = worker.wait(Duration::from_secs(30)).unwrap();
        let second = worker.wait(Duration::from_secs(30)).unwrap();
        assert_eq!((first.seq, first.encoded, first.features.is_err()), (1, false, true));
        assert_eq!((second.seq, second.encoded), (2, true));
        assert_eq!(second.features.unwrap().len(), 1);
        assert_eq!(worker.in_flight(), 0);
        drop(kept_ticket);
    }
}
