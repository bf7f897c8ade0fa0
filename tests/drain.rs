//! SIGTERM to a real `ocellus serve` process while 8 streams run: all 8 finish, new requests
//! are refused with 503, /health says 503 (/livez stays 200), and the process exits 0 before
//! its deadline.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

const SHUTDOWN_TIMEOUT_SECS: u64 = 30;

/// Reads the server's log until it says it is ready; returns its HTTP address.
fn wait_until_ready(stderr: impl std::io::Read) -> String {
    let mut addr = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split(" listening addr=").nth(1).filter(|_| !line.contains("gRPC")) {
            addr = Some(rest.trim().to_string());
        }
        if line.contains("model loaded; ready") {
            return addr.expect("`listening` comes before `ready`");
        }
    }
    panic!("the server exited before it was ready");
}

/// Kills the server if the test fails before it exits.
struct Reap(Option<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_streams_then_exits_zero() {
    // No server in this process installs reqwest's crypto provider for us.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocellus"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--shutdown-timeout", &format!("{SHUTDOWN_TIMEOUT_SECS}s")])
        .env("RUST_LOG", "warn,ocellus=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    let mut child = Reap(Some(child));
    let addr = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stderr);
        let addr = wait_until_ready(&mut reader);
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        addr
    })
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let body = json!({
        // The built-in model's name: the test runs `ocellus serve` with no --model.
        "model": "ocellus-demo",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 300, "min_tokens": 300, "stream": true,
    });

    // Eight streams, each seen running (its first chunk arrived).
    let mut streams = Vec::new();
    for _ in 0..8 {
        let response = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut chunks = response.bytes_stream();
        let first = chunks.next().await.unwrap().unwrap();
        streams.push((first, chunks));
    }

    let signalled = Instant::now();
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());

    // The signal is handled asynchronously: poll health until it turns (bounded).
    loop {
        let health = client.get(format!("{base}/health")).send().await.unwrap();
        if health.status() == 503 {
            let text = health.text().await.unwrap();
            assert!(text.contains("draining"), "{text}");
            break;
        }
        assert!(signalled.elapsed() < Duration::from_secs(5), "health never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Liveness stays up: a restart must not cut the drain short.
    let live = client.get(format!("{base}/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let refused = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);

    // Every stream runs to its end: 300 tokens, a finish reason, [DONE].
    for (first, mut chunks) in streams {
        let mut text = String::from_utf8_lossy(&first).into_owned();
        while let Some(chunk) = chunks.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        assert!(
            text.contains("\"finish_reason\":\"length\""),
            "a stream was cut: {text}"
        );
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }

    let mut process = child.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || process.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(SHUTDOWN_TIMEOUT_SECS),
        "the process outlived its shutdown deadline"
    );
}
