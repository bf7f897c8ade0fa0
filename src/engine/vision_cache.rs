//! Vision features of recent images, keyed by the hash of their preprocessed pixels and
//! bounded in bytes, least recently used first out. A repeated image (the same photo asked
//! about twice, a shared screenshot) skips the vision encoder, which dominates time to
//! first token on a CPU. Keys are of content only: two requests share features exactly
//! when their images are pixel for pixel the same.

use lru::LruCache;

use crate::model::{ContentKey, ImageFeatures};

pub struct VisionCache {
    entries: LruCache<ContentKey, ImageFeatures>,
    bytes: usize,
    budget: usize,
}

impl VisionCache {
    /// A cache holding at most `budget` bytes of features (0: never holds any).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    /// Whether `key` is cached, without making it recently used.
    pub fn contains(&self, key: &ContentKey) -> bool {
        self.entries.contains(key)
    }

    pub fn get(&mut self, key: &ContentKey) -> Option<ImageFeatures> {
        self.entries.get(key).cloned()
    }

    /// Keeps `features` (which must own their storage, not view a larger tensor, or the
    /// byte count would be wrong), evicting the least recently used to make room.
    pub fn insert(&mut self, key: ContentKey, features: ImageFeatures) {
        let size = features.bytes();
        if size > self.budget {
            return;
        }
        if let Some(old) = self.entries.pop(&key) {
            self.bytes -= old.bytes();
        }
        while self.bytes + size > self.budget {
            let (_, evicted) = self.entries.pop_lru().expect("bytes > 0 means entries. This is a bug.");
            self.bytes -= evicted.bytes();
        }
        self.bytes += size;
        self.entries.put(key, features);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    fn features(rows: usize) -> ImageFeatures {
        ImageFeatures {
            embeds: Tensor::zeros((rows, 4), DType::F32, &Device::Cpu).unwrap(),
            deepstack: Vec::new(),
        }
    }

    #[test]
    fn the_least_recently_used_goes_first_and_bytes_stay_in_budget() {
        let mut cache = VisionCache::new(3 * 64); // three entries of 4x4 f32
        for k in 0..3u8 {
            cache.insert([k; 32], features(4));
        }
        assert!(cache.get(&[0; 32]).is_some()); // 0 is now the most recent
        cache.insert([3; 32], features(4));
        assert!(cache.get(&[1; 32]).is_none(), "1 was the least recently used");
        assert!(cache.get(&[0; 32]).is_some());
        assert_eq!((cache.len(), cache.bytes()), (3, 192));
        cache.insert([9; 32], features(100));
        assert_eq!(cache.len(), 3, "an entry larger than the budget is not kept");
        assert!(VisionCache::new(0).get(&[0; 32]).is_none());
    }
}
