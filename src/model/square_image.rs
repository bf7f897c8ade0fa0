//! The image processors of the contrastive models, as transformers' default (torchvision)
//! backend runs them: convert to RGB, resize (CLIP: the shortest edge to a size, the other
//! in proportion; SigLIP: to a fixed height and width) with torchvision's antialiased uint8
//! kernel, center-crop (CLIP), then rescale and normalise fused, `(u8 - 255·mean) /
//! (255·std)` in f32. The result is one square `[1, 3, size, size]`.

use std::path::Path;

use image::DynamicImage;
use serde::Deserialize;

use super::embedding::{EmbeddingInputs, TextRules};
use super::resample::{Filter, Image8, resize_like_torch, to_rgb};
use super::{ContentKey, LoadError, ModelFiles, Pixels};

/// transformers' `OPENAI_CLIP_MEAN` and `OPENAI_CLIP_STD` (CLIP's and BLIP's processors),
/// as written there; the nearest f32s are what the normalisation uses.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// `preprocessor_config.json`'s fields these processors read, in the forms hub files use
/// (`size: 224`, `{"shortest_edge": 224}`, `{"height": 224, "width": 224}`).
#[derive(Debug, Clone, Deserialize)]
pub struct SquareConfig {
    #[serde(default)]
    pub size: Option<SizeField>,
    #[serde(default)]
    pub crop_size: Option<SizeField>,
    #[serde(default)]
    pub do_resize: Option<bool>,
    #[serde(default)]
    pub do_center_crop: Option<bool>,
    #[serde(default)]
    pub do_rescale: Option<bool>,
    #[serde(default)]
    pub rescale_factor: Option<f64>,
    #[serde(default)]
    pub do_normalize: Option<bool>,
    #[serde(default)]
    pub image_mean: Option<[f32; 3]>,
    #[serde(default)]
    pub image_std: Option<[f32; 3]>,
    #[serde(default)]
    pub resample: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum SizeField {
    Edge(usize),
    Shortest { shortest_edge: usize },
    Exact { height: usize, width: usize },
}

/// How the first step resizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The shortest edge to this, the other edge in proportion (truncated), as
    /// `get_resize_output_image_size(default_to_square=False)`.
    ShortestEdge(usize),
    /// To `(height, width)`.
    Exact(usize, usize),
}

/// The defaults a family's image processor class sets, where the file is silent.
#[derive(Debug, Clone, Copy)]
pub struct SquareDefaults {
    pub resize: Resize,
    pub crop: Option<usize>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone)]
pub struct SquareProcessor {
    resize: Option<Resize>,
    crop: Option<(usize, usize)>,
    filter: Filter,
    /// Per channel: value = (u8 - offset) / scale, in f32, as transformers fuses rescale and
    /// normalisation.
    offset: [f32; 3],
    scale: [f32; 3],
    /// The side of the square the model takes.
    side: usize,
    /// Most pixels of the resized image before the crop (an extreme aspect ratio resized by
    /// its shortest edge would otherwise make a huge one).
    max_resized_pixels: usize,
}

impl SquareProcessor {
    /// The processor `file` describes for a model that takes `side`-pixel squares.
    pub fn load(file: &Path, defaults: SquareDefaults, side: usize) -> Result<Self, LoadError> {
        let config: SquareConfig = super::files::read_json(file)?;
        let resize = match (config.do_resize.unwrap_or(true), config.size) {
            (false, _) => None,
            (true, None) => Some(defaults.resize),
            (true, Some(SizeField::Edge(n))) => Some(match defaults.resize {
                Resize::ShortestEdge(_) => Resize::ShortestEdge(n),
                Resize::Exact(..) => Resize::Exact(n, n),
            }),
            (true, Some(SizeField::Shortest { shortest_edge })) => Some(Resize::ShortestEdge(shortest_edge)),
            (true, Some(SizeField::Exact { height, width })) => Some(Resize::Exact(height, width)),
        };
        let crop_on = config.do_center_crop.unwrap_or(defaults.crop.is_some());
        let crop = match (crop_on, config.crop_size) {
            (false, _) => None,
            (true, Some(SizeField::Edge(n) | SizeField::Shortest { shortest_edge: n })) => Some((n, n)),
            (true, Some(SizeField::Exact { height, width })) => Some((height, width)),
            (true, None) => defaults.crop.map(|n| (n, n)),
        };
        let out = match (crop, resize) {
            (Some(c), _) => Some(c),
            (None, Some(Resize::Exact(h, w))) => Some((h, w)),
            _ => None,
        };
        if out != Some((side, side)) {
            return Err(LoadError::invalid(
                file,
                "size",
                format!("makes images of {out:?} (height, width); the model takes {side}x{side}"),
            ));
        }
        let code = config.resample.unwrap_or(3);
        let filter = Filter::from_pil_code(code)
            .ok_or_else(|| LoadError::invalid(file, "resample", format!("{code} is not supported")))?;
        let rescale = match config.do_rescale.unwrap_or(true) {
            true => config.rescale_factor.unwrap_or(1.0 / 255.0),
            false => 1.0,
        };
        let (mean, std) = match config.do_normalize.unwrap_or(true) {
            true => (
                config.image_mean.unwrap_or(defaults.mean),
                config.image_std.unwrap_or(defaults.std),
            ),
            false => ([0.0; 3], [1.0; 3]),
        };
        let factor = (1.0 / rescale) as f32;
        Ok(Self {
            resize,
            crop,
            filter,
            offset: mean.map(|m| m * factor),
            scale: std.map(|s| s * factor),
            side,
            max_resized_pixels: 64 * side * side,
        })
    }

