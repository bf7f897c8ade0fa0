//! The embedding engine: one thread owns a contrastive model and batches what many clients
//! send (dynamic batching, as TEI and vLLM's pooling runner do). Requests wait on a bounded
//! queue (full: refused at once, for a 429); the thread takes every waiting request that
//! fits `max_num_seqs` inputs and `max_batch_tokens` text tokens, encodes their texts in
//! one forward and their images in another, and answers each. Image embeddings are kept
//! by content (an LRU bounded in bytes): an image sent again is not encoded again. A
//! request whose client went away before its batch started is dropped unencoded.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use lru::LruCache;
use tokio::sync::oneshot;

use super::handle::SubmitError;
use crate::model::embedding::{EmbeddingInfo, EmbeddingModel};
use crate::model::{ContentKey, Pixels};

/// One input to embed.
#[derive(Debug, Clone)]
pub enum EmbedItem {
    /// Token ids as the family's processor made them.
    Text(Vec<u32>),
    /// Pixels as the family's processor made them, and the key of their content.
    Image(Pixels, ContentKey),
    /// A text and an image to match (a model with a matching head): its "vector" is the
    /// one match probability.
    Pair(Vec<u32>, Pixels, ContentKey),
}

#[derive(Debug, Clone, Copy)]
pub struct EmbedConfig {
    /// Most inputs in one forward.
    pub max_num_seqs: usize,
    /// Most text tokens in one forward (a request larger than this runs alone).
    pub max_batch_tokens: usize,
    /// Most inputs waiting.
    pub max_queue: usize,
    /// Bytes of image embeddings kept for reuse.
    pub cache_bytes: usize,
}

/// Why a request got no embeddings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error("the model failed: {0}")]
    Model(String),
}

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>;

struct Job {
    items: Vec<EmbedItem>,
    reply: Reply,
}

enum Command {
    Job(Job),
    /// Answer what is waiting, then stop.
    Shutdown,
}

#[derive(Clone)]
pub struct EmbedHandle {
    commands: Sender<Command>,
    /// Inputs submitted and not yet taken into a batch.
    queued: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
    max_queue: usize,
    info: Arc<EmbeddingInfo>,
}

impl EmbedHandle {
    pub fn spawn(model: Arc<dyn EmbeddingModel>, config: EmbedConfig) -> (Self, JoinHandle<()>) {
        let (commands, inbox) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let info = Arc::new(model.info().clone());
        let worker = Worker {
            cache: Cache::new(config.cache_bytes, info.dim),
            model,
            config,
            queued: queued.clone(),
            pending: VecDeque::new(),
        };
        let thread_stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("ocellus-embed".into())
            .spawn(move || {
                worker.run(inbox);
                thread_stopped.store(true, Ordering::Release);
            })
            .expect("the OS can start a thread at startup. This is a bug.");
        let handle = Self {
            commands,
            queued,
            stopped,
            max_queue: config.max_queue,
            info,
        };
        (handle, thread)
    }

    /// The unit vectors of `items`, in order, once a batch has encoded them.
    pub async fn embed(&self, items: Vec<EmbedItem>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let n = items.len();
        if self.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown.into());
        }
        if self.queued.load(Ordering::Acquire) + n > self.max_queue {
            return Err(SubmitError::QueueFull { limit: self.max_queue }.into());
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Job(Job { items, reply })).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown.into());
        }
        answer.await.unwrap_or(Err(SubmitError::ShuttingDown.into()))
    }

    pub fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    /// Asks the thread to answer what is waiting and stop.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// Image embeddings by content, least recently used out first.
struct Cache {
    entries: Option<LruCache<ContentKey, Vec<f32>>>,
}

impl Cache {
    fn new(bytes: usize, dim: usize) -> Self {
        let capacity = bytes / (dim.max(1) * 4 + std::mem::size_of::<ContentKey>());
        Self {
            entries: NonZeroUsize::new(capacity).map(LruCache::new),
        }
    }
}

