//! Errors of turning a request into a prompt: things a client can cause.

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
    #[error("this model's processor takes no videos (its config has no `video_sampling`)")]
    VideosNotSupported,
    #[error("tokenization failed: {message}")]
    Tokenizer { message: String },
}
