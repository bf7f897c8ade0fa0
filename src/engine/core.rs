//! The engine's state and its step: the model, the KV pool, waiting and running sequences.
//! Each `step` drops cancelled and expired sequences, asks the scheduler for a plan,
//! preempts and admits as planned, encodes the images of prompts that start, runs one
//! forward pass over the ragged batch, samples, and sends each sequence's events. The
//! engine thread calls it in a loop; the CLI, tests and benchmarks call it directly.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::request::{EngineFailure, EventSender, GenerationRequest, SequenceEvent};
use super::scheduler::{Limits, Plan, Who, plan_step};
use super::sequence::{SeqId, Sequence};
use super::vision_cache::VisionCache;
use crate::kv::KvPool;
use crate::model::{SequenceInput, VisionLanguageModel};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    /// Most tokens in one step (decodes plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Most tokens a sequence may reach (prompt plus output).
    pub max_model_len: usize,
    /// Memory for vision features of recent images (0: no cache).
    pub vision_cache_bytes: usize,
}

/// Requests the engine refuses at the door.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {found} image tokens but its images make {expected}")]
    ImageTokens { found: usize, expected: usize },
    #[error("the prompt ({prompt} tokens) plus `max_tokens` ({max_tokens}) exceeds the maximum context length {limit}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
}

/// What one step did, for metrics.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Sequences in the forward pass.
    pub batch_sequences: usize,
    pub preempted: usize,
    pub cancelled: usize,
    pub timed_out: usize,
    pub failed: usize,
    /// Time each newly admitted request waited.
    pub queue_times: Vec<Duration>,
    /// Vision encoding of prompts that started.
    pub vision: Duration,
    /// Images whose features came from the cache, and images encoded.
    pub vision_cache_hits: usize,
    pub vision_cache_misses: usize,
    /// The forward pass (and sampling).
    pub forward: Duration,
}

impl StepReport {
    pub fn did_work(&self) -> bool {
        self.prefill_tokens + self.decode_tokens > 0
    }
}

pub struct EngineCore {
    model: Box<dyn VisionLanguageModel>,
    pool: KvPool,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    /// In admission order: the youngest is last.
    running: Vec<Sequence>,
    next_id: SeqId,
    vision_cache: VisionCache,
}

impl EngineCore {
    pub fn new(
        model: Box<dyn VisionLanguageModel>,
        pool: KvPool,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        config: EngineConfig,
    ) -> Self {
        let vision_cache = VisionCache::new(config.vision_cache_bytes);
        Self {
            model,
            pool,
            tokenizer,
            eos,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            vision_cache,
        }
    }

