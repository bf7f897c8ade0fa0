//! Batched equals unbatched: sequences decoded together in ragged batches (prefill chunks
//! mixed with decode steps, preemption when KV blocks run out) produce exactly what each
//! produces alone, and what transformers produced.

mod common;

use common::*;
use ocellus::engine::{AddError, generate};

const CASES: [&str; 4] = ["wide", "rgba", "multi_turn", "text_only"];

fn alone_and_reference() -> Vec<Vec<u32>> {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), 4096, 256);
    CASES
        .iter()
        .map(|name| {
            let case = &reference.cases[*name];
            let request = greedy(prompt_for(&processor, &reference, case), case.greedy_tokens.len());
            let tokens = generate(&mut engine, vec![request], |_| {}).unwrap().0.remove(0).tokens;
            assert_eq!(tokens, case.greedy_tokens, "{name}: alone differs from transformers");
            tokens
        })
        .collect()
}

fn together(max_batch_tokens: usize, kv_blocks: usize) -> (Vec<Vec<u32>>, usize, usize) {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), max_batch_tokens, kv_blocks);
    let requests = CASES
        .iter()
        .map(|name| {
            let case = &reference.cases[*name];
            greedy(prompt_for(&processor, &reference, case), case.greedy_tokens.len())
        })
        .collect();
    let (mut mixed_steps, mut preempted) = (0, 0);
    let (generations, _) = generate(&mut engine, requests, |step| {
        assert!(step.prefill_tokens + step.decode_tokens <= max_batch_tokens);
        if step.prefill_tokens > 0 && step.decode_tokens > 0 {
            mixed_steps += 1;
        }
        preempted += step.preempted;
    })
    .unwrap();
    assert_eq!(engine.pool().used_blocks(), 0, "finished sequences hold no blocks");
    (
        generations.into_iter().map(|g| g.tokens).collect(),
        mixed_steps,
        preempted,
    )
}

#[test]
fn ragged_batches_give_each_sequence_its_unbatched_greedy_tokens() {
    let alone = alone_and_reference();
    // A 64-token budget splits every image prompt into chunks, and once the first prompt
    // is in, later chunks share steps with its decodes.
    let (batched, mixed_steps, _) = together(64, 256);
    assert!(mixed_steps >= 3, "only {mixed_steps} steps mixed prefill and decode");
    assert_eq!(batched, alone);
}

#[test]
fn preempted_sequences_are_recomputed_to_the_same_tokens() {
    let alone = alone_and_reference();
    // 50 blocks (800 tokens) cannot hold all four sequences (776 prompt tokens plus 96
    // generated): the youngest is preempted and recomputed later.
    let (batched, _, preempted) = together(512, 50);
    assert!(preempted > 0, "the pool was large enough; nothing was preempted");
    assert_eq!(batched, alone);
}

#[test]
fn a_prompt_whose_image_tokens_do_not_match_its_images_is_refused() {
    let loaded = load_fixture_model("tiny-idefics3");
    let image_token = loaded.model.info().image_token_id;
    let (_, mut engine) = engine(loaded, 64, 16);
    let prompt = ocellus::processor::Prompt::text(vec![1, image_token, 2]);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = engine.add(greedy(prompt, 4), 0, tx).unwrap_err();
    assert_eq!(err, AddError::ImageTokens { found: 1, expected: 0 });
}

#[test]
fn a_repeated_image_reuses_its_vision_features_and_gives_the_same_tokens() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), 4096, 256);
    let mut hits_and_misses = Vec::new();
    for name in ["wide", "wide", "multi_image", "gray"] {
        let case = &reference.cases[name];
        let request = greedy(prompt_for(&processor, &reference, case), case.greedy_tokens.len());
        let (mut hits, mut misses) = (0, 0);
        let tokens = generate(&mut engine, vec![request], |step| {
            hits += step.vision_cache_hits;
            misses += step.vision_cache_misses;
        })
        .unwrap()
        .0
        .remove(0)
        .tokens;
        assert_eq!(tokens, case.greedy_tokens, "{name}");
        hits_and_misses.push((hits, misses));
    }
    // wide: encoded, then reused; multi_image (wide + gray): wide reused, gray encoded;
    // gray alone: reused.
    assert_eq!(hits_and_misses, vec![(0, 1), (1, 0), (1, 1), (1, 0)]);
}

#[test]
fn the_same_image_arriving_together_is_encoded_once() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), 4096, 256);
    // Three requests with the same image join before any step: the first sends it to the
    // vision thread, the other two wait for its features instead of encoding it again.
    let case = &reference.cases["wide"];
    let requests: Vec<_> = (0..3)
        .map(|_| greedy(prompt_for(&processor, &reference, case), case.greedy_tokens.len()))
        .collect();
    let (mut hits, mut misses, mut encodes) = (0, 0, 0);
    let (results, _) = generate(&mut engine, requests, |step| {
        hits += step.vision_cache_hits;
        misses += step.vision_cache_misses;
        encodes += step.vision_encodes.len();
    })
    .unwrap();
    for result in results {
        assert_eq!(result.tokens, case.greedy_tokens);
    }
    assert_eq!((misses, hits, encodes), (1, 2, 1));
}
