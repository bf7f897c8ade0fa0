//! Images from requests, decoded within bounds. Today: `data:` URIs (base64). The header is
//! read before the pixels, so an image whose dimensions exceed the limit is refused before
//! any decoding (a 50000x50000 PNG of a few kilobytes must not allocate gigabytes).

use std::io::Cursor;

use base64::Engine;
use image::{DynamicImage, ImageReader};

#[derive(Debug, Clone, Copy)]
pub struct MediaLimits {
    /// Most pixels (width x height) of one image.
    pub max_image_pixels: u64,
}

/// Why an image was refused; every variant is the client's doing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    #[error("image URLs of this kind are not supported: {scheme}; send the image as a data: URI")]
    UnsupportedUrl { scheme: String },
    #[error("malformed data URI: {0}")]
    MalformedDataUri(String),
    #[error("the data URI's base64 payload is invalid: {0}")]
    Base64(String),
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
}

/// Decodes the image an `image_url.url` names.
pub fn load_image(url: &str, limits: &MediaLimits) -> Result<DynamicImage, MediaError> {
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url
            .split(':')
            .next()
            .filter(|s| s.len() < url.len())
            .unwrap_or("(none)");
        return Err(MediaError::UnsupportedUrl {
            scheme: scheme.chars().take(16).collect(),
        });
    };
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::MalformedDataUri("no ',' before the payload".into()))?;
    if !header.ends_with(";base64") {
        return Err(MediaError::MalformedDataUri(
            "only base64 payloads are supported".into(),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| MediaError::Base64(e.to_string()))?;
    decode_image(&bytes, limits)
}

/// Decodes image bytes, checking the dimensions from the header first.
pub fn decode_image(bytes: &[u8], limits: &MediaLimits) -> Result<DynamicImage, MediaError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| MediaError::NotAnImage)?;
    if reader.format().is_none() {
        return Err(MediaError::NotAnImage);
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| MediaError::Corrupt(e.to_string()))?;
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_image_pixels {
        return Err(MediaError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_image_pixels,
        });
    }
    if pixels == 0 {
        return Err(MediaError::Corrupt("the image has no pixels".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| MediaError::NotAnImage)?;
    // The decoder's own allocation cap backs up the header check (formats whose frames can
    // claim other sizes than the header).
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    reader.limits(decoder_limits);
    reader.decode().map_err(|e| MediaError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MediaLimits = MediaLimits {
        max_image_pixels: 1 << 20,
    };

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn data_uri(bytes: &[u8]) -> String {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn a_data_uri_png_decodes() {
        let img = load_image(&data_uri(&png(7, 3)), &LIMITS).unwrap();
        assert_eq!((img.width(), img.height()), (7, 3));
    }

    #[test]
    fn bad_inputs_get_their_own_errors() {
        assert!(matches!(
            load_image("https://example.com/a.png", &LIMITS),
            Err(MediaError::UnsupportedUrl { .. })
        ));
        assert!(matches!(
            load_image("data:image/png;base64", &LIMITS),
            Err(MediaError::MalformedDataUri(_))
        ));
        assert!(matches!(
            load_image("data:image/png;base64,@@@", &LIMITS),
            Err(MediaError::Base64(_))
        ));
        assert_eq!(
            load_image(&data_uri(b"plain text, not an image"), &LIMITS).unwrap_err(),
            MediaError::NotAnImage
        );
        let truncated = &png(40, 40)[..60];
        assert!(matches!(
            load_image(&data_uri(truncated), &LIMITS),
            Err(MediaError::Corrupt(_))
        ));
    }

    #[test]
    fn dimensions_are_checked_from_the_header_before_decoding() {
        // A valid PNG header claiming 50000x50000 with no pixel data behind it.
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&50000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&50000u32.to_be_bytes());
        let crc = crc32fast::hash(&bomb[12..29]); // IHDR's type and data
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = load_image(&data_uri(&bomb), &LIMITS).unwrap_err();
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
