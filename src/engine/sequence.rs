//! One sequence inside the engine: its tokens (prompt, then output), where its images'
//! features stand, KV blocks, sampler, detokenizer and stop strings, and the channel its
//! events go to.

use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::constraint::{Allowed, Constraint};
use super::detokenizer::Detokenizer;
use super::request::{
    ChoiceEvent, EventSender, FinishReason, GenerationParams, GenerationRequest, SequenceEvent, Usage,
};
use super::sampling::{Sampler, logprobs};
use super::scheduler::{Running, Waiting};
use super::stop::{StopCheck, StopStrings};
use crate::kv::{BlockHash, SequenceKv};
use crate::model::lora::Adapter;
use crate::model::{ContentKey, ImageFeatures, Pixels, TokenPositions};

pub type SeqId = u64;

/// An image of the prompt as the engine keeps it once its pixels are handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSlot {
    pub key: ContentKey,
    pub tokens: usize,
}

/// Where a sequence's image features stand. Only `Ready` sequences are scheduled.
pub enum Vision {
    /// Not started: waiting for another sequence's encoding of one of its images, to take
    /// it from the cache instead of encoding it again. Its pixels, per image.
    Waiting(Vec<Pixels>),
    /// On the vision thread; per image, the features known so far (cache hits). The ticket
    /// goes with the sequence: dropped with it, the job is skipped if not yet started.
    Encoding(Vec<Option<ImageFeatures>>, super::vision::Ticket),
    /// Every image's features, in prompt order, as one (`None`: a text prompt). Kept so that
    /// a preempted sequence is recomputed without the vision encoder.
    Ready(Option<ImageFeatures>),
}

pub struct Sequence {
    pub id: SeqId,
    pub choice: usize,
    pub events: EventSender,
    pub params: GenerationParams,
    /// `params.max_tokens`, resolved against the context length at admission.
    pub max_tokens: usize,
    /// The prompt's images, in order.
    pub images: Vec<ImageSlot>,
    pub positions: Option<TokenPositions>,
    pub adapter: Option<Arc<Adapter>>,
    pub deadline: Option<Instant>,
    /// The prompt, then every sampled token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub vision: Vision,
    pub kv: SequenceKv,
    /// Content hashes of the prompt's full KV blocks (empty without prefix caching).
    pub block_hashes: Vec<BlockHash>,
    /// Cached blocks found for its prompt when the step was planned, shared on admission.
    pub prefix_blocks: usize,
    pub arrived: Instant,
    pub admitted_once: bool,
    /// Where its output stands in the grammar it must follow, if any.
    pub constraint: Option<Constraint>,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stops: StopStrings,
}

impl Sequence {
    /// Choice `choice` of an admitted request; `max_tokens` is its resolved budget.
    pub fn new(
        id: SeqId,
        choice: usize,
        request: GenerationRequest,
        max_tokens: usize,
        events: EventSender,
        seed: u64,
    ) -> Self {
        let prompt = request.prompt;
        let sampler = Sampler::new(request.params.sampling.clone(), seed);
        let stops = StopStrings::new(request.params.stop.clone());
        // An adapter that changes the vision tower has features of its own: keyed apart.
        let images = (prompt.images.iter())
            .map(|i| ImageSlot {
                key: request.adapter.as_ref().map_or(i.key, |a| a.image_key(i.key)),
                tokens: i.tokens,
            })
            .collect();
        let vision = match prompt.images.is_empty() {
            true => Vision::Ready(None),
            false => Vision::Waiting(prompt.images.into_iter().map(|i| i.pixels).collect()),
        };
        let constraint = request.params.grammar.as_ref().map(|g| g.constraint());
        Self {
            id,
            choice,
            events,
            constraint,
            params: request.params,
            max_tokens,
            images,
            positions: prompt.positions,
            adapter: request.adapter,
            deadline: request.deadline,
            prompt_len: prompt.token_ids.len(),
            tokens: prompt.token_ids,
            vision,
            kv: SequenceKv::default(),
            block_hashes: Vec::new(),
            prefix_blocks: 0,
            arrived: request.arrived,
            admitted_once: false,
            sampler,
            detokenizer: Detokenizer::default(),
            stops,
        }
    }

    /// Whether its image features are all in hand (or it has none): it may be scheduled.
    pub fn is_ready(&self) -> bool {
        matches!(self.vision, Vision::Ready(_))
    }

    /// Its image features, once ready.
    pub fn image_features(&self) -> Option<&ImageFeatures> {
        match &self.vision {
            Vision::Ready(features) => features.as_ref(),
            _ => None,
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

    /// Samples a token from `logits` (only among those `allowed` when the sequence is
    /// constrained): updates text, stop strings and finish state, and sends the events.
    /// Returns the finish reason once the sequence is done.
    pub fn accept(
        &mut self,
        logits: &[f32],
        allowed: Option<&Allowed>,
        tokenizer: &Tokenizer,
        eos: &[u32],
    ) -> Option<FinishReason> {
        let masked;
        let logits = match allowed {
            Some(allowed) => {
                masked = mask(logits, allowed);
                &masked[..]
            }
            None => logits,
        };
        let params = &self.params;
        let before_min = self.output().len() < params.min_tokens;
        let mut banned: Vec<u32> = if before_min && !params.ignore_eos {
            eos.iter().chain(&params.stop_token_ids).copied().collect()
        } else {
            Vec::new()
        };
        // A complete grammar allows nothing but the end: it outranks `min_tokens`.
        let any_left =
            |banned: &[u32]| (logits.iter().enumerate()).any(|(i, l)| l.is_finite() && !banned.contains(&(i as u32)));
        if allowed.is_some() && !banned.is_empty() && !any_left(&banned) {
            banned.clear();
        }
        let (prompt, output) = self.tokens.split_at(self.prompt_len);
        let token = self.sampler.sample(logits, prompt, output, &banned);
        self.tokens.push(token);
        // A grammar allows an end-of-sequence token only once complete: it ends the output,
        // `ignore_eos` or not.
        let grammar_done = match &mut self.constraint {
            Some(constraint) => {
                constraint.take(token);
                eos.contains(&token)
            }
            None => false,
        };
        // Under a grammar, the log-probabilities of the distribution sampled from (vLLM's).
        let logprobs = self.params.logprobs.map(|top| logprobs(logits, token, top));
        let delta = self.detokenizer.push(tokenizer, token);
        let (text, stopped) = if before_min {
            (delta, false)
        } else {
            match self.stops.push(&delta) {
                StopCheck::Continue(text) => (text, false),
                StopCheck::Stop(text) => (text, true),
            }
        };
        let params = &self.params;
        let is_stop_token = !params.ignore_eos && (eos.contains(&token) || params.stop_token_ids.contains(&token));
        let finish = if stopped || is_stop_token || grammar_done {
            Some(FinishReason::Stop)
        } else if self.output().len() >= self.max_tokens {
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

/// `logits` with every token the grammar does not allow at minus infinity.
fn mask(logits: &[f32], allowed: &Allowed) -> Vec<f32> {
    let mut masked = logits.to_vec();
    allowed.apply(&mut masked);
    masked
}
