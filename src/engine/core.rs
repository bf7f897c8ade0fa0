//! The engine's state and its step: the model, the KV pool, waiting and running sequences.
//! Each `step` drops cancelled and expired sequences, asks the scheduler for a plan,
//! preempts and admits as planned, encodes the images of prompts that start, runs one
//! forward pass over the ragged batch, samples, and sends each sequence's events. The
//! engine thread calls it in a loop; the CLI, tests and benchmarks call it directly.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;

use super::constraint::{Allowed, Constraint, GrammarError};
use super::request::{AddError, EngineFailure, EventSender, GenerationRequest, SequenceEvent, admit};
use super::scheduler::{Limits, Plan, Waiting, Who, plan_step};
use super::sequence::{SeqId, Sequence, Vision};
use super::vision::{self, VisionDone, VisionWorker};
use super::vision_cache::VisionCache;
use crate::kv::{BLOCK_TOKENS, BlockHash, ImageSlots, KvPool, block_hashes};
use crate::model::{ContentKey, ImageFeatures, ModelInfo, SequenceInput, VisionLanguageModel};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    /// Most tokens in one step (decodes plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Most tokens a sequence may reach (prompt plus output).
    pub max_model_len: usize,
    /// Memory for vision features of recent images (0: no cache).
    pub vision_cache_bytes: usize,
    /// Reuse the KV blocks of prompts' common prefixes (see `kv`).
    pub prefix_caching: bool,
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
    /// Vision encoding of prompts that started, in all and per prompt.
    pub vision: Duration,
    pub vision_encodes: Vec<Duration>,
    /// Images whose features came from the cache, and images encoded.
    pub vision_cache_hits: usize,
    pub vision_cache_misses: usize,
    /// Tokens of newly admitted prompts, and how many of them came from cached KV blocks.
    pub prefix_queried_tokens: usize,
    pub prefix_hit_tokens: usize,
    /// Ready requests that sat this step out because another sequence computes their next
    /// prompt block in it.
    pub prefix_deferred: usize,
    /// The forward pass (and sampling).
    pub forward: Duration,
    /// Computing the grammars' token masks of the step (alongside the forward pass), when
    /// any sequence is constrained.
    pub masks: Option<Duration>,
}

impl StepReport {
    pub fn did_work(&self) -> bool {
        self.prefill_tokens + self.decode_tokens > 0
    }
}

pub struct EngineCore {
    model: Arc<dyn VisionLanguageModel>,
    pool: KvPool,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    /// In admission order: the youngest is last.
    running: Vec<Sequence>,
    next_id: SeqId,
    vision_cache: VisionCache,
    vision: VisionWorker,
    /// The images each sequence has on the vision thread now.
    encoding: std::collections::HashMap<SeqId, Vec<ContentKey>>,
    /// Vision work since the last report (cache lookups happen when requests arrive).
    unreported: StepReport,
}

