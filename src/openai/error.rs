//! Every rule a request can break, one variant each. A variant knows its HTTP status, its
//! OpenAI `code` and the field (`param`) it concerns; its message names the field and gives
//! both the limit and the value received.

/// Each `stop` sequence's longest length, in bytes: stop strings are matched against the
/// tail of the output at every token, and a bound keeps that cheap.
pub const MAX_STOP_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("we could not parse the JSON body of your request: {message}")]
    Json { message: String, param: Option<String> },
    #[error("`{param}` must be in {}{low}, {high}], got {value}", if *low_inclusive { '[' } else { '(' })]
    OutOfRange {
        param: String,
        low: f64,
        high: f64,
        low_inclusive: bool,
        value: f64,
    },
    #[error("`{param}` must be >= 1, got {value}")]
    NotPositive { param: String, value: i64 },
    #[error("`{param}` must be >= 0, got {value}")]
    Negative { param: &'static str, value: i64 },
    #[error("`top_k` must be -1 (off) or >= 1, got {value}")]
    TopK { value: i64 },
    /// A `logit_bias` entry whose key is no token id of the vocabulary or whose value is
    /// no number in [-100, 100].
    #[error("`logit_bias` maps token ids below {vocab_size} to numbers in [-100, 100]; got {key:?}: {value}")]
    LogitBias {
        key: String,
        value: String,
        vocab_size: usize,
    },
    #[error("`n` must be <= {limit}, got {value}")]
    TooManyChoices { limit: usize, value: usize },
    #[error("`min_tokens` must satisfy {}, got {value}", min_tokens_bound(*max_tokens))]
    MinTokens { value: i64, max_tokens: Option<usize> },
    #[error("each `stop` sequence may hold at most {MAX_STOP_BYTES} bytes, got {bytes}")]
    StopTooLong { bytes: usize },
    #[error("`stop` may hold at most {limit} sequences, got {count}")]
    TooManyStops { limit: usize, count: usize },
    #[error("token ids must be in [0, {vocab_size}), got {value}")]
    StopTokenId { vocab_size: usize, value: i64 },
    #[error("at most {limit} top log-probabilities per token, got {value}")]
    TooManyLogprobs { limit: usize, value: usize },
    #[error("`top_logprobs` requires `logprobs: true`")]
    TopLogprobsWithoutLogprobs,
    #[error("`stream_options` is only allowed when `stream` is true")]
    StreamOptionsWithoutStream,
    #[error("`messages` must hold at least one message")]
    NoMessages,
    #[error("`messages[{index}].role` must be system, developer, user or assistant, got `{role}`")]
    UnknownRole { index: usize, role: String },
    #[error("`{param}` is required")]
    MissingContent { param: String },
    #[error("`{param}` must not be an empty list")]
    EmptyContent { param: String },
    #[error("`{param}` sets none of text, image_url and video_url")]
    EmptyPart { param: String },
    #[error("{kind} are only allowed in user messages (`{param}`)")]
    MediaOutsideUserMessage { kind: &'static str, param: String },
    #[error("`{param}` must be auto, low or high, got `{value}`")]
    UnknownDetail { param: String, value: String },
    #[error("at most {limit} images per request, got {count}")]
    TooManyImages { limit: usize, count: usize },
    #[error("at most {limit} videos per request, got {count}")]
    TooManyVideos { limit: usize, count: usize },
    #[error("`{param}` may be at most {limit} on this server, got {value}")]
    TooManyVideoFrames { param: String, limit: usize, value: i64 },
    #[error("`{param}` may be at most {limit} on this server, got {value}")]
    TooManyPixels { param: String, limit: usize, value: i64 },
    #[error("`{param}` ({min_pixels}) must not exceed max_pixels ({max_pixels})")]
    PixelBounds {
        param: String,
        min_pixels: usize,
        max_pixels: usize,
    },
    #[error("one prompt per request, got {count}")]
    PromptCount { count: usize },
    #[error("`prompt` must not be empty")]
    EmptyPrompt,
    #[error("`{0}` is not supported")]
    Unsupported(&'static str),
    #[error("`{0}` is not a field this route takes")]
    UnknownField(String),
    #[error("`{param}` {message}")]
    InvalidInput { param: String, message: String },
    /// A field the request may send, with a value this model cannot honour.
    #[error("`{param}` {message}")]
    UnsupportedValue { param: String, message: String },
    #[error("`{param}`: this model takes no videos")]
    VideosNotSupported { param: String },
    #[error("`{param}` may hold at most {limit} inputs on this server, got {count}")]
    TooManyInputs { param: String, limit: usize, count: usize },
}

fn min_tokens_bound(max_tokens: Option<usize>) -> String {
    max_tokens.map_or("0 <= min_tokens".to_string(), |m| {
        format!("0 <= min_tokens <= max_tokens ({m})")
    })
}

impl ValidationError {
    /// The HTTP status: every broken rule is the client's, 400.
    pub fn status(&self) -> u16 {
        400
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        "invalid_request_error"
    }

    /// OpenAI's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Json { .. } => "invalid_json",
            Self::TooManyImages { .. } => "too_many_images",
            Self::TooManyVideos { .. } => "too_many_videos",
            Self::TooManyVideoFrames { .. } => "too_many_video_frames",
            Self::TooManyPixels { .. } => "too_many_pixels",
            Self::Unsupported(_) | Self::UnknownField(_) | Self::UnsupportedValue { .. } => "unsupported_parameter",
            Self::VideosNotSupported { .. } => "videos_not_supported",
            Self::TooManyInputs { .. } => "too_many_inputs",
            _ => "invalid_value",
        }
    }

    /// The field the error concerns, as a path into the request.
    pub fn param(&self) -> Option<String> {
        let fixed = |p: &str| Some(p.to_string());
        match self {
            Self::Json { param, .. } => param.clone(),
            Self::OutOfRange { param, .. }
            | Self::NotPositive { param, .. }
            | Self::MissingContent { param }
            | Self::EmptyContent { param }
            | Self::EmptyPart { param }
            | Self::MediaOutsideUserMessage { param, .. }
            | Self::UnknownDetail { param, .. }
            | Self::TooManyVideoFrames { param, .. }
            | Self::TooManyPixels { param, .. }
            | Self::PixelBounds { param, .. }
            | Self::InvalidInput { param, .. }
            | Self::UnsupportedValue { param, .. }
            | Self::VideosNotSupported { param }
            | Self::TooManyInputs { param, .. } => Some(param.clone()),
            Self::UnknownField(field) => Some(field.clone()),
            Self::Negative { param, .. } => fixed(param),
            Self::TopK { .. } => fixed("top_k"),
            Self::LogitBias { .. } => fixed("logit_bias"),
            Self::TooManyChoices { .. } => fixed("n"),
            Self::MinTokens { .. } => fixed("min_tokens"),
            Self::StopTooLong { .. } | Self::TooManyStops { .. } => fixed("stop"),
            Self::StopTokenId { .. } => fixed("stop_token_ids"),
            Self::TooManyLogprobs { .. } | Self::TopLogprobsWithoutLogprobs => fixed("top_logprobs"),
            Self::StreamOptionsWithoutStream => fixed("stream_options"),
            Self::NoMessages | Self::TooManyImages { .. } | Self::TooManyVideos { .. } => fixed("messages"),
            Self::UnknownRole { index, .. } => Some(format!("messages[{index}].role")),
            Self::PromptCount { .. } | Self::EmptyPrompt => fixed("prompt"),
            Self::Unsupported(field) => fixed(field),
        }
    }
}
