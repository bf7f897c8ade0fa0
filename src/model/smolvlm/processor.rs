//! SmolVLM's input processor (transformers' `Idefics3Processor` and `SmolVLMProcessor`):
//! an image becomes its tiles plus a global view (`image`), each written into the prompt
//! as `<row_r_col_c>` and the tile's image tokens, framed by `<fake_token_around_image>`;
//! SmolVLM2 adds videos (`video`). The files: preprocessor_config.json (or the
//! `image_processor` and `video_processor` that transformers 5 nests in
//! processor_config.json), and processor_config.json's `image_seq_len`.

use image::DynamicImage;

use super::config::SmolVlmConfig;
use super::image::{ImageProcessor, ImageProcessorConfig, Tiles};
use super::video::{SmolVlm2Video, VideoProcessorConfig};
use crate::model::files::read_json;
use crate::model::input::{Detail, ImageOptions, InputProcessor, MediaItem, ProcessedMedia, VideoProcessor};
use crate::model::{LoadError, ModelFiles, Pixels};

const IMAGE_TOKEN: &str = "<image>";
const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
const GLOBAL_IMAGE_TOKEN: &str = "<global-img>";

pub struct SmolVlmProcessor {
    images: ImageProcessor,
    /// SmolVLM2's, when its files say how to sample videos.
    videos: Option<SmolVlm2Video>,
    /// Image tokens per tile.
    image_seq_len: usize,
}

impl SmolVlmProcessor {
    /// The processor of a SmolVLM folder; `with_videos` for SmolVLM2, whose processor
    /// files may describe its video sampling (SmolVLM v1 takes no videos).
    pub fn load(files: &ModelFiles, with_videos: bool) -> Result<Self, LoadError> {
        let config = SmolVlmConfig::load(&files.config)?;
        let tile_size = config.vision_config.image_size;
        let (images, image_file) = load_image_processor(files)?;
        if images.tile_size() != tile_size {
            return Err(LoadError::invalid(
                &image_file,
                "max_image_size.longest_edge",
                format!(
                    "must equal the vision encoder's image_size {tile_size}, got {}",
                    images.tile_size()
                ),
            ));
        }
        let image_seq_len = load_image_seq_len(files, config.image_seq_len())?;
        let frame_text = global_view(&IMAGE_TOKEN.repeat(image_seq_len));
        let videos = match with_videos {
            true => load_video_processor(files, image_seq_len, frame_text)?,
            false => None,
        };
        if let Some(v) = videos.as_ref().filter(|v| v.tile_size() != tile_size) {
            return Err(LoadError::invalid(
                &image_file,
                "max_image_size.longest_edge",
                format!(
                    "the video frames' size {} must equal the vision encoder's image_size {tile_size}",
                    v.tile_size(),
                ),
            ));
        }
        Ok(Self {
            images,
            videos,
            image_seq_len,
        })
    }

    fn split(&self, detail: Detail) -> bool {
        match detail {
            Detail::Auto => self.images.splits_by_default(),
            Detail::Low => false,
        }
    }

    /// The text of an image: each tile's row and column marker and image tokens, a newline
    /// after each row, then the global view.
    fn image_text(&self, tiles: &Tiles) -> String {
        let image_tokens = IMAGE_TOKEN.repeat(self.image_seq_len);
        let mut out = String::with_capacity((tiles.tiles) * (image_tokens.len() + 40));
        for r in 1..=tiles.rows {
            for c in 1..=tiles.cols {
                out.push_str(&format!("{FAKE_IMAGE_TOKEN}<row_{r}_col_{c}>{image_tokens}"));
            }
            out.push('\n');
        }
        if tiles.rows > 0 {
            out.push('\n');
        }
        out.push_str(&global_view(&image_tokens));
        out
    }
}

impl InputProcessor for SmolVlmProcessor {
    fn image_placeholder(&self) -> &str {
        IMAGE_TOKEN
    }

    fn image_tokens(&self, width: u32, height: u32, options: &ImageOptions) -> usize {
        let tiles = self
            .images
            .tiles_for(width as usize, height as usize, self.split(options.detail));
        tiles * self.image_seq_len
    }

    fn preprocess_image(&self, image: &DynamicImage, options: &ImageOptions) -> candle_core::Result<ProcessedMedia> {
        let tiles = self.images.preprocess(image, self.split(options.detail));
        let text = self.image_text(&tiles);
        let size = self.images.tile_size();
        let (pixels, key) = Pixels::keyed(tiles.pixel_values, &[tiles.tiles, 3, size, size], None)?;
        let item = MediaItem {
            pixels,
            key,
            tokens: tiles.tiles * self.image_seq_len,
        };
        Ok(ProcessedMedia {
            items: vec![item],
            text,
        })
    }

    fn video(&self) -> Option<&dyn VideoProcessor> {
        self.videos.as_ref().map(|v| v as &dyn VideoProcessor)
    }
}

/// A global view (an untiled image, a video frame) as prompt text.
fn global_view(image_tokens: &str) -> String {
    format!("{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_tokens}{FAKE_IMAGE_TOKEN}")
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
fn load_video_processor(
    files: &ModelFiles,
    frame_tokens: usize,
    frame_text: String,
) -> Result<Option<SmolVlm2Video>, LoadError> {
    if let Some(path) = &files.processor_config {
        #[derive(serde::Deserialize)]
        struct Nested {
            video_processor: Option<VideoProcessorConfig>,
        }
        if let Some(config) = read_json::<Nested>(path)?.video_processor {
            return SmolVlm2Video::new(config, path, frame_tokens, frame_text);
        }
    }
    match &files.preprocessor_config {
        Some(path) => SmolVlm2Video::new(read_json(path)?, path, frame_tokens, frame_text),
        None => Ok(None),
    }
}

/// processor_config.json's `image_seq_len`, which must agree with the model; when the file
/// is absent the model's own value is used (transformers would fall back to 169 and fail).
fn load_image_seq_len(files: &ModelFiles, model: usize) -> Result<usize, LoadError> {
    let Some(path) = &files.processor_config else {
        return Ok(model);
    };
    #[derive(serde::Deserialize)]
    struct ProcessorConfig {
        image_seq_len: Option<usize>,
    }
    match read_json::<ProcessorConfig>(path)?.image_seq_len {
        Some(n) if n != model => Err(LoadError::invalid(
            path,
            "image_seq_len",
            format!("must equal the model's tokens per tile {model}, got {n}"),
        )),
        _ => Ok(model),
    }
}