struct Worker {
    model: Arc<dyn EmbeddingModel>,
    config: EmbedConfig,
    queued: Arc<AtomicUsize>,
    cache: Cache,
    /// Jobs taken from the channel that did not fit the last batch.
    pending: VecDeque<Job>,
}

impl Worker {
    fn run(mut self, inbox: Receiver<Command>) {
        let mut stopping = false;
        loop {
            if self.pending.is_empty() {
                if stopping {
                    return;
                }
                match inbox.recv() {
                    Ok(Command::Job(job)) => self.pending.push_back(job),
                    Ok(Command::Shutdown) | Err(_) => stopping = true,
                }
            }
            while let Ok(command) = inbox.try_recv() {
                match command {
                    Command::Job(job) => self.pending.push_back(job),
                    Command::Shutdown => stopping = true,
                }
            }
            let batch = self.next_batch();
            if !batch.is_empty() {
                self.answer(batch);
            }
        }
    }

    /// The waiting jobs that fit one batch, in arrival order (at least the first); jobs
    /// whose client is gone are dropped.
    fn next_batch(&mut self) -> Vec<Job> {
        let (mut seqs, mut tokens) = (0, 0);
        let mut batch = Vec::new();
        while let Some(job) = self.pending.front() {
            let job_tokens: usize = (job.items.iter())
                .map(|i| match i {
                    EmbedItem::Text(ids) | EmbedItem::Pair(ids, ..) => ids.len(),
                    EmbedItem::Image(..) => 0,
                })
                .sum();
            let fits = seqs + job.items.len() <= self.config.max_num_seqs
                && tokens + job_tokens <= self.config.max_batch_tokens;
            if !batch.is_empty() && !fits {
                break;
            }
            let job = self.pending.pop_front().expect("the front exists. This is a bug.");
            self.queued.fetch_sub(job.items.len(), Ordering::AcqRel);
            if job.reply.is_closed() {
                continue;
            }
            seqs += job.items.len();
            tokens += job_tokens;
            batch.push(job);
        }
        batch
    }

