//! Loading and unloading LoRA adapters at runtime, with vLLM's routes and bodies:
//! POST /v1/load_lora_adapter `{"lora_name", "lora_path"}` and POST
//! /v1/unload_lora_adapter `{"lora_name"}`. The server reads whatever folder the body
//! names, so these routes exist only behind an API key: without `--api-key` they answer 403.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::{AppState, parse_json};
use crate::engine::RegistryError;
use crate::openai::from_json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    lora_name: String,
    lora_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadRequest {
    lora_name: String,
}

pub async fn load(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let ready = admin(&state)?;
        let request: LoadRequest = from_json(&parse_json(body, state.settings.max_body_bytes)?)?;
        let adapters = ready.engine.adapters().clone();
        let name = request.lora_name.clone();
        // Reading and reshaping the weights takes milliseconds to seconds.
        let adapter = tokio::task::spawn_blocking(move || adapters.load(&request.lora_name, &request.lora_path))
            .await
            .map_err(|e| ApiError::Internal(format!("loading adapter `{name}`: {e}")))?
            .map_err(|e| registry_error(&state, ready, e))?;
        tracing::info!(
            name,
            rank = adapter.rank(),
            modules = adapter.modules(),
            "adapter loaded"
        );
        Ok(format!("Success: LoRA adapter '{name}' added successfully."))
    }
    .await;
    outcome(&state, "load_lora_adapter", result)
}

pub async fn unload(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let ready = admin(&state)?;
        let request: UnloadRequest = from_json(&parse_json(body, state.settings.max_body_bytes)?)?;
        (ready.engine.adapters().unload(&request.lora_name)).map_err(|e| registry_error(&state, ready, e))?;
        tracing::info!(name = request.lora_name, "adapter unloaded");
        Ok(format!(
            "Success: LoRA adapter '{}' removed successfully.",
            request.lora_name
        ))
    })();
    outcome(&state, "unload_lora_adapter", result)
}

/// The loaded model, if this server lets clients change its adapters.
fn admin(state: &AppState) -> Result<&super::Ready, ApiError> {
    if state.settings.api_key.is_none() {
        return Err(ApiError::Forbidden(
            "loading and unloading adapters needs the server to run with --api-key".into(),
        ));
    }
    state.accepting()
}

fn registry_error(state: &AppState, ready: &super::Ready, error: RegistryError) -> ApiError {
    match error {
        RegistryError::NotFound { name } => state.model_not_found(ready, &name),
        other => ApiError::Adapter(other),
    }
}

fn outcome(state: &AppState, route: &'static str, result: Result<String, ApiError>) -> Response {
    match result {
        Ok(text) => {
            state.metrics.count_request(route, crate::metrics::Outcome::Success);
            text.into_response()
        }
        Err(error) => {
            let outcome = if error.is_client_error() {
                crate::metrics::Outcome::ClientError
            } else {
                crate::metrics::Outcome::ServerError
            };
            state.metrics.count_request(route, outcome);
            error.into_response()
        }
    }
}
