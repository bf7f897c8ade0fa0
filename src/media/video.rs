//! Videos from requests, decoded by FFmpeg's libraries (through `ffmpeg-next`): the
//! container's header gives the frame count and rate, the processor picks the frames, and
//! only those are converted to RGB. Animated GIFs are read by the `image` crate.
//!
//! The bytes never touch the file system, and FFmpeg may open nothing else: a playlist or
//! concat script dressed as a video would otherwise make it fetch URLs or read local files.

use std::io::Cursor;
use std::sync::Once;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg_next as ffmpeg;
use image::{AnimationDecoder, ImageDecoder, RgbImage};

use super::{Fetched, MediaError, MediaLimits};

/// Containers FFmpeg may open; none of them refers to other files.
const FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg";
/// When a GIF's frames carry no delay, browsers play them at 10 frames a second.
const GIF_DEFAULT_FPS: f64 = 10.0;

/// What a container says about a video stream, as transformers' PyAV loader reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoMeta {
    pub total_frames: usize,
    pub fps: f64,
    /// `total_frames / fps`, in seconds.
    pub duration: f64,
}

/// Where decoded frames go, one at a time, in order: a video's frames are never all held at
/// full size (64 4K frames would be 1.6 GB).
pub type FrameSink<'a> = &'a mut dyn FnMut(RgbImage) -> Result<(), MediaError>;

/// What was decoded: the stream's metadata and the indices of the frames sent to the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedVideo {
    pub meta: VideoMeta,
    pub frame_indices: Vec<usize>,
}

/// Decodes the frames `pick` chooses from what the header says (frame count, rate), and
/// hands each to `sink`.
pub fn decode_video(
    fetched: &Fetched,
    limits: &MediaLimits,
    pick: impl FnOnce(&VideoMeta) -> Vec<usize>,
    sink: FrameSink,
) -> Result<DecodedVideo, MediaError> {
    let bytes = &fetched.bytes;
    if bytes.is_empty() {
        return Err(MediaError::NotAVideo("the file is empty".into()));
    }
    check_declared_type(fetched)?;
    let decoded = if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        decode_gif(bytes, limits, pick, sink)?
    } else {
        decode_with_ffmpeg(bytes, limits, pick, sink)?
    };
    if decoded.frame_indices.is_empty() {
        return Err(MediaError::CorruptVideo("no frame could be decoded".into()));
    }
    Ok(decoded)
}

fn check_declared_type(fetched: &Fetched) -> Result<(), MediaError> {
    let Some(declared) = fetched.declared_type.as_deref() else {
        return Ok(());
    };
    let acceptable = declared.is_empty()
        || declared.starts_with("video/")
        || declared == "image/gif"
        || declared == "application/octet-stream";
    if acceptable {
        return Ok(());
    }
    Err(MediaError::ContentTypeMismatch {
        declared: declared.to_string(),
        actual: "meant to be a video".into(),
    })
}

fn init_ffmpeg() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Corrupt input is reported through our errors, not FFmpeg's log on stderr.
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
        ffmpeg::init().expect("FFmpeg's libraries initialise. This is a bug.");
    });
}

fn open(bytes: &[u8]) -> Result<ffmpeg::format::context::Input, MediaError> {
    init_ffmpeg();
    let io = ffmpeg::format::context::StreamIo::from_read_seek(Cursor::new(bytes.to_vec()))
        .map_err(|e| MediaError::CorruptVideo(e.to_string()))?;
    let mut options = ffmpeg::Dictionary::new();
    options.set("format_whitelist", FORMATS);
    options.set("protocol_whitelist", "none");
    ffmpeg::format::input_from_stream(io, None, Some(options))
        .map_err(|e| MediaError::NotAVideo(format!("not a supported video container ({e})")))
}

fn corrupt(e: ffmpeg::Error) -> MediaError {
    MediaError::CorruptVideo(e.to_string())
}

fn decode_with_ffmpeg(
    bytes: &[u8],
    limits: &MediaLimits,
    pick: impl FnOnce(&VideoMeta) -> Vec<usize>,
    sink: FrameSink,
) -> Result<DecodedVideo, MediaError> {
    let mut input = open(bytes)?;
    let stream = input
        .streams()
        .best(ffmpeg::media::Type::Video)
        .ok_or_else(|| MediaError::NotAVideo("the file has no video stream".into()))?;
    let index = stream.index();
    let rate = stream.avg_frame_rate();
    let header_frames = stream.frames();
    let mut decoder = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|mut ctx| {
            // Frame threading on every core: decoding is most of a long video's cost.
            ctx.set_threading(ffmpeg::codec::threading::Config {
                kind: ffmpeg::codec::threading::Type::Frame,
                count: std::thread::available_parallelism().map_or(1, |n| n.get()),
                ..Default::default()
            });
            ctx.decoder().video()
        })
        .map_err(|e| MediaError::NotAVideo(format!("no decoder for this video ({e})")))?;
    let (width, height) = (decoder.width(), decoder.height());
    check_pixels(width, height, limits)?;
    let fps = f64::from(rate);
    if !(fps > 0.0 && fps.is_finite()) {
        return Err(MediaError::CorruptVideo("the video stream has no frame rate".into()));
    }
    // As transformers' PyAV loader: the header's frame count; containers without one
    // (WebM) are counted packet by packet, without decoding.
    let total_frames = if header_frames > 0 {
        header_frames as usize
    } else {
        let mut counting = open(bytes)?;
        counting.packets().filter(|(s, _)| s.index() == index).count()
    };
    let (meta, wanted) = plan(total_frames, fps, limits, pick)?;
    let Some(&last) = wanted.last() else {
        return Err(MediaError::NotAVideo("the video has no frames".into()));
    };

    let mut taker = FrameTaker {
        wanted: &wanted,
        delivered: 0,
        seen: 0,
        scaler: None,
        sink,
    };
    for (s, packet) in input.packets() {
        if s.index() != index {
            continue;
        }
        decoder.send_packet(&packet).map_err(corrupt)?;
        taker.drain(&mut decoder, limits)?;
        if taker.done() || taker.seen > last {
            break;
        }
    }
    if !taker.done() {
        decoder.send_eof().map_err(corrupt)?;
        taker.drain(&mut decoder, limits)?;
    }
    // A header that promised more frames than the stream holds: keep those that exist.
    let mut frame_indices = wanted.clone();
    frame_indices.truncate(taker.delivered);
    Ok(DecodedVideo { meta, frame_indices })
}

