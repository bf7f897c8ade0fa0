//! POST /v1/completions: a text prompt, tokenized as given (no chat template).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;

use super::respond::Endpoint;
use super::{AppState, answer, parse_json, submit};
use crate::openai::{self, CompletionRequest, SamplingFields};

pub async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let job = async {
        let ready = state.accepting()?;
        let body = parse_json(body, state.settings.max_body_bytes)?;
        openai::fields::check(&body, openai::fields::COMPLETION)?;
        let request: CompletionRequest = openai::from_json(&body)?;
        let fields: SamplingFields = openai::from_json(&body)?;
        let adapter = state.resolve_model(ready, request.model.as_deref())?;
        let vocab_size = ready.engine.info().vocab_size;
        let completion = openai::completion(&request, &fields, &state.settings.limits, vocab_size)?;
        let prepared = ready.preparer.completion(&completion).await?;
        submit(
            &state,
            ready,
            Endpoint::Completions,
            prepared,
            &completion.options,
            adapter,
            arrived,
        )
    };
    answer(&state, Endpoint::Completions, arrived, job.await).await
}
