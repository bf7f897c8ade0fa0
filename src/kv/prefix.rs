//! Identities of full KV blocks, for prefix caching: a block's keys and values depend on
//! every token up to its end, so its hash chains the previous block's hash with its own
//! tokens. Image tokens share a few ids; what they show is the image's content key
//! (blake3 of its preprocessed pixels), so two prompts share a block only if the same
//! pixels sit in the same slots. blake3 keeps a crafted prompt from colliding with another
//! client's cached blocks. The chain starts from the adapter the blocks were computed
//! with (0: the base model), since an adapter changes every layer's keys and values.

use super::BLOCK_TOKENS;

pub type BlockHash = [u8; 32];

/// The image slots of a prompt: the ids of image placeholder tokens and, in prompt order,
/// each image's number of tokens and content key.
pub struct ImageSlots<'a> {
    pub tokens: &'a [u32],
    pub images: &'a [(usize, [u8; 32])],
}

/// Hashes of the full blocks of `tokens` (a trailing partial block has none), computed
/// with the adapter of id `adapter` (`lora::Adapter::id`; 0 for none).
pub fn block_hashes(tokens: &[u32], slots: &ImageSlots<'_>, adapter: u64) -> Vec<BlockHash> {
    // Which image, and which of its tokens, each image token is.
    let mut owners = slots
        .images
        .iter()
        .flat_map(|(count, key)| (0..*count as u32).map(move |i| (key, i)));
    let mut hashes = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
    let mut parent = [0u8; 32];
    parent[..8].copy_from_slice(&adapter.to_le_bytes());
    for block in tokens.chunks_exact(BLOCK_TOKENS) {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&parent);
        for &token in block {
            hasher.update(&token.to_le_bytes());
            if slots.tokens.contains(&token) {
                // A prompt whose image tokens outnumber its images' (refused at add) would
                // hash as text here; it never reaches the pool.
                if let Some((key, index)) = owners.next() {
                    hasher.update(key);
                    hasher.update(&index.to_le_bytes());
                }
            }
        }
        parent = *hasher.finalize().as_bytes();
        hashes.push(parent);
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: u32 = 9;

    fn text(n: usize, first: u32) -> Vec<u32> {
        (first..first + n as u32).collect()
    }

    #[test]
    fn equal_prefixes_hash_equal_until_they_part() {
        let none = ImageSlots {
            tokens: &[IMAGE],
            images: &[],
        };
        let a = text(3 * BLOCK_TOKENS + 5, 100);
        let mut b = a.clone();
        b[BLOCK_TOKENS + 2] = 7;
        let (ha, hb) = (block_hashes(&a, &none, 0), block_hashes(&b, &none, 0));
        assert_eq!(ha.len(), 3, "the partial block has no hash");
        assert_eq!(ha[0], hb[0]);
        // The second block differs, and so does every block after it (the chain).
        assert_ne!(ha[1], hb[1]);
        assert_ne!(ha[2], hb[2]);
    }

    #[test]
    fn image_tokens_hash_by_the_pixels_they_show() {
        let mut tokens = text(4, 100);
        tokens.extend(std::iter::repeat_n(IMAGE, 2 * BLOCK_TOKENS));
        let cat = [(2 * BLOCK_TOKENS, [1u8; 32])];
        let dog = [(2 * BLOCK_TOKENS, [2u8; 32])];
        let with = |images| {
            block_hashes(
                &tokens,
                &ImageSlots {
                    tokens: &[IMAGE],
                    images,
                },
                0,
            )
        };
        assert_eq!(with(&cat), with(&cat));
        assert_ne!(with(&cat)[0], with(&dog)[0]);
        // Two images with the same tokens in swapped order are different prompts.
        let cat_dog = [(BLOCK_TOKENS, [1u8; 32]), (BLOCK_TOKENS, [2u8; 32])];
        let dog_cat = [(BLOCK_TOKENS, [2u8; 32]), (BLOCK_TOKENS, [1u8; 32])];
        assert_ne!(with(&cat_dog), with(&dog_cat));
    }

    #[test]
    fn the_same_tokens_under_another_adapter_share_no_block() {
        let none = ImageSlots {
            tokens: &[IMAGE],
            images: &[],
        };
        let tokens = text(2 * BLOCK_TOKENS, 100);
        let (base, a, b) = (
            block_hashes(&tokens, &none, 0),
            block_hashes(&tokens, &none, 1),
            block_hashes(&tokens, &none, 2),
        );
        assert_eq!(a, block_hashes(&tokens, &none, 1));
        for i in 0..2 {
            assert_ne!(base[i], a[i]);
            assert_ne!(a[i], b[i]);
        }
    }
}
