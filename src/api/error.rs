//! Every way a request can fail, one exhaustive mapping to an HTTP status and OpenAI's
//! error shape `{"error": {"message", "type", "param", "code"}}`, also used for the error
//! event of a stream that fails after it started.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::{AddError, EngineFailure, SubmitError};
use crate::media::MediaError;
use crate::processor::ProcessorError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("we could not parse the JSON body of your request: {message}")]
    InvalidJson { message: String, param: Option<String> },
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
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: "invalid_value",
        }
    }

    /// The same error, attributed to another field.
    pub fn with_param(self, param: &str) -> Self {
        match self {
            Self::InvalidRequest { message, code, .. } => Self::InvalidRequest {
                message,
                param: Some(param.into()),
                code,
            },
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::InvalidJson { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `code` string (every error has one).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { code, .. } => code,
            other => other.kind_and_code().1.unwrap_or("unknown"),
        }
    }

    /// OpenAI's `type` and `code` strings.
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest { code, .. } => ("invalid_request_error", Some(code)),
            Self::InvalidJson { .. } => ("invalid_request_error", Some("invalid_json")),
            Self::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            Self::ModelNotFound { .. } => ("invalid_request_error", Some("model_not_found")),
            Self::Forbidden(_) => ("permission_error", Some("permission_denied")),
            Self::RouteNotFound { .. } => ("invalid_request_error", Some("not_found")),
            Self::MethodNotAllowed { .. } => ("invalid_request_error", Some("method_not_allowed")),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            Self::QueueFull(_) => ("rate_limit_error", Some("queue_full")),
            Self::Unavailable(_) => ("server_error", Some("service_unavailable")),
            Self::Timeout => ("timeout_error", Some("request_timeout")),
            Self::Internal(_) => ("server_error", Some("internal_error")),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } | Self::InvalidJson { param, .. } => param.as_deref(),
            Self::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The JSON body, for responses and for stream error events.
    pub fn body(&self) -> String {
        let (kind, code) = self.kind_and_code();
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param: self.param(),
                code,
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

impl From<ProcessorError> for ApiError {
    fn from(err: ProcessorError) -> Self {
        match err {
            ProcessorError::NoMessages => Self::invalid("messages", err.to_string()),
            ProcessorError::EmptyContent { index } => {
                Self::invalid(&format!("messages[{index}].content"), err.to_string())
            }
            ProcessorError::ImageCount { .. } | ProcessorError::VideoCount { .. } => {
                Self::invalid("messages", err.to_string())
            }
            ProcessorError::VideosNotSupported => Self::InvalidRequest {
                message: err.to_string(),
                param: Some("messages".into()),
                code: "videos_not_supported",
            },
            ProcessorError::Template { .. } => Self::invalid("messages", err.to_string()),
            ProcessorError::Tokenizer { .. } => Self::Internal(err.to_string()),
        }
    }
}

impl From<MediaError> for ApiError {
    fn from(err: MediaError) -> Self {
        let code = match err {
            MediaError::UnsupportedUrl { .. } => "unsupported_image_url",
            MediaError::BadUrl(_)
            | MediaError::MalformedDataUri(_)
            | MediaError::Base64(_)
            | MediaError::NotAnImage
            | MediaError::Corrupt(_) => "invalid_image",
            MediaError::FetchFailed(_) => "media_fetch_failed",
            MediaError::Timeout => "media_timeout",
            MediaError::TooManyRedirects { .. } => "too_many_redirects",
            MediaError::TooLarge { .. } => "media_too_large",
            MediaError::DomainNotAllowed(_) => "media_domain_not_allowed",
            MediaError::LocalFilesDisabled | MediaError::PathNotAllowed(_) => "local_media_not_allowed",
            MediaError::FileNotFound(_) => "media_not_found",
            MediaError::ContentTypeMismatch { .. } => "content_type_mismatch",
            MediaError::TooManyPixels { .. } => "image_too_large",
            MediaError::NotAVideo(_) | MediaError::CorruptVideo(_) => "invalid_video",
            MediaError::VideoTooLong { .. } => "video_too_long",
        };
        Self::InvalidRequest {
            message: err.to_string(),
            param: Some("messages".into()),
            code,
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::QueueFull { .. } => Self::QueueFull(err.to_string()),
            SubmitError::ShuttingDown => Self::Unavailable(err.to_string()),
            SubmitError::Invalid(add) => add.into(),
        }
    }
}

impl From<AddError> for ApiError {
    fn from(err: AddError) -> Self {
        let code = match err {
            AddError::TooLong { .. } => "context_length_exceeded",
            _ => "invalid_value",
        };
        Self::InvalidRequest {
            message: err.to_string(),
            param: Some("messages".into()),
            code,
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
