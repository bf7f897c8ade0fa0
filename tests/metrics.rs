//! A known set of requests, one after another, and the exact counts they leave in
//! `/metrics`; the scrape also passes `promtool check metrics` (Debian's prometheus package,
//! which scripts/test.sh installs).

mod common;

use common::http::*;
use serde_json::{Value, json};

fn chat(content: Value) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5, "min_tokens": 5, "temperature": 0,
    })
}

fn image(url: &str) -> Value {
    json!([
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        {"type": "text", "text": "What is this?"}
    ])
}

/// Every series of `name`: its labels (`{...}`) and value.
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    (text.lines())
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_requests_info_says_which_adapters_run_as_vllms_does() {
    let server = server(|args| {
        let dir = common::fixtures().join("adapters").join(MODEL).join("attn-r8");
        let flags = [
            "--lora".to_string(),
            format!("attn={}", dir.display()),
            "--max-loras".into(),
            "3".into(),
        ];
        args.adapters = ocellus::config::ServeArgs::for_model(MODEL, &flags).adapters;
    })
    .await;
    let client = reqwest::Client::new();
    let info = |text: &str| series(text, "vllm:lora_requests_info");
    let at_start = info(&scrape(&client, &server).await);
    assert_eq!(at_start.len(), 1, "{at_start:?}");
    assert!(at_start[0].0.contains(r#"running_lora_adapters="""#), "{at_start:?}");
    assert!(at_start[0].0.contains(r#"max_lora="3""#), "{at_start:?}");

    let mut body = chat(json!("Write a haiku."));
    body["model"] = json!("attn");
    let (status, body) = post(&client, &url(&server, "/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{body}");
    let text = wait_for_metrics(&client, &server, |t| {
        value(t, "ocellus_decode_step_duration_seconds_count") >= 4.0
    })
    .await;
    // A series for the steps the adapter ran in, and a newer one (the picker reads the
    // largest value, a Unix time) for now that it has finished.
    let all = info(&text);
    let running = all.iter().find(|(l, _)| l.contains(r#"running_lora_adapters="attn""#));
    let (_, ran_at) = running.unwrap_or_else(|| panic!("no series with attn running: {all:?}"));
    let (latest, _) = all.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert!(latest.contains(r#"running_lora_adapters="""#), "{all:?}");
    assert!(all.iter().all(|(_, at)| *at > 1.6e9 && at >= &at_start[0].1), "{all:?}");
    assert!(*ran_at >= at_start[0].1);
}

/// `name{labels}`'s value, 0 when the series does not exist yet.
fn value(text: &str, sample: &str) -> f64 {
    metric(text, sample).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_set_of_requests_leaves_exact_counts() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let chat_url = url(&server, "/v1/chat/completions");
    let completions_url = url(&server, "/v1/completions");

    // Three answered: an image at low detail (one tile of 16 tokens), text, a completion.
    let mut prompt_tokens = 0;
    for (endpoint, body) in [
        (&chat_url, chat(image(&fixture_image_uri("wide")))),
        (&chat_url, chat(json!("Write a haiku."))),
        (
            &completions_url,
            json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "min_tokens": 5}),
        ),
    ] {
        let (status, body) = post(&client, endpoint, &body).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 5);
        prompt_tokens += body["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    // Three refused: a bad value, an unknown model, data that is not an image.
    let mut bad_value = chat(json!("hi"));
    bad_value["temperature"] = json!(3);
    let mut unknown_model = chat(json!("hi"));
    unknown_model["model"] = json!("gpt-4o");
    let not_an_image = chat(image("data:image/png;base64,AAAAAAAA"));
    for (body, status) in [(bad_value, 400), (unknown_model, 404), (not_an_image, 400)] {
        assert_eq!(post(&client, &chat_url, &body).await.0, status);
    }

    // The engine records a step after it has sent that step's tokens: wait for the last.
    let text = wait_for_metrics(&client, &server, |t| {
        value(t, "ocellus_decode_step_duration_seconds_count") >= 12.0
    })
    .await;
    let expected = [
        (
            r#"ocellus_requests_total{route="chat_completions",outcome="success"}"#,
            2.0,
        ),
        (r#"ocellus_requests_total{route="completions",outcome="success"}"#, 1.0),
        (
            r#"ocellus_requests_total{route="chat_completions",outcome="client_error"}"#,
            3.0,
        ),
        (r#"ocellus_rejected_requests_total{reason="invalid_value"}"#, 1.0),
        (r#"ocellus_rejected_requests_total{reason="model_not_found"}"#, 1.0),
        (r#"ocellus_rejected_requests_total{reason="invalid_image"}"#, 1.0),
        ("ocellus_prompt_tokens_total", prompt_tokens as f64),
        ("ocellus_generation_tokens_total", 15.0),
        ("ocellus_image_tokens_total", 16.0),
        ("ocellus_vision_cache_misses_total", 1.0),
        ("ocellus_vision_cache_hits_total", 0.0),
        ("ocellus_preemptions_total", 0.0),
        ("ocellus_time_to_first_token_seconds_count", 3.0),
        ("ocellus_request_duration_seconds_count", 3.0),
        ("ocellus_queue_time_seconds_count", 3.0),
        // Each answer: one prefill step (which samples the first token), four decode steps.
        ("ocellus_prefill_step_duration_seconds_count", 3.0),
        ("ocellus_decode_step_duration_seconds_count", 12.0),
        ("ocellus_inter_token_latency_seconds_count", 12.0),
        ("ocellus_batch_size_sequences_count", 15.0),
        ("ocellus_batch_size_sequences_sum", 15.0),
        ("ocellus_vision_encode_duration_seconds_count", 1.0),
        // Two images fetched (the good and the bad), three chat prompts prepared.
        ("ocellus_media_fetch_duration_seconds_count", 2.0),
        ("ocellus_media_preprocess_duration_seconds_count", 3.0),
        ("ocellus_running_sequences", 0.0),
        ("ocellus_waiting_sequences", 0.0),
        ("ocellus_kv_cache_used_blocks", 0.0),
        // vLLM's names, which Kubernetes' inference gateway routes by.
        (r#"vllm:num_requests_running{model_name="tiny-idefics3"}"#, 0.0),
        (r#"vllm:num_requests_waiting{model_name="tiny-idefics3"}"#, 0.0),
        (r#"vllm:kv_cache_usage_perc{model_name="tiny-idefics3"}"#, 0.0),
    ];
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(sample, want)| value(&text, sample) != *want)
        .map(|(sample, want)| format!("{sample}: {} != {want}", value(&text, sample)))
        .collect();
    assert!(wrong.is_empty(), "{}\n\n{text}", wrong.join("\n"));
    let blocks = value(&text, "ocellus_kv_cache_total_blocks");
    assert!(blocks > 0.0);
    let config = series(&text, "vllm:cache_config_info");
    assert_eq!(config.len(), 1, "{text}");
    let (labels, one) = &config[0];
    assert_eq!(*one, 1.0);
    assert!(labels.contains(r#"block_size="16""#), "{labels}");
    assert!(labels.contains(&format!(r#"num_gpu_blocks="{blocks}""#)), "{labels}");

    // Every series the Grafana dashboard and the autoscaler read is one the server exports.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for file in [
        "grafana/dashboards/ocellus.json",
        "kubernetes/hpa.yaml",
        "kubernetes/prometheus-adapter.yaml",
    ] {
        let config = std::fs::read_to_string(root.join(file)).unwrap();
        let names = config
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("ocellus_"));
        for name in names {
            let exported = text
                .lines()
                .any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])));
            assert!(exported, "{file} reads `{name}`, which the scrape lacks");
        }
    }

    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = promtool.expect("promtool runs (Debian's prometheus package; scripts/test.sh installs it)");
    use std::io::Write;
    // promtool's lint refuses colons in names (Prometheus keeps them for recording rules);
    // vLLM's names have them, and the aliases exist to be those names.
    let ours: String = (text.lines())
        .filter(|l| !l.starts_with("vllm:") && !l.starts_with("# HELP vllm:") && !l.starts_with("# TYPE vllm:"))
        .map(|l| format!("{l}\n"))
        .collect();
    child.stdin.take().unwrap().write_all(ours.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
