//! POST /v1/responses, OpenAI's Responses API (stateless): the chat answer in its shapes,
//! whole and as its stream of events; errors naming the Responses request's own fields; a
//! stream dropped midway frees its sequence. The official client's `responses.create` runs
//! in tests/openai_client.py.

mod common;

use common::http::*;
use serde_json::{Value, json};

fn question(image: &str) -> Value {
    json!([{"role": "user", "content": [
        {"type": "input_image", "image_url": image},
        {"type": "input_text", "text": "What is in this picture?"},
    ]}])
}

/// An SSE body's events: each event's name and its data as JSON.
async fn events(response: reqwest::Response) -> Vec<(String, Value)> {
    let body = response.text().await.unwrap();
    (common::sse::parse(&body).into_iter())
        .map(|e| (e.event.unwrap_or_default(), serde_json::from_str(&e.data).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_the_chat_answer_whole_and_streamed() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let image = fixture_image_uri("wide");
    let chat = json!({
        "model": MODEL, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "What is in this picture?"},
        ]}],
    });
    let (status, chat) = post(&client, &url(&server, "/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{chat}");
    let answer = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let (finished, incomplete) = match chat["choices"][0]["finish_reason"].as_str() {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        _ => ("completed", Value::Null),
    };

    let request = json!({
        "model": MODEL, "input": question(&image), "max_output_tokens": 12, "temperature": 0,
        "store": false, "metadata": {"job": "7"},
    });
    let (status, body) = post(&client, &url(&server, "/v1/responses"), &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["object"].as_str(), body["model"].as_str()),
        (Some("response"), Some(MODEL))
    );
    assert_eq!(
        (&body["status"], &body["incomplete_details"]),
        (&json!(finished), &incomplete)
    );
    let item = &body["output"][0];
    assert_eq!(
        (item["type"].as_str(), item["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert_eq!(
        item["content"],
        json!([{"type": "output_text", "text": answer, "annotations": [], "logprobs": []}])
    );
    assert_eq!(body["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(body["usage"]["output_tokens"], chat["usage"]["completion_tokens"]);
    assert_eq!(body["usage"]["total_tokens"], chat["usage"]["total_tokens"]);
    assert_eq!(
        (
            &body["metadata"],
            &body["max_output_tokens"],
            &body["store"],
            &body["temperature"]
        ),
        (&json!({"job": "7"}), &json!(12), &json!(false), &json!(0))
    );

    check_stream(&client, &server, &request, &body, answer, finished).await;
}

/// The same request streamed: OpenAI's events in order, numbered, the same text and output.
async fn check_stream(
    client: &reqwest::Client,
    server: &ocellus::api::server::ServerHandle,
    request: &Value,
    body: &Value,
    answer: &str,
    finished: &str,
) {
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let response = client
        .post(url(server, "/v1/responses"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = events(response).await;
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    let deltas = names.iter().filter(|n| **n == "response.output_text.delta").count();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    let last = format!("response.{finished}");
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last.as_str(),
    ]);
    assert_eq!(names, expected);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(
            (&data["type"], &data["sequence_number"]),
            (&json!(name), &json!(i)),
            "{data}"
        );
    }
    let text: String = (events.iter())
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, answer);
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    let last = &events.last().unwrap().1["response"];
    // The same output but for the message's id: each response names its own.
    let mut output = body["output"].clone();
    output[0]["id"] = last["output"][0]["id"].clone();
    assert_eq!(last["output"], output);
    assert_eq!(last["usage"], body["usage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_fields_as_the_request_spelled_them() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let responses = url(&server, "/v1/responses");
    let broken = "data:image/png;base64,iVBORw0KGgoAAAAN";
    let cases = [
        (
            json!({"instructions": "Be brief.", "input": question(broken)}),
            "invalid_image",
            "input[0].content[0].image_url",
        ),
        (
            json!({"input": "Hi", "max_output_tokens": 0}),
            "invalid_value",
            "max_output_tokens",
        ),
        (json!({"input": "Hi", "temperature": 5}), "invalid_value", "temperature"),
        (
            json!({"input": [{"role": "user", "content": []}]}),
            "invalid_value",
            "input[0].content",
        ),
        (
            json!({"input": "Hi", "previous_response_id": "resp_1"}),
            "unsupported_parameter",
            "previous_response_id",
        ),
        (json!({"input": "Hi", "store": true}), "unsupported_parameter", "store"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "tiny"}]}]}),
            "invalid_value",
            "input[0].content[0].image_url.detail",
        ),
    ];
    for (request, code, param) in cases {
        let (status, body) = post(&client, &responses, &request).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert_eq!(
            (&body["error"]["code"], &body["error"]["param"]),
            (&json!(code), &json!(param)),
            "{request}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("messages") && !message.contains("max_tokens"),
            "{message}"
        );
    }
    let (status, body) = post(&client, &responses, &json!({"model": "nope", "input": "Hi"})).await;
    assert_eq!((status, &body["error"]["param"]), (404, &json!("model")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_sequence() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let long = json!({"model": MODEL, "input": "Talk.", "max_output_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut response = client
        .post(url(&server, "/v1/responses"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("event: response.created"));
    wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_running_sequences") == Some(1.0)
    })
    .await;
    drop(response);
    wait_for_metrics(&client, &server, |m| {
        metric(m, "ocellus_kv_cache_used_blocks") == Some(0.0)
            && metric(m, "ocellus_running_sequences") == Some(0.0)
            && metric(m, "ocellus_requests_total{route=\"responses\",outcome=\"cancelled\"}") == Some(1.0)
    })
    .await;
}
