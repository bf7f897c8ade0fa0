//! Loading model folders: the layouts hub folders come in, hub ids through the local
//! cache, dtypes, and broken folders, which must give an error naming the file and the
//! field or tensor, never a panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use ocellus::config::WeightDType;
use ocellus::model::hub::resolve_model;

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error {message:?} does not mention {part:?}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let dir = copy_fixture("tiny-idefics3");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_mentions(&load_error(dir.path()), &["tokenizer.json"]);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_mentions(&load_error(dir.path()), &["model.safetensors"]);
}

#[test]
fn malformed_json_names_the_file_and_position() {
    let dir = copy_fixture("tiny-idefics3");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"architectures\": [\"Idefics3ForConditionalGeneration\",",
    )
    .unwrap();
    assert_mentions(&load_error(dir.path()), &["config.json", "(syntax)", "line 1"]);
}

#[test]
fn a_field_of_the_wrong_type_is_named_by_its_path() {
    let dir = copy_fixture("tiny-idefics3");
    edit_json(&dir.path().join("config.json"), |c| {
        c["text_config"]["hidden_size"] = "big".into()
    });
    assert_mentions(&load_error(dir.path()), &["config.json", "text_config.hidden_size"]);
    let dir = copy_fixture("tiny-idefics3");
    edit_json(&dir.path().join("preprocessor_config.json"), |c| {
        c["resample"] = "lanczos".into()
    });
    assert_mentions(&load_error(dir.path()), &["preprocessor_config.json", "resample"]);
}

#[test]
fn an_unknown_architecture_is_refused_by_name() {
    let dir = copy_fixture("tiny-idefics3");
    edit_json(&dir.path().join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["LlavaForCausalLM"])
    });
    assert_mentions(
        &load_error(dir.path()),
        &["config.json", "architectures", "LlavaForCausalLM"],
    );
}

#[test]
fn settings_the_model_cannot_honour_are_refused_by_field() {
    let dir = copy_fixture("tiny-idefics3");
    edit_json(&dir.path().join("config.json"), |c| {
        c["text_config"]["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
    });
    assert_mentions(
        &load_error(dir.path()),
        &["config.json", "text_config.rope_scaling", "yarn"],
    );
    let dir = copy_fixture("tiny-idefics3");
    edit_json(&dir.path().join("processor_config.json"), |c| {
        c["image_seq_len"] = 169.into()
    });
    assert_mentions(
        &load_error(dir.path()),
        &["processor_config.json", "image_seq_len", "169"],
    );
}

#[test]
fn degenerate_sizes_are_errors_not_panics() {
    for (field, value) in [
        ("num_attention_heads", 0u64),
        ("hidden_size", 0),
        ("max_position_embeddings", 1u64 << 40),
    ] {
        let dir = copy_fixture("tiny-idefics3");
        edit_json(&dir.path().join("config.json"), |c| {
            c["text_config"][field] = value.into()
        });
        assert_mentions(
            &load_error(dir.path()),
            &["config.json", &format!("text_config.{field}")],
        );
    }
}

/// Rewrites model.safetensors with one tensor replaced (or removed when `replacement` is None).
fn rewrite_weights(dir: &Path, name: &str, replacement: Option<Tensor>) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    match replacement {
        Some(t) => tensors.insert(name.to_string(), t),
        None => tensors.remove(name),
    };
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn a_tensor_of_the_wrong_shape_names_file_tensor_and_shapes() {
    let dir = copy_fixture("tiny-idefics3");
    let name = "model.text_model.layers.1.mlp.up_proj.weight";
    rewrite_weights(
        dir.path(),
        name,
        Some(Tensor::zeros((130, 64), DType::F32, &Device::Cpu).unwrap()),
    );
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", name, "[130, 64]", "[128, 64]"],
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = copy_fixture("tiny-idefics3");
    let name = "model.vision_model.post_layernorm.bias";
    rewrite_weights(dir.path(), name, None);
    assert_mentions(&load_error(dir.path()), &["model.safetensors", name, "missing"]);
}

#[test]
fn a_shard_missing_from_a_sharded_folder_is_named() {
    let dir = copy_fixture("tiny-smolvlm2");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors.index.json", "model-00002-of-00003.safetensors"],
    );
}

/// Lays out `fixture` as huggingface_hub caches `owner/name` and returns the cache folder.
fn fake_hub_cache(fixture: &str, owner: &str, name: &str) -> (tempfile::TempDir, PathBuf) {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join(format!("models--{owner}--{name}"));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(fixture)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    (cache, snapshot)
}

#[test]
fn a_hub_id_resolves_through_the_local_cache() {
    let (cache, snapshot) = fake_hub_cache("tiny-idefics3", "HuggingFaceTB", "SmolVLM-Tiny");
    let dir = resolve_model("HuggingFaceTB/SmolVLM-Tiny", cache.path(), true).unwrap();
    assert_eq!(dir, snapshot);
    assert!(ocellus::runtime::load_folder(&dir, WeightDType::F32, &Device::Cpu).is_ok());
}

#[test]
fn an_uncached_hub_id_offline_and_a_non_model_are_errors() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model("HuggingFaceTB/SmolVLM-256M-Instruct", cache.path(), true)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["HuggingFaceTB/SmolVLM-256M-Instruct", "HF_HUB_OFFLINE"]);
    let err = resolve_model("no such model", cache.path(), true)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["no such model"]);
}

#[test]
fn reduced_precision_dtypes_load_and_stay_close_to_f32() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let case = &reference.cases["wide"];
    let expected = reference.logits("wide");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, tolerance) in [(WeightDType::Bf16, 0.1), (WeightDType::F16, 0.02)] {
        let dir = fixtures().join("models").join("tiny-idefics3");
        let loaded = ocellus::runtime::load_folder(&dir, dtype, &Device::Cpu).unwrap();
        let prompt = prompt_for(&loaded.processor, &reference, case);
        let logits = first_step_logits(loaded.model.as_ref(), &prompt);
        let diff = max_abs_diff(&logits, &expected);
        assert!(
            diff < tolerance * scale,
            "{dtype:?}: logits differ by {diff} (scale {scale})"
        );
        assert_eq!(
            ocellus::engine::sampling::argmax(&logits),
            ocellus::engine::sampling::argmax(&expected),
            "{dtype:?}"
        );
    }
}

#[test]
fn the_kv_cache_dtype_follows_the_flags() {
    let model = fixtures().join("models/tiny-idefics3");
    let kv_dtype = |flags: &[&str]| {
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let args = ocellus::config::ServeArgs::for_model(model.to_str().unwrap(), &flags);
        let loaded = ocellus::runtime::load(&args.model).unwrap();
        (loaded.kv_dtype, loaded.kv_spec().bytes_per_token())
    };
    let (f32, f32_bytes) = kv_dtype(&[]);
    assert_eq!(f32, DType::F32, "auto: the model's dtype");
    assert_eq!(kv_dtype(&["--quantize", "q8_0"]), (DType::F16, f32_bytes / 2));
    assert_eq!(kv_dtype(&["--kv-cache-dtype", "bf16"]).0, DType::BF16);
    assert_eq!(
        kv_dtype(&["--quantize", "q8_0", "--kv-cache-dtype", "f32"]).0,
        DType::F32
    );
}
