//! Token for token equal to transformers: the fixture models' reference outputs (token
//! ids, pixel values, first-step logits, greedy tokens) recorded by
//! scripts/make_fixtures.py, compared with Ocellus on the same weights, in f32.

mod common;

use candle_core::Device;
use common::*;
use ocellus::config::WeightDType;

const PIXEL_TOLERANCE: f32 = 1e-5;
const LOGIT_TOLERANCE: f32 = 1e-4;

fn check_parity(root: &std::path::Path, model: &str) {
    let reference = Reference::load(root, model);
    let loaded =
        ocellus::runtime::load_folder(&Reference::model_dir(root, model), WeightDType::F32, &Device::Cpu).unwrap();
    let (processor, mut engine) = engine(loaded, 4096, 512);
    let mut failures = Vec::new();
    for (name, case) in &reference.cases {
        let (messages, _) = reference.inputs(case);
        let rendered = processor.render(&messages).unwrap();
        if rendered != case.prompt {
            failures.push(format!("{name}: rendered prompt {rendered:?} != {:?}", case.prompt));
        }
        let prompt = prompt_for(&processor, &reference, case);
        if prompt.token_ids != case.input_ids {
            failures.push(format!(
                "{name}: input ids differ ({} vs {} tokens)",
                prompt.token_ids.len(),
                case.input_ids.len()
            ));
            continue;
        }
        let mut pixel_note = String::new();
        if let Some(expected) = reference.pixel_values(name) {
            let ours = pixel_values(&prompt);
            let diff = max_abs_diff(&ours, &expected);
            pixel_note = format!(", max pixel difference {diff:.1e}");
            if diff > PIXEL_TOLERANCE {
                failures.push(format!("{name}: pixel values differ by {diff}"));
            }
        }
        let logits = first_step_logits(engine.model(), &prompt);
        let diff = max_abs_diff(&logits, &reference.logits(name));
        eprintln!(
            "{name}: {} prompt tokens, max logit difference {diff:.2e}{pixel_note}",
            case.input_ids.len()
        );
        if diff > LOGIT_TOLERANCE {
            failures.push(format!("{name}: first-step logits differ by {diff}"));
        }
        let request = greedy(prompt, case.greedy_tokens.len());
        let tokens = ocellus::engine::generate(&mut engine, vec![request], |_| {})
            .unwrap()
            .0
            .remove(0)
            .tokens;
        if tokens != case.greedy_tokens {
            failures.push(format!("{name}: greedy tokens {tokens:?} != {:?}", case.greedy_tokens));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        reference.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn tiny_idefics3_matches_transformers() {
    check_parity(&fixtures(), "tiny-idefics3");
}

#[test]
fn tiny_smolvlm2_sharded_tied_matches_transformers() {
    check_parity(&fixtures(), "tiny-smolvlm2");
}

#[test]
fn tiny_qwen3vl_matches_transformers() {
    check_parity(&fixtures(), "tiny-qwen3vl");
}

/// The SmolVLM-256M-shaped random model: `python scripts/make_fixtures.py big DIR`, then
/// `OCELLUS_PARITY_DIR=DIR cargo test --release --test parity -- --ignored`.
#[test]
#[ignore = "needs the 256M-shaped model built by scripts/make_fixtures.py big (OCELLUS_PARITY_DIR)"]
fn smolvlm_256m_shaped_matches_transformers() {
    let root =
        std::env::var("OCELLUS_PARITY_DIR").expect("set OCELLUS_PARITY_DIR to the folder make_fixtures.py big wrote");
    check_parity(std::path::Path::new(&root), "smolvlm-256m-random");
}

/// Qwen3-VL-2B's real config and tokenizer with random weights: `python
/// scripts/make_fixtures.py qwen3vl-big DIR`, then
/// `OCELLUS_PARITY_DIR=DIR cargo test --release --test parity qwen3vl_2b -- --ignored`.
#[test]
#[ignore = "needs the 2B-shaped model built by scripts/make_fixtures.py qwen3vl-big (OCELLUS_PARITY_DIR)"]
fn qwen3vl_2b_shaped_matches_transformers() {
    let root =
        std::env::var("OCELLUS_PARITY_DIR").expect("set OCELLUS_PARITY_DIR to the folder make_fixtures.py wrote");
    check_parity(std::path::Path::new(&root), "qwen3vl-2b-random");
}
