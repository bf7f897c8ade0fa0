//! POST /v1/chat/completions.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;

use super::error::ApiError;
use super::respond::{Endpoint, Job};
use super::{AppState, answer, parse_json, submit};
use crate::openai::tool_calls::CallReader;
use crate::openai::{self, ChatCompletionRequest, SamplingFields};

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let job = async {
        let body = parse_json(body, state.settings.max_body_bytes)?;
        openai::fields::check(&body, openai::fields::CHAT)?;
        let request: ChatCompletionRequest = openai::from_json(&body)?;
        let fields: SamplingFields = openai::from_json(&body)?;
        start(&state, &request, &fields, arrived).await
    };
    answer(&state, Endpoint::Chat, arrived, job.await).await
}

/// A chat request (from HTTP's JSON or gRPC's messages) validated, prepared and submitted.
pub(super) async fn start(
    state: &AppState,
    request: &ChatCompletionRequest,
    fields: &SamplingFields,
    arrived: Instant,
) -> Result<Job, ApiError> {
    start_as(state, request, fields, arrived, Endpoint::Chat).await
}

/// `start`, for an endpoint that answers a chat request in its own shapes.
pub(super) async fn start_as(
    state: &AppState,
    request: &ChatCompletionRequest,
    fields: &SamplingFields,
    arrived: Instant,
    endpoint: Endpoint,
) -> Result<Job, ApiError> {
    let ready = state.accepting()?;
    let adapter = state.resolve_model(ready, request.model.as_deref())?;
    let chat = openai::chat(request, fields, &state.settings.limits, ready.engine.info().vocab_size)?;
    let prepared = ready.preparer.chat(&chat).await?;
    let job = submit(state, ready, endpoint, prepared, &chat.options, adapter, arrived)?;
    Ok(Job {
        calls: CallReader::of(chat.tools.as_ref()),
        ..job
    })
}
