//! SmolVLM2's video processor, as transformers 5 runs it: which frames to take
//! (`sample_frames`), how each becomes one tile (torchvision resizes, not Pillow's), and the
//! text a video becomes ("You are provided the following series of ... frames ...").
//! SmolVLM (v1) has none: its family refuses videos.

use std::path::Path;

use ::image::RgbImage;
use serde::Deserialize;

use super::image::LongestEdge;
use crate::model::input::{FrameSampling, MediaItem, ProcessedMedia, VideoInfo, VideoProcessor};
use crate::model::resample::{Filter, Image8, resize_like_torch};
use crate::model::{LoadError, Pixels};

/// transformers' `MAX_IMAGE_SIZE`: no frame is resized past a 4K edge.
const MAX_FRAME_EDGE: usize = 4096;
/// `sample_frames`' default: a long enough video loses its first and last second.
const SKIP_SECS: f64 = 1.0;

/// The video processor's part of preprocessor_config.json (or of processor_config.json's
/// `video_processor`).
#[derive(Debug, Clone, Deserialize)]
pub struct VideoProcessorConfig {
    pub video_sampling: Option<VideoSamplingConfig>,
    /// When present, transformers' SmolVLM video processor takes it as the frame size,
    /// overriding `video_sampling.video_size` (so real SmolVLM2 configs resize frames to
    /// a 2048 edge first, then squash them to the tile).
    pub size: Option<LongestEdge>,
    pub max_image_size: Option<LongestEdge>,
    pub resample: Option<u32>,
    pub do_rescale: Option<bool>,
    pub rescale_factor: Option<f64>,
    pub do_normalize: Option<bool>,
    pub image_mean: Option<[f32; 3]>,
    pub image_std: Option<[f32; 3]>,
    pub fps: Option<f64>,
    pub num_frames: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VideoSamplingConfig {
    pub fps: f64,
    pub max_frames: usize,
    pub video_size: Option<LongestEdge>,
}

/// transformers' SmolVLMProcessor renders conversations that hold a video with this template
/// instead of the model's (whose templates have no video branch).
const VIDEO_TEMPLATE: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// SmolVLM2's videos: frames sampled evenly, each one global tile of the image encoder.
pub struct SmolVlm2Video {
    sampling: FrameSampling,
    frame_edge: usize,
    tile: usize,
    filter: Filter,
    /// Per channel: value = (u8 - offset) / scale, in f32.
    offset: [f32; 3],
    scale: [f32; 3],
    /// Placeholder tokens per frame, and the text of one frame's global view.
    frame_tokens: usize,
    frame_text: String,
}

impl SmolVlm2Video {
    /// `None` when the config has no `video_sampling`: the model's processor takes no videos.
    /// `frame_tokens` and `frame_text`: one frame's placeholder tokens, and its text.
    pub fn new(
        config: VideoProcessorConfig,
        file: &Path,
        frame_tokens: usize,
        frame_text: String,
    ) -> Result<Option<Self>, LoadError> {
        let Some(sampling) = &config.video_sampling else {
            return Ok(None);
        };
        let fps = config.fps.unwrap_or(sampling.fps);
        let max_frames = config.num_frames.unwrap_or(sampling.max_frames);
        if !(fps > 0.0 && fps.is_finite()) || max_frames == 0 {
            return Err(LoadError::invalid(
                file,
                "video_sampling",
                format!("fps must be > 0 and max_frames >= 1, got {fps} and {max_frames}"),
            ));
        }
        let edge = config
            .size
            .as_ref()
            .or(sampling.video_size.as_ref())
            .map(|s| s.longest_edge)
            .ok_or_else(|| LoadError::invalid(file, "video_sampling.video_size", "is missing"))?;
        let tile = config.max_image_size.as_ref().map_or(364, |s| s.longest_edge);
        let resample = config.resample.unwrap_or(1);
        let filter = Filter::from_pil_code(resample)
            .filter(|f| matches!(f, Filter::Lanczos | Filter::Bilinear | Filter::Bicubic))
            .ok_or_else(|| {
                LoadError::invalid(
                    file,
                    "resample",
                    format!("videos support LANCZOS (1), BILINEAR (2) and BICUBIC (3), got {resample}"),
                )
            })?;
        if edge == 0 || tile == 0 {
            return Err(LoadError::invalid(file, "video_size", "frame sizes must be >= 1"));
        }
        let (offset, scale) = normalization(&config);
        Ok(Some(Self {
            sampling: FrameSampling { fps, max_frames },
            frame_edge: edge.min(MAX_FRAME_EDGE),
            tile,
            filter,
            offset,
            scale,
            frame_tokens,
            frame_text,
        }))
    }

    pub fn tile_size(&self) -> usize {
        self.tile
    }
}

impl VideoProcessor for SmolVlm2Video {
    fn placeholder(&self) -> &str {
        "<video>"
    }

    fn chat_template(&self) -> Option<&str> {
        Some(VIDEO_TEMPLATE)
    }

