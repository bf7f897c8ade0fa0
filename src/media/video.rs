//! Videos from requests, decoded by FFmpeg's libraries (through `ffmpeg-next`): the
//! container's header gives the frame count and rate (`open_video`), the caller picks the
//! frames from that and the decoder hands over only those, one at a time, converted to RGB
//! (`VideoSource::frames`): a video's frames are never all held at full size (64 4K frames
//! would be 1.6 GB). Animated GIFs are read by the `image` crate.
//!
//! The bytes never touch the file system, and FFmpeg may open nothing else: a playlist or
//! concat script dressed as a video would otherwise make it fetch URLs or read local files.

use std::collections::VecDeque;
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
    pub width: u32,
    pub height: u32,
}

/// A video whose header has been read and checked (type, pixels, duration); no frame has
/// been decoded yet (a GIF's frames were only counted).
pub struct VideoSource<'a> {
    pub meta: VideoMeta,
    container: Container<'a>,
    limits: MediaLimits,
}

enum Container<'a> {
    Ffmpeg {
        input: ffmpeg::format::context::Input,
        decoder: ffmpeg::decoder::Video,
        stream: usize,
    },
    Gif(&'a [u8]),
}

/// Reads a video's header: its frame count, rate and size, checked against the limits.
pub fn open_video<'a>(fetched: &'a Fetched, limits: &MediaLimits) -> Result<VideoSource<'a>, MediaError> {
    let bytes = &fetched.bytes;
    if bytes.is_empty() {
        return Err(MediaError::NotAVideo("the file is empty".into()));
    }
    check_declared_type(fetched)?;
    let (meta, container) = if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        (gif_meta(bytes, limits)?, Container::Gif(bytes))
    } else {
        open_with_ffmpeg(bytes, limits)?
    };
    if meta.duration > limits.max_video_seconds {
        return Err(MediaError::VideoTooLong {
            seconds: meta.duration,
            limit: limits.max_video_seconds,
        });
    }
    Ok(VideoSource {
        meta,
        container,
        limits: *limits,
    })
}

impl<'a> VideoSource<'a> {
    /// The frames at `indices` (ascending), decoded as the iterator is advanced. A header
    /// that promised more frames than the stream holds yields those that exist; a video of
    /// which none can be decoded yields an error.
    pub fn frames(self, indices: Vec<usize>) -> Frames<'a> {
        let inner = match self.container {
            Container::Ffmpeg { input, decoder, stream } => Inner::Ffmpeg(Box::new(FfmpegFrames {
                input,
                decoder,
                stream,
                scaler: None,
                ready: VecDeque::new(),
                seen: 0,
                finished: false,
            })),
            Container::Gif(bytes) => Inner::Gif(gif(bytes, &self.limits).map(|d| d.into_frames().enumerate())),
        };
        Frames {
            inner,
            wanted: indices,
            delivered: 0,
            limits: self.limits,
            failed: false,
        }
    }
}

/// The picked frames of a video, in order, as packed RGB.
pub struct Frames<'a> {
    inner: Inner<'a>,
    wanted: Vec<usize>,
    delivered: usize,
    limits: MediaLimits,
    failed: bool,
}

enum Inner<'a> {
    Ffmpeg(Box<FfmpegFrames>),
    Gif(Result<std::iter::Enumerate<image::Frames<'a>>, MediaError>),
}

