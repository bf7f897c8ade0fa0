//! LoRA adapters served by Ocellus: five trained by PEFT (two on the vision tower and the
//! connector) and three by `ocellus finetune` (SFT on the text model, SFT on the vision tower,
//! connector and text, and `--method dpo`; scripts/make_fixtures.py), each giving
//! transformers+PEFT's logits and greedy tokens; all eight and the base model in
//! one batch give what each gives alone; the prefix and vision caches keep them apart; broken
//! adapter folders are refused with errors that name what is wrong.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use ocellus::engine::EngineCore;
use ocellus::model::lora::{Adapter, AdapterError};
use ocellus::processor::Processor;

const MODEL: &str = "tiny-idefics3";
const ADAPTERS: [&str; 8] = [
    "all-linear-r4",
    "attn-r8",
    "mlp-rslora",
    "ocellus-colours",
    "ocellus-dpo",
    "ocellus-vision",
    "vision-r4",
    "vision-text-r8",
];
const LOGIT_TOLERANCE: f32 = 1e-4;
const MAX_RANK: usize = 64;

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(MODEL).join(name)
}

fn load_adapter(engine: &EngineCore, name: &str) -> Arc<Adapter> {
    try_load(engine, &adapter_dir(name), MAX_RANK).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn try_load(engine: &EngineCore, dir: &Path, max_rank: usize) -> Result<Arc<Adapter>, AdapterError> {
    let model = engine.model();
    let layout = model.adapter_layout();
    Adapter::load("test", dir, &layout, max_rank, model.dtype(), model.device()).map(Arc::new)
}

fn reference(adapter: Option<&str>) -> Reference {
    match adapter {
        Some(name) => Reference::load(&fixtures(), &format!("{MODEL}-lora-{name}")),
        None => Reference::load(&fixtures(), MODEL),
    }
}

fn fixture_engine() -> (Processor, EngineCore) {
    engine(load_fixture_model(MODEL), 4096, 1024)
}

/// Greedy tokens of one case per request, all submitted together.
fn generate_together(
    engine: &mut EngineCore,
    processor: &Processor,
    jobs: &[(&Reference, &str, Option<Arc<Adapter>>)],
) -> Vec<Vec<u32>> {
    let requests = jobs
        .iter()
        .map(|(reference, case, adapter)| {
            let case = &reference.cases[*case];
            let mut request = greedy(prompt_for(processor, reference, case), case.greedy_tokens.len());
            request.adapter = adapter.clone();
            request
        })
        .collect();
    let mut batch_sizes = Vec::new();
    let (generations, _) =
        ocellus::engine::generate(engine, requests, |report| batch_sizes.push(report.batch_sequences)).unwrap();
    assert!(
        batch_sizes.contains(&jobs.len()),
        "the requests never shared a step: {batch_sizes:?}"
    );
    generations.into_iter().map(|g| g.tokens).collect()
}

#[test]
fn peft_adapters_give_transformers_peft_logits_and_greedy_tokens() {
    let (processor, mut engine) = fixture_engine();
    let mut failures = Vec::new();
    for name in ADAPTERS {
        let adapter = load_adapter(&engine, name);
        let reference = reference(Some(name));
        for (case_name, case) in &reference.cases {
            let prompt = prompt_for(&processor, &reference, case);
            assert_eq!(prompt.token_ids, case.input_ids, "{name}/{case_name}: input ids");
            let kv_dtype = engine.model().kv_spec().dtype;
            let logits = first_step_logits_with(engine.model(), kv_dtype, &prompt, Some(&adapter));
            let diff = max_abs_diff(&logits, &reference.logits(case_name));
            eprintln!("{name}/{case_name}: max logit difference {diff:.2e}");
            if diff > LOGIT_TOLERANCE {
                failures.push(format!("{name}/{case_name}: first-step logits differ by {diff}"));
            }
            let mut request = greedy(prompt, case.greedy_tokens.len());
            request.adapter = Some(adapter.clone());
            let (generations, _) = ocellus::engine::generate(&mut engine, vec![request], |_| {}).unwrap();
            if generations[0].tokens != case.greedy_tokens {
                failures.push(format!(
                    "{name}/{case_name}: greedy tokens {:?} != PEFT's {:?}",
                    generations[0].tokens, case.greedy_tokens
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_peft_adapter_on_qwen3vl_gives_transformers_peft_logits_and_greedy_tokens() {
    let model = "tiny-qwen3vl";
    let (processor, mut engine) = engine(load_fixture_model(model), 4096, 1024);
    let dir = fixtures().join("adapters").join(model).join("lang-r4");
    let adapter = try_load(&engine, &dir, MAX_RANK).unwrap();
    let reference = Reference::load(&fixtures(), &format!("{model}-lora-lang-r4"));
    let base = Reference::load(&fixtures(), model);
    for (name, case) in &reference.cases {
        assert_ne!(
            case.greedy_tokens, base.cases[name].greedy_tokens,
            "{name}: the adapter changes nothing"
        );
        let prompt = prompt_for(&processor, &reference, case);
        let kv_dtype = engine.model().kv_spec().dtype;
        let logits = first_step_logits_with(engine.model(), kv_dtype, &prompt, Some(&adapter));
        let diff = max_abs_diff(&logits, &reference.logits(name));
        assert!(diff <= LOGIT_TOLERANCE, "{name}: first-step logits differ by {diff}");
        let mut request = greedy(prompt, case.greedy_tokens.len());
        request.adapter = Some(adapter.clone());
        let (generations, _) = ocellus::engine::generate(&mut engine, vec![request], |_| {}).unwrap();
        assert_eq!(generations[0].tokens, case.greedy_tokens, "{name}");
    }
}

#[test]
fn every_adapter_and_the_base_model_in_one_batch_each_give_what_they_give_alone() {
    let (processor, mut engine) = fixture_engine();
    let adapters: Vec<Arc<Adapter>> = ADAPTERS.iter().map(|n| load_adapter(&engine, n)).collect();
    let references: Vec<Reference> = ADAPTERS.iter().map(|n| reference(Some(n))).collect();
    let base = reference(None);
    // Two requests per model, different cases, so that every adapter covers several rows
    // of a step and the base model's rows sit between them.
    for cases in [["wide", "text_only"], ["multi_image", "small_nosplit"]] {
        let mut jobs = Vec::new();
        let mut expected = Vec::new();
        for case in cases {
            jobs.push((&base, case, None));
            expected.push(base.cases[case].greedy_tokens.clone());
            for (reference, adapter) in references.iter().zip(&adapters) {
                jobs.push((reference, case, Some(adapter.clone())));
                expected.push(reference.cases[case].greedy_tokens.clone());
            }
        }
        let together = generate_together(&mut engine, &processor, &jobs);
        for (i, ((_, case, _), tokens)) in jobs.iter().zip(&together).enumerate() {
            let alone = generate_together(&mut engine, &processor, &jobs[i..=i]);
            let who = match i % (ADAPTERS.len() + 1) {
                0 => "base",
                k => ADAPTERS[k - 1],
            };
            assert_eq!(tokens, &alone[0], "{who}/{case}: batched differs from alone");
            assert_eq!(tokens, &expected[i], "{who}/{case}: differs from the reference");
        }
    }
}

#[test]
fn the_prefix_cache_does_not_hand_one_adapters_blocks_to_another() {
    // Prefix caching is on: the base model's run caches the prompt's blocks first. An
    // adapter that changes k and v would read them if hashes ignored adapters.
    let (processor, mut engine) = fixture_engine();
    let adapter = load_adapter(&engine, "all-linear-r4");
    let (base, lora) = (reference(None), reference(Some("all-linear-r4")));
    for (reference, adapter) in [(&base, None), (&lora, Some(adapter.clone())), (&base, None)] {
        let tokens = generate_together(&mut engine, &processor, &[(reference, "wide", adapter)]);
        assert_eq!(tokens[0], reference.cases["wide"].greedy_tokens);
    }
}

#[test]
fn the_vision_cache_keeps_each_vision_adapters_image_features_apart() {
    // The same image, one request at a time: the base model's features are cached first.
    // A vision adapter must encode the image itself (a miss) and still answer as PEFT; a
    // text-only adapter takes the base features (a hit); a second vision adapter again
    // encodes its own; and the base model, asked again, gets its own features back.
    let (processor, mut engine) = fixture_engine();
    let base = reference(None);
    let runs: [(Option<&str>, usize, usize); 5] = [
        (None, 0, 1),
        (Some("vision-r4"), 0, 1),
        (Some("all-linear-r4"), 1, 0),
        (Some("vision-text-r8"), 0, 1),
        (None, 1, 0),
    ];
    for (name, hits, misses) in runs {
        let reference = name.map_or_else(|| reference(None), |n| reference(Some(n)));
        let adapter = name.map(|n| load_adapter(&engine, n));
        let case = &reference.cases["wide"];
        let mut request = greedy(prompt_for(&processor, &base, case), case.greedy_tokens.len());
        request.adapter = adapter;
        let (mut seen_hits, mut seen_misses) = (0, 0);
        let (generations, _) = ocellus::engine::generate(&mut engine, vec![request], |report| {
            seen_hits += report.vision_cache_hits;
            seen_misses += report.vision_cache_misses;
        })
        .unwrap();
        let who = name.unwrap_or("base");
        assert_eq!(generations[0].tokens, case.greedy_tokens, "{who}");
        assert_eq!((seen_hits, seen_misses), (hits, misses), "{who}: cache hits and misses");
    }
}

/// A copy of a fixture adapter in a fresh folder, with its config and tensors changed.
fn broken_adapter(
    test: &str,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let source = adapter_dir("attn-r8");
    let dir = std::env::temp_dir().join(format!("ocellus-lora-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(source.join("adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = candle_core::safetensors::load(source.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

#[test]
fn broken_adapter_folders_are_refused_naming_what_is_wrong() {
    let (_, engine) = fixture_engine();
    let q = "base_model.model.model.text_model.layers.0.self_attn.q_proj";
    let check = |dir: &Path, max_rank: usize, expect: &dyn Fn(&AdapterError) -> bool, mentions: &str| {
        let err = try_load(&engine, dir, max_rank).expect_err("a broken adapter loads");
        let message = err.to_string();
        assert!(expect(&err), "{message}");
        assert!(message.contains(mentions), "`{message}` does not mention `{mentions}`");
    };

    let missing = std::env::temp_dir().join("ocellus-lora-no-such-folder");
    check(
        &missing,
        MAX_RANK,
        &|e| matches!(e, AdapterError::Io { .. }),
        "adapter_config.json",
    );

    let dora = broken_adapter("dora", |c| c["use_dora"] = true.into(), |_| {});
    check(
        &dora,
        MAX_RANK,
        &|e| matches!(e, AdapterError::Unsupported { .. }),
        "use_dora",
    );

    // PEFT adapts a convolution with 4-D pairs; the patch embedding is not a slot here.
    let conv = broken_adapter(
        "conv",
        |_| {},
        |t| {
            let a = Tensor::zeros((8, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::zeros((32, 8, 1, 1), DType::F32, &Device::Cpu).unwrap();
            let m = "base_model.model.model.vision_model.embeddings.patch_embedding";
            t.insert(format!("{m}.lora_A.weight"), a);
            t.insert(format!("{m}.lora_B.weight"), b);
        },
    );
    check(
        &conv,
        MAX_RANK,
        &|e| matches!(e, AdapterError::UnknownModule { .. }),
        "model.vision_model.embeddings.patch_embedding",
    );

    // A vision projection's pair made for another width.
    let vision = broken_adapter(
        "vision",
        |_| {},
        |t| {
            let a = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::zeros((32, 8), DType::F32, &Device::Cpu).unwrap();
            let m = "base_model.model.model.vision_model.encoder.layers.0.mlp.fc1";
            t.insert(format!("{m}.lora_A.weight"), a);
            t.insert(format!("{m}.lora_B.weight"), b);
        },
    );
    check(
        &vision,
        MAX_RANK,
        &|e| matches!(e, AdapterError::Tensor { .. }),
        "vision_model.encoder.layers.0.mlp.fc1.lora_A",
    );

    let misshapen = broken_adapter(
        "shape",
        |_| {},
        |t| {
            let a = Tensor::zeros((8, 63), DType::F32, &Device::Cpu).unwrap();
            t.insert(format!("{q}.lora_A.weight"), a);
        },
    );
    check(
        &misshapen,
        MAX_RANK,
        &|e| matches!(e, AdapterError::Tensor { .. }),
        "lora_A",
    );

    let lonely = broken_adapter("unpaired", |_| {}, |t| drop(t.remove(&format!("{q}.lora_B.weight"))));
    check(
        &lonely,
        MAX_RANK,
        &|e| matches!(e, AdapterError::Tensor { .. }),
        "lora_B",
    );

    let embedding = broken_adapter(
        "embedding",
        |_| {},
        |t| {
            let a = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
            t.insert(
                "base_model.model.model.text_model.embed_tokens.lora_embedding_A".into(),
                a,
            );
        },
    );
    check(
        &embedding,
        MAX_RANK,
        &|e| matches!(e, AdapterError::Tensor { .. }),
        "lora_embedding_A",
    );

    // attn-r8 has rank 8 modules: a limit of 4 refuses it.
    check(
        &adapter_dir("attn-r8"),
        4,
        &|e| matches!(e, AdapterError::RankLimit { .. }),
        "--max-lora-rank",
    );

    for dir in [dora, vision, misshapen, lonely, embedding] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}
