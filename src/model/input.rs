//! A family's side of request preparation: how an image or a video becomes pixels for its
//! encoder and text for its prompt. The processor layer owns the chat template, the
//! tokenizer and the media; it asks the family, through these traits, for everything that
//! differs between families (tiles or patches at native resolution, the frame-sampling
//! rule, the placeholder expansion).

use image::{DynamicImage, RgbImage};

use super::{ContentKey, Pixels, TokenPositions};

/// How much of an image the request asks the model to see (OpenAI's `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Detail {
    /// The model's own preprocessing (`auto`, `high`).
    #[default]
    Auto,
    /// The family's small budget (`low`): SmolVLM shows one global view, no tiles.
    Low,
}

/// How a request asks an image to be shown: its `detail`, and the pixel budget (families
/// that resize to one, Qwen-VL) in place of the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ImageOptions {
    pub detail: Detail,
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

impl From<Detail> for ImageOptions {
    fn from(detail: Detail) -> Self {
        Self {
            detail,
            ..Self::default()
        }
    }
}

/// A unit of vision encoding: an image, or a part of a video (SmolVLM2: one frame).
#[derive(Debug, Clone)]
pub struct MediaItem {
    pub pixels: Pixels,
    pub key: ContentKey,
    /// Placeholder tokens it fills: rows of features the encoder makes of it.
    pub tokens: usize,
}

/// An image or a video ready for the encoder and the prompt.
#[derive(Debug, Clone)]
pub struct ProcessedMedia {
    pub items: Vec<MediaItem>,
    /// What replaces its placeholder in the rendered prompt: its items' placeholder tokens
    /// with the family's markers around them.
    pub text: String,
}

impl ProcessedMedia {
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.tokens).sum()
    }
}

/// What a container's header says of a video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    pub total_frames: usize,
    pub fps: f64,
    /// `total_frames / fps`, in seconds.
    pub duration: f64,
    pub width: u32,
    pub height: u32,
}

/// How densely to sample a video: about `fps` frames a second, at most `max_frames`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameSampling {
    pub fps: f64,
    pub max_frames: usize,
}

/// What a family makes of images.
pub trait InputProcessor: Send + Sync {
    /// What the chat template writes where an image goes (`<image>`).
    fn image_placeholder(&self) -> &str;

    /// Why the family's processor refuses an image of this size, from its header alone
    /// (Qwen-VL's: an aspect ratio over 200); `None`: it takes it.
    fn refuses_image(&self, _width: u32, _height: u32) -> Option<String> {
        None
    }

    /// Placeholder tokens an image of this size becomes, from its header alone: a request's
    /// token budget is checked before any image is decoded.
    fn image_tokens(&self, width: u32, height: u32, options: &ImageOptions) -> usize;

    /// An image's pixels and the text that replaces its placeholder.
    fn preprocess_image(&self, image: &DynamicImage, options: &ImageOptions) -> candle_core::Result<ProcessedMedia>;

    /// Whether a request may set an image's pixel budget (`ImageOptions::min_pixels`,
    /// `max_pixels`); where not, one that does is refused.
    fn takes_pixel_budget(&self) -> bool {
        false
    }

    /// What the family does with videos; `None`: it takes none, and a request with one is
    /// refused.
    fn video(&self) -> Option<&dyn VideoProcessor>;

    /// Where a prompt's tokens sit for rotary embeddings when not at their index (Qwen-VL's
    /// M-RoPE), from its token ids and the grids (`[frames, rows, columns]` in patches) of
    /// its media items, in order. `None`: at their index.
    fn positions(&self, _tokens: &[u32], _grids: &[[usize; 3]]) -> Option<TokenPositions> {
        None
    }
}

/// What a family makes of videos. The frames it picks are decoded (by the media layer)
/// and handed back one by one.
pub trait VideoProcessor: Send + Sync {
    /// What the chat template writes where a video goes (`<video>`).
    fn placeholder(&self) -> &str;

    /// A chat template for conversations that hold a video, used instead of the model's
    /// (SmolVLM2's processor does this: its models' templates have no video branch).
    fn chat_template(&self) -> Option<&str>;

    /// The model's own sampling, which a request may change within the server's bounds.
    fn default_sampling(&self) -> FrameSampling;

    /// The frames to take from a video, by index, ascending.
    fn sample_frames(&self, video: &VideoInfo, sampling: &FrameSampling) -> Vec<usize>;

    /// Placeholder tokens `frames` frames of this size become, before any is decoded.
    fn video_tokens(&self, width: u32, height: u32, frames: usize) -> usize;

    /// One frame's pixel values, `frames` being how many were sampled (a budget over the
    /// whole clip may size each); called on several threads at once, as frames are decoded.
    fn preprocess_frame(&self, frame: &RgbImage, frames: usize) -> Vec<f32>;

    /// The video from its frames' values (in order) and the indices they were taken at.
    fn finish(
        &self,
        frames: Vec<Vec<f32>>,
        video: &VideoInfo,
        indices: &[usize],
    ) -> candle_core::Result<ProcessedMedia>;
}
