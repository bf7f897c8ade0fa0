//! POST /v1/completions: a text prompt, tokenized as given (no chat template).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;

use super::error::ApiError;
use super::respond::Endpoint;
use super::types::{CompletionRequest, PromptField, SamplingFields};
use super::validate::Settings;
use super::{AppState, answer, from_json, parse_json, validate};
use crate::processor::Prompt;

/// OpenAI's default for completions (chat has none).
const DEFAULT_MAX_TOKENS: i64 = 16;

pub async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let prepared = prepare(&state, body).await;
    answer(&state, Endpoint::Completions, arrived, prepared).await
}

/// Validates the request and tokenizes its prompt.
async fn prepare(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<(Prompt, Settings), ApiError> {
    let ready = state.accepting()?;
    let settings = &state.settings;
    let body = parse_json(body, settings.max_body_bytes)?;
    let request: CompletionRequest = from_json(&body)?;
    let sampling: SamplingFields = from_json(&body)?;
    let adapter = state.resolve_model(ready, request.model.as_deref())?;
    let text = match request.prompt {
        PromptField::One(text) => text,
        PromptField::Many(mut list) if list.len() == 1 => list.remove(0),
        PromptField::Many(list) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("one prompt per request, got {}", list.len()),
            ));
        }
    };
    if text.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    if request.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if request.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let logprobs = match request.logprobs {
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be >= 0, got {k}"),
            ));
        }
        k => k.map(|k| k as usize),
    };
    let max_tokens = Some(sampling.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
    let mut generation = validate::settings(&sampling, max_tokens, logprobs, &settings.limits, ready.vocab_size)?;
    generation.adapter = adapter;
    let processor = ready.processor.clone();
    let token_ids = tokio::task::spawn_blocking(move || processor.tokenize(&text))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))??;
    let image_token = ready.processor.image_token_id();
    if token_ids.contains(&image_token) {
        let message = "the prompt contains the image placeholder token, which needs an image; use /v1/chat/completions";
        return Err(ApiError::invalid("prompt", message));
    }
    Ok((Prompt::text(token_ids), generation))
}
