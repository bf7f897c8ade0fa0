//! f32 layers whose weights are all bf16 values are kept in bf16 (`compact_text`): a bf16
//! copy of the tiny fixture, loaded at f32, must answer as the same weights held in f32 do
//! (logits up to summation order, the same greedy tokens). (The 256M-shaped parity test runs this path against transformers: that model is
//! saved in bf16.)

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use ocellus::config::WeightDType;
use ocellus::kv::{KvPool, SequenceKv, blocks_for};
use ocellus::model::{SequenceInput, VisionLanguageModel};

/// The tiny fixture with its weights rounded to bf16 and saved as bf16, in a temp folder.
fn bf16_copy() -> tempfile::TempDir {
    let source = fixtures().join("models/tiny-idefics3");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
    let rounded: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&rounded, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn only_weights_that_are_exactly_bf16_are_compacted() {
    let dir = bf16_copy();
    let mut as_stored = ocellus::runtime::load_folder_as_stored(dir.path(), WeightDType::F32, &Device::Cpu).unwrap();
    // Two layers of four matrices (q/k/v stacked, o, gate/up stacked, down), and the head.
    assert_eq!(as_stored.model.compact_text().unwrap(), 9);
    let fixture = fixtures().join("models/tiny-idefics3");
    let mut random_f32 = ocellus::runtime::load_folder_as_stored(&fixture, WeightDType::F32, &Device::Cpu).unwrap();
    assert_eq!(random_f32.model.compact_text().unwrap(), 0);
}

#[test]
fn compact_layers_answer_as_their_f32_weights() {
    let dir = bf16_copy();
    let compact = ocellus::runtime::load_folder(dir.path(), WeightDType::F32, &Device::Cpu).unwrap();
    let as_stored = ocellus::runtime::load_folder_as_stored(dir.path(), WeightDType::F32, &Device::Cpu).unwrap();
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    for (name, case) in &reference.cases {
        let prompt = prompt_for(&compact.processor, &reference, case);
        let (prefill, decode) = two_steps(compact.model.as_ref(), &prompt);
        let (prefill_f32, decode_f32) = two_steps(as_stored.model.as_ref(), &prompt);
        // The same products, summed in another order: the prompt's rows go through gemm
        // slab by slab, and a decode row meets the weights two at a time.
        for (step, ours, theirs) in [("prompt", &prefill, &prefill_f32), ("decode", &decode, &decode_f32)] {
            let difference = max_abs_diff(ours, theirs);
            assert!(difference < 1e-5, "{name}: {step} logits differ by {difference}");
            eprintln!("{name}: {step} logits within {difference:e}");
        }
    }
    let case = &reference.cases["wide"];
    let generate = |loaded: ocellus::runtime::Loaded| {
        let prompt = prompt_for(&loaded.processor, &reference, case);
        let (_, mut engine) = engine(loaded, 4096, 256);
        let request = greedy(prompt, case.greedy_tokens.len());
        ocellus::engine::generate(&mut engine, vec![request], |_| {})
            .unwrap()
            .0
            .remove(0)
            .tokens
    };
    let tokens = generate(compact);
    assert_eq!(tokens, generate(as_stored));
    assert_eq!(tokens.len(), case.greedy_tokens.len());
}

/// Logits after the prompt and after one more (decode) token.
fn two_steps(model: &dyn VisionLanguageModel, prompt: &ocellus::engine::Prompt) -> (Vec<f32>, Vec<f32>) {
    let features = prompt_features(model, prompt);
    let n = prompt.token_ids.len();
    let mut pool = KvPool::new(&model.kv_spec(), blocks_for(n + 1)).unwrap();
    let mut kv = SequenceKv::default();
    assert!(pool.grow(&mut kv, n + 1));
    let mut step = |tokens: &[u32], image_features: Option<ocellus::model::ImageFeatures>| -> Vec<f32> {
        let mut batch = [SequenceInput {
            tokens,
            positions: None,
            image_features,
            kv: &mut kv,
            wants_logits: true,
            adapter: None,
        }];
        let logits = model.forward(&mut batch, &mut pool).unwrap();
        logits.squeeze(0).unwrap().to_vec1().unwrap()
    };
    let prefill = step(&prompt.token_ids, features);
    let next = prefill.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
    let decode = step(&[next], None);
    (prefill, decode)
}
