//! The server over real HTTP on port 0: answers equal the greedy reference, streams carry
//! the OpenAI chunk sequence, many streams batch together, a client that leaves frees its
//! KV blocks, a full queue answers 429, and shutdown drains.

mod common;

use common::http::*;
use common::*;
use serde_json::{Value, json};

fn wide_request(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": fixture_image_uri("wide")}},
            {"type": "text", "text": "What is in this picture?"}
        ]}],
        "temperature": 0,
        "max_tokens": 24,
        "min_tokens": 24,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        "user": "tester",
    })
}

fn expected_wide_text() -> String {
    let reference = Reference::load(&fixtures(), MODEL);
    let loaded = load_fixture_model(MODEL);
    loaded.processor.decode(&reference.cases["wide"].greedy_tokens).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_equal_the_greedy_reference_streamed_or_not() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let expected = expected_wide_text();

    let (status, body) = post(&client, &url(&server, "/v1/chat/completions"), &wide_request(false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 187, "completion_tokens": 24, "total_tokens": 211})
    );

    let response = client
        .post(url(&server, "/v1/chat/completions"))
        .json(&wide_request(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse(response).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let (content, chunks) = stream_content(&events);
    assert_eq!(content, expected);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 24);
    assert!(
        chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()),
        "usage is null until the last chunk"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_n_choices_stop_strings_and_logprobs() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let request = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "n": 2, "logprobs": 3});
    let (status, body) = post(&client, &url(&server, "/v1/completions"), &request).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy choices agree");
    let logprobs = &choices[0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(logprobs["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert!(
        logprobs["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l.as_f64().unwrap() <= 0.0)
    );
    assert_eq!(body["usage"]["completion_tokens"], 24);

    // A stop string taken from the middle of that answer cuts it there, unreturned.
    let text = choices[0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(text.chars().count() / 2).take(3).collect();
    let request =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stop": stop});
    let (_, body) = post(&client, &url(&server, "/v1/completions"), &request).await;
    let cut = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // logit_bias: a token raised by 100 is all a greedy answer says.
    let request = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "logit_bias": {"300": 100}});
    let (status, body) = post(&client, &url(&server, "/v1/completions"), &request).await;
    assert_eq!(status, 200, "{body}");
    let expected = load_fixture_model(MODEL).processor.decode(&[300; 4]).unwrap();
    assert_eq!(body["choices"][0]["text"], expected.as_str());

    // A regex constrains every sampled choice, each with its own place in the grammar.
    let request = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 1, "n": 3,
        "seed": 1, "structured_outputs": {"regex": "[0-9]{4}-(ab|cd)"}});
    let (status, body) = post(&client, &url(&server, "/v1/completions"), &request).await;
    assert_eq!(status, 200, "{body}");
    let pattern = regex::Regex::new("^[0-9]{4}-(ab|cd)$").unwrap();
    for choice in body["choices"].as_array().unwrap() {
        let text = choice["text"].as_str().unwrap();
        assert!(pattern.is_match(text), "{text:?}");
        assert_eq!(choice["finish_reason"], "stop");
    }

    // Logprobs under a constraint are the constrained distribution's (vLLM's): its
    // alternatives are tokens the grammar allows, and their probabilities sum to at most 1.
    let request = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
        "logprobs": 20, "structured_outputs": {"choice": ["yes", "no"]}});
    let (status, body) = post(&client, &url(&server, "/v1/completions"), &request).await;
    assert_eq!(status, 200, "{body}");
    let first = body["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .clone();
    assert!(!first.is_empty());
    assert!(
        first
            .keys()
            .all(|t| "yes".starts_with(t.as_str()) || "no".starts_with(t.as_str())),
        "{first:?}"
    );
    let mass: f64 = first.values().map(|l| l.as_f64().unwrap().exp()).sum();
    assert!(mass <= 1.0 + 1e-4, "{mass}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_streams_with_different_images_batch_and_all_finish() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..32u32)
        .map(|i| {
            let client = client.clone();
            let url = url(&server, "/v1/chat/completions");
            let image = png(20 + i * 7, 16 + (i * 13) % 50, [(i * 8) as u8, 255 - (i * 5) as u8, 90]);
            tokio::spawn(async move {
                let request = json!({
                    "model": MODEL,
                    "messages": [{"role": "user", "content": [
                        {"type": "text", "text": format!("Image number {i}:")},
                        {"type": "image_url", "image_url": {"url": data_uri(&image, "image/png"), "detail": if i % 2 == 0 { "low" } else { "auto" }}}
                    ]}],
                    "max_tokens": 16, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
                });
                let events = sse(client.post(url).json(&request).send().await.unwrap()).await;
                let (_, chunks) = stream_content(&events);
                chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 16);
    }
    let text = scrape(&client, &server).await;
    let steps = metric(&text, "ocellus_batch_size_sequences_count").unwrap();
    let single = metric(&text, "ocellus_batch_size_sequences_bucket{le=\"1\"}").unwrap();
    assert!(steps > single, "every step ran one sequence ({steps} steps)");
    assert_eq!(
        metric(
            &text,
            "ocellus_requests_total{route=\"chat_completions\",outcome=\"success\"}"
        ),
        Some(32.0)
    );
    assert_eq!(metric(&text, "ocellus_generation_tokens_total"), Some(32.0 * 16.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_kv_blocks() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut response = client
        .post(url(&server, "/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_kv_cache_used_blocks").unwrap_or(0.0) > 0.0
    })
    .await;
    drop(response);
    let text = wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_kv_cache_used_blocks") == Some(0.0) && metric(m, "ocellus_running_sequences") == Some(0.0)
    })
    .await;
    assert_eq!(metric(&text, "ocellus_kv_cache_usage_ratio"), Some(0.0));

    // The same for a non-streamed request whose client gives up.
    let unstreamed = json!({"model": MODEL, "prompt": "Go on", "max_tokens": 4000, "ignore_eos": true});
    let request = client.post(url(&server, "/v1/completions")).json(&unstreamed).send();
    let gave_up = tokio::time::timeout(std::time::Duration::from_millis(300), request).await;
    assert!(gave_up.is_err(), "4000 tokens took under 300 ms");
    wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_kv_cache_used_blocks") == Some(0.0)
            && metric(m, "ocellus_requests_total{route=\"completions\",outcome=\"cancelled\"}") == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = server(|args| {
        args.max_num_seqs = 1;
        args.max_queue = 1;
    })
    .await;
    let client = reqwest::Client::new();
    let long = json!({"model": MODEL, "prompt": "Go", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut running = client
        .post(url(&server, "/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    running.chunk().await.unwrap();
    // The engine runs one sequence at a time: the second waits, the third finds the queue full.
    let waiting = client.post(url(&server, "/v1/completions")).json(&long).send();
    let waiting = tokio::spawn(waiting);
    wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_waiting_sequences") == Some(1.0)
    })
    .await;
    let response = client
        .post(url(&server, "/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "queue_full");
    drop(running);
    // The waiting request's headers came back at once (a stream starts before its first
    // token): its client leaves by dropping that response. (Aborting the finished task that
    // holds it left the stream open, and the test waited for its 4,000 tokens.)
    drop(waiting.await.unwrap().unwrap());
    let text = wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_kv_cache_used_blocks") == Some(0.0)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "ocellus_requests_total{route=\"completions\",outcome=\"rejected\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_streams_and_refuses_new_work() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let request = json!({"model": MODEL, "prompt": "Go", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let mut stream = client
        .post(url(&server, "/v1/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    stream.chunk().await.unwrap();
    server.shutdown();
    // Health turns 503 and new requests are refused while the stream finishes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let health = client.get(url(&server, "/health")).send().await.unwrap();
        if health.status() == 503 {
            assert_eq!(health.json::<Value>().await.unwrap()["status"], "draining");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "health never turned 503");
    }
    let (status, body) = post(&client, &url(&server, "/v1/completions"), &json!({"prompt": "hi"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("service_unavailable"))
    );
    let mut rest = String::new();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        rest.contains("\"finish_reason\":\"length\"") && rest.trim_end().ends_with("data: [DONE]"),
        "{rest}"
    );
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_timeout_gets_504_or_an_error_event() {
    let server = server(|args| args.request_timeout = std::time::Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let long = json!({"model": MODEL, "prompt": "Go", "max_tokens": 5000, "ignore_eos": true});
    let (status, body) = post(&client, &url(&server, "/v1/completions"), &long).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("request_timeout")),
        "{body}"
    );

    let streamed = json!({"model": MODEL, "prompt": "Go", "max_tokens": 5000, "ignore_eos": true, "stream": true});
    let events = sse(client
        .post(url(&server, "/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap())
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["type"], "timeout_error", "{error}");
    let text = wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_kv_cache_used_blocks") == Some(0.0)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "ocellus_requests_total{route=\"completions\",outcome=\"timeout\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_origins_only() {
    let server = server(|args| args.cors_allow_origin = vec!["https://app.example".into()]).await;
    let client = reqwest::Client::new();
    let allowed = client
        .get(url(&server, "/v1/models"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.example");
    let other = client
        .get(url(&server, "/v1/models"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_the_model_may_not_call_leave_the_answer_as_it_was() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let mut request = wide_request(false);
    request["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    request["tool_choice"] = json!("none");
    let (status, body) = post(&client, &url(&server, "/v1/chat/completions"), &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], expected_wide_text().as_str());
}
