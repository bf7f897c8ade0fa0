//! Images named in files rather than requests (fine-tuning data, evaluation sets): paths
//! relative to the file's folder, `file://` URLs or `data:` URIs, read and decoded within
//! the same bounds as a request's.

use std::path::Path;

use ::image::DynamicImage;

use crate::media::{Fetched, MediaLimits, decode_image, fetch::decode_data_uri, probe_image};

#[derive(Debug, Clone, Copy)]
pub struct LocalImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

/// The image `url` names, relative to `folder`; the error says what was wrong.
pub fn read_image(url: &str, folder: &Path, limits: &LocalImageLimits) -> Result<DynamicImage, String> {
    let fetched = if url.starts_with("data:") {
        decode_data_uri(url, limits.max_bytes).map_err(|e| e.to_string())?
    } else {
        let path = folder.join(url.strip_prefix("file://").unwrap_or(url));
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.len() > limits.max_bytes {
            return Err(format!("{}: over {} bytes", path.display(), limits.max_bytes));
        }
        Fetched {
            bytes,
            declared_type: None,
        }
    };
    let media = MediaLimits {
        max_image_pixels: limits.max_pixels,
        max_video_seconds: 0.0,
    };
    let header = probe_image(&fetched, &media).map_err(|e| e.to_string())?;
    decode_image(&fetched, &header).map_err(|e| e.to_string())
}
