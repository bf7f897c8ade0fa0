//! Preprocessed images of recent requests, so that the same image sent again (a burst of
//! requests about one photo, a chat resending its history) is not resized and normalised
//! again: at 16 concurrent requests about one photo, resampling was 7% of the server's CPU
//! time. Keyed by the decoded pixels and the detail asked for; bounded in bytes, least
//! recently used first out. vLLM keeps the same kind of cache (its multi-modal processor
//! cache). Entries share their pixels' storage with the prompts made from them.

use std::sync::Mutex;

use ::image::DynamicImage;
use lru::LruCache;

use crate::model::{ImageOptions, ProcessedMedia};

type Key = [u8; 32];

pub struct PreprocessCache {
    inner: Mutex<Inner>,
}

struct Inner {
    entries: LruCache<Key, ProcessedMedia>,
    bytes: usize,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl PreprocessCache {
    /// Holds up to `capacity` bytes of pixel values; 0 caches nothing.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                bytes: 0,
                capacity,
                hits: 0,
                misses: 0,
            }),
        }
    }

    pub fn set_capacity(&self, capacity: usize) {
        let mut inner = self.lock();
        inner.capacity = capacity;
        inner.evict();
    }

    /// The cached result for `image` shown with `options`, or `preprocess`'s, remembered.
    pub fn get_or_insert<E>(
        &self,
        image: &DynamicImage,
        options: &ImageOptions,
        preprocess: impl FnOnce() -> Result<ProcessedMedia, E>,
    ) -> Result<ProcessedMedia, E> {
        let key = key(image, options);
        {
            let mut inner = self.lock();
            if let Some(found) = inner.entries.get(&key).cloned() {
                inner.hits += 1;
                return Ok(found);
            }
            inner.misses += 1;
        }
        // Preprocessing runs outside the lock: other requests' images go on meanwhile.
        let processed = preprocess()?;
        let size = bytes(&processed);
        let mut inner = self.lock();
        if size <= inner.capacity && inner.entries.put(key, processed.clone()).is_none() {
            inner.bytes += size;
            inner.evict();
        }
        Ok(processed)
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.hits, inner.misses)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves nothing half-done worth refusing service for.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn evict(&mut self) {
        while self.bytes > self.capacity {
            let Some((_, evicted)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes -= bytes(&evicted);
        }
    }
}

fn bytes(processed: &ProcessedMedia) -> usize {
    processed.items.iter().map(|i| i.pixels.bytes()).sum()
}

/// blake3 over the pixel layout and bytes, and how the image is to be shown.
fn key(image: &DynamicImage, options: &ImageOptions) -> Key {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&image.width().to_le_bytes());
    hasher.update(&image.height().to_le_bytes());
    hasher.update(format!("{:?}", image.color()).as_bytes());
    hasher.update(format!("{options:?}").as_bytes());
    hasher.update(image.as_bytes());
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Detail;

    type Made = Result<ProcessedMedia, ()>;

    fn processed(value: f32, len: usize) -> Made {
        let (pixels, key) = crate::model::Pixels::keyed(vec![value; len], &[len], None).unwrap();
        let item = crate::model::MediaItem { pixels, key, tokens: 1 };
        Ok(ProcessedMedia {
            items: vec![item],
            text: String::new(),
        })
    }

    fn values(made: Made) -> Vec<f32> {
        made.unwrap().items[0].pixels.values.to_vec1().unwrap()
    }

    #[test]
    fn the_same_pixels_and_tiling_hit_and_anything_else_misses() {
        let cache = PreprocessCache::new(1 << 20);
        let image = DynamicImage::new_rgb8(4, 4);
        let first = values(cache.get_or_insert(&image, &Detail::Auto.into(), || processed(1.0, 8)));
        let again = values(cache.get_or_insert(&image, &Detail::Auto.into(), || -> Made {
            panic!("a hit does not preprocess")
        }));
        assert_eq!(again, first);
        let _ = cache.get_or_insert(&image, &Detail::Low.into(), || processed(2.0, 8));
        let mut other = image.to_rgb8();
        other.put_pixel(3, 3, ::image::Rgb([1, 0, 0]));
        let _ = cache.get_or_insert(&DynamicImage::ImageRgb8(other), &Detail::Auto.into(), || {
            processed(3.0, 8)
        });
        let _ = cache.get_or_insert(&DynamicImage::new_rgba8(4, 4), &Detail::Auto.into(), || {
            processed(4.0, 8)
        });
        assert_eq!(cache.stats(), (1, 4));
    }

    #[test]
    fn stays_within_its_bytes_dropping_the_least_recently_used() {
        // Room for two entries of 8 f32s.
        let cache = PreprocessCache::new(64);
        let images: Vec<_> = (1..=3).map(|w| DynamicImage::new_rgb8(w, 1)).collect();
        let _ = cache.get_or_insert(&images[0], &Detail::Auto.into(), || processed(0.0, 8));
        let _ = cache.get_or_insert(&images[1], &Detail::Auto.into(), || processed(1.0, 8));
        let _ = cache.get_or_insert(&images[0], &Detail::Auto.into(), || -> Made { panic!("cached") });
        let _ = cache.get_or_insert(&images[2], &Detail::Auto.into(), || processed(2.0, 8));
        // images[1] was the least recently used.
        let _ = cache.get_or_insert(&images[0], &Detail::Auto.into(), || -> Made { panic!("cached") });
        let _ = cache.get_or_insert(&images[1], &Detail::Auto.into(), || processed(1.0, 8));
        assert_eq!(cache.stats(), (2, 4));
        let empty = PreprocessCache::new(0);
        let _ = empty.get_or_insert(&images[0], &Detail::Auto.into(), || processed(0.0, 8));
        let _ = empty.get_or_insert(&images[0], &Detail::Auto.into(), || processed(0.0, 8));
        assert_eq!(empty.stats(), (0, 2));
    }
}
