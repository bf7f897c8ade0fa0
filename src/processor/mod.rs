//! From messages and images to what the model takes: the chat template, the image
//! processor, the expansion of each image placeholder into its tile tokens, tokenization.
//! Identical to transformers' SmolVLM processor, so the token ids and pixel values match.

pub mod cache;
pub mod error;
pub mod image;
pub mod resample;
pub mod template;
pub mod video;

use std::path::Path;
use std::sync::Arc;

use ::image::DynamicImage;
use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

pub use error::ProcessorError;
pub use image::{ImageProcessor, ImageProcessorConfig, ProcessedImage};
pub use template::{ChatMessage, ChatTemplate, ContentPart, TemplateTokens};
pub use video::{FrameSampling, VideoInput, VideoMeta, VideoProcessor, VideoProcessorConfig};

use crate::model::files::read_json;
use crate::model::{LoadError, ModelFiles, ModelInfo};

const IMAGE_TOKEN: &str = "<image>";
const VIDEO_TOKEN: &str = "<video>";
const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
const GLOBAL_IMAGE_TOKEN: &str = "<global-img>";

/// A prompt ready for the engine.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub token_ids: Vec<u32>,
    /// All tiles of all images, in prompt order: `[tiles, 3, S, S]` (f32, CPU).
    pub pixel_values: Option<Tensor>,
    /// The images, in prompt order: how many of the tiles each has, and its content key.
    pub images: Vec<PromptImage>,
}

/// A hash of an image's preprocessed pixels: equal keys mean equal model inputs, so the
/// vision features can be reused across requests. Keys are of content only, never of
/// position or surrounding text.
pub type ImageKey = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptImage {
    pub tiles: usize,
    pub key: ImageKey,
}

impl Prompt {
    /// A prompt of text only.
    pub fn text(token_ids: Vec<u32>) -> Self {
        Self {
            token_ids,
            pixel_values: None,
            images: Vec::new(),
        }
    }

    /// Image tiles in all.
    pub fn tiles(&self) -> usize {
        self.images.iter().map(|i| i.tiles).sum()
    }
}

/// An image of a request and how to present it to the model.
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub image: DynamicImage,
    /// Split into tiles (`None`: the model's default). `detail: "low"` sends `Some(false)`:
    /// one global view.
    pub split: Option<bool>,
}

impl ImageInput {
    pub fn new(image: DynamicImage) -> Self {
        Self { image, split: None }
    }
}

pub struct Processor {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    images: ImageProcessor,
    videos: Option<VideoProcessor>,
    image_seq_len: usize,
    image_token_id: u32,
    eos_token_ids: Vec<u32>,
    /// Off (0 bytes) until `set_preprocess_cache_bytes`.
    preprocessed: cache::PreprocessCache,
}

