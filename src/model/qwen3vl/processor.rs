//! Qwen3-VL's input processor (transformers' `Qwen3VLProcessor` with the torchvision
//! `Qwen2VLImageProcessor` the hub's `Qwen2VLImageProcessorFast` names): an image is resized
//! to multiples of 32 pixels within a pixel budget (`smart_resize`), cut into 16-pixel
//! patches (each repeated over the two frames of a temporal patch), and written into the
//! prompt as one `<|image_pad|>` per 2×2 block of patches; videos are in `video`. It also
//! places the prompt's tokens for M-RoPE (`positions`).

use std::path::{Path, PathBuf};

use image::DynamicImage;
use serde::Deserialize;

use super::config::Qwen3VlConfig;
use super::video::Qwen3VlVideo;
use crate::model::files::read_json;
use crate::model::input::{Detail, ImageOptions, InputProcessor, MediaItem, ProcessedMedia, VideoProcessor};
use crate::model::resample::{Filter, Image8, resize_like_torch, to_rgb};
use crate::model::{LoadError, ModelFiles, Pixels, TokenPositions};

pub const IMAGE_TOKEN: &str = "<|image_pad|>";
pub const VIDEO_TOKEN: &str = "<|video_pad|>";

/// `detail: "low"`: at most this many image tokens (64 at 32-pixel blocks: 256×256 pixels).
pub const LOW_DETAIL_TOKENS: usize = 64;

/// transformers refuses images longer than this many times their width (or wider).
const MAX_ASPECT_RATIO: f64 = 200.0;

/// What Qwen-VL's image and video processors share in their files.
#[derive(Debug, Clone, Deserialize)]
pub struct PatchConfig {
    #[serde(default)]
    pub size: Option<PixelBudget>,
    /// Older files give the budget as two fields instead of `size`.
    #[serde(default)]
    pub min_pixels: Option<usize>,
    #[serde(default)]
    pub max_pixels: Option<usize>,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::temporal_patch_size")]
    pub temporal_patch_size: usize,
    #[serde(default = "defaults::merge_size")]
    pub merge_size: usize,
    #[serde(default = "defaults::half")]
    pub image_mean: [f32; 3],
    #[serde(default = "defaults::half")]
    pub image_std: [f32; 3],
    #[serde(default = "defaults::yes")]
    pub do_rescale: bool,
    #[serde(default = "defaults::rescale")]
    pub rescale_factor: f64,
    #[serde(default = "defaults::yes")]
    pub do_normalize: bool,
    #[serde(default = "defaults::bicubic")]
    pub resample: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct PixelBudget {
    pub shortest_edge: usize,
    pub longest_edge: usize,
}

mod defaults {
    pub fn patch_size() -> usize {
        16
    }
    pub fn temporal_patch_size() -> usize {
        2
    }
    pub fn merge_size() -> usize {
        2
    }
    pub fn half() -> [f32; 3] {
        [0.5; 3]
    }
    pub fn yes() -> bool {
        true
    }
    pub fn rescale() -> f64 {
        1.0 / 255.0
    }
    pub fn bicubic() -> u32 {
        3
    }
}

/// How an image or a frame becomes patches: the resize filter, the normalisation, the patch
/// and block sizes.
#[derive(Debug, Clone)]
pub struct Patcher {
    pub patch: usize,
    pub temporal: usize,
    pub merge: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    filter: Filter,
    /// Per channel: value = (u8 - offset) / scale, in f32, as transformers fuses rescale and
    /// normalisation.
    offset: [f32; 3],
    scale: [f32; 3],
}

impl Patcher {
    pub fn new(config: &PatchConfig, file: &Path, default_budget: PixelBudget) -> Result<Self, LoadError> {
        let budget = config.size.unwrap_or(PixelBudget {
            shortest_edge: config.min_pixels.unwrap_or(default_budget.shortest_edge),
            longest_edge: config.max_pixels.unwrap_or(default_budget.longest_edge),
        });
        let filter = Filter::from_pil_code(config.resample)
            .ok_or_else(|| LoadError::invalid(file, "resample", format!("{} is not supported", config.resample)))?;
        if config.patch_size == 0 || config.merge_size == 0 || config.temporal_patch_size == 0 {
            return Err(LoadError::invalid(file, "patch_size", "patch sizes must be positive"));
        }
        if budget.shortest_edge > budget.longest_edge {
            return Err(LoadError::invalid(
                file,
                "size",
                "shortest_edge (min pixels) exceeds longest_edge (max pixels)",
            ));
        }
        let rescale = if config.do_rescale { config.rescale_factor } else { 1.0 };
        let (mean, std) = match config.do_normalize {
            true => (config.image_mean, config.image_std),
            false => ([0.0; 3], [1.0; 3]),
        };
        let factor = (1.0 / rescale) as f32;
        Ok(Self {
            patch: config.patch_size,
            temporal: config.temporal_patch_size,
            merge: config.merge_size,
            min_pixels: budget.shortest_edge,
            max_pixels: budget.longest_edge,
            filter,
            offset: mean.map(|m| m * factor),
            scale: std.map(|s| s * factor),
        })
    }