    /// The model's defaults (`video_sampling`).
    fn default_sampling(&self) -> FrameSampling {
        self.sampling
    }

    fn sample_frames(&self, video: &VideoInfo, sampling: &FrameSampling) -> Vec<usize> {
        sample_frames(video, sampling)
    }

    /// Every frame is one tile, whatever its size.
    fn video_tokens(&self, _width: u32, _height: u32, frames: usize) -> usize {
        frames * self.frame_tokens
    }

    /// One frame's tile, channels first: resized to the frame edge, then to the square tile
    /// (frames are never split), rescaled and normalised.
    fn preprocess_frame(&self, frame: &RgbImage, _frames: usize) -> Vec<f32> {
        let src = Image8 {
            width: frame.width() as usize,
            height: frame.height() as usize,
            channels: 3,
            data: frame.as_raw().clone(),
        };
        let (h, w) = frame_size(src.height, src.width, self.frame_edge);
        let resized = resize_like_torch(&src, w, h, self.filter);
        let tile = resize_like_torch(&resized, self.tile, self.tile, self.filter);
        let mut out = Vec::with_capacity(3 * self.tile * self.tile);
        for ch in 0..3 {
            let (offset, scale) = (self.offset[ch], self.scale[ch]);
            out.extend(tile.data[ch..].iter().step_by(3).map(|&v| (v as f32 - offset) / scale));
        }
        out
    }

