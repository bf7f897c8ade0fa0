//! A synchronous driver of the model over many sequences at once: each `step` plans a
//! ragged batch (decodes plus prompt chunks), encodes the images of prompts that start,
//! runs one forward pass, samples, and retires finished sequences. The one-shot CLI, the
//! tests and the benchmarks use it directly.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::sampling::{Sampler, SamplingParams};
use super::scheduler::{Chunk, SequenceState, plan_step};
use crate::kv::SequenceKv;
use crate::model::{SequenceInput, VisionLanguageModel};
use crate::processor::Prompt;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt ({prompt} tokens) plus `max_tokens` ({max_tokens}) exceeds the model's {limit} positions")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {found} image tokens but its images make {expected}")]
    ImageTokens { found: usize, expected: usize },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// End-of-sequence tokens cannot be sampled before this many tokens.
    pub min_tokens: usize,
    /// Keep generating past end-of-sequence tokens, up to `max_tokens`.
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Where a sequence's time went; steps shared with other sequences count in full.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub vision: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    pub decode_steps: usize,
}

/// What one step carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepStats {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub timings: Timings,
}

struct Sequence {
    request: GenerationRequest,
    kv: SequenceKv,
    sampler: Sampler,
    prefilled: usize,
    /// Vision features of all image tokens of the prompt, once encoded.
    image_features: Option<Tensor>,
    /// Feature rows already placed in earlier prompt chunks.
    image_rows_used: usize,
    output: Vec<u32>,
    finish: Option<FinishReason>,
    timings: Timings,
}

impl Sequence {
    /// This sequence's part of a step: its last sampled token, or a prompt chunk with the
    /// vision features of the image tokens in it.
    fn input(&mut self, chunk: Chunk, image_token: u32, wants_logits: bool) -> candle_core::Result<SequenceInput<'_>> {
        if chunk.decode {
            let last = self
                .output
                .last()
                .expect("decoding follows a sampled token. This is a bug.");
            let tokens = std::slice::from_ref(last);
            return Ok(SequenceInput {
                tokens,
                image_features: None,
                kv: &mut self.kv,
                wants_logits,
            });
        }
        let tokens = &self.request.prompt.token_ids[chunk.start..chunk.start + chunk.len];
        let rows = tokens.iter().filter(|&&t| t == image_token).count();
        let image_features = if rows == 0 {
            None
        } else {
            let features = self
                .image_features
                .as_ref()
                .expect("add() checked the prompt has images. This is a bug.");
            Some(features.narrow(0, self.image_rows_used, rows)?)
        };
        self.image_rows_used += rows;
        Ok(SequenceInput {
            tokens,
            image_features,
            kv: &mut self.kv,
            wants_logits,
        })
    }

    fn state(&self) -> SequenceState {
        SequenceState {
            prompt_len: self.request.prompt.token_ids.len(),
            prefilled: self.prefilled,
            finished: self.finish.is_some(),
        }
    }
}

pub struct Generator<'m> {
    model: &'m dyn VisionLanguageModel,
    eos_token_ids: Vec<u32>,
    token_budget: usize,
    seqs: Vec<Sequence>,
}

impl<'m> Generator<'m> {
    /// `token_budget`: the most tokens one step may carry (decodes plus prompt chunks).
    pub fn new(model: &'m dyn VisionLanguageModel, eos_token_ids: &[u32], token_budget: usize) -> Self {
        Self {
            model,
            eos_token_ids: eos_token_ids.to_vec(),
            token_budget: token_budget.max(1),
            seqs: Vec::new(),
        }
    }

    /// Adds a sequence; it joins the next step. Returns its index.
    pub fn add(&mut self, request: GenerationRequest) -> Result<usize, GenerateError> {
        let prompt = request.prompt.token_ids.len();
        if prompt == 0 {
            return Err(GenerateError::EmptyPrompt);
        }
        let info = self.model.info();
        let image_tokens = request
            .prompt
            .token_ids
            .iter()
            .filter(|&&t| t == info.image_token_id)
            .count();
        let expected = request.prompt.tiles * info.image_seq_len;
        if image_tokens != expected || (request.prompt.tiles > 0) != request.prompt.pixel_values.is_some() {
            return Err(GenerateError::ImageTokens {
                found: image_tokens,
                expected,
            });
        }
        let limit = info.max_positions;
        if prompt + request.max_tokens > limit {
            return Err(GenerateError::TooLong {
                prompt,
                max_tokens: request.max_tokens,
                limit,
            });
        }
        let kv = SequenceKv::new(&self.model.kv_spec(), prompt + request.max_tokens)?;
        let sampler = Sampler::new(request.sampling.clone(), self.seqs.len() as u64);
        self.seqs.push(Sequence {
            request,
            kv,
            sampler,
            prefilled: 0,
            image_features: None,
            image_rows_used: 0,
            output: Vec::new(),
            finish: None,
            timings: Timings::default(),
        });
        Ok(self.seqs.len() - 1)
    }