impl Iterator for Frames<'_> {
    type Item = Result<RgbImage, MediaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.delivered == self.wanted.len() {
            return None;
        }
        let want = self.wanted[self.delivered];
        let frame = match &mut self.inner {
            Inner::Ffmpeg(frames) => frames.next_at(want, &self.limits),
            Inner::Gif(frames) => next_gif_frame(frames, want),
        };
        match frame {
            Ok(Some(frame)) => {
                self.delivered += 1;
                Some(Ok(frame))
            }
            Ok(None) => {
                self.failed = true;
                (self.delivered == 0).then(|| Err(MediaError::CorruptVideo("no frame could be decoded".into())))
            }
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
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

fn open_with_ffmpeg(bytes: &[u8], limits: &MediaLimits) -> Result<(VideoMeta, Container<'static>), MediaError> {
    let input = open(bytes)?;
    let stream = input
        .streams()
        .best(ffmpeg::media::Type::Video)
        .ok_or_else(|| MediaError::NotAVideo("the file has no video stream".into()))?;
    let index = stream.index();
    let rate = stream.avg_frame_rate();
    let header_frames = stream.frames();
    let decoder = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
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
    let meta = VideoMeta {
        total_frames,
        fps,
        duration: total_frames as f64 / fps,
        width,
        height,
    };
    Ok((
        meta,
        Container::Ffmpeg {
            input,
            decoder,
            stream: index,
        },
    ))
}

/// An FFmpeg stream being decoded: packets go in, frames come out (several per packet, or
/// none, with frame threading), and the ones asked for are converted.
struct FfmpegFrames {
    input: ffmpeg::format::context::Input,
    decoder: ffmpeg::decoder::Video,
    stream: usize,
    scaler: Option<scaling::Context>,
    /// Decoded frames not yet looked at, with their indices.
    ready: VecDeque<(usize, ffmpeg::util::frame::Video)>,
    /// Frames decoded so far.
    seen: usize,
    /// The stream is drained.
    finished: bool,
}

impl FfmpegFrames {
    /// Frame `want` (past every frame handed over before), or `None` once the stream ends.
    fn next_at(&mut self, want: usize, limits: &MediaLimits) -> Result<Option<RgbImage>, MediaError> {
        loop {
            while let Some((index, frame)) = self.ready.pop_front() {
                if index == want {
                    return to_rgb(&frame, &mut self.scaler, limits).map(Some);
                }
            }
            if self.finished {
                return Ok(None);
            }
            self.decode_more()?;
        }
    }

    /// Feeds the decoder one packet of the stream (or the end), and takes what it gives.
    fn decode_more(&mut self) -> Result<(), MediaError> {
        loop {
            // A new packet per read: av_read_frame fills a blank packet and does not release
            // what one already holds, so reusing it leaked every skipped packet's buffer and
            // side data (an audio track's packets, corrupt ones; found by the video fuzzer).
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) if packet.stream() != self.stream => continue,
                Ok(()) => {
                    self.decoder.send_packet(&packet).map_err(corrupt)?;
                    break;
                }
                // A corrupt packet: the demuxer resyncs past it.
                Err(ffmpeg::Error::InvalidData) => continue,
                Err(ffmpeg::Error::Eof) => {
                    self.decoder.send_eof().map_err(corrupt)?;
                    self.finished = true;
                    break;
                }
                Err(e) => return Err(corrupt(e)),
            }
        }
        let mut decoded = ffmpeg::util::frame::Video::empty();
        while self.decoder.receive_frame(&mut decoded).is_ok() {
            self.ready.push_back((
                self.seen,
                std::mem::replace(&mut decoded, ffmpeg::util::frame::Video::empty()),
            ));
            self.seen += 1;
        }
        Ok(())
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

fn gif<'a>(
    bytes: &'a [u8],
    limits: &MediaLimits,
) -> Result<image::codecs::gif::GifDecoder<Cursor<&'a [u8]>>, MediaError> {
    let corrupt = |e: image::ImageError| MediaError::CorruptVideo(e.to_string());
    let mut decoder = image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).map_err(corrupt)?;
    // A frame may claim far more pixels than the screen it is drawn on (the fuzzer's: 65533 x
    // 65530 on a 5 x 5 screen, 17 GB as RGBA): the decoder's buffers, the screen's and one
    // frame's, are bounded by the pixel limit, and past it the frame is an error.
    let mut bounds = image::Limits::default();
    bounds.max_alloc = Some(limits.max_image_pixels.saturating_mul(4 * 2));
    decoder.set_limits(bounds).map_err(corrupt)?;
    Ok(decoder)
}

/// An animated GIF's header: its frames counted (without keeping them) and the frame rate
/// from their delays.
fn gif_meta(bytes: &[u8], limits: &MediaLimits) -> Result<VideoMeta, MediaError> {
    let (width, height) = gif(bytes, limits)?.dimensions();
    check_pixels(width, height, limits)?;
    let mut total_frames = 0usize;
    let mut total_ms = 0f64;
    for frame in gif(bytes, limits)?.into_frames() {
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
    Ok(VideoMeta {
        total_frames,
        fps,
        duration: total_frames as f64 / fps,
        width,
        height,
    })
}

/// The GIF frame at `want`, composited as browsers show it.
fn next_gif_frame(
    frames: &mut Result<std::iter::Enumerate<image::Frames<'_>>, MediaError>,
    want: usize,
) -> Result<Option<RgbImage>, MediaError> {
    let frames = frames.as_mut().map_err(|e| e.clone())?;
    for (i, frame) in frames.by_ref() {
        if i == want {
            let frame = frame.map_err(|e| MediaError::CorruptVideo(e.to_string()))?;
            return Ok(Some(image::DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8()));
        }
    }
    Ok(None)
}
