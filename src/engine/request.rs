//! What goes into the engine and what comes out of it. The engine defines its input (the
//! processor produces it): a prompt with each image's pixels and content key, and the
//! generation parameters validation produced. `admit` is the one check of a request
//! against the model and the context length.

use std::sync::Arc;
use std::time::Instant;

use super::constraint::Grammar;
use super::sampling::{SamplingParams, TokenLogprobs};
use crate::model::lora::Adapter;
use crate::model::{ContentKey, ModelInfo, Pixels, TokenPositions};

/// A prompt ready for the engine.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub token_ids: Vec<u32>,
    /// Its images (and video frames) in prompt order: the units of vision encoding.
    pub images: Vec<PromptImage>,
    /// Where its tokens sit when not at their index (M-RoPE families); `None` for SmolVLM.
    pub positions: Option<TokenPositions>,
}

/// One image of a prompt: its pixels, their content key (for the vision cache and prefix
/// caching) and the placeholder tokens it fills.
#[derive(Debug, Clone)]
pub struct PromptImage {
    pub pixels: Pixels,
    pub key: ContentKey,
    pub tokens: usize,
}

impl Prompt {
    /// A prompt of text only.
    pub fn text(token_ids: Vec<u32>) -> Self {
        Self {
            token_ids,
            ..Default::default()
        }
    }

    /// Placeholder tokens its images fill.
    pub fn image_tokens(&self) -> usize {
        self.images.iter().map(|i| i.tokens).sum()
    }
}

/// How to generate: what validation made of a request's sampling and stopping fields.
#[derive(Debug, Clone, Default)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    /// `None`: up to the context length.
    pub max_tokens: Option<usize>,
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
    /// The grammar the output must follow (JSON schema, regex, Lark), compiled.
    pub grammar: Option<Arc<Grammar>>,
}

impl GenerationParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub arrived: Instant,
    /// Past this instant the sequence fails with a timeout.
    pub deadline: Option<Instant>,
    /// The LoRA adapter to generate with (`model` naming one); `None` for the base model.
    pub adapter: Option<Arc<Adapter>>,
}

impl GenerationRequest {
    pub fn new(prompt: Prompt, params: GenerationParams) -> Self {
        Self {
            prompt,
            params,
            arrived: Instant::now(),
            deadline: None,
            adapter: None,
        }
    }

    /// Greedy decoding of exactly `max_tokens` tokens unless an end-of-sequence comes first.
    pub fn greedy(prompt: Prompt, max_tokens: usize) -> Self {
        Self::new(prompt, GenerationParams::greedy(max_tokens))
    }
}

/// Requests the engine refuses at the door.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {found} image placeholder tokens but its images fill {expected}; text may not hold placeholders of its own"
    )]
    ImageTokens { found: usize, expected: usize },
    #[error("the prompt is {prompt} tokens (images included), the maximum context length is {limit}")]
    PromptTooLong { prompt: usize, limit: usize },
    #[error("the prompt ({prompt} tokens) plus `max_tokens` ({max_tokens}) exceeds the maximum context length {limit}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
}

/// The one check of a request before it is queued: a prompt, whose image placeholders
/// match its images, with room for its output within `max_model_len`. Returns the most
/// tokens it may generate (`max_tokens`, or the rest of the context).
pub fn admit(
    prompt: &Prompt,
    params: &GenerationParams,
    info: &ModelInfo,
    max_model_len: usize,
) -> Result<usize, AddError> {
    let len = prompt.token_ids.len();
    if len == 0 {
        return Err(AddError::EmptyPrompt);
    }
    let found = prompt.token_ids.iter().filter(|&&t| info.is_image_token(t)).count();
    let expected = prompt.image_tokens();
    if found != expected {
        return Err(AddError::ImageTokens { found, expected });
    }
    if len >= max_model_len {
        return Err(AddError::PromptTooLong {
            prompt: len,
            limit: max_model_len,
        });
    }
    let max_tokens = params.max_tokens.unwrap_or(max_model_len - len);
    if len + max_tokens > max_model_len {
        return Err(AddError::TooLong {
            prompt: len,
            max_tokens,
            limit: max_model_len,
        });
    }
    Ok(max_tokens)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ModelInfo {
        ModelInfo {
            architecture: "test".into(),
            image_token_ids: vec![9],
            vocab_size: 100,
            max_positions: 64,
        }
    }

    #[test]
    fn admission_checks_placeholders_and_the_context_once() {
        let params = |max_tokens| GenerationParams {
            max_tokens,
            ..Default::default()
        };
        let text = Prompt::text(vec![1, 2, 3]);
        assert_eq!(admit(&text, &params(None), &info(), 10), Ok(7));
        assert_eq!(admit(&text, &params(Some(7)), &info(), 10), Ok(7));
        assert!(matches!(
            admit(&text, &params(Some(8)), &info(), 10),
            Err(AddError::TooLong { max_tokens: 8, .. })
        ));
        assert!(matches!(
            admit(&text, &params(None), &info(), 3),
            Err(AddError::PromptTooLong { prompt: 3, limit: 3 })
        ));
        let typed_placeholder = Prompt::text(vec![1, 9, 3]);
        assert_eq!(
            admit(&typed_placeholder, &params(None), &info(), 10),
            Err(AddError::ImageTokens { found: 1, expected: 0 })
        );
        assert_eq!(
            admit(&Prompt::text(vec![]), &params(None), &info(), 10),
            Err(AddError::EmptyPrompt)
        );
    }
}
