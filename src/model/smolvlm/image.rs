//! SmolVLM's image processor, as transformers 5's `Idefics3ImageProcessorPil` runs it:
//! RGB conversion (alpha composited on white, as Pillow does it), resize of the longest
//! edge, resize to a multiple of the tile size, split into tiles plus a global view,
//! rescale and normalise. Every resize is Pillow's, to the bit (see `resample`).

use std::path::Path;

use image::DynamicImage;
use serde::Deserialize;

use crate::model::LoadError;
use crate::model::resample::{self, Filter, Image8, as_rgb8, to_rgb};

/// transformers' cap on either side after the longest-edge resize.
const MAX_IMAGE_SIZE: usize = 4096;

#[derive(Debug, Clone, Deserialize)]
pub struct LongestEdge {
    pub longest_edge: usize,
}

/// preprocessor_config.json (or processor_config.json's `image_processor`), with
/// `Idefics3ImageProcessor`'s defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_convert_rgb: bool,
    #[serde(default = "yes")]
    pub do_image_splitting: bool,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default = "half3")]
    pub image_mean: [f32; 3],
    #[serde(default = "half3")]
    pub image_std: [f32; 3],
    #[serde(default = "default_tile")]
    pub max_image_size: LongestEdge,
    #[serde(default = "lanczos")]
    pub resample: u32,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_size")]
    pub size: LongestEdge,
}

fn yes() -> bool {
    true
}
fn half3() -> [f32; 3] {
    [0.5; 3]
}
fn default_tile() -> LongestEdge {
    LongestEdge { longest_edge: 364 }
}
fn default_size() -> LongestEdge {
    LongestEdge { longest_edge: 4 * 364 }
}
fn lanczos() -> u32 {
    1
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}

/// One image after preprocessing: its tiles, row-major, then the global view.
#[derive(Debug, Clone)]
pub struct Tiles {
    /// `tiles * 3 * tile_size * tile_size` values, channels first.
    pub pixel_values: Vec<f32>,
    pub tiles: usize,
    /// 0 and 0 when the image is not split (one global view only).
    pub rows: usize,
    pub cols: usize,
}

#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: ImageProcessorConfig,
    filter: Filter,
    tile_size: usize,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig, file: &Path) -> Result<Self, LoadError> {
        let filter = Filter::from_pil_code(config.resample).ok_or_else(|| {
            LoadError::invalid(
                file,
                "resample",
                format!("PIL filter {} is not supported (1-5 are)", config.resample),
            )
        })?;
        let tile_size = config.max_image_size.longest_edge;
        if tile_size == 0 || config.size.longest_edge == 0 {
            return Err(LoadError::invalid(file, "max_image_size", "sizes must be positive"));
        }
        Ok(Self {
            config,
            filter,
            tile_size,
        })
    }

    pub fn tile_size(&self) -> usize {
        self.tile_size
    }

    /// Whether images are split into tiles unless a request says otherwise.
    pub fn splits_by_default(&self) -> bool {
        self.config.do_image_splitting
    }

    /// Tiles an image of this size becomes, without touching its pixels.
    pub fn tiles_for(&self, width: usize, height: usize, split: bool) -> usize {
        if !split {
            return 1;
        }
        let (h, w) = if self.config.do_resize {
            longest_edge_size(height, width, self.config.size.longest_edge)
        } else {
            (height, width)
        };
        let m = self.tile_size;
        let (h, w) = vision_encoder_size(h, w, m);
        if h > m || w > m {
            ((h - m) / m + 1) * ((w - m) / m + 1) + 1
        } else {
            1
        }
    }

    pub fn preprocess(&self, image: &DynamicImage, split: bool) -> Tiles {
        let c = &self.config;
        let mut img = if c.do_convert_rgb {
            to_rgb(image)
        } else {
            as_rgb8(image)
        };
        if c.do_resize {
            let (h, w) = longest_edge_size(img.height, img.width, c.size.longest_edge);
            img = resample::resize(&img, w, h, self.filter);
        }
        let m = self.tile_size;
        let (tiles, rows, cols) = if split {
            let (h, w) = vision_encoder_size(img.height, img.width, m);
            let img = resample::resize(&img, w, h, self.filter);
            if h > m || w > m {
                let (rows, cols) = ((h - m) / m + 1, (w - m) / m + 1);
                let mut tiles: Vec<Image8> = (0..rows)
                    .flat_map(|r| (0..cols).map(move |c| (r, c)))
                    .map(|(r, c)| crop(&img, c * m, r * m, m))
                    .collect();
                tiles.push(resample::resize(&img, m, m, self.filter));
                (tiles, rows, cols)
            } else {
                (vec![img], 0, 0)
            }
        } else {
            (vec![resample::resize(&img, m, m, self.filter)], 0, 0)
        };
        let mut pixel_values = Vec::with_capacity(tiles.len() * 3 * m * m);
        for tile in &tiles {
            self.normalize_into(tile, &mut pixel_values);
        }
        Tiles {
            pixel_values,
            tiles: tiles.len(),
            rows,
            cols,
        }
    }

    /// Rescale then normalise, in the precisions transformers uses: u8 * factor in f64,
    /// cast to f32, then (x - mean) / std in f32. Channels first.
    fn normalize_into(&self, tile: &Image8, out: &mut Vec<f32>) {
        let c = &self.config;
        for ch in 0..3 {
            out.extend(tile.data[ch..].iter().step_by(3).map(|&v| {
                let x = if c.do_rescale {
                    (v as f64 * c.rescale_factor) as f32
                } else {
                    v as f32
                };
                if c.do_normalize {
                    (x - c.image_mean[ch]) / c.image_std[ch]
                } else {
                    x
                }
            }));
        }
    }
}

