//! The HTTP API: OpenAI's routes over the engine, plus health and metrics. A handler
//! parses (`openai`), prepares (`processor::Preparer`), submits (`engine::EngineHandle`)
//! and responds (`respond`: one JSON body or an SSE stream). The gRPC API (`grpc`) maps
//! its messages onto the same requests and shares everything after parsing.

pub mod adapters;
pub mod auth;
pub mod calls;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod grpc;
pub mod observe;
pub mod respond;
pub mod responses;
pub mod server;
pub mod tokenize;
pub mod web;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::engine::embed::EmbedHandle;
use crate::engine::{Adapter, EngineHandle, GenerationRequest};
use crate::metrics::Metrics;
use crate::openai::{self, Options};
use crate::processor::embed::EmbedPreparer;
use crate::processor::{Prepared, Preparer};
use error::ApiError;
use respond::{Endpoint, Job, Observer, respond};

/// What handlers need to know of the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub limits: openai::Limits,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// The chat page at `/`.
    pub web_ui: bool,
}

/// The model, once loaded: the engine and what prepares its requests.
pub struct Ready {
    pub engine: EngineHandle,
    pub preparer: Preparer,
}

/// A contrastive model, once loaded: its batching engine and what prepares its inputs.
pub struct EmbedReady {
    pub engine: EmbedHandle,
    pub preparer: EmbedPreparer,
}

pub struct AppState {
    pub settings: ApiSettings,
    pub metrics: Arc<Metrics>,
    pub ready: OnceLock<Ready>,
    /// Set instead of `ready` when the model is a contrastive one.
    pub embed: OnceLock<EmbedReady>,
    pub load_error: OnceLock<String>,
    pub draining: AtomicBool,
    /// grpc.health.v1's statuses (SERVING once ready, NOT_SERVING while draining).
    pub grpc_health: tonic_health::server::HealthReporter,
}

impl AppState {
    pub fn new(settings: ApiSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            settings,
            metrics,
            ready: OnceLock::new(),
            embed: OnceLock::new(),
            load_error: OnceLock::new(),
            draining: AtomicBool::new(false),
            grpc_health: tonic_health::server::HealthReporter::new(),
        }
    }

    /// The loaded generative model, if the server takes requests now.
    fn accepting(&self) -> Result<&Ready, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        if let Some(embed) = self.embed.get() {
            return Err(ApiError::WrongTask(format!(
                "the model `{}` ({}) embeds and scores; it does not generate: use /v1/embeddings, /v1/score \
                 or /v1/rerank",
                self.settings.served_model_name,
                embed.engine.info().architecture
            )));
        }
        self.ready
            .get()
            .ok_or_else(|| ApiError::Unavailable("the model is still loading".into()))
    }

    /// The loaded contrastive model, if the server takes requests now and `model` names it.
    fn accepting_embeddings(&self, model: Option<&str>) -> Result<&EmbedReady, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        if self.ready.get().is_some() {
            return Err(ApiError::WrongTask(format!(
                "the model `{}` generates; it does not embed: use /v1/chat/completions or /v1/completions",
                self.settings.served_model_name
            )));
        }
        let embed = (self.embed.get()).ok_or_else(|| ApiError::Unavailable("the model is still loading".into()))?;
        match model {
            Some(name) if name != self.settings.served_model_name => Err(ApiError::ModelNotFound {
                model: name.to_string(),
                served: format!("`{}`", self.settings.served_model_name),
            }),
            _ => Ok(embed),
        }
    }

    /// Whether a model is loaded and taking requests (either kind).
    fn loaded(&self) -> bool {
        self.ready.get().is_some() || self.embed.get().is_some()
    }

    /// The adapter a request's `model` names: `None` for the base model (or no `model`).
    fn resolve_model(&self, ready: &Ready, model: Option<&str>) -> Result<Option<Arc<Adapter>>, ApiError> {
        match model {
            None => Ok(None),
            Some(name) if name == self.settings.served_model_name => Ok(None),
            Some(name) => match ready.engine.adapters().get(name) {
                Some(adapter) => Ok(Some(adapter)),
                None => Err(self.model_not_found(ready, name)),
            },
        }
    }

    fn model_not_found(&self, ready: &Ready, name: &str) -> ApiError {
        let mut served = format!("`{}`", self.settings.served_model_name);
        let adapters: Vec<String> = (ready.engine.adapters().list().iter())
            .map(|l| format!("`{}`", l.adapter.name()))
            .collect();
        if !adapters.is_empty() {
            served += &format!(" and its adapters {}", adapters.join(", "));
        }
        ApiError::ModelNotFound {
            model: name.to_string(),
            served,
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/score", post(embeddings::score))
        .route("/v1/rerank", post(embeddings::rerank))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let page = if state.settings.web_ui {
        web::routes()
    } else {
        Router::new()
    };
    Router::new()
        .merge(api)
        .merge(page)
        .route("/health", get(health))
        .route("/livez", get(live))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(state.settings.max_body_bytes))
        .with_state(state)
}

