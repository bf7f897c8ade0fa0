//! vLLM's `POST /tokenize` and `POST /detokenize` bodies: a prompt or a chat conversation
//! to tokens (a conversation through the chat template, its images expanded to their image
//! tokens), and tokens back to text.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ValidationError;
use super::types::{ChatCompletionRequest, ChatMessageIn, MmProcessorKwargs, ToolIn};

/// `/tokenize`'s fields, its two forms together.
const TOKENIZE: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "continue_final_message",
    "return_token_strs",
    "tools",
    "mm_processor_kwargs",
];

/// vLLM's `/tokenize` fields that Ocellus does not honour.
const TOKENIZE_NOT_HONOURED: &[&str] = &["chat_template", "chat_template_kwargs", "documents"];

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub return_token_strs: Option<bool>,
    pub tools: Option<Vec<ToolIn>>,
    pub mm_processor_kwargs: Option<MmProcessorKwargs>,
}

/// What to tokenize.
#[derive(Debug)]
pub enum Tokenize {
    /// A prompt as given, with the tokenizer's special tokens or not.
    Prompt { text: String, add_special_tokens: bool },
    /// A conversation, as `/v1/chat/completions` would prompt the model with it.
    Chat(Box<ChatCompletionRequest>),
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// A `/tokenize` body's fields checked by name, and its form.
pub fn tokenize(body: &Value) -> Result<(Option<String>, Tokenize, bool), ValidationError> {
    if let Some(map) = body.as_object() {
        for (name, _) in map.iter().filter(|(_, v)| !v.is_null()) {
            if TOKENIZE.contains(&name.as_str()) {
                continue;
            }
            return Err(match TOKENIZE_NOT_HONOURED.iter().find(|&&f| f == name) {
                Some(field) => ValidationError::Unsupported(field),
                None => ValidationError::UnknownField(name.clone()),
            });
        }
    }
    let request: TokenizeRequest = super::from_json(body)?;
    let strs = request.return_token_strs.unwrap_or(false);
    let unsupported = |param: &str, message: &str| ValidationError::UnsupportedValue {
        param: param.into(),
        message: message.into(),
    };
    let form = match (request.prompt, request.messages) {
        (Some(text), None) => Tokenize::Prompt {
            text,
            add_special_tokens: request.add_special_tokens.unwrap_or(true),
        },
        (None, Some(messages)) => {
            if request.add_special_tokens == Some(true) {
                return Err(unsupported(
                    "add_special_tokens",
                    "must be false with `messages`: the chat template writes the special tokens",
                ));
            }
            if request.add_generation_prompt == Some(false) {
                return Err(unsupported(
                    "add_generation_prompt",
                    "must be true: conversations are tokenized as chat prompts them",
                ));
            }
            if request.continue_final_message == Some(true) {
                return Err(unsupported("continue_final_message", "must be false"));
            }
            Tokenize::Chat(Box::new(ChatCompletionRequest {
                model: request.model.clone(),
                messages,
                tools: request.tools,
                mm_processor_kwargs: request.mm_processor_kwargs,
                ..ChatCompletionRequest::default()
            }))
        }
        _ => {
            return Err(ValidationError::InvalidInput {
                param: "prompt".into(),
                message: "or `messages`: give exactly one".into(),
            });
        }
    };
    Ok((request.model, form, strs))
}

/// Token ids as the vocabulary's, each checked.
pub fn token_ids(tokens: &[i64], vocab_size: usize) -> Result<Vec<u32>, ValidationError> {
    (tokens.iter().enumerate())
        .map(|(i, &value)| match u32::try_from(value) {
            Ok(id) if (id as usize) < vocab_size => Ok(id),
            _ => Err(ValidationError::InvalidInput {
                param: format!("tokens[{i}]"),
                message: format!("must be a token id in [0, {vocab_size}), got {value}"),
            }),
        })
        .collect()
}
