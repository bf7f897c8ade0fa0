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
                    EmbedItem::Text(ids) => ids.len(),
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
                EmbedItem::Image(..) => None,
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
        out.into_iter()
            .map(|v| v.ok_or_else(|| candle_core::Error::Msg("an input got no embedding. This is a bug.".into())))
            .collect()
    }
}
