//! The one-shot CLI: `ocellus generate` answers and reports timings; bad input is a clear
//! error and a failing exit status, not a panic.

mod common;

use std::process::Command;

use common::*;

fn ocellus(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ocellus"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn generate_prints_the_greedy_answer_and_its_timings() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let loaded = load_fixture_model("tiny-idefics3");
    let case = &reference.cases["wide"];
    let image = fixtures().join("images").join("wide.png");
    let model = fixtures().join("models").join("tiny-idefics3");
    let out = ocellus(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is in this picture?",
        "--max-tokens",
        "8",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = loaded.processor.decode(&case.greedy_tokens[..8]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        "prompt 187 tokens",
        "9 image tiles",
        "vision encode",
        "prefill",
        "decode 7 tokens",
        "finish length",
    ] {
        assert!(stderr.contains(part), "{stderr:?} lacks {part:?}");
    }
}

#[test]
fn a_missing_image_or_model_is_an_error_naming_it() {
    let out = ocellus(&["generate", "--image", "/nonexistent/cat.png", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cat.png"));
    let out = ocellus(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/model") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn generate_with_q8_0_quantizes_and_answers() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let loaded = load_fixture_model("tiny-idefics3");
    let image = fixtures().join("images").join("wide.png");
    let model = fixtures().join("models").join("tiny-idefics3");
    let out = ocellus(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--quantize",
        "q8_0",
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is in this picture?",
        "--max-tokens",
        "8",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("quantized the text model") && stderr.contains("layers=9"),
        "{stderr}"
    );
    // The engine's own q8_0 answer to the same prompt (q8_0 is not f32: tests/quantized.rs).
    let mut quantized = load_fixture_model("tiny-idefics3");
    quantized
        .model
        .quantize_text(ocellus::model::Quantization::Q8_0)
        .unwrap();
    // with the KV cache `--quantize` defaults to (f16), as the command runs
    quantized.kv_dtype = ocellus::runtime::kv_dtype(ocellus::config::KvCacheDType::Auto, quantized.model.dtype(), true);
    let (processor, mut engine) = engine(quantized, 4096, 512);
    let prompt = prompt_for(&processor, &reference, &reference.cases["wide"]);
    let tokens = ocellus::engine::generate(&mut engine, vec![greedy(prompt, 8)], |_| {})
        .unwrap()
        .0
        .remove(0)
        .tokens;
    let expected = loaded.processor.decode(&tokens).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), expected);
    let bad = ocellus(&["generate", "--quantize", "q4_k", "--prompt", "hi"]);
    assert_eq!(bad.status.code(), Some(2), "clap refuses an unknown quantization");
}

#[test]
fn a_device_this_build_cannot_open_is_a_clear_error() {
    let model = fixtures().join("models").join("tiny-idefics3");
    let model = model.to_str().unwrap();
    let bad = ocellus(&["generate", "--model", model, "--device", "gpu", "--prompt", "hi"]);
    assert_eq!(bad.status.code(), Some(2), "clap refuses a malformed device");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cuda:N"));
    let cpu = ocellus(&[
        "generate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    assert!(cpu.status.success(), "{}", String::from_utf8_lossy(&cpu.stderr));
    if cfg!(feature = "cuda") {
        return; // whether cuda:0 opens depends on the machine's GPU
    }
    let out = ocellus(&["generate", "--model", model, "--device", "cuda:0", "--prompt", "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cuda:0") && stderr.contains("--features cuda"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_built_in_model_travels_with_the_binary() {
    // A copy of the binary in a folder of its own, run from there with a cache of its own
    // and no model named: it answers from the demo model it carries, unpacked into that
    // cache (not read from the checkout's models/ folder).
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("ocellus");
    std::fs::copy(env!("CARGO_BIN_EXE_ocellus"), &binary).unwrap();
    let cache = dir.path().join("cache");
    let run = || {
        Command::new(&binary)
            .args(["generate", "--prompt", "What colour is this?", "--max-tokens", "4"])
            .current_dir(dir.path())
            .env("XDG_CACHE_HOME", &cache)
            .env_remove("OCELLUS_MODEL")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("the copied binary runs")
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let unpacked: Vec<_> = std::fs::read_dir(cache.join("ocellus").join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(unpacked.len(), 1, "{unpacked:?}");
    assert!(unpacked[0].starts_with("ocellus-demo-"), "{unpacked:?}");
    // The same answer from the same files, unpacked once.
    let second = run();
    assert!(second.status.success());
    assert_eq!(first.stdout, second.stdout);
    assert!(!first.stdout.is_empty());
}