/// transformers' `get_resize_output_image_size`: longest edge to `max_len` (the other side
/// truncated, then made even), then both under 4096. Returns (height, width).
fn longest_edge_size(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = if width >= height {
        let h = (max_len as f64 / aspect) as usize;
        (h + h % 2, max_len)
    } else {
        let w = (max_len as f64 * aspect) as usize;
        (max_len, w + w % 2)
    };
    h = h.max(1);
    w = w.max(1);
    let aspect = w as f64 / h as f64;
    if w >= h && w > MAX_IMAGE_SIZE {
        w = MAX_IMAGE_SIZE;
        h = (w as f64 / aspect) as usize;
    } else if h > w && h > MAX_IMAGE_SIZE {
        h = MAX_IMAGE_SIZE;
        w = (h as f64 * aspect) as usize;
    }
    (h.max(1), w.max(1))
}

/// transformers' `resize_for_vision_encoder`: both sides up to multiples of the tile.
fn vision_encoder_size(height: usize, width: usize, tile: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let up = |x: f64| (x / tile as f64).ceil() as usize * tile;
    if width >= height {
        let w = up(width as f64);
        let h = (w as f64 / aspect) as usize;
        (up(h as f64), w)
    } else {
        let h = up(height as f64);
        let w = (h as f64 * aspect) as usize;
        (h, up(w as f64))
    }
}

fn crop(img: &Image8, x: usize, y: usize, size: usize) -> Image8 {
    let c = img.channels;
    let mut data = Vec::with_capacity(size * size * c);
    for row in y..y + size {
        data.extend_from_slice(&img.data[(row * img.width + x) * c..][..size * c]);
    }
    Image8 {
        width: size,
        height: size,
        channels: c,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers_for_smolvlm_256m() {
        // 640x480 -> 2048x1536 -> 4 cols x 3 rows of 512 (PREPROCESSING.md).
        assert_eq!(longest_edge_size(480, 640, 2048), (1536, 2048));
        assert_eq!(vision_encoder_size(1536, 2048, 512), (1536, 2048));
        // wide 300x80: height int(2048 / 3.75) = 546, already even; tiles 2 rows x 4 cols
        assert_eq!(longest_edge_size(80, 300, 2048), (546, 2048));
        assert_eq!(vision_encoder_size(546, 2048, 512), (1024, 2048));
        // tall: the width is made even
        assert_eq!(longest_edge_size(260, 70, 2048), (2048, 552));
        // an extreme panorama stays under 4096 on both sides
        assert_eq!(longest_edge_size(10, 5000, 8192), (8, 4096));
    }

    #[test]
    fn tiles_for_predicts_what_preprocess_makes() {
        let config: ImageProcessorConfig =
            serde_json::from_str(r#"{"max_image_size": {"longest_edge": 64}, "size": {"longest_edge": 256}}"#).unwrap();
        let processor = ImageProcessor::new(config, std::path::Path::new("x")).unwrap();
        for (w, h) in [
            (640, 480),
            (300, 80),
            (70, 260),
            (40, 30),
            (64, 64),
            (1, 1),
            (4000, 3000),
        ] {
            let image = DynamicImage::new_rgb8(w, h);
            for split in [true, false] {
                let made = processor.preprocess(&image, split).tiles;
                assert_eq!(
                    processor.tiles_for(w as usize, h as usize, split),
                    made,
                    "{w}x{h} split {split}"
                );
            }
        }
    }

    #[test]
    fn compositing_on_white_matches_pillow() {
        use crate::model::resample::composite_on_white;
        // Values from PIL: Image.alpha_composite(white, RGBA pixel).convert("RGB").
        assert_eq!(composite_on_white(0, 0), 255);
        assert_eq!(composite_on_white(0, 255), 0);
        assert_eq!(composite_on_white(0, 128), 127);
        assert_eq!(composite_on_white(200, 1), 255);
        assert_eq!(composite_on_white(10, 77), 181);
    }
}