    /// The side of a block of patches that becomes one token: sizes are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch * self.merge
    }

    /// Resized to `width × height` with torchvision's antialiased uint8 kernel, normalised,
    /// channels first.
    pub fn normalized(&self, image: &Image8, width: usize, height: usize) -> Vec<f32> {
        let resized = match (image.width, image.height) == (width, height) {
            true => image.clone(),
            false => resize_like_torch(image, width, height, self.filter),
        };
        let mut out = Vec::with_capacity(3 * width * height);
        for ch in 0..3 {
            let (offset, scale) = (self.offset[ch], self.scale[ch]);
            out.extend(
                resized.data[ch..]
                    .iter()
                    .step_by(3)
                    .map(|&v| (v as f32 - offset) / scale),
            );
        }
        out
    }

    /// Frames (channels first, `height × width`, as many as a temporal patch holds) cut into
    /// patches `[patches, 3 · temporal · patch · patch]`, block by block.
    pub fn patches(&self, frames: &[&[f32]], height: usize, width: usize) -> Vec<f32> {
        let p = self.patch;
        let (gh, gw) = (height / p, width / p);
        let mut out = Vec::with_capacity(gh * gw * 3 * frames.len() * p * p);
        for (row, col) in super::vision::block_order(gh, gw, self.merge) {
            for ch in 0..3 {
                for frame in frames {
                    let plane = &frame[ch * height * width..][..height * width];
                    for y in row * p..(row + 1) * p {
                        out.extend_from_slice(&plane[y * width + col * p..][..p]);
                    }
                }
            }
        }
        out
    }
}

/// transformers' `smart_resize` for images: both sides multiples of `factor`, the area within
/// `[min_pixels, max_pixels]`, the aspect ratio kept as nearly as that allows. `None`: an
/// aspect ratio over 200, which transformers refuses.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Option<(usize, usize)> {
    let (h, w) = (height as f64, width as f64);
    if height == 0 || width == 0 || h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return None;
    }
    let f = factor as f64;
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Some((h_bar as usize, w_bar as usize))
}

/// Python's `round`: halves to even.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

pub struct Qwen3VlProcessor {
    images: Patcher,
    videos: Option<Qwen3VlVideo>,
    image_token_id: u32,
    video_token_id: u32,
}

impl Qwen3VlProcessor {
    pub fn load(files: &ModelFiles) -> Result<Self, LoadError> {
        let config = Qwen3VlConfig::load(&files.config)?;
        let path = image_config_path(files)?;
        let images = Patcher::new(&read_json(&path)?, &path, IMAGE_BUDGET)?;
        check_against_model(&images, &config, &path)?;
        let video_path = files.dir.join("video_preprocessor_config.json");
        let videos = match video_path.is_file() {
            true => {
                let video = Qwen3VlVideo::new(&read_json(&video_path)?, &video_path)?;
                check_against_model(video.patcher(), &config, &video_path)?;
                Some(video)
            }
            false => None,
        };
        Ok(Self {
            images,
            videos,
            image_token_id: config.image_token_id,
            video_token_id: config.video_token_id,
        })
    }

