//! POST /v1/chat/completions.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;

use super::error::ApiError;
use super::respond::Endpoint;
use super::types::{ChatCompletionRequest, SamplingFields};
use super::validate::Settings;
use super::{AppState, answer, from_json, parse_json, validate};
use crate::media::load_image;
use crate::processor::{ImageInput, Prompt};

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let prepared = prepare(&state, body).await;
    answer(&state, Endpoint::Chat, arrived, prepared).await
}

/// Validates the request and builds its prompt: template, images, tokens.
async fn prepare(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<(Prompt, Settings), ApiError> {
    let ready = state.accepting()?;
    let settings = &state.settings;
    let body = parse_json(body, settings.max_body_bytes)?;
    let request: ChatCompletionRequest = from_json(&body)?;
    let sampling: SamplingFields = from_json(&body)?;
    state.check_model(request.model.as_deref())?;
    let logprobs = validate::chat_logprobs(request.logprobs, request.top_logprobs)?;
    let max_tokens = request.max_completion_tokens.or(sampling.max_tokens);
    let generation = validate::settings(&sampling, max_tokens, logprobs, &settings.limits, ready.vocab_size)?;
    let (messages, images) = validate::messages(&request.messages, &settings.limits)?;
    // Decoding images, resizing them and running the tokenizer take milliseconds to
    // seconds: off the async workers, so other requests' streams keep flowing.
    let processor = ready.processor.clone();
    let media = settings.media;
    let prompt = tokio::task::spawn_blocking(move || {
        let images = images
            .into_iter()
            .map(|image| {
                let decoded = load_image(&image.url, &media).map_err(|e| ApiError::from(e).with_param(&image.param))?;
                Ok(ImageInput {
                    image: decoded,
                    split: image.split,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        processor.process(&messages, &images).map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("preprocessing task: {e}")))??;
    Ok((prompt, generation))
}
