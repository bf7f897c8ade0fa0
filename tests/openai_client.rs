//! The official `openai` Python package works unchanged against the server: chat, streams,
//! usage, logprobs, an image as a data URI, completions and typed errors
//! (tests/openai_client.py), on SmolVLM and on Qwen3-VL (with a video). scripts/test.sh
//! installs the package into target/test-venv.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::http::*;
use common::*;

/// Runs the script against a fixture model; `video`: a video to ask about too.
async fn run_client(model: &str, prompt_tokens: usize, video: Option<&str>) {
    let python = python();
    let server = server_on(model, |args| {
        args.api_key = Some("sk-ocellus".into());
        // Qwen3-VL's context (262144 positions) is more than the test's KV cache holds.
        args.max_model_len = Some(8192);
    })
    .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let image = fixtures().join("images/wide.png");
    let mut args = vec![
        url(&server, "/v1"),
        model.to_string(),
        image.to_str().unwrap().to_string(),
        "sk-ocellus".to_string(),
        prompt_tokens.to_string(),
    ];
    args.extend(video.map(|v| fixtures().join("videos").join(v).to_str().unwrap().to_string()));
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(&args)
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai client failed on {model}:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" ok"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_unchanged() {
    // 9 tiles of 16 image tokens plus text.
    run_client(MODEL, 187, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_unchanged_on_qwen3vl() {
    // transformers' prompt for the same question (tests/fixtures/reference/tiny-qwen3vl.json, "wide").
    run_client("tiny-qwen3vl", 40, Some("clip.mp4")).await;
}
