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
use crate::media::{decode_image, probe_image};
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
    let fetches = images.iter().map(|image| async {
        state
            .fetcher
            .fetch(&image.url)
            .await
            .map_err(|e| ApiError::from(e).with_param(&image.param))
    });
    let fetched = futures::future::try_join_all(fetches).await?;
    // Decoding, resizing and tokenizing take milliseconds to seconds: the bounded media
    // pool runs them, off the async workers and the engine thread.
    let processor = ready.processor.clone();
    let (media, max_image_tokens) = (settings.media, settings.max_image_tokens_per_request);
    let prompt = state
        .media_pool
        .run(move || {
            let mut headers = Vec::with_capacity(images.len());
            let mut image_tokens = 0;
            for (image, bytes) in images.iter().zip(&fetched) {
                let header = probe_image(bytes, &media).map_err(|e| ApiError::from(e).with_param(&image.param))?;
                image_tokens += processor.image_tokens(header.width, header.height, image.split);
                if image_tokens > max_image_tokens {
                    let message = format!("the images need {image_tokens} or more tokens, more than the limit of {max_image_tokens} per request");
                    return Err(ApiError::InvalidRequest { message, param: Some(image.param.clone()), code: "image_tokens_exceeded" });
                }
                headers.push(header);
            }
            let inputs = images
                .iter()
                .zip(&fetched)
                .zip(&headers)
                .map(|((image, bytes), header)| {
                    let decoded = decode_image(bytes, header).map_err(|e| ApiError::from(e).with_param(&image.param))?;
                    Ok(ImageInput { image: decoded, split: image.split })
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            processor.process(&messages, &inputs).map_err(ApiError::from)
        })
        .await?;
    Ok((prompt, generation))
}
