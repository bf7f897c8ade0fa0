//! Qwen3-VL's video processor (transformers' `Qwen3VLVideoProcessor`): frames sampled at
//! the processor's fps (at least `min_frames`, at most `max_frames`), resized alike within a
//! budget for the whole clip, paired into temporal patches (an odd last frame repeated),
//! and written into the prompt pair by pair, each with its time:
//! `<1.3 seconds><|vision_start|><|video_pad|>…<|vision_end|>`. Each pair is its own unit of
//! encoding: the encoder attends within a pair, and the decoder places each pair as an
//! image of its own.

use std::path::Path;

use ::image::RgbImage;
use serde::Deserialize;

use super::processor::{PatchConfig, Patcher, PixelBudget, VIDEO_TOKEN, round_half_even};
use crate::model::input::{FrameSampling, MediaItem, ProcessedMedia, VideoInfo, VideoProcessor};
use crate::model::resample::Image8;
use crate::model::{LoadError, Pixels};

const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";
/// What transformers assumes of a video whose container gives no rate.
const UNKNOWN_FPS: f64 = 24.0;

/// video_preprocessor_config.json, with the class defaults for what it leaves out.
#[derive(Debug, Clone, Deserialize)]
pub struct VideoConfig {
    #[serde(flatten)]
    pub patches: PatchConfig,
    #[serde(default = "defaults::fps")]
    pub fps: f64,
    #[serde(default = "defaults::min_frames")]
    pub min_frames: usize,
    #[serde(default = "defaults::max_frames")]
    pub max_frames: usize,
}

mod defaults {
    pub fn fps() -> f64 {
        2.0
    }
    pub fn min_frames() -> usize {
        4
    }
    pub fn max_frames() -> usize {
        768
    }
}

/// `Qwen3VLVideoProcessor`'s class default budget.
const VIDEO_BUDGET: PixelBudget = PixelBudget {
    shortest_edge: 128 * 32 * 32,
    longest_edge: 32 * 32 * 768,
};

pub struct Qwen3VlVideo {
    patcher: Patcher,
    fps: f64,
    min_frames: usize,
    max_frames: usize,
}

impl Qwen3VlVideo {
    pub fn new(config: &VideoConfig, file: &Path) -> Result<Self, LoadError> {
        if config.min_frames > config.max_frames || config.max_frames == 0 {
            return Err(LoadError::invalid(
                file,
                "min_frames",
                "must be at most max_frames, which must be positive",
            ));
        }
        // NaN is not positive either.
        if config.fps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(LoadError::invalid(
                file,
                "fps",
                format!("must be positive, got {}", config.fps),
            ));
        }
        Ok(Self {
            patcher: Patcher::new(&config.patches, file, VIDEO_BUDGET)?,
            fps: config.fps,
            min_frames: config.min_frames,
            max_frames: config.max_frames,
        })
    }

    pub fn patcher(&self) -> &Patcher {
        &self.patcher
    }

    /// The size every frame is resized to, for `frames` frames of `width × height`.
    fn frame_size(&self, width: usize, height: usize, frames: usize) -> (usize, usize) {
        let p = &self.patcher;
        video_smart_resize(
            frames,
            height,
            width,
            p.temporal,
            p.factor(),
            p.min_pixels,
            p.max_pixels,
        )
    }

    fn groups(&self, frames: usize) -> usize {
        frames.div_ceil(self.patcher.temporal)
    }
}

