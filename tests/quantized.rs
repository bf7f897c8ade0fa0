//! `--quantize q8_0`: the text model's projections and head as int8 blocks. Not equal to
//! f32 by design; close: first-step logits correlate with f32's, the first greedy token is
//! the same, and the greedy answers mostly agree (printed). The tiny fixture's weights are
//! far larger than a trained model's, which makes it a harsh case for 8 bits.

mod common;

use common::*;
use ocellus::model::Quantization;

#[test]
fn q8_0_stays_close_to_f32_on_the_fixture_prompts() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let mut loaded = load_fixture_model("tiny-idefics3");
    // Two layers of seven projections, and the head.
    assert_eq!(loaded.model.quantize_text(Quantization::Q8_0).unwrap(), 15);
    let (processor, mut engine) = engine(loaded, 4096, 512);
    let (mut agreeing, mut total, mut worst) = (0, 0, 1f32);
    for (name, case) in &reference.cases {
        let prompt = prompt_for(&processor, &reference, case);
        let expected = reference.logits(name);
        let logits = first_step_logits(engine.model(), &prompt);
        let correlation = pearson(&logits, &expected);
        worst = worst.min(correlation);
        let request = greedy(prompt, case.greedy_tokens.len());
        let tokens = ocellus::engine::generate(&mut engine, vec![request], |_| {})
            .unwrap()
            .0
            .remove(0)
            .tokens;
        let same = tokens
            .iter()
            .zip(&case.greedy_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{name}: logits correlate {correlation:.4} with f32's; {same} of {} greedy tokens agree before the first difference",
            tokens.len()
        );
        assert_eq!(tokens[0], case.greedy_tokens[0], "{name}: the first token differs");
        agreeing += same;
        total += tokens.len();
    }
    eprintln!("q8_0 vs f32: {agreeing} of {total} greedy tokens agree (prefix), lowest logit correlation {worst:.4}");
    assert!(worst > 0.99, "q8_0 logits drifted: correlation {worst}");
    assert!(
        agreeing * 2 > total,
        "fewer than half the greedy tokens agree: {agreeing} of {total}"
    );
}

fn pearson(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        ab += dx * dy;
        aa += dx * dx;
        bb += dy * dy;
    }
    (ab / (aa * bb).sqrt()) as f32
}
