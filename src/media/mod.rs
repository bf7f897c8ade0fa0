//! Media from requests: fetched (`fetch`), then probed and decoded within bounds, on a
//! bounded pool of workers (`pool`). The header is read before the pixels, so an image
//! whose dimensions exceed the limit, or whose tokens would exceed the request's budget, is
//! refused before any decoding (a 50000x50000 PNG of a few kilobytes must not allocate
//! gigabytes); likewise a video's frame count and rate come before its frames.

pub mod address;
pub mod fetch;
pub mod pool;
pub mod video;

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader};

pub use address::AddressRule;
pub use fetch::{FetchConfig, Fetched, MediaFetcher};
pub use pool::{JobFailed, MediaPool};
pub use video::{Frames, VideoMeta, VideoSource, open_video};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MediaLimits {
    /// Most pixels (width x height) of one image or video frame.
    pub max_image_pixels: u64,
    /// Longest video, in seconds.
    pub max_video_seconds: f64,
}

/// Why media was refused; every variant is the client's doing.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MediaError {
    #[error("URLs of this kind are not supported: `{scheme}:`; use data:, http(s): or (where allowed) file:")]
    UnsupportedUrl { scheme: String },
    #[error("malformed URL: {0}")]
    BadUrl(String),
    #[error("malformed data URI: {0}")]
    MalformedDataUri(String),
    #[error("the data URI's base64 payload is invalid: {0}")]
    Base64(String),
    #[error("fetching the media failed: {0}")]
    FetchFailed(String),
    #[error("fetching the media took longer than the server's media timeout")]
    Timeout,
    #[error("the media URL redirected more than {limit} times")]
    TooManyRedirects { limit: usize },
    #[error("the media is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("media from `{0}` is not allowed on this server")]
    DomainNotAllowed(String),
    #[error(
        "media from {0} is not allowed: the address is not public (loopback, private, link-local, \
         unique-local, unspecified or reserved), and this server fetches only from public addresses"
    )]
    AddressNotAllowed(String),
    #[error("local files are not allowed on this server")]
    LocalFilesDisabled,
    #[error("the local file {0} is outside the folder this server allows")]
    PathNotAllowed(String),
    #[error("no such local file: {0}")]
    FileNotFound(String),
    #[error("the source says `{declared}` but the data is {actual}")]
    ContentTypeMismatch { declared: String, actual: String },
    #[error("the data is not an image in a supported format (PNG, JPEG, WebP, GIF, BMP, TIFF)")]
    NotAnImage,
    #[error("the image is {width}x{height} = {pixels} pixels, more than the limit of {limit}")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    #[error("the video could not be decoded: {0}")]
    CorruptVideo(String),
    #[error("the data is not a video in a supported format (MP4, WebM, MKV, MOV, AVI, animated GIF): {0}")]
    NotAVideo(String),
    #[error("the video lasts {seconds:.1} s, more than the limit of {limit} s")]
    VideoTooLong { seconds: f64, limit: f64 },
}

/// An image's format and size, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// Reads the format and dimensions, checks them against the declared content type and the
/// pixel limit. Decodes nothing.
pub fn probe_image(fetched: &Fetched, limits: &MediaLimits) -> Result<ImageHeader, MediaError> {
    let bytes = &fetched.bytes;
    let format = image::guess_format(bytes).map_err(|_| MediaError::NotAnImage)?;
    if let Some(declared) = &fetched.declared_type {
        let actual = format.to_mime_type();
        let generic = declared == "application/octet-stream" || declared.is_empty();
        if !generic && declared != actual && !(declared == "image/jpg" && actual == "image/jpeg") {
            return Err(MediaError::ContentTypeMismatch {
                declared: declared.clone(),
                actual: actual.to_string(),
            });
        }
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| MediaError::Corrupt(e.to_string()))?;
    check_pixel_limit(width, height, limits)?;
    if width == 0 || height == 0 {
        return Err(MediaError::Corrupt("the image has no pixels".into()));
    }
    Ok(ImageHeader { format, width, height })
}

/// The pixel bound of one image or video frame, read from a header before decoding.
fn check_pixel_limit(width: u32, height: u32, limits: &MediaLimits) -> Result<(), MediaError> {
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_image_pixels {
        return Err(MediaError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_image_pixels,
        });
    }
    Ok(())
}

/// Decodes a probed image; the decoder's allocation cap backs up the header check.
pub fn decode_image(fetched: &Fetched, header: &ImageHeader) -> Result<DynamicImage, MediaError> {
    let mut reader = ImageReader::with_format(Cursor::new(&fetched.bytes), header.format);
    let pixels = header.width as u64 * header.height as u64;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| MediaError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MediaLimits = MediaLimits {
        max_image_pixels: 1 << 20,
        max_video_seconds: 60.0,
    };

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    fn fetched(bytes: Vec<u8>, declared: Option<&str>) -> Fetched {
        Fetched {
            bytes,
            declared_type: declared.map(str::to_string),
        }
    }

    #[test]
    fn a_png_probes_and_decodes() {
        let f = fetched(png(7, 3), Some("image/png"));
        let header = probe_image(&f, &LIMITS).unwrap();
        assert_eq!((header.width, header.height), (7, 3));
        let img = decode_image(&f, &header).unwrap();
        assert_eq!((img.width(), img.height()), (7, 3));
    }

    #[test]
    fn bad_bytes_and_lying_types_get_their_own_errors() {
        assert_eq!(
            probe_image(&fetched(b"plain text".to_vec(), None), &LIMITS).unwrap_err(),
            MediaError::NotAnImage
        );
        assert_eq!(
            probe_image(&fetched(Vec::new(), None), &LIMITS).unwrap_err(),
            MediaError::NotAnImage
        );
        let lying = probe_image(&fetched(png(4, 4), Some("image/jpeg")), &LIMITS).unwrap_err();
        assert!(matches!(lying, MediaError::ContentTypeMismatch { .. }), "{lying}");
        let generic = probe_image(&fetched(png(4, 4), Some("application/octet-stream")), &LIMITS);
        assert!(generic.is_ok());
        let truncated = fetched(png(40, 40)[..60].to_vec(), None);
        let result = probe_image(&truncated, &LIMITS).and_then(|h| decode_image(&truncated, &h).map(|_| ()));
        assert!(matches!(result, Err(MediaError::Corrupt(_))), "{result:?}");
    }

    #[test]
    fn dimensions_are_checked_from_the_header_before_decoding() {
        // A valid PNG header claiming 50000x50000 with no pixel data behind it.
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&50000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&50000u32.to_be_bytes());
        let crc = crc32fast::hash(&bomb[12..29]); // IHDR's type and data
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = probe_image(&fetched(bomb, None), &LIMITS).unwrap_err();
        assert!(
            matches!(
                err,
                MediaError::TooManyPixels {
                    width: 50000,
                    height: 50000,
                    ..
                }
            ),
            "{err}"
        );
    }
}