/// transformers' video `smart_resize`: as the image one, with the budget over all frames
/// (rounded to whole temporal patches) and frames smaller than a block scaled up first.
pub fn video_smart_resize(
    frames: usize,
    height: usize,
    width: usize,
    temporal: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> (usize, usize) {
    let (mut h, mut w) = (height.max(1) as f64, width.max(1) as f64);
    let f = factor as f64;
    if h < f || w < f {
        let scale = (f / h).max(f / w);
        (h, w) = ((h * scale).trunc(), (w * scale).trunc());
    }
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    let t_bar = round_half_even(frames as f64 / temporal as f64) * temporal as f64;
    let n = frames as f64;
    if t_bar * h_bar * w_bar > max_pixels as f64 {
        let beta = (n * h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if t_bar * h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (n * h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    (h_bar as usize, w_bar as usize)
}

impl VideoProcessor for Qwen3VlVideo {
    fn placeholder(&self) -> &str {
        VIDEO_TOKEN
    }

    fn chat_template(&self) -> Option<&str> {
        None
    }

    fn default_sampling(&self) -> FrameSampling {
        FrameSampling {
            fps: self.fps,
            max_frames: self.max_frames,
        }
    }

    /// `sample_frames`: `int(total / video_fps · fps)` frames, at least `min_frames`, at most
    /// `max_frames` and the video's own, spread evenly over it (`linspace(...).round()`).
    fn sample_frames(&self, video: &VideoInfo, sampling: &FrameSampling) -> Vec<usize> {
        let total = video.total_frames;
        if total == 0 {
            return Vec::new();
        }
        let video_fps = if video.fps > 0.0 { video.fps } else { UNKNOWN_FPS };
        let wanted = (total as f64 / video_fps * sampling.fps) as usize;
        let max_frames = sampling.max_frames.min(self.max_frames);
        let num = wanted.max(self.min_frames).min(max_frames).min(total).max(1);
        if num == 1 {
            return vec![0];
        }
        let last = (total - 1) as f64;
        let step = last / (num - 1) as f64;
        (0..num)
            .map(|i| {
                let x = if i == num - 1 { last } else { i as f64 * step };
                round_half_even(x) as usize
            })
            .collect()
    }

    fn video_tokens(&self, width: u32, height: u32, frames: usize) -> usize {
        let (h, w) = self.frame_size(width as usize, height as usize, frames);
        let block = self.patcher.factor();
        self.groups(frames) * (h / block) * (w / block)
    }

    fn preprocess_frame(&self, frame: &RgbImage, frames: usize) -> Vec<f32> {
        let (width, height) = (frame.width() as usize, frame.height() as usize);
        let (h, w) = self.frame_size(width, height, frames);
        let image = Image8 {
            width,
            height,
            channels: 3,
            data: frame.as_raw().clone(),
        };
        self.patcher.normalized(&image, w, h)
    }

    fn finish(
        &self,
        frames: Vec<Vec<f32>>,
        video: &VideoInfo,
        indices: &[usize],
    ) -> candle_core::Result<ProcessedMedia> {
        let Some(first) = frames.first() else {
            candle_core::bail!("the video has no frames")
        };
        // Every frame was resized alike: its size follows from the values' count and the
        // frame count the sizes were computed for.
        let p = &self.patcher;
        let (h, w) = self.frame_size(video.width as usize, video.height as usize, indices.len());
        if first.len() != 3 * h * w {
            candle_core::bail!("frames of {} values, expected 3x{h}x{w}. This is a bug.", first.len())
        }
        let fps = if video.fps > 0.0 { video.fps } else { UNKNOWN_FPS };
        let mut padded: Vec<usize> = indices.to_vec();
        let mut frames: Vec<&[f32]> = frames.iter().map(Vec::as_slice).collect();
        while !frames.len().is_multiple_of(p.temporal) {
            frames.push(frames[frames.len() - 1]);
            padded.push(*padded.last().unwrap_or(&0));
        }
        let (block, grid) = (p.factor(), [1, h / p.patch, w / p.patch]);
        let tokens = (h / block) * (w / block);
        let mut items = Vec::with_capacity(frames.len() / p.temporal);
        let mut text = String::new();
        for (pair, times) in frames.chunks(p.temporal).zip(padded.chunks(p.temporal)) {
            let patches = p.patches(pair, h, w);
            let shape = [grid[1] * grid[2], 3 * p.temporal * p.patch * p.patch];
            let (pixels, key) = Pixels::keyed(patches, &shape, Some(grid))?;
            items.push(MediaItem { pixels, key, tokens });
            let seconds = (times[0] as f64 / fps + times[times.len() - 1] as f64 / fps) / 2.0;
            text.push_str(&format!(
                "<{seconds:.1} seconds>{VISION_START}{}{VISION_END}",
                VIDEO_TOKEN.repeat(tokens)
            ));
        }
        Ok(ProcessedMedia { items, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> Qwen3VlVideo {
        let config: VideoConfig =
            serde_json::from_str(r#"{"size": {"shortest_edge": 4096, "longest_edge": 25165824}}"#).unwrap();
        Qwen3VlVideo::new(&config, Path::new("video_preprocessor_config.json")).unwrap()
    }

    #[test]
    fn frame_sizes_follow_transformers() {
        // transformers 5.24: video smart_resize(frames, h, w, 2, 32, 4096, 25165824)
        assert_eq!(video_smart_resize(6, 72, 96, 2, 32, 4096, 25165824), (64, 96));
        assert_eq!(video_smart_resize(4, 20, 30, 2, 32, 4096, 25165824), (32, 64));
    }

    #[test]
    fn sampling_follows_transformers() {
        let info = |total_frames, fps| VideoInfo {
            total_frames,
            fps,
            duration: total_frames as f64 / fps,
            width: 96,
            height: 72,
        };
        let video = qwen();
        let sampling = video.default_sampling();
        // 3 s at 15 fps, 2 fps: 6 frames, np.linspace(0, 44, 6).round().
        assert_eq!(video.sample_frames(&info(45, 15.0), &sampling), [0, 9, 18, 26, 35, 44]);
        // Short videos take at least min_frames (4), never more than they hold.
        assert_eq!(video.sample_frames(&info(30, 30.0), &sampling), [0, 10, 19, 29]);
        assert_eq!(video.sample_frames(&info(3, 30.0), &sampling), [0, 1, 2]);
        let capped = FrameSampling {
            fps: 2.0,
            max_frames: 5,
        };
        assert_eq!(video.sample_frames(&info(300, 10.0), &capped).len(), 5);
        // Odd frame counts pad to whole temporal patches: 3 frames, 2 pairs.
        assert_eq!(video.video_tokens(96, 72, 3), 2 * 6);
    }
}