/// Passes on the decoded frames whose indices were picked.
struct FrameTaker<'a, 's> {
    wanted: &'a [usize],
    /// Frames passed to the sink so far.
    delivered: usize,
    /// Frames decoded so far.
    seen: usize,
    scaler: Option<scaling::Context>,
    sink: FrameSink<'s>,
}

impl FrameTaker<'_, '_> {
    fn drain(&mut self, decoder: &mut ffmpeg::decoder::Video, limits: &MediaLimits) -> Result<(), MediaError> {
        let mut decoded = ffmpeg::util::frame::Video::empty();
        while decoder.receive_frame(&mut decoded).is_ok() {
            if self.wanted.get(self.delivered) == Some(&self.seen) {
                (self.sink)(to_rgb(&decoded, &mut self.scaler, limits)?)?;
                self.delivered += 1;
            }
            self.seen += 1;
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.delivered == self.wanted.len()
    }
}

/// One decoded frame as packed RGB (swscale, bilinear, as PyAV's `to_ndarray("rgb24")`).
fn to_rgb(
    frame: &ffmpeg::util::frame::Video,
    scaler: &mut Option<scaling::Context>,
    limits: &MediaLimits,
) -> Result<RgbImage, MediaError> {
    let (w, h) = (frame.width(), frame.height());
    check_pixels(w, h, limits)?;
    let fits = scaler
        .as_ref()
        .is_some_and(|s| s.input().width == w && s.input().height == h && s.input().format == frame.format());
    if !fits {
        let context = scaling::Context::get(frame.format(), w, h, Pixel::RGB24, w, h, scaling::Flags::BILINEAR)
            .map_err(corrupt)?;
        *scaler = Some(context);
    }
    let mut rgb = ffmpeg::util::frame::Video::empty();
    scaler
        .as_mut()
        .expect("set just above")
        .run(frame, &mut rgb)
        .map_err(corrupt)?;
    let stride = rgb.stride(0);
    let row = w as usize * 3;
    let data = rgb.data(0);
    let mut packed = Vec::with_capacity(row * h as usize);
    for y in 0..h as usize {
        packed.extend_from_slice(&data[y * stride..][..row]);
    }
    Ok(RgbImage::from_raw(w, h, packed).expect("w * h * 3 bytes"))
}

fn check_pixels(width: u32, height: u32, limits: &MediaLimits) -> Result<(), MediaError> {
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(MediaError::CorruptVideo("the video has no pixels".into()));
    }
    super::check_pixel_limit(width, height, limits)
}

/// The stream's metadata, checked against the duration limit, and the frames to take.
fn plan(
    total_frames: usize,
    fps: f64,
    limits: &MediaLimits,
    pick: impl FnOnce(&VideoMeta) -> Vec<usize>,
) -> Result<(VideoMeta, Vec<usize>), MediaError> {
    let meta = VideoMeta {
        total_frames,
        fps,
        duration: total_frames as f64 / fps,
    };
    if meta.duration > limits.max_video_seconds {
        return Err(MediaError::VideoTooLong {
            seconds: meta.duration,
            limit: limits.max_video_seconds,
        });
    }
    Ok((meta, pick(&meta)))
}

/// An animated GIF: its frames composited as browsers show them, the frame rate from the
/// delays. Counted first (cheap), then decoded again for the frames picked.
fn decode_gif(
    bytes: &[u8],
    limits: &MediaLimits,
    pick: impl FnOnce(&VideoMeta) -> Vec<usize>,
    sink: FrameSink,
) -> Result<DecodedVideo, MediaError> {
    let gif = |bytes| {
        image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).map_err(|e| MediaError::CorruptVideo(e.to_string()))
    };
    let (width, height) = gif(bytes)?.dimensions();
    check_pixels(width, height, limits)?;
    let mut total_frames = 0usize;
    let mut total_ms = 0f64;
    for frame in gif(bytes)?.into_frames() {
        let frame = frame.map_err(|e| MediaError::CorruptVideo(e.to_string()))?;
        let (num, den) = frame.delay().numer_denom_ms();
        total_ms += num as f64 / den.max(1) as f64;
        total_frames += 1;
    }
    let fps = if total_ms > 0.0 {
        total_frames as f64 * 1000.0 / total_ms
    } else {
        GIF_DEFAULT_FPS
    };
    let (meta, wanted) = plan(total_frames, fps, limits, pick)?;
    let mut delivered = 0;
    for (i, frame) in gif(bytes)?.into_frames().enumerate() {
        let Some(&want) = wanted.get(delivered) else { break };
        let frame = frame.map_err(|e| MediaError::CorruptVideo(e.to_string()))?;
        if i == want {
            sink(image::DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8())?;
            delivered += 1;
        }
    }
    let mut frame_indices = wanted;
    frame_indices.truncate(delivered);
    Ok(DecodedVideo { meta, frame_indices })
}
