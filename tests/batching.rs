//! Batched equals unbatched: sequences decoded together in ragged batches (prefill chunks
//! mixed with decode steps) produce exactly what each produces alone, and what
//! transformers produced.

mod common;

use common::*;
use ocellus::engine::Generator;

#[test]
fn ragged_batches_give_each_sequence_its_unbatched_greedy_tokens() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let loaded = load_fixture_model("tiny-idefics3");
    let eos = loaded.processor.eos_token_ids();
    // Different images, tile counts and prompt lengths (187, 261, 303 and 25 tokens).
    let names = ["wide", "rgba", "multi_turn", "text_only"];
    let cases: Vec<_> = names.iter().map(|n| &reference.cases[*n]).collect();

    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|case| {
            let mut generator = Generator::new(loaded.model.as_ref(), eos, 4096);
            generator
                .add(greedy(prompt_for(&loaded, &reference, case), case.greedy_tokens.len()))
                .unwrap();
            generator.run().unwrap().remove(0).tokens
        })
        .collect();

    // A 64-token budget splits every image prompt into chunks, and once the first prompt
    // is in, later chunks share steps with its decodes.
    let mut generator = Generator::new(loaded.model.as_ref(), eos, 64);
    for case in &cases {
        generator
            .add(greedy(prompt_for(&loaded, &reference, case), case.greedy_tokens.len()))
            .unwrap();
    }
    let mut mixed_steps = 0;
    while let Some(step) = generator.step().unwrap() {
        assert!(step.prefill_tokens + step.decode_tokens <= 64);
        if step.prefill_tokens > 0 && step.decode_tokens > 0 {
            mixed_steps += 1;
        }
    }
    let together: Vec<Vec<u32>> = generator.finish().into_iter().map(|g| g.tokens).collect();

    assert!(mixed_steps >= 3, "only {mixed_steps} steps mixed prefill and decode");
    for (i, name) in names.iter().enumerate() {
        assert_eq!(together[i], alone[i], "{name}: batched differs from alone");
        assert_eq!(alone[i], cases[i].greedy_tokens, "{name}: differs from transformers");
    }
}

#[test]
fn a_prompt_whose_image_tokens_do_not_match_its_images_is_refused() {
    let loaded = load_fixture_model("tiny-idefics3");
    let mut generator = Generator::new(loaded.model.as_ref(), loaded.processor.eos_token_ids(), 64);
    let image_token = loaded.model.info().image_token_id;
    let prompt = ocellus::processor::Prompt {
        token_ids: vec![1, image_token, 2],
        pixel_values: None,
        tiles: 0,
    };
    let err = generator.add(greedy(prompt, 4)).unwrap_err();
    assert!(
        matches!(
            err,
            ocellus::engine::GenerateError::ImageTokens { found: 1, expected: 0 }
        ),
        "{err}"
    );
}
