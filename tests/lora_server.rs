//! Adapters over HTTP: `--lora NAME=DIR` serves PEFT's greedy answer to requests naming
//! NAME, /v1/models lists adapters under their base model, and loading or unloading one at
//! runtime needs the API key.

mod common;

use common::http::*;
use common::*;
use ocellus::config::ServeArgs;
use serde_json::{Value, json};

const KEY: &str = "sekret";

fn adapter_path(name: &str) -> String {
    let dir = fixtures().join("adapters").join(MODEL).join(name);
    dir.to_str().unwrap().to_string()
}

fn wide_request(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": fixture_image_uri("wide")}},
            {"type": "text", "text": "What is in this picture?"}
        ]}],
        "temperature": 0,
        "max_tokens": 24,
        "min_tokens": 24,
    })
}

/// The reference answer to the `wide` case, with the adapter `name` or none.
fn expected_wide_text(adapter: Option<&str>) -> String {
    let model = match adapter {
        Some(name) => format!("{MODEL}-lora-{name}"),
        None => MODEL.to_string(),
    };
    let reference = Reference::load(&fixtures(), &model);
    let loaded = load_fixture_model(MODEL);
    loaded.processor.decode(&reference.cases["wide"].greedy_tokens).unwrap()
}

async fn model_ids(request: reqwest::RequestBuilder) -> Vec<(String, Value)> {
    let body: Value = request.send().await.unwrap().json().await.unwrap();
    (body["data"].as_array().unwrap().iter())
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["parent"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_an_adapter_gets_its_answer_and_models_lists_it() {
    let server = server(|args| {
        // As the command line gives it.
        let flags = ["--lora".to_string(), format!("attn={}", adapter_path("attn-r8"))];
        args.adapters = ServeArgs::for_model(MODEL, &flags).adapters;
    })
    .await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");

    let (status, body) = post(&client, &chat, &wide_request("attn")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "attn");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        expected_wide_text(Some("attn-r8")).as_str()
    );
    let (status, body) = post(&client, &chat, &wide_request(MODEL)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], MODEL);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        expected_wide_text(None).as_str()
    );

    // An adapter's request under a grammar: the adapter's weights, the grammar's output.
    let mut constrained = wide_request("attn");
    constrained["structured_outputs"] = json!({"choice": ["red", "green", "blue"]});
    constrained["min_tokens"] = json!(0);
    let (status, body) = post(&client, &chat, &constrained).await;
    assert_eq!(status, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(["red", "green", "blue"].contains(&answer), "{answer:?}");

    let listed = model_ids(client.get(url(&server, "/v1/models"))).await;
    assert_eq!(
        listed,
        vec![(MODEL.to_string(), Value::Null), ("attn".to_string(), json!(MODEL))]
    );

    let (status, body) = post(&client, &chat, &wide_request("nope")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`attn`") && message.contains(MODEL), "{message}");

    // Without --api-key the runtime routes are closed.
    let load = json!({"lora_name": "mlp", "lora_path": adapter_path("mlp-rslora")});
    let (status, body) = post(&client, &url(&server, "/v1/load_lora_adapter"), &load).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "permission_denied");
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_at_runtime_with_the_api_key() {
    let server = server(|args| {
        args.api_key = Some(KEY.into());
        args.adapters.max_loras = 1;
    })
    .await;
    let client = reqwest::Client::new();
    let post_as = |path: &str, key: Option<&str>, body: Value| {
        let mut request = client.post(url(&server, path)).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }
    };
    let load = |name: &str, adapter: &str| json!({"lora_name": name, "lora_path": adapter_path(adapter)});

    let (status, _) = post_as("/v1/load_lora_adapter", None, load("mlp", "mlp-rslora")).await;
    assert_eq!(status, 401);
    let (status, _) = post_as("/v1/load_lora_adapter", Some("wrong"), load("mlp", "mlp-rslora")).await;
    assert_eq!(status, 401);

    let (status, body) = post_as("/v1/load_lora_adapter", Some(KEY), load("mlp", "mlp-rslora")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_as("/v1/chat/completions", Some(KEY), wide_request("mlp")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        expected_wide_text(Some("mlp-rslora")).as_str()
    );

    // --max-loras 1 is reached; the same name twice, the base model's name, a folder that
    // is no adapter: each a 400 naming its field.
    for (body, code, param) in [
        (load("attn", "attn-r8"), "adapter_limit_reached", "lora_name"),
        (load("mlp", "attn-r8"), "adapter_exists", "lora_name"),
        (load(MODEL, "attn-r8"), "invalid_value", "lora_name"),
    ] {
        let (status, error) = post_as("/v1/load_lora_adapter", Some(KEY), body).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }

    let unload = json!({"lora_name": "mlp"});
    let (status, body) = post_as("/v1/unload_lora_adapter", Some(KEY), unload.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post_as("/v1/unload_lora_adapter", Some(KEY), unload).await;
    assert_eq!(status, 404);
    let (status, body) = post_as("/v1/chat/completions", Some(KEY), wide_request("mlp")).await;
    assert_eq!(status, 404, "{body}");

    let bad = json!({"lora_name": "bad", "lora_path": fixtures().join("images").to_str().unwrap()});
    let (status, error) = post_as("/v1/load_lora_adapter", Some(KEY), bad).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_adapter");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adapter_config.json")
    );

    let listed = model_ids(client.get(url(&server, "/v1/models")).bearer_auth(KEY)).await;
    assert_eq!(listed, vec![(MODEL.to_string(), Value::Null)]);
    server.shutdown();
    server.wait().await.unwrap();
}