    pub fn model(&self) -> &dyn VisionLanguageModel {
        self.model.as_ref()
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn max_model_len(&self) -> usize {
        self.config.max_model_len.min(self.pool.capacity_tokens())
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Queues one choice of a request; its events go to `events`.
    pub fn add(&mut self, request: GenerationRequest, choice: usize, events: EventSender) -> Result<SeqId, AddError> {
        let prompt = request.prompt.token_ids.len();
        if prompt == 0 {
            return Err(AddError::EmptyPrompt);
        }
        let info = self.model.info();
        let found = request
            .prompt
            .token_ids
            .iter()
            .filter(|&&t| t == info.image_token_id)
            .count();
        let tiles = request.prompt.tiles();
        let expected = tiles * info.image_seq_len;
        let pixels = request
            .prompt
            .pixel_values
            .as_ref()
            .map_or(0, |p| p.dim(0).unwrap_or(usize::MAX));
        if found != expected || pixels != tiles {
            return Err(AddError::ImageTokens { found, expected });
        }
        let limit = self.max_model_len();
        if prompt + request.max_tokens > limit {
            return Err(AddError::TooLong {
                prompt,
                max_tokens: request.max_tokens,
                limit,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let seed = request.sampling.seed.map_or(id, |s| s.wrapping_add(choice as u64));
        self.waiting.push_back(Sequence::new(id, choice, request, events, seed));
        Ok(id)
    }

    /// Fails every sequence (shutdown past its deadline).
    pub fn abort_all(&mut self, failure: EngineFailure) {
        for mut seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            seq.send(SequenceEvent::Failed(failure.clone()));
            self.pool.release(&mut seq.kv);
        }
    }

    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport::default();
        self.drop_gone(&mut report);
        let running: Vec<_> = self.running.iter().map(Sequence::as_running).collect();
        let waiting: Vec<_> = self.waiting.iter().map(Sequence::as_waiting).collect();
        let limits = Limits {
            max_num_seqs: self.config.max_num_seqs,
            token_budget: self.config.max_batch_tokens,
        };
        let plan = plan_step(&running, &waiting, self.pool.free_blocks(), limits);
        if plan.chunks.is_empty() && plan.preempt.is_empty() {
            return report;
        }
        self.preempt_and_admit(&plan, &mut report);
        let chunks = self.resolve_chunks(&plan);
        let mut encoded = Vec::new();
        for &(index, len) in &chunks {
            let seq = &mut self.running[index];
            let grown = self.pool.grow(&mut seq.kv, len);
            debug_assert!(grown, "the plan counted these blocks. This is a bug.");
            if seq.kv.is_empty() && seq.image_features.is_none() && seq.request.prompt.pixel_values.is_some() {
                encoded.push(index);
            }
        }
        let started = Instant::now();
        for index in encoded {
            if let Err(err) = self.encode_images(index, &mut report) {
                self.fail(&[index], &err.to_string(), &mut report);
                return report;
            }
        }
        report.vision = started.elapsed();
        self.forward(&chunks, &mut report);
        report
    }

    fn drop_gone(&mut self, report: &mut StepReport) {
        let now = Instant::now();
        let pool = &mut self.pool;
        let mut keep = |seq: &mut Sequence| {
            if seq.is_cancelled() {
                report.cancelled += 1;
            } else if seq.request.deadline.is_some_and(|d| now >= d) {
                seq.send(SequenceEvent::Failed(EngineFailure::Timeout));
                report.timed_out += 1;
            } else {
                return true;
            }
            pool.release(&mut seq.kv);
            false
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
    }

    fn preempt_and_admit(&mut self, plan: &Plan, report: &mut StepReport) {
        // Victims are the youngest alive sequences, which the plan lists youngest first:
        // the tail of `running`. They go back to the front of the queue, oldest first.
        if let Some(&oldest_victim) = plan.preempt.last() {
            for mut seq in self.running.split_off(oldest_victim).into_iter().rev() {
                self.pool.release(&mut seq.kv);
                report.preempted += 1;
                self.waiting.push_front(seq);
            }
        }
        for mut seq in self.waiting.drain(..plan.admit) {
            if !seq.admitted_once {
                seq.admitted_once = true;
                report.queue_times.push(seq.arrived.elapsed());
            }
            self.running.push(seq);
        }
    }

    /// The plan's chunks as (running index, tokens), newly admitted ones placed at the end
    /// of `running`. A recomputed prompt with images is cut where its output starts: past
    /// that point image-token ids are generated text, not image slots.
    fn resolve_chunks(&self, plan: &Plan) -> Vec<(usize, usize)> {
        let first_admitted = self.running.len() - plan.admit;
        plan.chunks
            .iter()
            .map(|c| {
                let index = match c.who {
                    Who::Running(i) => i,
                    Who::Admitted(j) => first_admitted + j,
                };
                let seq = &self.running[index];
                let start = seq.kv.len();
                let crosses = start < seq.prompt_len && start + c.len > seq.prompt_len;
                let len = if crosses && seq.image_features.is_some() {
                    seq.prompt_len - start
                } else {
                    c.len
                };
                (index, len)
            })
            .collect()
    }

    /// The vision features of a prompt's images: cached ones reused, the rest encoded
    /// together in one batch of tiles and cached.
    fn encode_images(&mut self, index: usize, report: &mut StepReport) -> candle_core::Result<()> {
        let seq = &mut self.running[index];
        let pixels = seq
            .request
            .prompt
            .pixel_values
            .take()
            .expect("checked by the caller. This is a bug.");
        let images = &seq.request.prompt.images;
        let mut parts: Vec<Option<Tensor>> = images.iter().map(|image| self.vision_cache.get(&image.key)).collect();
        // Tiles of images to encode, each key once.
        let mut misses: Vec<(Tensor, usize)> = Vec::new();
        let mut first_tile = 0;
        for (i, image) in images.iter().enumerate() {
            let repeat = images[..i].iter().any(|earlier| earlier.key == image.key);
            if parts[i].is_none() && !repeat {
                misses.push((pixels.narrow(0, first_tile, image.tiles)?, i));
            }
            first_tile += image.tiles;
        }
        report.vision_cache_hits += parts.iter().filter(|p| p.is_some()).count();
        report.vision_cache_misses += misses.len();
        if !misses.is_empty() {
            let tiles: Vec<Tensor> = misses.iter().map(|(t, _)| t.clone()).collect();
            let features = self
                .model
                .encode_images(&Tensor::cat(&tiles, 0)?.to_device(self.model.device())?)?;
            let rows_per_tile = self.model.info().image_seq_len;
            let mut row = 0;
            for &(_, i) in &misses {
                let rows = images[i].tiles * rows_per_tile;
                // A copy, so the cached entry owns exactly its rows.
                let own = if misses.len() == 1 {
                    features.clone()
                } else {
                    features.narrow(0, row, rows)?.copy()?
                };
                self.vision_cache.insert(images[i].key, own.clone());
                parts[i] = Some(own);
                row += rows;
            }
        }
        for i in 0..images.len() {
            if parts[i].is_none() {
                let earlier = images[..i].iter().position(|e| e.key == images[i].key);
                parts[i] = earlier.and_then(|j| parts[j].clone());
            }
        }
        let parts: Vec<Tensor> = parts
            .into_iter()
            .map(|p| p.expect("every image has features now. This is a bug."))
            .collect();
        seq.image_features = Some(Tensor::cat(&parts, 0)?);
        Ok(())
    }

    fn forward(&mut self, chunks: &[(usize, usize)], report: &mut StepReport) {
        let image_token = self.model.info().image_token_id;
        let mut lens = vec![None; self.running.len()];
        for &(index, len) in chunks {
            lens[index] = Some(len);
        }
        let mut logit_owners = Vec::new();
        let mut batch = Vec::with_capacity(chunks.len());
        for (index, seq) in self.running.iter_mut().enumerate() {
            let Some(len) = lens[index] else { continue };
            let start = seq.kv.len();
            let wants_logits = start + len == seq.tokens.len();
            if wants_logits {
                logit_owners.push(index);
            }
            if len == 1 && start >= seq.prompt_len {
                report.decode_tokens += 1;
            } else {
                report.prefill_tokens += len;
            }
            let tokens = &seq.tokens[start..start + len];
            let image_features = chunk_features(seq, start, len, image_token);
            batch.push(SequenceInput {
                tokens,
                image_features,
                kv: &mut seq.kv,
                wants_logits,
            });
        }
        report.batch_sequences = batch.len();
        let started = Instant::now();
        let result = self
            .model
            .forward(&mut batch, &mut self.pool)
            .and_then(|l| l.to_vec2::<f32>());
        drop(batch);
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                let indices: Vec<usize> = chunks.iter().map(|&(i, _)| i).collect();
                self.fail(&indices, &err.to_string(), report);
                return;
            }
        };
        let mut finished = Vec::new();
        for (row, index) in logit_owners.into_iter().enumerate() {
            let seq = &mut self.running[index];
            if seq.accept(&logits[row], &self.tokenizer, &self.eos).is_some() {
                finished.push(index);
            }
        }
        report.forward = started.elapsed();
        for index in finished.into_iter().rev() {
            let mut seq = self.running.remove(index);
            self.pool.release(&mut seq.kv);
        }
    }

    fn fail(&mut self, indices: &[usize], message: &str, report: &mut StepReport) {
        tracing::error!(%message, sequences = indices.len(), "a step failed");
        let mut sorted = indices.to_vec();
        sorted.sort_unstable();
        for index in sorted.into_iter().rev() {
            let mut seq = self.running.remove(index);
            seq.send(SequenceEvent::Failed(EngineFailure::Model(message.to_string())));
            self.pool.release(&mut seq.kv);
            report.failed += 1;
        }
    }
}

/// Vision features for the image tokens in `tokens[start..start + len]` of a prompt.
fn chunk_features(seq: &Sequence, start: usize, len: usize, image_token: u32) -> Option<Tensor> {
    // add() checked that the prompt's image tokens and features agree in number.
    let features = seq.image_features.as_ref()?;
    let end = (start + len).min(seq.prompt_len);
    if start >= end {
        return None;
    }
    let before = seq.tokens[..start].iter().filter(|&&t| t == image_token).count();
    let rows = seq.tokens[start..end].iter().filter(|&&t| t == image_token).count();
    if rows == 0 {
        return None;
    }
    Some(
        features
            .narrow(0, before, rows)
            .expect("features cover every image token. This is a bug."),
    )
}
