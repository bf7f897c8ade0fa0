//! One sequence inside the engine: its tokens (prompt, then output), KV blocks, sampler,
//! detokenizer and stop strings, and the channel its events go to.

use std::time::Instant;

use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::detokenizer::Detokenizer;
use super::request::{ChoiceEvent, EventSender, FinishReason, GenerationRequest, SequenceEvent, Usage};
use super::sampling::{Sampler, logprobs};
use super::scheduler::{Running, Waiting};
use super::stop::{StopCheck, StopStrings};
use crate::kv::{BlockHash, SequenceKv};

pub type SeqId = u64;

pub struct Sequence {
    pub id: SeqId,
    pub choice: usize,
    pub events: EventSender,
    pub request: GenerationRequest,
    /// The prompt, then every sampled token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Vision features of the prompt's image tokens; kept so a preempted sequence can be
    /// recomputed without the vision encoder.
    pub image_features: Option<Tensor>,
    /// Per image, its features while they are being gathered (cache or encoder).
    pub image_parts: Vec<Option<Tensor>>,
    /// Waiting for the vision thread: not schedulable yet.
    pub vision_pending: bool,
    /// Waiting for another sequence's encoding of the same image, to take it from the cache
    /// instead of encoding it again; its own vision work has not started.
    pub vision_deferred: bool,
    pub kv: SequenceKv,
    /// Content hashes of the prompt's full KV blocks (empty without prefix caching).
    pub block_hashes: Vec<BlockHash>,
    /// Cached blocks found for its prompt when the step was planned, shared on admission.
    pub prefix_blocks: usize,
    pub arrived: Instant,
    pub admitted_once: bool,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopStrings,
}

impl Sequence {
    pub fn new(id: SeqId, choice: usize, request: GenerationRequest, events: EventSender, seed: u64) -> Self {
        let tokens = request.prompt.token_ids.clone();
        let sampler = Sampler::new(request.sampling.clone(), seed);
        let stops = StopStrings::new(request.stop.clone());
        Self {
            id,
            choice,
            events,
            prompt_len: tokens.len(),
            tokens,
            image_features: None,
            image_parts: Vec::new(),
            vision_pending: false,
            vision_deferred: false,
            kv: SequenceKv::default(),
            block_hashes: Vec::new(),
            prefix_blocks: 0,
            arrived: request.arrived,
            admitted_once: false,
            sampler,
            detokenizer: Detokenizer::default(),
            stops,
            request,
        }
    }

    /// Tokens not yet in the KV cache.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn as_running(&self) -> Running {
        Running {
            pending: self.pending(),
            kv_len: self.kv.len(),
            blocks: self.kv.blocks(),
        }
    }

    pub fn as_waiting(&self) -> Waiting {
        Waiting::new(self.pending())
    }

    /// Its blocks that a cached prefix may supply: full blocks before the last token, which
    /// must be computed for its logits.
    pub fn reusable_hashes(&self) -> &[BlockHash] {
        let blocks = (self.tokens.len() - 1) / crate::kv::BLOCK_TOKENS;
        &self.block_hashes[..blocks.min(self.block_hashes.len())]
    }

    /// The hash of the first prompt block it would compute that a cache could have supplied:
    /// for a waiting sequence, the first reusable block past its cached prefix; for one
    /// still prefilling, the block its next chunk starts in. None when there is none left.
    pub fn next_uncached_block(&self) -> Option<BlockHash> {
        let next = if self.kv.is_empty() {
            self.prefix_blocks
        } else if self.kv.len() < self.prompt_len {
            self.kv.len() / crate::kv::BLOCK_TOKENS
        } else {
            return None;
        };
        self.reusable_hashes().get(next).copied()
    }

    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    pub fn send(&self, event: SequenceEvent) {
        // A closed channel means the client left; the next step drops the sequence.
        let _ = self.events.send(ChoiceEvent {
            choice: self.choice,
            event,
        });
    }

    /// Takes a sampled token: updates text, stop strings and finish state, and sends the
    /// events. Returns the finish reason once the sequence is done.
    pub fn accept(&mut self, logits: &[f32], tokenizer: &Tokenizer, eos: &[u32]) -> Option<FinishReason> {
        let request = &self.request;
        let before_min = self.output().len() < request.min_tokens;
        let banned: Vec<u32> = if before_min && !request.ignore_eos {
            eos.iter().chain(&request.stop_token_ids).copied().collect()
        } else {
            Vec::new()
        };
        let (prompt, output) = self.tokens.split_at(self.prompt_len);
        let token = self.sampler.sample(logits, prompt, output, &banned);
        self.tokens.push(token);
        let logprobs = self.request.logprobs.map(|top| logprobs(logits, token, top));
        let delta = self.detokenizer.push(tokenizer, token);
        let (text, stopped) = if before_min {
            (delta, false)
        } else {
            match self.stops.push(&delta) {
                StopCheck::Continue(text) => (text, false),
                StopCheck::Stop(text) => (text, true),
            }
        };
        let request = &self.request;
        let is_stop_token = !request.ignore_eos && (eos.contains(&token) || request.stop_token_ids.contains(&token));
        let finish = if stopped || is_stop_token {
            Some(FinishReason::Stop)
        } else if self.output().len() >= request.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.send(SequenceEvent::Token { token, text, logprobs });
        if let Some(reason) = finish {
            let tail = if stopped { String::new() } else { self.flush(tokenizer) };
            let usage = Usage {
                prompt_tokens: self.prompt_len,
                completion_tokens: self.output().len(),
            };
            self.send(SequenceEvent::Finished {
                text: tail,
                reason,
                usage,
            });
        }
        finish
    }

    fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        let rest = self.detokenizer.flush(tokenizer);
        match self.stops.push(&rest) {
            StopCheck::Stop(text) => text,
            StopCheck::Continue(text) => text + &self.stops.flush(),
        }
    }
}