    fn answer(&mut self, batch: Vec<Job>) {
        match self.encode(&batch) {
            Ok(mut vectors) => {
                for job in batch.into_iter().rev() {
                    let at = vectors.len() - job.items.len();
                    let _ = job.reply.send(Ok(vectors.split_off(at)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedding failed");
                for job in batch {
                    let _ = job.reply.send(Err(EmbedError::Model(e.to_string())));
                }
            }
        }
    }

    /// The vectors of every item of the batch, in order: texts in one forward, images not
    /// in the cache in another.
    fn encode(&mut self, batch: &[Job]) -> candle_core::Result<Vec<Vec<f32>>> {
        let items: Vec<&EmbedItem> = batch.iter().flat_map(|j| &j.items).collect();
        let mut out: Vec<Option<Vec<f32>>> = vec![None; items.len()];
        let texts: Vec<(usize, &[u32])> = (items.iter().enumerate())
            .filter_map(|(i, item)| match item {
                EmbedItem::Text(ids) => Some((i, ids.as_slice())),
                _ => None,
            })
            .collect();
        // A request larger than a batch (up to `--max-embedding-inputs`) runs in parts.
        for chunk in texts.chunks(self.config.max_num_seqs.max(1)) {
            let ids: Vec<&[u32]> = chunk.iter().map(|(_, ids)| *ids).collect();
            let vectors = self.model.embed_texts(&ids)?.to_vec2::<f32>()?;
            for ((i, _), vector) in chunk.iter().zip(vectors) {
                out[*i] = Some(vector);
            }
        }
        // Images: from the cache, else encoded once per distinct content.
        let mut missing: Vec<(ContentKey, &Pixels)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let EmbedItem::Image(pixels, key) = item {
                match self.cache.entries.as_mut().and_then(|c| c.get(key)) {
                    Some(vector) => out[i] = Some(vector.clone()),
                    None if missing.iter().any(|(k, _)| k == key) => {}
                    None => missing.push((*key, pixels)),
                }
            }
        }
        let mut fresh = Vec::with_capacity(missing.len());
        for chunk in missing.chunks(self.config.max_num_seqs.max(1)) {
            let pixels: Vec<&Pixels> = chunk.iter().map(|(_, p)| *p).collect();
            let vectors = self.model.embed_images(&pixels)?.to_vec2::<f32>()?;
            fresh.extend(chunk.iter().map(|(k, _)| *k).zip(vectors));
        }
        for (i, item) in items.iter().enumerate() {
            if let EmbedItem::Image(_, key) = item
                && out[i].is_none()
            {
                out[i] = fresh.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            }
        }
        if let Some(cache) = self.cache.entries.as_mut() {
            for (key, vector) in fresh {
                cache.put(key, vector);
            }
        }
        self.match_pairs(&items, &mut out)?;
        out.into_iter()
            .map(|v| v.ok_or_else(|| candle_core::Error::Msg("an input got no embedding. This is a bug.".into())))
            .collect()
    }
}

impl Worker {
    /// The match probability of every pair among `items`, into `out`: each distinct image
    /// encoded once per forward.
    fn match_pairs(&self, items: &[&EmbedItem], out: &mut [Option<Vec<f32>>]) -> candle_core::Result<()> {
        let pairs: Vec<(usize, &[u32], &Pixels, &ContentKey)> = (items.iter().enumerate())
            .filter_map(|(i, item)| match item {
                EmbedItem::Pair(ids, pixels, key) => Some((i, ids.as_slice(), pixels, key)),
                _ => None,
            })
            .collect();
        for chunk in pairs.chunks(self.config.max_num_seqs.max(1)) {
            let mut keys: Vec<&ContentKey> = Vec::new();
            let mut images: Vec<&Pixels> = Vec::new();
            let image_of: Vec<usize> = (chunk.iter())
                .map(|(_, _, pixels, key)| match keys.iter().position(|k| k == key) {
                    Some(at) => at,
                    None => {
                        keys.push(key);
                        images.push(pixels);
                        images.len() - 1
                    }
                })
                .collect();
            let texts: Vec<&[u32]> = chunk.iter().map(|(_, ids, ..)| *ids).collect();
            let probs = self.model.match_pairs(&texts, &images, &image_of)?;
            for ((i, ..), p) in chunk.iter().zip(probs) {
                out[*i] = Some(vec![p]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::embedding::Scoring;

    /// A model whose vector of a text is `[first id, length]` and of an image `[mean, 0]`,
    /// recording the size of every forward.
    struct Recorder {
        info: EmbeddingInfo,
        forwards: Mutex<Vec<(char, usize)>>,
    }

    impl Recorder {
        fn new() -> Arc<Self> {
            let info = EmbeddingInfo {
                architecture: "test".into(),
                dim: 2,
                scoring: Scoring::Softmax { scale: 1.0 },
                matching: false,
            };
            Arc::new(Self {
                info,
                forwards: Mutex::new(Vec::new()),
            })
        }
    }

    impl EmbeddingModel for Recorder {
        fn info(&self) -> &EmbeddingInfo {
            &self.info
        }

        fn embed_texts(&self, texts: &[&[u32]]) -> candle_core::Result<Tensor> {
            self.forwards.lock().unwrap().push(('t', texts.len()));
            let rows: Vec<f32> = texts.iter().flat_map(|t| [t[0] as f32, t.len() as f32]).collect();
            Tensor::from_vec(rows, (texts.len(), 2), &Device::Cpu)
        }

        fn embed_images(&self, images: &[&Pixels]) -> candle_core::Result<Tensor> {
            self.forwards.lock().unwrap().push(('i', images.len()));
            let mut rows = Vec::new();
            for image in images {
                rows.extend([image.values.mean_all()?.to_scalar::<f32>()?, 0.0]);
            }
            Tensor::from_vec(rows, (images.len(), 2), &Device::Cpu)
        }
    }

    fn image(value: f32) -> EmbedItem {
        let (pixels, key) = Pixels::keyed(vec![value; 12], &[1, 3, 2, 2], None).unwrap();
        EmbedItem::Image(pixels, key)
    }

    fn worker(model: Arc<Recorder>, max_num_seqs: usize, max_batch_tokens: usize) -> Worker {
        let config = EmbedConfig {
            max_num_seqs,
            max_batch_tokens,
            max_queue: 100,
            cache_bytes: 1 << 20,
        };
        Worker {
            cache: Cache::new(config.cache_bytes, 2),
            model,
            config,
            queued: Arc::new(AtomicUsize::new(0)),
            pending: VecDeque::new(),
        }
    }

    /// Jobs sent before the worker runs, then a shutdown: the worker's batches are decided
    /// by the limits alone.
    fn run(worker: Worker, jobs: Vec<Vec<EmbedItem>>) -> Vec<oneshot::Receiver<Result<Vec<Vec<f32>>, EmbedError>>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut answers = Vec::new();
        for items in jobs {
            worker.queued.fetch_add(items.len(), Ordering::AcqRel);
            let (reply, answer) = oneshot::channel();
            tx.send(Command::Job(Job { items, reply })).unwrap();
            answers.push(answer);
        }
        tx.send(Command::Shutdown).unwrap();
        worker.run(rx);
        answers
    }

    #[test]
    fn waiting_requests_share_one_forward_and_each_gets_its_own_vectors() {
        let model = Recorder::new();
        let jobs = vec![
            vec![EmbedItem::Text(vec![7, 1, 1])],
            vec![image(0.5), EmbedItem::Text(vec![9])],
            vec![image(0.5), image(0.25)],
        ];
        let answers = run(worker(model.clone(), 16, 100), jobs);
        let got: Vec<Vec<Vec<f32>>> = answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(got[0], vec![vec![7.0, 3.0]]);
        assert_eq!(got[1], vec![vec![0.5, 0.0], vec![9.0, 1.0]]);
        assert_eq!(got[2], vec![vec![0.5, 0.0], vec![0.25, 0.0]]);
        // One forward of both texts, one of the two distinct images.
        assert_eq!(*model.forwards.lock().unwrap(), vec![('t', 2), ('i', 2)]);
    }

    #[test]
    fn limits_split_batches_and_cached_images_are_not_encoded_again() {
        let model = Recorder::new();
        let jobs = vec![
            vec![EmbedItem::Text(vec![1; 6])],
            vec![EmbedItem::Text(vec![2; 6])],
            vec![image(1.0)],
            vec![image(1.0)],
        ];
        // 10 tokens per batch: the two texts go apart; three inputs per batch: the first
        // image's batch is the second text's, the second image comes from the cache.
        let answers = run(worker(model.clone(), 3, 10), jobs);
        for mut answer in answers {
            assert!(answer.try_recv().unwrap().is_ok());
        }
        assert_eq!(*model.forwards.lock().unwrap(), vec![('t', 1), ('t', 1), ('i', 1)]);
    }

    #[test]
    fn a_request_whose_client_left_is_not_encoded() {
        let model = Recorder::new();
        let worker = worker(model.clone(), 16, 100);
        let (tx, rx) = crossbeam_channel::unbounded();
        let (reply, answer) = oneshot::channel();
        drop(answer);
        tx.send(Command::Job(Job {
            items: vec![EmbedItem::Text(vec![1])],
            reply,
        }))
        .unwrap();
        tx.send(Command::Shutdown).unwrap();
        worker.run(rx);
        assert!(model.forwards.lock().unwrap().is_empty());
    }
}
