//! What goes into the engine and what comes out of it.

use std::sync::Arc;
use std::time::Instant;

use super::sampling::{SamplingParams, TokenLogprobs};
use crate::model::lora::Adapter;
use crate::processor::Prompt;

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// End-of-sequence tokens and stop strings are ignored before this many tokens.
    pub min_tokens: usize,
    /// Keep generating past end-of-sequence tokens, up to `max_tokens`.
    pub ignore_eos: bool,
    /// Stop strings: generation ends before them and they are not returned.
    pub stop: Vec<String>,
    /// Tokens that end generation besides the model's end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
    /// Report log-probabilities: the chosen token's and this many top alternatives.
    pub logprobs: Option<usize>,
    pub arrived: Instant,
    /// Past this instant the sequence fails with a timeout.
    pub deadline: Option<Instant>,
    /// The LoRA adapter to generate with (`model` naming one); `None` for the base model.
    pub adapter: Option<Arc<Adapter>>,
}

impl GenerationRequest {
    /// Greedy decoding of exactly `max_tokens` tokens unless an end-of-sequence comes first.
    pub fn greedy(prompt: Prompt, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
            arrived: Instant::now(),
            deadline: None,
            adapter: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Including the image tokens.
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SequenceEvent {
    /// A sampled token and the text it adds to the answer (empty while a character or a
    /// possible stop string is incomplete).
    Token {
        token: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The end: the last of the text, why, and the token counts.
    Finished {
        text: String,
        reason: FinishReason,
        usage: Usage,
    },
    Failed(EngineFailure),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineFailure {
    #[error("the request took longer than the server's request timeout")]
    Timeout,
    #[error("the model failed: {0}")]
    Model(String),
    #[error("the server is shutting down")]
    Shutdown,
}

/// An event of one of a request's `n` choices.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceEvent {
    pub choice: usize,
    pub event: SequenceEvent,
}

pub type EventSender = tokio::sync::mpsc::UnboundedSender<ChoiceEvent>;
pub type EventReceiver = tokio::sync::mpsc::UnboundedReceiver<ChoiceEvent>;
