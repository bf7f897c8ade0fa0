//! Time to turn a video into model inputs: decode and sample its frames (FFmpeg) and
//! preprocess each into a tile (the real SmolVLM2 preprocessor config: frames resized to a
//! 2048 edge, then to 512x512). Median of a few runs.
//!
//!   python scripts/make_fixtures.py video /tmp/bench720.mp4
//!   cargo bench --bench video -- /tmp/bench720.mp4 [runs]
//!
//! Without arguments it runs once on the small fixture clip (a smoke test).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ocellus::media::{Fetched, MediaLimits, open_video};
use ocellus::model::smolvlm::video::{SmolVlm2Video, VideoProcessorConfig};
use ocellus::model::{VideoInfo, VideoProcessor};
use ocellus::processor::video::preprocess_frames;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let video = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests/fixtures/videos/clip-yuv420.mp4"));
    let runs: usize = args
        .get(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(if args.is_empty() { 1 } else { 3 });
    let config_file = root
        .join("../shared/reference/smolvlm2-500m-video-instruct/inferred-not-directly-seen/preprocessor_config.json");
    let config: VideoProcessorConfig = serde_json::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    // The frames' tokens and text do not enter these timings.
    let processor = SmolVlm2Video::new(config, &config_file, 64, String::new())
        .unwrap()
        .expect("the SmolVLM2 config samples videos");
    let sampling = processor.default_sampling();
    let fetched = Fetched {
        bytes: std::fs::read(&video).unwrap(),
        declared_type: None,
    };
    let limits = MediaLimits {
        max_image_pixels: 40_000_000,
        max_video_seconds: 3600.0,
    };

    // Decoding alone (frames dropped), then decoding with preprocessing streamed beside it,
    // as the server runs them.
    let (mut decode, mut total) = (Vec::new(), Vec::new());
    let mut summary = String::new();
    let pick = || {
        let source = open_video(&fetched, &limits).unwrap();
        let meta = source.meta;
        let info = VideoInfo {
            total_frames: meta.total_frames,
            fps: meta.fps,
            duration: meta.duration,
            width: meta.width,
            height: meta.height,
        };
        let indices = processor.sample_frames(&info, &sampling);
        (source, indices)
    };
    for _ in 0..runs {
        let start = Instant::now();
        let (source, indices) = pick();
        let frames = source.frames(indices).map(Result::unwrap).count();
        decode.push(start.elapsed());
        let start = Instant::now();
        let (source, indices) = pick();
        let meta = source.meta;
        let count = indices.len();
        let tiles = preprocess_frames(&processor, source.frames(indices), count).unwrap();
        total.push(start.elapsed());
        summary = format!(
            "{}: {} frames, {} bytes, {:.1} s at {:.2} fps; sampled {frames} frames into {} tiles of {} values",
            video.display(),
            meta.total_frames,
            fetched.bytes.len(),
            meta.duration,
            meta.fps,
            tiles.len(),
            tiles[0].len(),
        );
    }
    println!("{summary}");
    println!(
        "decode + sample: {:.3} s (median of {runs})",
        median(decode).as_secs_f64()
    );
    println!(
        "total:           {:.3} s (decode, sample and preprocess)",
        median(total).as_secs_f64()
    );
}
