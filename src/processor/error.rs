//! Errors of turning a request into a prompt. Most are the client's doing; each knows its
//! HTTP status, OpenAI `code` and the field it concerns.

use crate::media::MediaError;

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("`messages` must not be empty")]
    NoMessages,
    #[error("`messages[{index}].content` must not be empty")]
    EmptyContent { index: usize },
    #[error("the chat template failed: {message}")]
    Template { message: String },
    #[error("the prompt has {placeholders} image placeholders but the request has {images} images")]
    ImageCount { placeholders: usize, images: usize },
    #[error("the prompt has {placeholders} video placeholders but the request has {videos} videos")]
    VideoCount { placeholders: usize, videos: usize },
    #[error("this model takes no videos")]
    VideosNotSupported,
    #[error("tokenization failed: {message}")]
    Tokenizer { message: String },
    #[error("preprocessing failed: {message}")]
    Pixels { message: String },
}

/// Why a request could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// A media part (its `param`) could not be fetched or decoded.
    #[error("{error}")]
    Media { error: MediaError, param: String },
    #[error("the images and video frames need {tokens} or more tokens, more than the limit of {limit} per request")]
    ImageTokens { tokens: usize, limit: usize, param: String },
    #[error("{}", ProcessorError::VideosNotSupported)]
    VideosNotSupported { param: String },
    #[error("{message}")]
    ImageRefused { message: String, param: String },
    /// A text to embed the model cannot take as it is.
    #[error("`{param}`: {error}")]
    Text {
        error: super::embed::TextError,
        param: String,
    },
    #[error("this model's processor has no pixel budget: `min_pixels` and `max_pixels` do not apply to it")]
    PixelBudgetNotSupported { param: String },
    /// An output constraint (its `param`) the grammar compiler refused.
    #[error("`{param}`: {message}")]
    Grammar { message: String, param: String },
    /// A media worker died: a bug.
    #[error("{0}")]
    Failed(String),
}

impl PrepareError {
    /// Whether the client caused it (400) rather than the server (500).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            Self::Failed(_)
                | Self::Processor(ProcessorError::Tokenizer { .. } | ProcessorError::Pixels { .. })
                | Self::Text {
                    error: super::embed::TextError::Tokenizer(_),
                    ..
                }
        )
    }

    pub fn status(&self) -> u16 {
        if self.is_client_error() { 400 } else { 500 }
    }

    /// OpenAI's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Text {
                error: super::embed::TextError::TooLong { .. },
                ..
            } => "context_length_exceeded",
            Self::Text {
                error: super::embed::TextError::Tokenizer(_),
                ..
            } => "internal_error",
            Self::Text { .. } => "invalid_value",
            Self::Processor(ProcessorError::VideosNotSupported) | Self::VideosNotSupported { .. } => {
                "videos_not_supported"
            }
            Self::Processor(_) if !self.is_client_error() => "internal_error",
            Self::Processor(_) => "invalid_value",
            Self::Media { error, .. } => media_code(error),
            Self::ImageTokens { .. } => "image_tokens_exceeded",
            Self::PixelBudgetNotSupported { .. } => "unsupported_parameter",
            Self::ImageRefused { .. } => "invalid_image",
            Self::Grammar { .. } => "invalid_grammar",
            Self::Failed(_) => "internal_error",
        }
    }

    /// The field it concerns.
    pub fn param(&self) -> Option<String> {
        match self {
            Self::Processor(ProcessorError::EmptyContent { index }) => Some(format!("messages[{index}].content")),
            Self::Processor(_) if !self.is_client_error() => None,
            Self::Processor(_) => Some("messages".into()),
            Self::Media { param, .. } | Self::ImageTokens { param, .. } | Self::VideosNotSupported { param } => {
                Some(param.clone())
            }
            Self::PixelBudgetNotSupported { param } => Some(format!("{param}.max_pixels")),
            Self::ImageRefused { param, .. } | Self::Text { param, .. } | Self::Grammar { param, .. } => {
                Some(param.clone())
            }
            Self::Failed(_) => None,
        }
    }
}

fn media_code(error: &MediaError) -> &'static str {
    match error {
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
        MediaError::AddressNotAllowed(_) => "media_address_not_allowed",
        MediaError::LocalFilesDisabled | MediaError::PathNotAllowed(_) => "local_media_not_allowed",
        MediaError::FileNotFound(_) => "media_not_found",
        MediaError::ContentTypeMismatch { .. } => "content_type_mismatch",
        MediaError::TooManyPixels { .. } => "image_too_large",
        MediaError::NotAVideo(_) | MediaError::CorruptVideo(_) => "invalid_video",
        MediaError::VideoTooLong { .. } => "video_too_long",
    }
}