    /// Each frame is its own unit of encoding (and of the vision cache).
    fn finish(
        &self,
        frames: Vec<Vec<f32>>,
        video: &VideoInfo,
        indices: &[usize],
    ) -> candle_core::Result<ProcessedMedia> {
        let items = frames
            .into_iter()
            .map(|values| {
                let (pixels, key) = Pixels::keyed(values, &[1, 3, self.tile, self.tile], None)?;
                Ok(MediaItem {
                    pixels,
                    key,
                    tokens: self.frame_tokens,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(ProcessedMedia {
            items,
            text: video_prompt(video, indices, &self.frame_text),
        })
    }
}

/// transformers fuses rescale into normalisation: mean and std are divided by the rescale
/// factor (in f32), then `(x - mean) / std`.
fn normalization(config: &VideoProcessorConfig) -> ([f32; 3], [f32; 3]) {
    let rescale = if config.do_rescale.unwrap_or(true) {
        config.rescale_factor.unwrap_or(1.0 / 255.0)
    } else {
        1.0
    };
    if !config.do_normalize.unwrap_or(true) {
        let inverse = (1.0 / rescale) as f32;
        return ([0.0; 3], [inverse; 3]);
    }
    let mean = config.image_mean.unwrap_or([0.5; 3]);
    let std = config.image_std.unwrap_or([0.5; 3]);
    let factor = (1.0 / rescale) as f32;
    (mean.map(|m| m * factor), std.map(|s| s * factor))
}

/// `get_resize_output_image_size`: the longest edge becomes `edge`, the other keeps the
/// aspect ratio, truncated, then rounded up to even.
fn frame_size(height: usize, width: usize, edge: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (h, w) = if width >= height {
        let h = (edge as f64 / aspect) as usize;
        (h + h % 2, edge)
    } else {
        let w = (edge as f64 * aspect) as usize;
        (edge, w + w % 2)
    };
    (h.max(1), w.max(1))
}

/// `SmolVLMVideoProcessor.sample_frames`: about `fps` frames a second, at most `max_frames`,
/// spread evenly; videos long enough lose their first and last second.
pub fn sample_frames(meta: &VideoInfo, sampling: &FrameSampling) -> Vec<usize> {
    let total = meta.total_frames;
    if total == 0 {
        return Vec::new();
    }
    // Python's round() rounds halves to even.
    let estimated = (sampling.fps * meta.duration).round_ties_even().max(0.0) as usize;
    let desired = estimated.min(sampling.max_frames).max(1);
    let (mut start, mut end) = (0i64, total as i64 - 1);
    if SKIP_SECS > 0.0 && meta.duration - 2.0 * SKIP_SECS > sampling.max_frames as f64 * sampling.fps {
        start = (SKIP_SECS * meta.fps) as i64;
        end = (total as f64 - SKIP_SECS * meta.fps) as i64;
    }
    start = start.max(0);
    end = end.min(total as i64 - 1);
    if start >= end {
        (start, end) = (0, total as i64 - 1);
    }
    let mut indices = linspace(start as f64, end as f64, desired);
    indices.dedup();
    indices
}

/// `np.linspace(start, stop, num, dtype=int)`: evenly spaced in f64, the last exactly
/// `stop`, truncated to integers.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<usize> {
    if num == 1 {
        return vec![start as usize];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    (0..num)
        .map(|i| {
            if i == num - 1 {
                return stop as usize;
            }
            let y = if step == 0.0 {
                i as f64 / div * delta
            } else {
                i as f64 * step
            };
            (y + start) as usize
        })
        .collect()
}

/// The text a video becomes (`SmolVLMProcessor.replace_video_token`), `frame` being one
/// frame's image tokens.
fn video_prompt(video: &VideoInfo, indices: &[usize], frame: &str) -> String {
    let duration = std::time::Duration::from_secs(video.duration.max(0.0) as u64);
    let mut out = format!(
        "You are provided the following series of {} frames from a {} [H:MM:SS] video.\n",
        number_in_words(indices.len() as u64),
        timedelta(duration)
    );
    for &index in indices {
        let seconds = index as f64 / video.fps;
        let (minutes, secs) = ((seconds / 60.0).floor() as u64, (seconds % 60.0) as u64);
        out.push_str(&format!("\nFrame from {minutes:02}:{secs:02}:{frame}"));
    }
    out.push_str("\n\n");
    out
}

/// Python's `str(timedelta(seconds=s))`: `H:MM:SS`, with days in front when there are any.
fn timedelta(duration: std::time::Duration) -> String {
    let s = duration.as_secs();
    let (days, h, m, sec) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    let clock = format!("{h}:{m:02}:{sec:02}");
    match days {
        0 => clock,
        1 => format!("1 day, {clock}"),
        d => format!("{d} days, {clock}"),
    }
}

/// English cardinal numbers as the `num2words` Python package writes them ("one hundred and
/// one", "one thousand, two hundred and thirty-four"): the num2words crate writes "one
/// hundred one", which would change the prompt's tokens.
pub fn number_in_words(n: u64) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    // Joins a leading group and what follows it, the way num2words merges them.
    fn join(head: String, rest: u64) -> String {
        match rest {
            0 => head,
            1..100 => format!("{head} and {}", number_in_words(rest)),
            _ => format!("{head}, {}", number_in_words(rest)),
        }
    }
    match n {
        0..20 => ONES[n as usize].to_string(),
        20..100 => match n % 10 {
            0 => TENS[n as usize / 10].to_string(),
            r => format!("{}-{}", TENS[n as usize / 10], ONES[r as usize]),
        },
        100..1000 => {
            let head = format!("{} hundred", ONES[n as usize / 100]);
            match n % 100 {
                0 => head,
                r => format!("{head} and {}", number_in_words(r)),
            }
        }
        1000..1_000_000 => join(format!("{} thousand", number_in_words(n / 1000)), n % 1000),
        _ => join(format!("{} million", number_in_words(n / 1_000_000)), n % 1_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_python_num2words_writes_them() {
        // Python: num2words(n) with num2words 0.5.14.
        let cases = [
            (1, "one"),
            (13, "thirteen"),
            (21, "twenty-one"),
            (40, "forty"),
            (64, "sixty-four"),
            (100, "one hundred"),
            (101, "one hundred and one"),
            (115, "one hundred and fifteen"),
            (999, "nine hundred and ninety-nine"),
            (1000, "one thousand"),
            (1001, "one thousand and one"),
            (1234, "one thousand, two hundred and thirty-four"),
            (100000, "one hundred thousand"),
        ];
        for (n, words) in cases {
            assert_eq!(number_in_words(n), words, "{n}");
        }
    }

    #[test]
    fn durations_read_as_python_timedelta() {
        let t = |s| timedelta(std::time::Duration::from_secs(s));
        assert_eq!(t(3), "0:00:03");
        assert_eq!(t(3725), "1:02:05");
        assert_eq!(t(90000), "1 day, 1:00:00");
    }

    fn meta(total_frames: usize, fps: f64) -> VideoInfo {
        VideoInfo {
            total_frames,
            fps,
            duration: total_frames as f64 / fps,
            width: 96,
            height: 72,
        }
    }

    #[test]
    fn sampling_follows_smolvlm2() {
        let one_fps = |max_frames| FrameSampling { fps: 1.0, max_frames };
        // 3 s at 30 fps: three frames over the whole video.
        assert_eq!(sample_frames(&meta(90, 30.0), &one_fps(64)), vec![0, 44, 89]);
        // 2.5 s rounds (half to even) to 2 frames.
        assert_eq!(sample_frames(&meta(25, 10.0), &one_fps(64)), vec![0, 24]);
        // 100 s at 10 fps capped at 8 frames, first and last second skipped (Python: the same).
        let long = sample_frames(&meta(1000, 10.0), &one_fps(8));
        assert_eq!(long, vec![10, 150, 290, 430, 570, 710, 850, 990]);
        // Fewer frames than asked for: duplicates collapse.
        assert_eq!(
            sample_frames(
                &meta(2, 1.0),
                &FrameSampling {
                    fps: 4.0,
                    max_frames: 64
                }
            ),
            vec![0, 1]
        );
        assert!(sample_frames(&meta(0, 25.0), &one_fps(4)).is_empty());
    }

    #[test]
    fn frame_sizes_keep_the_aspect_and_round_up_to_even() {
        assert_eq!(frame_size(720, 1280, 2048), (1152, 2048));
        assert_eq!(frame_size(480, 270, 512), (512, 288));
        assert_eq!(frame_size(75, 100, 64), (48, 64));
        assert_eq!(frame_size(100, 100, 64), (64, 64));
    }
}