impl EngineCore {
    pub fn new(
        model: Arc<dyn VisionLanguageModel>,
        pool: KvPool,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        config: EngineConfig,
    ) -> Self {
        let vision_cache = VisionCache::new(config.vision_cache_bytes);
        let vision = VisionWorker::spawn(model.clone());
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
            encoding: std::collections::HashMap::new(),
            vision,
            unreported: StepReport::default(),
        }
    }

    pub fn model(&self) -> &dyn VisionLanguageModel {
        self.model.as_ref()
    }

    pub fn info(&self) -> &ModelInfo {
        self.model.info()
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

    /// The adapters of the running and of the waiting sequences, each named once, sorted.
    pub fn adapters_in_use(&self) -> (Vec<String>, Vec<String>) {
        fn names<'a>(seqs: impl Iterator<Item = &'a Sequence>) -> Vec<String> {
            let mut names: Vec<String> = seqs
                .filter_map(|s| s.adapter.as_ref().map(|a| a.name().to_string()))
                .collect();
            names.sort();
            names.dedup();
            names
        }
        (names(self.running.iter()), names(self.waiting.iter()))
    }

    pub fn max_model_len(&self) -> usize {
        self.config.max_model_len.min(self.pool.capacity_tokens())
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Whether a step could compute something now (not only wait for the vision thread).
    pub fn has_runnable_work(&self) -> bool {
        !self.running.is_empty() || self.waiting.iter().any(Sequence::is_ready)
    }

    /// Images being encoded on the vision thread.
    pub fn vision_in_flight(&self) -> usize {
        self.vision.in_flight()
    }

    /// The vision thread's results, to wait on together with other channels.
    pub fn vision_results(&self) -> &crossbeam_channel::Receiver<VisionDone> {
        self.vision.results()
    }

    /// Blocks until the vision thread finishes a job (or `timeout`), and takes it in.
    pub fn wait_for_vision(&mut self, timeout: Duration) {
        if let Some(done) = self.vision.wait(timeout) {
            self.take_vision(done);
        }
    }

    /// Queues one choice of a request; its events go to `events`.
    pub fn add(&mut self, request: GenerationRequest, choice: usize, events: EventSender) -> Result<SeqId, AddError> {
        let max_tokens = admit(
            &request.prompt,
            &request.params,
            self.model.info(),
            self.max_model_len(),
        )?;
        let id = self.next_id;
        self.next_id += 1;
        let seed = (request.params.sampling.seed).map_or(id, |s| s.wrapping_add(choice as u64));
        let hashes = if self.config.prefix_caching {
            let images: Vec<(usize, [u8; 32])> = request.prompt.images.iter().map(|i| (i.tokens, i.key)).collect();
            let slots = ImageSlots {
                tokens: &self.model.info().image_token_ids,
                images: &images,
            };
            let adapter = request.adapter.as_ref().map_or(0, |a| a.id());
            block_hashes(&request.prompt.token_ids, &slots, adapter)
        } else {
            Vec::new()
        };
        let mut seq = Sequence::new(id, choice, request, max_tokens, events, seed);
        seq.block_hashes = hashes;
        if !vision::waits_on(&seq, &self.vision_cache, &self.encoding)
            && let Err(err) = self.start_vision(&mut seq)
        {
            seq.send(SequenceEvent::Failed(EngineFailure::Model(err.to_string())));
            return Ok(id);
        }
        self.waiting.push_back(seq);
        Ok(id)
    }

    /// Starts a sequence's vision work (cache hits now, the rest to the vision thread).
    fn start_vision(&mut self, seq: &mut Sequence) -> candle_core::Result<()> {
        let started = vision::start(seq, &mut self.vision_cache, &mut self.vision)?;
        self.unreported.vision_cache_hits += started.hits;
        self.unreported.vision_cache_misses += started.encoding.len();
        if !started.encoding.is_empty() {
            self.encoding.insert(seq.id, started.encoding);
        }
        Ok(())
    }

    /// Starts the deferred sequences whose images are no longer being encoded elsewhere
    /// (now cached, or the other sequence is gone and they must encode them themselves).
    fn start_deferred(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let seq = &self.waiting[i];
            let deferred = matches!(seq.vision, Vision::Waiting(_));
            if !deferred || vision::waits_on(seq, &self.vision_cache, &self.encoding) {
                i += 1;
                continue;
            }
            let mut seq = self.waiting.remove(i).expect("i < len. This is a bug.");
            match self.start_vision(&mut seq) {
                Ok(()) => {
                    self.waiting.insert(i, seq);
                    i += 1;
                }
                Err(err) => {
                    seq.send(SequenceEvent::Failed(EngineFailure::Model(err.to_string())));
                    self.unreported.failed += 1;
                }
            }
        }
    }

    /// Fails every sequence (shutdown past its deadline).
    pub fn abort_all(&mut self, failure: EngineFailure) {
        for mut seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            seq.send(SequenceEvent::Failed(failure.clone()));
            self.pool.release(&mut seq.kv);
        }
    }

    pub fn step(&mut self) -> StepReport {
        for done in self.vision.finished() {
            self.take_vision(done);
        }
        self.start_deferred();
        let mut report = std::mem::take(&mut self.unreported);
        self.drop_gone(&mut report);
        let running: Vec<_> = self.running.iter().map(Sequence::as_running).collect();
        // Requests whose images are still encoding wait outside the queue's order.
        let ready: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| self.waiting[i].is_ready())
            .collect();
        // Only the first few can join this step (max_num_seqs): the prefix cache is looked up
        // for those, not for the whole queue on every step.
        let can_join = self.config.max_num_seqs.saturating_sub(self.running.len());
        // A request whose next uncached prompt block another sequence computes in this step
        // sits the step out and takes that block from the cache in the next: a burst of
        // requests with the same image or system prompt prefills it once, not once each.
        let mut computing: HashSet<BlockHash> = (self.running.iter())
            .filter_map(Sequence::next_uncached_block)
            .collect();
        let (mut waiting, mut ready_now) = (Vec::new(), Vec::new());
        for (k, &i) in ready.iter().enumerate() {
            let planned = self.plan_prefix(i, k < can_join);
            let next = self.waiting[i].next_uncached_block();
            if next.is_some_and(|hash| !computing.insert(hash)) {
                report.prefix_deferred += 1;
                continue;
            }
            waiting.push(planned);
            ready_now.push(i);
        }
        let ready = ready_now;
        let limits = Limits {
            max_num_seqs: self.config.max_num_seqs,
            token_budget: self.config.max_batch_tokens,
        };
        let plan = plan_step(&running, &waiting, self.pool.free_blocks(), limits);
        if plan.chunks.is_empty() && plan.preempt.is_empty() {
            return report;
        }
        self.preempt_and_admit(&plan, &ready[..plan.admit], &mut report);
        let chunks = self.resolve_chunks(&plan);
        for &(index, len) in &chunks {
            let grown = self.pool.grow(&mut self.running[index].kv, len);
            debug_assert!(grown, "the plan counted these blocks. This is a bug.");
        }
        self.forward(&chunks, &mut report);
        report
    }

    /// A ready waiting sequence as the planner sees it, after looking up its cached prefix
    /// (shared on admission; nothing changes the cache in between, as the plan admits only
    /// when it preempts nobody).
    fn plan_prefix(&mut self, index: usize, look_up: bool) -> Waiting {
        let seq = &mut self.waiting[index];
        seq.prefix_blocks = 0;
        let mut waiting = seq.as_waiting();
        if look_up && seq.kv.is_empty() && !seq.block_hashes.is_empty() {
            let (blocks, reclaims) = self.pool.peek_prefix(seq.reusable_hashes());
            seq.prefix_blocks = blocks;
            waiting.pending -= blocks * BLOCK_TOKENS;
            waiting.reclaims = reclaims;
        }
        waiting
    }

    /// Attaches the vision thread's output to its sequence (if it is still waiting).
    fn take_vision(&mut self, done: VisionDone) {
        self.encoding.remove(&done.seq);
        if done.encoded {
            self.unreported.vision += done.took;
            self.unreported.vision_encodes.push(done.took);
        }
        let Some(index) = self.waiting.iter().position(|s| s.id == done.seq) else {
            return;
        };
        let seq = &mut self.waiting[index];
        let result = done
            .features
            .and_then(|f| vision::finish(seq, f, &mut self.vision_cache).map_err(|e| e.to_string()));
        if let Err(message) = result {
            tracing::error!(%message, "vision encoding failed");
            let seq = self.waiting.remove(index).expect("index found above. This is a bug.");
            seq.send(SequenceEvent::Failed(EngineFailure::Model(message)));
            self.unreported.failed += 1;
        }
    }

    fn drop_gone(&mut self, report: &mut StepReport) {
        let now = Instant::now();
        let pool = &mut self.pool;
        let mut keep = |seq: &mut Sequence| {
            if seq.is_cancelled() {
                report.cancelled += 1;
            } else if seq.deadline.is_some_and(|d| now >= d) {
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

    fn preempt_and_admit(&mut self, plan: &Plan, admitted: &[usize], report: &mut StepReport) {
        // Victims are the youngest alive sequences, which the plan lists youngest first:
        // the tail of `running`. They go back to the front of the queue, oldest first.
        if let Some(&oldest_victim) = plan.preempt.last() {
            for mut seq in self.running.split_off(oldest_victim).into_iter().rev() {
                self.pool.release(&mut seq.kv);
                report.preempted += 1;
                self.waiting.push_front(seq);
            }
        }
        // The plan admits only when nothing was preempted, so `admitted` still indexes the
        // queue as it was planned. Taken from the back to keep earlier indices valid.
        let mut joining: Vec<Sequence> = admitted
            .iter()
            .rev()
            .map(|&i| self.waiting.remove(i).expect("planned from the queue. This is a bug."))
            .collect();
        joining.reverse();
        for mut seq in joining {
            if !seq.admitted_once {
                seq.admitted_once = true;
                report.queue_times.push(seq.arrived.elapsed());
                report.prefix_queried_tokens += seq.prompt_len;
            }
            if seq.prefix_blocks > 0 {
                let hashes = &seq.block_hashes[..seq.prefix_blocks];
                let hit = self.pool.share_prefix(&mut seq.kv, hashes);
                report.prefix_hit_tokens += hit;
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
                let len = c.len.min(seq.pending());
                let crosses = start < seq.prompt_len && start + len > seq.prompt_len;
                let len = if crosses && !seq.images.is_empty() {
                    seq.prompt_len - start
                } else {
                    len
                };
                (index, len)
            })
            .collect()
    }

    fn forward(&mut self, chunks: &[(usize, usize)], report: &mut StepReport) {
        let info = self.model.info();
        let mut lens = vec![None; self.running.len()];
        for &(index, len) in chunks {
            lens[index] = Some(len);
        }
        let mut logit_owners = Vec::new();
        let mut batch = Vec::with_capacity(chunks.len());
        let mut constrained = Vec::new();
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
            let image_features = chunk_features(seq, start, len, info);
            if let Some(constraint) = seq.constraint.as_mut().filter(|_| wants_logits) {
                constrained.push((index, constraint));
            }
            batch.push(SequenceInput {
                tokens,
                positions: seq.positions.as_ref(),
                image_features,
                kv: &mut seq.kv,
                wants_logits,
                adapter: seq.adapter.as_deref(),
            });
        }
        report.batch_sequences = batch.len();
        let started = Instant::now();
        let model = &self.model;
        let pool = &mut self.pool;
        // The grammars' masks depend only on tokens already taken: they are computed on a
        // thread of their own while the forward pass runs, not after it.
        let constrained_indices: Vec<usize> = constrained.iter().map(|&(i, _)| i).collect();
        let (result, masks) = std::thread::scope(|scope| {
            let masking = (!constrained.is_empty()).then(|| scope.spawn(move || masks(constrained)));
            let result = model.forward(&mut batch, pool).and_then(|l| l.to_vec2::<f32>());
            (result, masking.map(|m| m.join()))
        });
        drop(batch);
        let (allowed, mask_time) = match masks {
            None => Default::default(),
            Some(Ok(masks)) => masks,
            // A grammar library that panicked fails its sequences, not the engine.
            Some(Err(_)) => {
                let failed = |_| Err(GrammarError("the grammar's mask computation panicked".into()));
                (
                    constrained_indices.into_iter().map(|i| (i, failed(i))).collect(),
                    Duration::ZERO,
                )
            }
        };
        report.masks = (mask_time > Duration::ZERO).then_some(mask_time);
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                let indices: Vec<usize> = chunks.iter().map(|&(i, _)| i).collect();
                self.fail(&indices, &err.to_string(), report);
                return;
            }
        };
        for &(index, len) in chunks {
            let seq = &self.running[index];
            if seq.kv.len() - len < seq.prompt_len && !seq.block_hashes.is_empty() {
                self.pool.register(&seq.kv, &seq.block_hashes);
            }
        }
        self.sample(&logit_owners, &logits, allowed, report);
        report.forward = started.elapsed();
    }

    /// Samples each logit owner's next token from its row of `logits` (within its grammar's
    /// `allowed` tokens), then removes the sequences that finished or whose grammar failed.
    fn sample(
        &mut self,
        owners: &[usize],
        logits: &[Vec<f32>],
        mut allowed: HashMap<usize, Result<Allowed, GrammarError>>,
        report: &mut StepReport,
    ) {
        let mut done: Vec<(usize, Option<GrammarError>)> = Vec::new();
        for (row, &index) in owners.iter().enumerate() {
            let mask = match allowed.remove(&index) {
                Some(Ok(mask)) => Some(mask),
                Some(Err(error)) => {
                    done.push((index, Some(error)));
                    continue;
                }
                None => None,
            };
            let seq = &mut self.running[index];
            if seq
                .accept(&logits[row], mask.as_ref(), &self.tokenizer, &self.eos)
                .is_some()
            {
                done.push((index, None));
            }
        }
        done.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (index, error) in done {
            let mut seq = self.running.remove(index);
            if let Some(error) = error {
                tracing::error!(%error, "a grammar failed mid-generation");
                let message = format!("the output grammar failed: {error}");
                seq.send(SequenceEvent::Failed(EngineFailure::Model(message)));
                report.failed += 1;
            }
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
fn chunk_features(seq: &Sequence, start: usize, len: usize, info: &ModelInfo) -> Option<ImageFeatures> {
    // add() checked that the prompt's image tokens and features agree in number.
    let features = seq.image_features()?;
    let end = (start + len).min(seq.prompt_len);
    if start >= end {
        return None;
    }
    let before = seq.tokens[..start].iter().filter(|&&t| info.is_image_token(t)).count();
    let rows = seq.tokens[start..end]
        .iter()
        .filter(|&&t| info.is_image_token(t))
        .count();
    if rows == 0 {
        return None;
    }
    Some(
        features
            .narrow(before, rows)
            .expect("features cover every image token. This is a bug."),
    )
}

/// Each constrained sequence's allowed tokens, by its index, and the time they took.
fn masks(constrained: Vec<(usize, &mut Constraint)>) -> (HashMap<usize, Result<Allowed, GrammarError>>, Duration) {
    let started = Instant::now();
    let masks = constrained.into_iter().map(|(index, c)| (index, c.allowed())).collect();
    (masks, started.elapsed())
}