    /// The size an image is resized to, or `None` when transformers refuses it. A request's
    /// budget replaces the model's; `detail: "low"` caps it at `LOW_DETAIL_TOKENS` tokens.
    fn resized(&self, width: usize, height: usize, options: &ImageOptions) -> Option<(usize, usize)> {
        let factor = self.images.factor();
        let mut max_pixels = options.max_pixels.unwrap_or(self.images.max_pixels);
        if options.detail == Detail::Low {
            max_pixels = max_pixels.min(LOW_DETAIL_TOKENS * factor * factor);
        }
        let min_pixels = options.min_pixels.unwrap_or(self.images.min_pixels).min(max_pixels);
        smart_resize(height, width, factor, min_pixels, max_pixels)
    }
}

/// transformers' class defaults, for files without a budget.
const IMAGE_BUDGET: PixelBudget = PixelBudget {
    shortest_edge: 56 * 56,
    longest_edge: 28 * 28 * 1280,
};

fn image_config_path(files: &ModelFiles) -> Result<PathBuf, LoadError> {
    files.preprocessor_config.clone().ok_or_else(|| LoadError::MissingFile {
        dir: files.dir.clone(),
        file: "preprocessor_config.json".into(),
    })
}

/// The processor's patches must be the encoder's.
fn check_against_model(patcher: &Patcher, config: &Qwen3VlConfig, file: &Path) -> Result<(), LoadError> {
    let v = &config.vision_config;
    let checks = [
        ("patch_size", patcher.patch, v.patch_size),
        ("temporal_patch_size", patcher.temporal, v.temporal_patch_size),
        ("merge_size", patcher.merge, v.spatial_merge_size),
    ];
    for (field, ours, model) in checks {
        if ours != model {
            return Err(LoadError::invalid(
                file,
                field,
                format!("must equal the vision encoder's {model}, got {ours}"),
            ));
        }
    }
    Ok(())
}

impl InputProcessor for Qwen3VlProcessor {
    fn image_placeholder(&self) -> &str {
        IMAGE_TOKEN
    }

    fn refuses_image(&self, width: u32, height: u32) -> Option<String> {
        let (long, short) = (width.max(height), width.min(height));
        (short == 0 || long as f64 / short as f64 > MAX_ASPECT_RATIO).then(|| {
            format!("a {width}x{height} image has an aspect ratio over {MAX_ASPECT_RATIO}, which Qwen3-VL's processor refuses")
        })
    }

    fn image_tokens(&self, width: u32, height: u32, options: &ImageOptions) -> usize {
        let block = self.images.factor();
        self.resized(width as usize, height as usize, options)
            .map_or(0, |(h, w)| (h / block) * (w / block))
    }

    fn preprocess_image(&self, image: &DynamicImage, options: &ImageOptions) -> candle_core::Result<ProcessedMedia> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let Some((h, w)) = self.resized(width, height, options) else {
            candle_core::bail!(
                "a {width}x{height} image has an aspect ratio over 200, which Qwen3-VL's processor refuses"
            )
        };
        let values = self.images.normalized(&to_rgb(image), w, h);
        let frames = vec![values.as_slice(); self.images.temporal];
        let patches = self.images.patches(&frames, h, w);
        let (p, block) = (self.images.patch, self.images.factor());
        let grid = [1, h / p, w / p];
        let (pixels, key) = Pixels::keyed(
            patches,
            &[grid[1] * grid[2], 3 * self.images.temporal * p * p],
            Some(grid),
        )?;
        let tokens = (h / block) * (w / block);
        Ok(ProcessedMedia {
            items: vec![MediaItem { pixels, key, tokens }],
            text: IMAGE_TOKEN.repeat(tokens),
        })
    }

    fn takes_pixel_budget(&self) -> bool {
        true
    }

    fn video(&self) -> Option<&dyn VideoProcessor> {
        self.videos.as_ref().map(|v| v as &dyn VideoProcessor)
    }

    fn positions(&self, tokens: &[u32], grids: &[[usize; 3]]) -> Option<TokenPositions> {
        let vision = |t: u32| t == self.image_token_id || t == self.video_token_id;
        Some(mrope_positions(tokens, grids, self.images.merge, vision))
    }
}