/// Reads a JSON body (413 past the size limit, 400 for malformed JSON).
fn parse_json(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<serde_json::Value, ApiError> {
    let bytes = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::Invalid(openai::ValidationError::Json {
            message: rejection.body_text(),
            param: None,
        }),
    })?;
    Ok(openai::parse_json(&bytes)?)
}

/// Answers a request (JSON or SSE) once submitted, counting the outcome either way.
async fn answer(state: &AppState, endpoint: Endpoint, arrived: Instant, job: Result<Job, ApiError>) -> Response {
    let mut observer = Observer::new(state.metrics.clone(), endpoint.route(), arrived);
    match job {
        Ok(job) => respond(job, observer).await,
        Err(error) => {
            observer.fail(&error);
            error.into_response()
        }
    }
}

/// A prepared request's `n` choices submitted to the engine, ready to be answered.
fn submit(
    state: &AppState,
    ready: &Ready,
    endpoint: Endpoint,
    prepared: Prepared,
    options: &Options,
    adapter: Option<Arc<Adapter>>,
    arrived: Instant,
) -> Result<Job, ApiError> {
    let prompt_tokens = prepared.prompt.token_ids.len();
    let model = (adapter.as_ref()).map_or_else(|| state.settings.served_model_name.clone(), |a| a.name().to_string());
    let request = GenerationRequest {
        prompt: prepared.prompt,
        params: prepared.params,
        arrived,
        deadline: Some(arrived + state.settings.request_timeout),
        adapter,
    };
    let events =
        (ready.engine.submit(vec![request; options.n])).map_err(|e| ApiError::submit(e, endpoint.prompt_param()))?;
    Ok(Job {
        endpoint,
        id: format!("{}-{}", endpoint.id_prefix(), uuid::Uuid::new_v4().simple()),
        model,
        n: options.n,
        prompt_tokens,
        events,
        stream: options.stream,
        include_usage: options.include_usage,
        tokenizer: ready.preparer.processor().tokenizer().clone(),
        calls: None,
    })
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (status, text) = if state.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if state.loaded() {
        (StatusCode::OK, "ready")
    } else if state.load_error.get().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (status, axum::Json(serde_json::json!({ "status": text }))).into_response()
}

/// Liveness, for orchestrators: 200 while the process can make progress (loading and
/// draining included, so a drain is never cut short by a restart); 503 once the engine
/// thread has stopped while the server still takes requests, which only a bug causes.
async fn live(State(state): State<Arc<AppState>>) -> Response {
    let stopped = state.ready.get().is_some_and(|ready| ready.engine.is_stopped())
        || state.embed.get().is_some_and(|embed| embed.engine.is_stopped());
    let engine_dead = !state.draining.load(Ordering::Acquire) && stopped;
    let (status, text) = if engine_dead {
        (StatusCode::SERVICE_UNAVAILABLE, "engine stopped")
    } else {
        (StatusCode::OK, "alive")
    };
    (status, axum::Json(serde_json::json!({ "status": text }))).into_response()
}

/// The base model, then its adapters (each with the base model as `parent`, as vLLM lists
/// LoRA adapters).
async fn models(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.ready.get();
    let embed = state.embed.get();
    let max_model_len = match (ready, embed) {
        (Some(r), _) => r.engine.max_model_len(),
        (None, Some(e)) => e.preparer.processor().rules().max_tokens,
        (None, None) => 0,
    };
    // What the model serves, as vLLM's `--task` names it.
    let task = match embed {
        Some(_) => "embed",
        None => "generate",
    };
    let base = &state.settings.served_model_name;
    let card = |id: &str, parent: Option<&String>| openai::ModelCard {
        id: id.to_string(),
        object: "model",
        created: openai::unix_now(),
        owned_by: "ocellus",
        max_model_len,
        task,
        parent: parent.cloned(),
    };
    let mut data = vec![card(base, None)];
    if let Some(ready) = ready {
        data.extend((ready.engine.adapters().list().iter()).map(|l| card(l.adapter.name(), Some(base))));
    }
    axum::Json(openai::ModelList { object: "list", data }).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], state.metrics.render()).into_response()
}

async fn method_not_allowed(method: axum::http::Method) -> Response {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
    }
    .into_response()
}

async fn not_found(uri: Uri) -> Response {
    ApiError::RouteNotFound {
        path: uri.path().to_string(),
    }
    .into_response()
}
