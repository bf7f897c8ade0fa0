//! Every way a request can fail, one exhaustive mapping to an HTTP status and OpenAI's
//! error shape `{"error": {"message", "type", "param", "code"}}`, also used for the error
//! event of a stream that fails after it started. Validation and preparation errors carry
//! their own status, code and field; the rest are the server's.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::{AddError, EngineFailure, RegistryError, SubmitError};
use crate::openai::ValidationError;
use crate::processor::PrepareError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// The engine refused the prompt; `param` is the endpoint's name for the prompt.
    #[error("{error}")]
    Admission { error: AddError, param: &'static str },
    /// Loading or unloading an adapter failed (not for want of the adapter: that is
    /// `ModelNotFound`).
    #[error(transparent)]
    Adapter(RegistryError),
    #[error("invalid or missing API key; send it as `Authorization: Bearer KEY`")]
    Unauthorized,
    #[error("the model `{model}` does not exist; this server serves {served}")]
    ModelNotFound { model: String, served: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("not found: {path}")]
    RouteNotFound { path: String },
    #[error("method {method} is not allowed here")]
    MethodNotAllowed { method: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    QueueFull(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the request took longer than the server's request timeout")]
    Timeout,
    #[error("internal error: {0}")]
    Internal(String),
    /// A route for the other kind of model (chat on an embedding model, or the reverse).
    #[error("{0}")]
    WrongTask(String),
    /// An error about a request that ran as another (`/v1/responses` as chat), its message
    /// and field written as the client's request names them.
    #[error("{message}")]
    Renamed {
        error: Box<ApiError>,
        message: String,
        param: Option<String>,
    },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<String>,
    code: &'a str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        let code = match self {
            Self::Renamed { error, .. } => return error.status(),
            Self::Invalid(e) => e.status(),
            Self::Prepare(e) => e.status(),
            Self::Admission { .. } | Self::Adapter(_) | Self::WrongTask(_) => 400,
            Self::Unauthorized => 401,
            Self::Forbidden(_) => 403,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::PayloadTooLarge { .. } => 413,
            Self::QueueFull(_) => 429,
            Self::Unavailable(_) => 503,
            Self::Timeout => 504,
            Self::Internal(_) => 500,
        };
        StatusCode::from_u16(code).expect("every status above is valid. This is a bug.")
    }

    /// OpenAI's `code` string (every error has one).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Renamed { error, .. } => error.code(),
            Self::Invalid(e) => e.code(),
            Self::Prepare(e) => e.code(),
            Self::Admission {
                error: AddError::PromptTooLong { .. } | AddError::TooLong { .. },
                ..
            } => "context_length_exceeded",
            Self::Admission { .. } => "invalid_value",
            Self::Adapter(RegistryError::Load(_)) => "invalid_adapter",
            Self::Adapter(RegistryError::Exists { .. }) => "adapter_exists",
            Self::Adapter(RegistryError::Full { .. }) => "adapter_limit_reached",
            Self::Adapter(_) => "invalid_value",
            Self::Unauthorized => "invalid_api_key",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::Forbidden(_) => "permission_denied",
            Self::RouteNotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::QueueFull(_) => "queue_full",
            Self::Unavailable(_) => "service_unavailable",
            Self::Timeout => "request_timeout",
            Self::Internal(_) => "internal_error",
            Self::WrongTask(_) => "unsupported_task",
        }
    }

    /// OpenAI's error `type`.
    fn kind(&self) -> &'static str {
        match self {
            Self::Renamed { error, .. } => error.kind(),
            Self::Invalid(e) => e.kind(),
            Self::Unauthorized => "authentication_error",
            Self::Forbidden(_) => "permission_error",
            Self::QueueFull(_) => "rate_limit_error",
            Self::Timeout => "timeout_error",
            Self::Unavailable(_) | Self::Internal(_) => "server_error",
            Self::Prepare(e) if !e.is_client_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The field the error concerns.
    pub fn param(&self) -> Option<String> {
        match self {
            Self::Invalid(e) => e.param(),
            Self::Prepare(e) => e.param(),
            Self::Admission {
                error: AddError::TooLong { .. },
                ..
            } => Some("max_tokens".into()),
            Self::Admission { param, .. } => Some(param.to_string()),
            Self::Adapter(RegistryError::Load(_)) => Some("lora_path".into()),
            Self::Adapter(_) => Some("lora_name".into()),
            Self::ModelNotFound { .. } => Some("model".into()),
            Self::Renamed { param, .. } => param.clone(),
            _ => None,
        }
    }

    /// The JSON body, for responses and for stream error events.
    pub fn body(&self) -> String {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        serde_json::to_string(&body).expect("error bodies serialize. This is a bug.")
    }

    pub fn is_client_error(&self) -> bool {
        self.status().is_client_error() && !matches!(self, Self::QueueFull(_))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), [(header::CONTENT_TYPE, "application/json")], self.body()).into_response();
        if matches!(self, Self::QueueFull(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl ApiError {
    /// This error with the field names in its message and `param` rewritten; an error about
    /// no field (overload, timeouts, the server's own) is left as it is.
    pub fn renamed(self, rename: impl Fn(&str) -> String) -> Self {
        let Some(param) = self.param() else {
            return self;
        };
        Self::Renamed {
            message: rename(&self.to_string()),
            param: Some(rename(&param)),
            error: Box::new(self),
        }
    }

    /// A refused submission; `param` names the prompt's field (`messages` or `prompt`).
    pub fn submit(error: SubmitError, param: &'static str) -> Self {
        match error {
            SubmitError::QueueFull { .. } => Self::QueueFull(error.to_string()),
            SubmitError::ShuttingDown => Self::Unavailable(error.to_string()),
            SubmitError::Invalid(error) => Self::Admission { error, param },
        }
    }
}

impl From<EngineFailure> for ApiError {
    fn from(failure: EngineFailure) -> Self {
        match failure {
            EngineFailure::Timeout => Self::Timeout,
            EngineFailure::Shutdown => Self::Unavailable(failure.to_string()),
            EngineFailure::Model(_) => Self::Internal(failure.to_string()),
        }
    }
}