/// transformers' `get_rope_index` for Qwen3-VL: text tokens count up from where the last
/// image left off; an image's tokens sit at (start, start + row, start + column) of its
/// merged grid, and the text after it starts at `start + max(rows, columns)`. Each run of
/// vision tokens takes the next grids (frames of a video are one grid each) until it is
/// covered.
pub fn mrope_positions(
    tokens: &[u32],
    grids: &[[usize; 3]],
    merge: usize,
    vision: impl Fn(u32) -> bool,
) -> TokenPositions {
    let mut positions = Vec::with_capacity(tokens.len());
    let mut grids = grids.iter();
    let mut next = 0u32;
    let mut i = 0;
    while i < tokens.len() {
        if !vision(tokens[i]) {
            positions.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let run = tokens[i..].iter().take_while(|&&t| vision(t)).count();
        let mut placed = 0;
        while placed < run {
            let Some(&[t, h, w]) = grids.next() else { break };
            let (h, w) = (h / merge, w / merge);
            let start = next;
            for ti in 0..t {
                for r in 0..h {
                    for c in 0..w {
                        positions.push([start + ti as u32, start + r as u32, start + c as u32]);
                    }
                }
            }
            placed += t * h * w;
            next = start + h.max(w) as u32;
        }
        // Vision tokens with no grid left (a prompt that does not match its media: refused
        // later by the engine's count) are placed as text.
        for _ in placed..run {
            positions.push([next; 3]);
            next += 1;
        }
        positions.truncate(i + run);
        i += run;
    }
    let max = positions.iter().flatten().max().map_or(-1, |&m| m as i64);
    TokenPositions {
        offset: max + 1 - tokens.len() as i64,
        prompt: positions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_follows_transformers() {
        // transformers 5.24: smart_resize(h, w, 32, 65536, 16777216)
        assert_eq!(smart_resize(480, 640, 32, 65536, 16777216), Some((480, 640)));
        assert_eq!(smart_resize(30, 40, 32, 4096, 65536), Some((64, 96)));
        assert_eq!(smart_resize(768, 1024, 32, 4096, 65536), Some((192, 288)));
        assert_eq!(smart_resize(1, 300, 32, 4096, 65536), None);
        // Halves round to even: 48 / 32 = 1.5 -> 2 blocks, 80 / 32 = 2.5 -> 2 blocks.
        assert_eq!(smart_resize(48, 80, 32, 1024, 1 << 20), Some((64, 64)));
    }

    #[test]
    fn text_after_an_image_continues_from_its_largest_side() {
        // "a b <img 2x3 merged> c": grid [1, 4, 6] in patches with merge 2.
        let tokens = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let p = mrope_positions(&tokens, &[[1, 4, 6]], 2, |t| t == 9);
        assert_eq!(&p.prompt[..3], &[[0, 0, 0], [1, 1, 1], [2, 2, 2]]);
        assert_eq!(p.prompt[3], [2, 2, 3]);
        assert_eq!(p.prompt[7], [2, 3, 4]);
        assert_eq!(p.prompt[8], [5, 5, 5]);
        assert_eq!(p.offset, 6 - 9);
        assert_eq!(p.range(9, 2), vec![[6; 3], [7; 3]]);
    }
}
