//! Batched equals unbatched: sequences decoded together in ragged batches (prefill chunks
//! mixed with decode steps, preemption when KV blocks run out) produce exactly what each
//! produces alone, and what transformers produced.

mod common;

use common::*;
use ocellus::engine::{AddError, generate};

const CASES: [&str; 4] = ["wide", "rgba", "multi_turn", "text_only"];
/// Qwen3-VL's: M-RoPE positions, DeepStack rows and a video's frame pairs.
const QWEN_CASES: [&str; 4] = ["wide", "two_images", "video", "multi_turn"];

fn alone_and_reference() -> Vec<Vec<u32>> {
    alone_and_reference_of("tiny-idefics3", &CASES)
}

fn alone_and_reference_of(model: &str, cases: &[&str]) -> Vec<Vec<u32>> {
    let reference = Reference::load(&fixtures(), model);
    let (processor, mut engine) = engine(load_fixture_model(model), 4096, 256);
    cases
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

/// The four cases at once: (tokens, steps mixing prefill and decode, preemptions, prefix
/// cache hits in tokens).
fn together(max_batch_tokens: usize, kv_blocks: usize, prefix_caching: bool) -> (Vec<Vec<u32>>, usize, usize, usize) {
    together_of("tiny-idefics3", &CASES, max_batch_tokens, kv_blocks, prefix_caching)
}

fn together_of(
    model: &str,
    cases: &[&str],
    max_batch_tokens: usize,
    kv_blocks: usize,
    prefix_caching: bool,
) -> (Vec<Vec<u32>>, usize, usize, usize) {
    let reference = Reference::load(&fixtures(), model);
    let loaded = load_fixture_model(model);
    let (processor, mut engine) = engine_with(loaded, max_batch_tokens, kv_blocks, prefix_caching);
    let requests = |tokens: Option<usize>| {
        cases
            .iter()
            .map(|name| {
                let case = &reference.cases[*name];
                let tokens = tokens.unwrap_or(case.greedy_tokens.len());
                greedy(prompt_for(&processor, &reference, case), tokens)
            })
            .collect()
    };
    // One request at a time first, to fill the vision cache: then all four are ready at the
    // first step, and which steps they share does not depend on the vision thread's timing.
    for request in requests(Some(1)) {
        generate(&mut engine, vec![request], |_| {}).unwrap();
    }
    let (mut mixed_steps, mut preempted, mut hits) = (0, 0, 0);
    let (generations, _) = generate(&mut engine, requests(None), |step| {
        assert!(step.prefill_tokens + step.decode_tokens <= max_batch_tokens);
        if step.prefill_tokens > 0 && step.decode_tokens > 0 {
            mixed_steps += 1;
        }
        preempted += step.preempted;
        hits += step.prefix_hit_tokens;
    })
    .unwrap();
    assert_eq!(engine.pool().used_blocks(), 0, "finished sequences hold no blocks");
    let tokens = generations.into_iter().map(|g| g.tokens).collect();
    (tokens, mixed_steps, preempted, hits)
}

#[test]
fn ragged_batches_give_each_sequence_its_unbatched_greedy_tokens() {
    let alone = alone_and_reference();
    // A 64-token budget splits every image prompt into chunks, and once the first prompt
    // is in, later chunks share steps with its decodes.
    let (batched, mixed_steps, _, _) = together(64, 256, false);
    assert!(mixed_steps >= 3, "only {mixed_steps} steps mixed prefill and decode");
    assert_eq!(batched, alone);
}

#[test]
fn preempted_sequences_are_recomputed_to_the_same_tokens() {
    let alone = alone_and_reference();
    // 50 blocks (800 tokens) cannot hold all four sequences (776 prompt tokens plus 96
    // generated): the youngest is preempted and recomputed later, without prefix caching
    // entirely, with it from the prompt blocks cached before (the warm-up's and its own).
    for prefix_caching in [false, true] {
        let (batched, _, preempted, hits) = together(512, 50, prefix_caching);
        assert!(preempted > 0, "the pool was large enough; nothing was preempted");
        assert_eq!(hits > 0, prefix_caching);
        assert_eq!(batched, alone, "prefix caching {prefix_caching}");
    }
}

#[test]
fn qwen3vl_ragged_batches_and_preemption_give_each_sequence_its_unbatched_tokens() {
    let alone = alone_and_reference_of("tiny-qwen3vl", &QWEN_CASES);
    // 12 tokens a step: every image and frame pair (18 and 6 tokens) is split across
    // chunks, its DeepStack rows and M-RoPE positions with it.
    let (batched, mixed_steps, _, _) = together_of("tiny-qwen3vl", &QWEN_CASES, 12, 256, false);
    assert!(mixed_steps >= 3, "only {mixed_steps} steps mixed prefill and decode");
    assert_eq!(batched, alone);
    // 12 blocks (192 tokens) cannot hold all four (223 prompt tokens plus 96 generated):
    // preempted sequences are recomputed, with their positions past the prompt.
    for prefix_caching in [false, true] {
        let (batched, _, preempted, hits) = together_of("tiny-qwen3vl", &QWEN_CASES, 512, 12, prefix_caching);
        assert!(preempted > 0, "the pool was large enough; nothing was preempted");
        assert_eq!(hits > 0, prefix_caching);
        assert_eq!(batched, alone, "prefix caching {prefix_caching}");
    }
}

#[test]
fn a_prompt_whose_image_tokens_do_not_match_its_images_is_refused() {
    let loaded = load_fixture_model("tiny-idefics3");
    let image_token = loaded.model.info().image_token_ids[0];
    let (_, mut engine) = engine(loaded, 64, 16);
    let prompt = ocellus::engine::Prompt::text(vec![1, image_token, 2]);
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

#[test]
fn a_burst_of_the_same_prompt_prefills_its_shared_blocks_once() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let loaded = load_fixture_model("tiny-idefics3");
    let (processor, mut engine) = engine(loaded, 4096, 256);
    let case = &reference.cases["wide"];
    let n = case.input_ids.len();
    let cached = (n - 1) / 16 * 16;
    // Four at once, their image encoded once (the others wait for it in flight), so all four
    // are ready at the same step: the first prefills everything, the other three sit that
    // step out and then compute only what follows the cached blocks.
    let requests = (0..4)
        .map(|_| greedy(prompt_for(&processor, &reference, case), case.greedy_tokens.len()))
        .collect();
    let (mut prefilled, mut hit, mut deferred) = (0, 0, 0);
    let (generations, _) = generate(&mut engine, requests, |step| {
        prefilled += step.prefill_tokens;
        hit += step.prefix_hit_tokens;
        deferred += step.prefix_deferred;
    })
    .unwrap();
    for generation in generations {
        assert_eq!(generation.tokens, case.greedy_tokens);
    }
    assert_eq!((prefilled, hit), (n + 3 * (n - cached), 3 * cached));
    assert!(deferred >= 3, "{deferred} deferrals");
    assert_eq!(engine.pool().used_blocks(), 0);
}

#[test]
fn a_repeated_prefix_is_prefilled_once_and_gives_the_same_tokens() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let loaded = load_fixture_model("tiny-idefics3");
    let image_token = loaded.model.info().image_token_ids[0];
    let (processor, mut engine) = engine(loaded, 4096, 256);
    let prompt = |name: &str| prompt_for(&processor, &reference, &reference.cases[name]);
    let (wide, gray) = (prompt("wide").token_ids, prompt("gray").token_ids);
    let mut run = |name: &str| {
        let case = &reference.cases[name];
        let request = greedy(prompt(name), case.greedy_tokens.len());
        let (mut prefilled, mut hit) = (0, 0);
        let tokens = generate(&mut engine, vec![request], |step| {
            prefilled += step.prefill_tokens;
            hit += step.prefix_hit_tokens;
        })
        .unwrap()
        .0
        .remove(0)
        .tokens;
        assert_eq!(tokens, case.greedy_tokens, "{name}");
        (prefilled, hit)
    };
    assert_eq!(run("wide"), (wide.len(), 0));
    // Again: every full block before the last token comes from the cache.
    let cached = (wide.len() - 1) / 16 * 16;
    assert!(cached >= 64, "the prompt spans several blocks");
    assert_eq!(run("wide"), (wide.len() - cached, cached));
    // Another image: only the blocks before the first image slot (or the first different
    // token) are shared, whatever the token ids after it.
    let parted = (0..wide.len().min(gray.len()))
        .find(|&i| wide[i] != gray[i] || wide[i] == image_token)
        .unwrap();
    let shared = (parted / 16 * 16).min((gray.len() - 1) / 16 * 16);
    assert_eq!(run("gray"), (gray.len() - shared, shared));
    assert_eq!(engine.pool().used_blocks(), 0);
    assert!(engine.pool().cached_blocks() > 0, "finished prompts stay cached");
}