impl Processor {
    pub fn load(files: &ModelFiles, info: &ModelInfo) -> Result<Self, LoadError> {
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| LoadError::Tokenizer {
            file: files.tokenizer.clone(),
            message: e.to_string(),
        })?;
        let tokenizer_config: serde_json::Value = match &files.tokenizer_config {
            Some(path) => read_json(path)?,
            None => serde_json::Value::Null,
        };
        let token = |name: &str| special_token(&tokenizer_config, name);
        let tokens = TemplateTokens {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
        };
        let template = ChatTemplate::load(&files.chat_template, tokens.clone())?;
        let (images, image_file) = load_image_processor(files)?;
        let videos = load_video_processor(files)?;
        if let Some(v) = videos.as_ref().filter(|v| v.tile_size() != info.tile_size) {
            return Err(LoadError::invalid(
                &image_file,
                "max_image_size.longest_edge",
                format!(
                    "the video frames' size {} must equal the vision encoder's image_size {}",
                    v.tile_size(),
                    info.tile_size
                ),
            ));
        }
        let image_seq_len = load_image_seq_len(files, info)?;
        if images.tile_size() != info.tile_size {
            return Err(LoadError::invalid(
                &image_file,
                "max_image_size.longest_edge",
                format!(
                    "must equal the vision encoder's image_size {}, got {}",
                    info.tile_size,
                    images.tile_size()
                ),
            ));
        }
        let image_token_id = tokenizer.token_to_id(IMAGE_TOKEN);
        if image_token_id != Some(info.image_token_id) {
            return Err(LoadError::invalid(
                &files.config,
                "image_token_id",
                format!(
                    "is {} but the tokenizer's {IMAGE_TOKEN} is {image_token_id:?}",
                    info.image_token_id
                ),
            ));
        }
        let tokenizer_vocab = tokenizer.get_vocab_size(true);
        if tokenizer_vocab > info.vocab_size {
            return Err(LoadError::Tokenizer {
                file: files.tokenizer.clone(),
                message: format!(
                    "has {tokenizer_vocab} tokens, more than the model's vocab_size {}",
                    info.vocab_size
                ),
            });
        }
        let eos_token_ids = eos_token_ids(files, &tokenizer, tokens.eos_token.as_deref())?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            template,
            images,
            videos,
            image_seq_len,
            image_token_id: info.image_token_id,
            eos_token_ids,
            preprocessed: cache::PreprocessCache::new(0),
        })
    }

    /// Keep up to `bytes` of preprocessed images for requests that send them again.
    pub fn set_preprocess_cache_bytes(&self, bytes: usize) {
        self.preprocessed.set_capacity(bytes);
    }

    /// The preprocessing cache's (hits, misses).
    pub fn preprocess_cache_stats(&self) -> (u64, u64) {
        self.preprocessed.stats()
    }

    /// Image tokens an image of this size becomes (its tiles times the tokens per tile).
    pub fn image_tokens(&self, width: u32, height: u32, split: Option<bool>) -> usize {
        let split = split.unwrap_or(self.images.splits_by_default());
        self.images.tiles_for(width as usize, height as usize, split) * self.image_seq_len
    }

    /// The video processor, if the model's processor takes videos (SmolVLM2).
    pub fn video_processor(&self) -> Option<&VideoProcessor> {
        self.videos.as_ref()
    }

    /// Tokens one video frame becomes.
    pub fn frame_tokens(&self) -> usize {
        self.image_seq_len
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    /// Tokens that end generation (generation_config.json's `eos_token_id`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Shared with the engine, which detokenizes as it generates.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn image_processor(&self) -> &ImageProcessor {
        &self.images
    }

    /// Renders the chat template with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ProcessorError> {
        self.render_with(messages, true)
    }

    /// Renders the chat template, with the generation prompt or without (a finished
    /// conversation, as fine-tuning reads it).
    pub fn render_with(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ProcessorError> {
        if messages.is_empty() {
            return Err(ProcessorError::NoMessages);
        }
        if let Some(index) = messages.iter().position(|m| m.content.is_empty()) {
            return Err(ProcessorError::EmptyContent { index });
        }
        self.template.render(messages, add_generation_prompt)
    }

    /// The whole processor: template, images, placeholder expansion, tokenization.
    pub fn process(&self, messages: &[ChatMessage], images: &[ImageInput]) -> Result<Prompt, ProcessorError> {
        self.process_media(messages, images, Vec::new())
    }

    /// `process` with videos too: each video becomes its frames, one tile each, introduced
    /// and timestamped as SmolVLM2's processor does.
    pub fn process_media(
        &self,
        messages: &[ChatMessage],
        images: &[ImageInput],
        videos: Vec<VideoInput>,
    ) -> Result<Prompt, ProcessorError> {
        let text = self.render(messages)?;
        self.process_rendered(&text, images, videos)
    }

    /// `process_media` on a conversation already rendered by the chat template.
    pub fn process_rendered(
        &self,
        text: &str,
        images: &[ImageInput],
        videos: Vec<VideoInput>,
    ) -> Result<Prompt, ProcessorError> {
        if !videos.is_empty() && self.videos.is_none() {
            return Err(ProcessorError::VideosNotSupported);
        }
        let default_split = self.images.splits_by_default();
        let mut processed: Vec<ProcessedImage> = images
            .iter()
            .map(|input| {
                let split = input.split.unwrap_or(default_split);
                (self.preprocessed).get_or_insert(&input.image, split, || self.images.preprocess(&input.image, split))
            })
            .collect();
        let (expanded, order) = self.expand_placeholders(text, &processed, &videos)?;
        let token_ids = self.tokenize(&expanded)?;
        let by_video: Vec<usize> = videos.iter().map(|v| v.tiles.len()).collect();
        let frames: Vec<ProcessedImage> = videos
            .into_iter()
            .flat_map(|v| v.tiles)
            .map(|pixel_values| {
                let key = *blake3::hash(image::bytes_of(&pixel_values)).as_bytes();
                ProcessedImage {
                    pixel_values,
                    tiles: 1,
                    rows: 0,
                    cols: 0,
                    key,
                }
            })
            .collect();
        // Images and frames in the order the prompt holds them.
        let mut frames = frames.into_iter();
        let mut by_video = by_video.into_iter();
        let mut images = std::mem::take(&mut processed).into_iter();
        let ordered: Vec<ProcessedImage> = order
            .iter()
            .flat_map(|kind| match kind {
                Placeholder::Image => images.next().into_iter().collect::<Vec<_>>(),
                Placeholder::Video => {
                    let n = by_video.next().unwrap_or(0);
                    frames.by_ref().take(n).collect()
                }
            })
            .collect();
        let tiles: usize = ordered.iter().map(|p| p.tiles).sum();
        let found = token_ids.iter().filter(|&&t| t == self.image_token_id).count();
        if found != tiles * self.image_seq_len {
            return Err(ProcessorError::Tokenizer {
                message: format!(
                    "expected {} image tokens, the tokenizer produced {found}",
                    tiles * self.image_seq_len
                ),
            });
        }
        let prompt_images = ordered
            .iter()
            .map(|p| PromptImage {
                tiles: p.tiles,
                key: p.key,
            })
            .collect();
        let pixel_values = if ordered.is_empty() {
            None
        } else {
            Some(stack_tiles(&ordered, self.images.tile_size()))
        };
        Ok(Prompt {
            token_ids,
            pixel_values,
            images: prompt_images,
        })
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ProcessorError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ProcessorError::Tokenizer { message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ProcessorError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ProcessorError::Tokenizer { message: e.to_string() })
    }

    /// transformers' `Idefics3Processor`: each `<image>` in the rendered text becomes the
    /// tokens of its tiles (`<row_r_col_c>` + image tokens, a newline after each row) and
    /// of its global view (`<global-img>`), framed by `<fake_token_around_image>`. Each
    /// `<video>` becomes SmolVLM2's video text, one global view per frame. Returns the text
    /// and which placeholder came in which order.
    fn expand_placeholders(
        &self,
        text: &str,
        images: &[ProcessedImage],
        videos: &[VideoInput],
    ) -> Result<(String, Vec<Placeholder>), ProcessorError> {
        let mut order = Vec::new();
        let mut pieces = Vec::new();
        let mut rest = text;
        loop {
            let image = rest
                .find(IMAGE_TOKEN)
                .map(|i| (i, Placeholder::Image, IMAGE_TOKEN.len()));
            let video = rest
                .find(VIDEO_TOKEN)
                .map(|i| (i, Placeholder::Video, VIDEO_TOKEN.len()));
            let next = match (image, video) {
                (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            let Some((at, kind, len)) = next else { break };
            pieces.push(&rest[..at]);
            order.push(kind);
            rest = &rest[at + len..];
        }
        pieces.push(rest);
        let count = |kind| order.iter().filter(|&&k| k == kind).count();
        if count(Placeholder::Image) != images.len() {
            return Err(ProcessorError::ImageCount {
                placeholders: count(Placeholder::Image),
                images: images.len(),
            });
        }
        if count(Placeholder::Video) != videos.len() {
            return Err(ProcessorError::VideoCount {
                placeholders: count(Placeholder::Video),
                videos: videos.len(),
            });
        }
        let image_tokens = IMAGE_TOKEN.repeat(self.image_seq_len);
        let global = format!("{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_tokens}{FAKE_IMAGE_TOKEN}");
        let (mut images, mut videos) = (images.iter(), videos.iter());
        let mut out = String::with_capacity(text.len() + order.len() * image_tokens.len() * 17);
        for (piece, kind) in pieces.iter().zip(order.iter().map(Some).chain([None])) {
            out.push_str(piece);
            match kind {
                None => break,
                Some(Placeholder::Video) => {
                    let video = videos.next().expect("counted above");
                    out.push_str(&video::video_prompt(video, &global));
                }
                Some(Placeholder::Image) => {
                    let image = images.next().expect("counted above");
                    for r in 1..=image.rows {
                        for c in 1..=image.cols {
                            out.push_str(&format!("{FAKE_IMAGE_TOKEN}<row_{r}_col_{c}>{image_tokens}"));
                        }
                        out.push('\n');
                    }
                    if image.rows > 0 {
                        out.push('\n');
                    }
                    out.push_str(&global);
                }
            }
        }
        Ok((out, order))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Image,
    Video,
}

fn stack_tiles(images: &[ProcessedImage], size: usize) -> Tensor {
    let tiles: usize = images.iter().map(|p| p.tiles).sum();
    let data: Vec<f32> = images.iter().flat_map(|p| p.pixel_values.iter().copied()).collect();
    Tensor::from_vec(data, (tiles, 3, size, size), &Device::Cpu)
        .expect("every tile holds 3 * size * size values. This is a bug.")
}

/// A special token of tokenizer_config.json: a string, or an AddedToken object.
fn special_token(config: &serde_json::Value, name: &str) -> Option<String> {
    match config.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// preprocessor_config.json, or the `image_processor` that transformers 5 nests in
/// processor_config.json.
fn load_image_processor(files: &ModelFiles) -> Result<(ImageProcessor, std::path::PathBuf), LoadError> {
    if let Some(path) = &files.preprocessor_config {
        let config: ImageProcessorConfig = read_json(path)?;
        return Ok((ImageProcessor::new(config, path)?, path.clone()));
    }
    if let Some(path) = &files.processor_config {
        #[derive(serde::Deserialize)]
        struct Nested {
            image_processor: Option<ImageProcessorConfig>,
        }
        if let Some(config) = read_json::<Nested>(path)?.image_processor {
            return Ok((ImageProcessor::new(config, path)?, path.clone()));
        }
    }
    Err(LoadError::MissingFile {
        dir: files.dir.clone(),
        file: "preprocessor_config.json (or processor_config.json with image_processor)".into(),
    })
}

/// The video processor: preprocessor_config.json's `video_sampling` (hub layout), or the
/// `video_processor` that transformers 5 nests in processor_config.json.
fn load_video_processor(files: &ModelFiles) -> Result<Option<VideoProcessor>, LoadError> {
    if let Some(path) = &files.processor_config {
        #[derive(serde::Deserialize)]
        struct Nested {
            video_processor: Option<VideoProcessorConfig>,
        }
        if let Some(config) = read_json::<Nested>(path)?.video_processor {
            return VideoProcessor::new(config, path);
        }
    }
    match &files.preprocessor_config {
        Some(path) => VideoProcessor::new(read_json(path)?, path),
        None => Ok(None),
    }
}

/// processor_config.json's `image_seq_len`, which must agree with the model; when the file
/// is absent the model's own value is used (transformers would fall back to 169 and fail).
fn load_image_seq_len(files: &ModelFiles, info: &ModelInfo) -> Result<usize, LoadError> {
    let Some(path) = &files.processor_config else {
        return Ok(info.image_seq_len);
    };
    #[derive(serde::Deserialize)]
    struct ProcessorConfig {
        image_seq_len: Option<usize>,
    }
    match read_json::<ProcessorConfig>(path)?.image_seq_len {
        Some(n) if n != info.image_seq_len => Err(LoadError::invalid(
            path,
            "image_seq_len",
            format!("must equal the model's tokens per tile {}, got {n}", info.image_seq_len),
        )),
        _ => Ok(info.image_seq_len),
    }
}

/// generation_config.json's `eos_token_id` (one id or a list); without that file, the
/// tokenizer's eos token.
fn eos_token_ids(files: &ModelFiles, tokenizer: &Tokenizer, eos_token: Option<&str>) -> Result<Vec<u32>, LoadError> {
    if let Some(path) = &files.generation_config {
        #[derive(serde::Deserialize)]
        struct GenerationConfig {
            eos_token_id: Option<crate::model::smolvlm::config::EosTokenIds>,
        }
        if let Some(ids) = read_json::<GenerationConfig>(path)?.eos_token_id {
            return Ok(ids.to_vec());
        }
    }
    let id = eos_token.and_then(|t| tokenizer.token_to_id(t));
    id.map(|id| vec![id]).ok_or_else(|| {
        let file = files
            .generation_config
            .clone()
            .unwrap_or_else(|| files.dir.join("generation_config.json"));
        LoadError::invalid(
            &file,
            "eos_token_id",
            "no end-of-sequence token: neither here nor in tokenizer_config.json",
        )
    })
}

/// Opens an image file the way the CLI and tests need it; the server's media layer does
/// its own bounded decoding.
pub fn open_image(path: &Path) -> Result<DynamicImage, ::image::ImageError> {
    ::image::ImageReader::open(path)?.with_guessed_format()?.decode()
}
