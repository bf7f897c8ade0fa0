//! The embedding routes over real HTTP on the fixture CLIP and SigLIP: every input form
//! gives transformers' vectors (tests/fixtures/reference/tiny-*/reference.json), scores and
//! rerank probabilities are the model's, concurrent clients get what each gets alone, the
//! official `openai` client's `embeddings.create` works unchanged, and bad input gets its
//! documented 4xx while the server stays up.

mod common;

use std::process::Command;

use base64::Engine;
use common::http::*;
use common::*;
use serde_json::{Value, json};

#[derive(serde::Deserialize)]
struct Reference {
    texts: Vec<String>,
    images: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    image_embeds: Vec<Vec<f32>>,
    text_embeds_alone: Vec<Vec<f32>>,
    logits_per_image: Vec<Vec<f32>>,
}

fn reference(model: &str) -> Reference {
    let path = fixtures().join("reference").join(model).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn image_uri(name: &str) -> String {
    data_uri(
        &std::fs::read(fixtures().join("images").join(name)).unwrap(),
        "image/png",
    )
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    (body["data"].as_array().unwrap().iter())
        .map(|d| match &d["embedding"] {
            Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            floats => floats
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

fn assert_close(got: &[Vec<f32>], expected: &[Vec<f32>], tolerance: f32, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (g, e) in got.iter().zip(expected) {
        assert_eq!(g.len(), e.len(), "{what}");
        let diff = g.iter().zip(e).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < tolerance, "{what}: differs by {diff}");
    }
}

/// Every input form of `/v1/embeddings`, on one model, against its reference.
async fn embeddings_match(model: &str) {
    let server = server_on(model, |_| {}).await;
    let client = reqwest::Client::new();
    let reference = reference(model);
    let endpoint = url(&server, "/v1/embeddings");

    let (status, body) = post(&client, &endpoint, &json!({ "model": model, "input": reference.texts })).await;
    assert_eq!(status, 200, "{body}");
    assert_close(&vectors(&body), &reference.text_embeds_alone, 1e-5, "texts");
    // The texts' own tokens: SigLIP's padding (id 1 after its end token, also 1) not counted.
    let tokens: usize = (reference.input_ids.iter())
        .map(|ids| match model.contains("siglip") {
            true => ids.iter().position(|&id| id == 1).unwrap() + 1,
            false => ids.len(),
        })
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"].as_u64().unwrap() as usize, tokens);
    assert_eq!(body["model"], model);

    // One string; token ids; Jina's {"text"}; base64.
    let first = &reference.text_embeds_alone[..1];
    for input in [
        json!(reference.texts[0]),
        json!(reference.input_ids[0]),
        json!([{ "text": reference.texts[0] }]),
    ] {
        let (status, body) = post(&client, &endpoint, &json!({ "input": input })).await;
        assert_eq!(status, 200, "{input}: {body}");
        assert_close(&vectors(&body), first, 1e-5, &input.to_string());
    }
    let request = json!({ "input": reference.texts[0], "encoding_format": "base64" });
    let (_, body) = post(&client, &endpoint, &request).await;
    assert!(body["data"][0]["embedding"].is_string());
    assert_close(&vectors(&body), first, 1e-5, "base64");

    // Images, as Jina's items and as vLLM's messages.
    let images: Vec<Value> = reference
        .images
        .iter()
        .map(|n| json!({ "image": image_uri(n) }))
        .collect();
    let (status, body) = post(&client, &endpoint, &json!({ "input": images })).await;
    assert_eq!(status, 200, "{body}");
    assert_close(&vectors(&body), &reference.image_embeds, 1e-5, "images");
    let part = json!({ "type": "image_url", "image_url": { "url": image_uri(&reference.images[1]) } });
    let messages = json!({ "messages": [{ "role": "user", "content": [part] }] });
    let (status, body) = post(&client, &endpoint, &messages).await;
    assert_eq!(status, 200, "{body}");
    assert_close(&vectors(&body), &reference.image_embeds[1..2], 1e-5, "messages");

    scores_and_rerank(&server, model, &reference).await;
    concurrent_clients(&server, &reference).await;
}

/// `/v1/score` and `/v1/rerank` against the reference logits.
async fn scores_and_rerank(server: &ocellus::api::server::ServerHandle, model: &str, reference: &Reference) {
    let client = reqwest::Client::new();
    // Scores: the reference logits of the first image against every text.
    let score = json!({ "text_1": { "image": image_uri(&reference.images[0]) }, "text_2": reference.texts });
    let (status, body) = post(&client, &url(server, "/v1/score"), &score).await;
    assert_eq!(status, 200, "{body}");
    let scores: Vec<f32> = (body["data"].as_array().unwrap().iter())
        .map(|d| d["score"].as_f64().unwrap() as f32)
        .collect();
    assert_close(&[scores], &reference.logits_per_image[..1], 1e-3, "scores");

    // Rerank: the texts as labels of the image, best first, probabilities as the model's.
    let rerank =
        json!({ "query": { "image": image_uri(&reference.images[0]) }, "documents": reference.texts, "top_n": 3 });
    let (status, body) = post(&client, &url(server, "/v1/rerank"), &rerank).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let logits = &reference.logits_per_image[0];
    let expected = |i: usize| -> f32 {
        match model.contains("siglip") {
            true => 1.0 / (1.0 + (-logits[i]).exp()),
            false => {
                let max = logits.iter().copied().fold(f32::MIN, f32::max);
                (logits[i] - max).exp() / logits.iter().map(|l| (l - max).exp()).sum::<f32>()
            }
        }
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for (result, &index) in results.iter().zip(&order) {
        assert_eq!(result["index"].as_u64().unwrap() as usize, index, "{body}");
        let score = result["relevance_score"].as_f64().unwrap() as f32;
        assert!((score - expected(index)).abs() < 1e-4, "{score} vs {}", expected(index));
        assert_eq!(result["document"]["text"], reference.texts[index]);
    }
}

/// Many clients at once: each gets what it gets alone.
async fn concurrent_clients(server: &ocellus::api::server::ServerHandle, reference: &Reference) {
    let client = reqwest::Client::new();
    let endpoint = url(server, "/v1/embeddings");
    let requests = (0..12).map(|i| {
        let (client, endpoint) = (client.clone(), endpoint.clone());
        let input = match i % 2 {
            0 => json!(reference.texts[i % reference.texts.len()]),
            _ => json!([{ "image": image_uri(&reference.images[i % reference.images.len()]) }]),
        };
        async move { (i, post(&client, &endpoint, &json!({ "input": input })).await) }
    });
    for (i, (status, body)) in futures::future::join_all(requests).await {
        assert_eq!(status, 200, "{body}");
        let expected = match i % 2 {
            0 => &reference.text_embeds_alone[i % reference.texts.len()],
            _ => &reference.image_embeds[i % reference.images.len()],
        };
        assert_close(&vectors(&body), std::slice::from_ref(expected), 1e-5, "concurrent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clip_embeddings_scores_and_rerank_equal_the_models() {
    embeddings_match("tiny-clip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siglip_embeddings_scores_and_rerank_equal_the_models() {
    embeddings_match("tiny-siglip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_documented_error_and_the_server_stays_up() {
    let server = server_on("tiny-clip", |args| args.limits.max_embedding_inputs = 3).await;
    let client = reqwest::Client::new();
    let endpoint = url(&server, "/v1/embeddings");
    let long = "word ".repeat(100);
    let video = json!({ "type": "video_url", "video_url": { "url": "data:video/mp4;base64,AAAA" } });
    let cases = [
        (json!({ "input": [] }), "invalid_value", "input"),
        (json!({ "input": ["a", "b", "c", "d"] }), "too_many_inputs", "input"),
        (json!({ "input": long }), "context_length_exceeded", "input"),
        (
            json!({ "input": [{ "image": "data:image/png;base64,AAAA" }] }),
            "invalid_image",
            "input[0]",
        ),
        (json!({ "input": [video] }), "videos_not_supported", "input[0]"),
        (
            json!({ "input": "a", "dimensions": 4 }),
            "unsupported_parameter",
            "dimensions",
        ),
        (
            json!({ "input": "a", "frobnicate": true }),
            "unsupported_parameter",
            "frobnicate",
        ),
        (json!({ "input": [1, 2, 999999] }), "invalid_value", "input"),
        (json!({ "input": "" }), "invalid_value", "input"),
        (
            json!({ "input": "a", "encoding_format": "int8" }),
            "invalid_value",
            "encoding_format",
        ),
        (json!({ "input": "a", "model": "gpt-4" }), "model_not_found", "model"),
    ];
    for (request, code, param) in cases {
        let (status, body) = post(&client, &endpoint, &request).await;
        let expected_status = if code == "model_not_found" { 404 } else { 400 };
        assert_eq!(status, expected_status, "{request}: {body}");
        assert_eq!(body["error"]["code"], code, "{request}: {body}");
        assert_eq!(body["error"]["param"], param, "{request}: {body}");
    }
    // Truncation when asked: the first 77 tokens, the end token last.
    let (status, body) = post(&client, &endpoint, &json!({ "input": long, "truncate": true })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 77);
    let (status, body) = post(
        &client,
        &url(&server, "/v1/score"),
        &json!({ "text_1": ["a", "b"], "text_2": ["c"] }),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("text_2")),
        "{body}"
    );
    let chat = json!({ "messages": [{ "role": "user", "content": "hi" }] });
    let (status, body) = post(&client, &url(&server, "/v1/chat/completions"), &chat).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unsupported_task")),
        "{body}"
    );
    let (_, models) = post(&client, &url(&server, "/v1/models"), &json!({})).await;
    assert!(models.is_object());
    let models: Value = client
        .get(url(&server, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["task"], "embed");
    // Still serving.
    let (status, _) = post(&client, &endpoint, &json!({ "input": "a" })).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_routes_on_a_chat_model_are_refused_by_name() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    for route in ["/v1/embeddings", "/v1/score", "/v1/rerank"] {
        let request = json!({ "input": "a", "text_1": "a", "text_2": "b", "query": "a", "documents": ["b"] });
        let (status, body) = post(&client, &url(&server, route), &request).await;
        // The request is checked against the route's fields before the model's task.
        assert_eq!(status, 400, "{route}: {body}");
        assert!(
            ["unsupported_task", "unsupported_parameter"].contains(&body["error"]["code"].as_str().unwrap()),
            "{route}: {body}"
        );
    }
    let (status, body) = post(&client, &url(&server, "/v1/embeddings"), &json!({ "input": "a" })).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unsupported_task")),
        "{body}"
    );
    let models: Value = client
        .get(url(&server, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["task"], "generate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_embeds_unchanged() {
    let python = python();
    let server = server_on("tiny-clip", |args| args.api_key = Some("sk-ocellus".into())).await;
    let reference = reference("tiny-clip");
    let script = fixtures().join("../openai_embeddings.py");
    let args = [url(&server, "/v1"), "tiny-clip".to_string(), "sk-ocellus".into()];
    let texts = reference.texts.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(args)
            .args(texts)
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: Vec<Vec<f32>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // Default (base64, decoded by the client) and float requests alike.
    assert_close(
        &got[..reference.texts.len()],
        &reference.text_embeds_alone,
        1e-5,
        "openai client, base64",
    );
    assert_close(
        &got[reference.texts.len()..],
        &reference.text_embeds_alone[..1],
        1e-5,
        "openai client, float",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blip_scores_and_ranks_by_its_matching_head() {
    #[derive(serde::Deserialize)]
    struct Matching {
        itm_probs: Vec<Vec<f32>>,
    }
    let model = "tiny-blip-itm";
    let server = server_on(model, |_| {}).await;
    let client = reqwest::Client::new();
    let reference = reference(model);
    let path = fixtures().join("reference").join(model).join("reference.json");
    let matching: Matching = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();

    // Embeddings are the contrastive (ITC) ones.
    let (status, body) = post(
        &client,
        &url(&server, "/v1/embeddings"),
        &json!({ "input": reference.texts }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_close(&vectors(&body), &reference.text_embeds_alone, 1e-5, "BLIP texts");

    // Scores and relevances: each pair's match probability, in either order.
    let image = json!({ "image": image_uri(&reference.images[1]) });
    let (status, body) = post(
        &client,
        &url(&server, "/v1/score"),
        &json!({ "text_1": image, "text_2": reference.texts }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let scores: Vec<f32> = (body["data"].as_array().unwrap().iter())
        .map(|d| d["score"].as_f64().unwrap() as f32)
        .collect();
    assert_close(&[scores], &matching.itm_probs[1..2], 1e-4, "match probabilities");
    let (status, body) = post(
        &client,
        &url(&server, "/v1/score"),
        &json!({ "text_1": reference.texts[2], "text_2": image }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!((body["data"][0]["score"].as_f64().unwrap() as f32 - matching.itm_probs[1][2]).abs() < 1e-4);
    let request = json!({ "query": image, "documents": reference.texts, "return_documents": false });
    let (status, body) = post(&client, &url(&server, "/v1/rerank"), &request).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    let mut previous = f32::MAX;
    for result in results {
        let (index, score) = (
            result["index"].as_u64().unwrap() as usize,
            result["relevance_score"].as_f64().unwrap() as f32,
        );
        assert!(
            (score - matching.itm_probs[1][index]).abs() < 1e-4 && score <= previous,
            "{body}"
        );
        assert!(result.get("document").is_none());
        previous = score;
    }
    // Two texts are not a pair the matching head scores.
    let (status, body) = post(
        &client,
        &url(&server, "/v1/score"),
        &json!({ "text_1": "a", "text_2": "b" }),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unsupported_parameter")),
        "{body}"
    );
}
