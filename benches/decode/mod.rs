//! The decode step both model benches time: caches of text context, one token each.

use ocellus::kv::{KvPool, SequenceKv};
use ocellus::model::{SequenceInput, VisionLanguageModel};

/// Tokens of context before the timed step.
pub const DECODE_CONTEXT: usize = 512;

/// A cache holding `context` tokens of text, with room for one more.
pub fn prefilled_cache(model: &dyn VisionLanguageModel, pool: &mut KvPool, context: usize) -> SequenceKv {
    let mut kv = SequenceKv::default();
    assert!(pool.grow(&mut kv, context + 1));
    let tokens: Vec<u32> = (0..context as u32).map(|i| 200 + i % 500).collect();
    let input = SequenceInput {
        tokens: &tokens,
        positions: None,
        image_features: None,
        kv: &mut kv,
        wants_logits: false,
        adapter: None,
    };
    model.forward(&mut [input], pool).expect("prefill");
    kv
}

/// One decode token per cache (`tokens[i]` for cache i), each cache cut back to
/// `DECODE_CONTEXT` tokens first so that every step sees the same context.
pub fn decode_inputs<'a>(caches: &'a mut [SequenceKv], tokens: &'a [u32]) -> Vec<SequenceInput<'a>> {
    caches
        .iter_mut()
        .zip(tokens)
        .map(|(kv, token)| {
            kv.truncate(DECODE_CONTEXT);
            SequenceInput {
                tokens: std::slice::from_ref(token),
                positions: None,
                image_features: None,
                kv,
                wants_logits: true,
                adapter: None,
            }
        })
        .collect()
}