    /// The model's pixels for an image, and the key of their content.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<(Pixels, ContentKey), String> {
        let rgb = to_rgb(image);
        let resized = match self.resize.map(|r| self.resized_size(&rgb, r)) {
            Some((h, w)) if (h, w) != (rgb.height, rgb.width) => {
                if h * w > self.max_resized_pixels || h == 0 || w == 0 {
                    return Err(format!(
                        "a {}x{} image resizes to {w}x{h} before its crop; its aspect ratio is too extreme",
                        rgb.width, rgb.height
                    ));
                }
                resize_like_torch(&rgb, w, h, self.filter)
            }
            _ => rgb,
        };
        let (top, left, h, w) = match self.crop {
            Some((ch, cw)) => (
                (resized.height as i64 - ch as i64) / 2,
                (resized.width as i64 - cw as i64) / 2,
                ch,
                cw,
            ),
            None => (0, 0, resized.height, resized.width),
        };
        let mut values = Vec::with_capacity(3 * h * w);
        for ch in 0..3 {
            let (offset, scale) = (self.offset[ch], self.scale[ch]);
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let (sy, sx) = (y + top, x + left);
                    // torchvision pads with zeros where the crop is larger than the image.
                    let inside = (0..resized.height as i64).contains(&sy) && (0..resized.width as i64).contains(&sx);
                    let v = match inside {
                        true => resized.data[(sy as usize * resized.width + sx as usize) * 3 + ch],
                        false => 0,
                    };
                    values.push((v as f32 - offset) / scale);
                }
            }
        }
        Pixels::keyed(values, &[1, 3, h, w], None).map_err(|e| e.to_string())
    }

    fn resized_size(&self, image: &Image8, resize: Resize) -> (usize, usize) {
        match resize {
            Resize::Exact(h, w) => (h, w),
            Resize::ShortestEdge(short) => {
                let (h, w) = (image.height, image.width);
                let (s, l) = (h.min(w), h.max(w));
                // Python's int() of the float ratio.
                let long = (short as f64 * l as f64 / s as f64) as usize;
                if h <= w { (short, long) } else { (long, short) }
            }
        }
    }

    pub fn side(&self) -> usize {
        self.side
    }
}

/// A contrastive family's inputs: its text rules and a square image processor read from
/// the folder's `preprocessor_config.json` (CLIP, SigLIP and BLIP differ only in these).
pub struct SquareInputs {
    rules: TextRules,
    image: SquareProcessor,
}

impl SquareInputs {
    pub fn load(
        files: &ModelFiles,
        rules: TextRules,
        defaults: SquareDefaults,
        side: usize,
    ) -> Result<Self, LoadError> {
        let file = files
            .preprocessor_config
            .as_ref()
            .ok_or_else(|| LoadError::MissingFile {
                dir: files.dir.clone(),
                file: "preprocessor_config.json".into(),
            })?;
        Ok(Self {
            rules,
            image: SquareProcessor::load(file, defaults, side)?,
        })
    }
}

impl EmbeddingInputs for SquareInputs {
    fn text_rules(&self) -> &TextRules {
        &self.rules
    }

    fn preprocess_image(&self, image: &DynamicImage) -> Result<(Pixels, ContentKey), String> {
        self.image.preprocess(image)
    }
}