    /// Runs every sequence to its end and returns the generations in the order added.
    pub fn run(mut self) -> Result<Vec<Generation>, GenerateError> {
        while self.step()?.is_some() {}
        Ok(self.finish())
    }

    /// The generations, in the order added, once `step` has returned `None`.
    pub fn finish(self) -> Vec<Generation> {
        self.seqs
            .into_iter()
            .map(|s| Generation {
                prompt_tokens: s.request.prompt.token_ids.len(),
                tokens: s.output,
                finish_reason: s
                    .finish
                    .expect("run() steps until every sequence finished. This is a bug."),
                timings: s.timings,
            })
            .collect()
    }

    /// One iteration; `None` when no sequence has work left.
    pub fn step(&mut self) -> Result<Option<StepStats>, GenerateError> {
        let states: Vec<SequenceState> = self.seqs.iter().map(Sequence::state).collect();
        let plan = plan_step(&states, self.token_budget);
        if plan.is_empty() {
            return Ok(None);
        }
        let stats = StepStats {
            decode_tokens: plan.iter().filter(|c| c.decode).count(),
            prefill_tokens: plan.iter().filter(|c| !c.decode).map(|c| c.len).sum(),
        };
        for chunk in plan.iter().filter(|c| !c.decode && c.start == 0) {
            self.encode_images(chunk.index)?;
        }
        let started = Instant::now();
        let mut order = vec![None; self.seqs.len()];
        for chunk in &plan {
            order[chunk.index] = Some(*chunk);
        }
        let image_token = self.model.info().image_token_id;
        let mut logit_owners = Vec::new();
        let mut inputs = Vec::with_capacity(plan.len());
        for (index, seq) in self.seqs.iter_mut().enumerate() {
            let Some(chunk) = order[index] else { continue };
            let wants_logits = chunk.decode || chunk.start + chunk.len == seq.request.prompt.token_ids.len();
            if wants_logits {
                logit_owners.push(index);
            }
            inputs.push(seq.input(chunk, image_token, wants_logits)?);
        }
        let logits = self.model.forward(&mut inputs)?;
        drop(inputs);
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let elapsed = started.elapsed();
        for chunk in &plan {
            let seq = &mut self.seqs[chunk.index];
            if chunk.decode {
                seq.timings.decode += elapsed;
                seq.timings.decode_steps += 1;
            } else {
                seq.timings.prefill += elapsed;
                seq.prefilled += chunk.len;
                if seq.prefilled == seq.request.prompt.token_ids.len() {
                    seq.image_features = None; // all placed in the KV cache now
                }
            }
        }
        for (row, index) in logit_owners.into_iter().enumerate() {
            self.sample_into(index, &logits[row]);
        }
        Ok(Some(stats))
    }

    fn encode_images(&mut self, index: usize) -> Result<(), GenerateError> {
        let seq = &mut self.seqs[index];
        let Some(pixels) = seq.request.prompt.pixel_values.take() else {
            return Ok(());
        };
        let started = Instant::now();
        let features = self.model.encode_images(&pixels.to_device(self.model.device())?)?;
        seq.timings.vision += started.elapsed();
        seq.image_features = Some(features);
        Ok(())
    }

    fn sample_into(&mut self, index: usize, logits: &[f32]) {
        let seq = &mut self.seqs[index];
        let request = &seq.request;
        let banned: &[u32] = if !request.ignore_eos && seq.output.len() < request.min_tokens {
            &self.eos_token_ids
        } else {
            &[]
        };
        let token = seq
            .sampler
            .sample(logits, &request.prompt.token_ids, &seq.output, banned);
        seq.output.push(token);
        if !request.ignore_eos && self.eos_token_ids.contains(&token) {
            seq.finish = Some(FinishReason::Stop);
        } else if seq.output.len() >= request.max_tokens {
            seq.finish = Some(FinishReason::Length);
        }
    }
}
