//! The official `openai` Python package works unchanged against the server: chat, streams,
//! usage, logprobs, an image as a data URI, completions and typed errors
//! (tests/openai_client.py). scripts/test.sh installs the package into target/test-venv.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::http::*;
use common::*;

fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("OCELLUS_TEST_PYTHON") {
        return python.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python with the openai package: run scripts/test.sh (it installs one into target/test-venv) \
         or set OCELLUS_TEST_PYTHON"
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_unchanged() {
    let python = python();
    let server = server(|args| args.api_key = Some("sk-ocellus".into())).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let image = fixtures().join("images/wide.png");
    let base_url = url(&server, "/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([base_url.as_str(), MODEL, image.to_str().unwrap(), "sk-ocellus"])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the openai client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" ok"), "{stdout}");
}
