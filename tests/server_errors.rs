//! Bad requests: each gets its documented status and an error in OpenAI's shape, and the
//! server goes on serving. The README's error table lists the same cases.

mod common;

use common::http::*;
use serde_json::{Value, json};

const KEY: &str = "sk-test-key";

struct Case {
    name: &'static str,
    path: &'static str,
    body: Body,
    auth: Option<&'static str>,
    status: u16,
    code: &'static str,
    param: Option<&'static str>,
}

enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

fn chat(messages: Value) -> Value {
    json!({"model": MODEL, "messages": messages, "max_tokens": 4})
}

fn user_image(url: &str) -> Value {
    json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}])
}

fn with(mut base: Value, field: &str, value: Value) -> Value {
    base[field] = value;
    base
}

fn hi() -> Value {
    chat(json!([{"role": "user", "content": "hi"}]))
}

fn cases() -> Vec<Case> {
    let c = |name, body, status, code, param| Case {
        name,
        path: "/v1/chat/completions",
        body: Body::Json(body),
        auth: Some(KEY),
        status,
        code,
        param,
    };
    let small = data_uri(&png(4, 4, [1, 2, 3]), "image/png");
    let image_part = json!({"type": "image_url", "image_url": {"url": small}});
    vec![
        Case {
            body: Body::Raw(b"{\"messages\": [".to_vec()),
            ..c("invalid JSON", json!(null), 400, "invalid_json", None)
        },
        c(
            "messages is a string",
            json!({"messages": "hi"}),
            400,
            "invalid_json",
            Some("messages"),
        ),
        c(
            "max_tokens is a string",
            with(hi(), "max_tokens", json!("ten")),
            400,
            "invalid_json",
            Some("max_tokens"),
        ),
        c("no messages", chat(json!([])), 400, "invalid_value", Some("messages")),
        c(
            "unknown role",
            chat(json!([{"role": "function", "content": "x"}])),
            400,
            "invalid_value",
            Some("messages[0].role"),
        ),
        c(
            "no content",
            chat(json!([{"role": "user"}])),
            400,
            "invalid_value",
            Some("messages[0].content"),
        ),
        c(
            "empty content list",
            chat(json!([{"role": "user", "content": []}])),
            400,
            "invalid_value",
            Some("messages[0].content"),
        ),
        c(
            "unknown content part",
            chat(json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])),
            400,
            "invalid_json",
            Some("messages[0].content[0].type"),
        ),
        c(
            "bad base64",
            chat(user_image("data:image/png;base64,!!!")),
            400,
            "invalid_image",
            Some("messages[0].content[0].image_url"),
        ),
        c(
            "not an image",
            chat(user_image(&data_uri(b"hello, world", "image/png"))),
            400,
            "invalid_image",
            Some("messages[0].content[0].image_url"),
        ),
        c(
            "ftp image URL",
            chat(user_image("ftp://example.com/cat.png")),
            400,
            "unsupported_image_url",
            Some("messages[0].content[0].image_url"),
        ),
        c(
            "decompression bomb",
            chat(user_image(&data_uri(&png_claiming(50000, 50000), "image/png"))),
            400,
            "image_too_large",
            Some("messages[0].content[0].image_url"),
        ),
        c(
            "image in an assistant message",
            chat(json!([{"role": "assistant", "content": [image_part.clone()]}])),
            400,
            "invalid_value",
            Some("messages[0].content[0].image_url"),
        ),
        c(
            "unknown detail",
            chat(
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small, "detail": "medium"}}]}]),
            ),
            400,
            "invalid_value",
            Some("messages[0].content[0].image_url.detail"),
        ),
        c(
            "too many images",
            chat(json!([{"role": "user", "content": [image_part.clone(), image_part.clone(), image_part]}])),
            400,
            "too_many_images",
            Some("messages"),
        ),
        c(
            "prompt past max-model-len",
            chat(json!([{"role": "user", "content": "word ".repeat(400)}])),
            400,
            "context_length_exceeded",
            Some("messages"),
        ),
        c(
            "max_tokens past the context",
            with(hi(), "max_tokens", json!(100000)),
            400,
            "context_length_exceeded",
            Some("max_tokens"),
        ),
        c(
            "max_tokens 0",
            with(hi(), "max_tokens", json!(0)),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        c(
            "max_tokens negative",
            with(hi(), "max_tokens", json!(-5)),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        c(
            "max_completion_tokens 0",
            with(hi(), "max_completion_tokens", json!(0)),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        c(
            "temperature 3",
            with(hi(), "temperature", json!(3)),
            400,
            "invalid_value",
            Some("temperature"),
        ),
        c(
            "top_p 0",
            with(hi(), "top_p", json!(0)),
            400,
            "invalid_value",
            Some("top_p"),
        ),
        c(
            "top_p 1.5",
            with(hi(), "top_p", json!(1.5)),
            400,
            "invalid_value",
            Some("top_p"),
        ),
        c(
            "presence_penalty 5",
            with(hi(), "presence_penalty", json!(5)),
            400,
            "invalid_value",
            Some("presence_penalty"),
        ),
        c(
            "n too large",
            with(hi(), "n", json!(100)),
            400,
            "invalid_value",
            Some("n"),
        ),
        c(
            "min_tokens above max_tokens",
            with(hi(), "min_tokens", json!(10)),
            400,
            "invalid_value",
            Some("min_tokens"),
        ),
        c(
            "top_logprobs without logprobs",
            with(hi(), "top_logprobs", json!(3)),
            400,
            "invalid_value",
            Some("top_logprobs"),
        ),
        c(
            "stream_options without stream",
            with(hi(), "stream_options", json!({"include_usage": true})),
            400,
            "invalid_value",
            Some("stream_options"),
        ),
        c(
            "unknown model",
            with(hi(), "model", json!("gpt-4o")),
            404,
            "model_not_found",
            Some("model"),
        ),
        Case {
            auth: None,
            ..c("missing API key", hi(), 401, "invalid_api_key", None)
        },
        Case {
            auth: Some("sk-wrong"),
            ..c("wrong API key", hi(), 401, "invalid_api_key", None)
        },
        Case {
            body: Body::Raw(vec![b'x'; 300_000]),
            ..c("body too large", json!(null), 413, "request_too_large", None)
        },
        Case {
            path: "/v1/completions",
            ..c(
                "empty prompt",
                json!({"prompt": ""}),
                400,
                "invalid_value",
                Some("prompt"),
            )
        },
        Case {
            path: "/v1/completions",
            ..c(
                "two prompts",
                json!({"prompt": ["a", "b"]}),
                400,
                "invalid_value",
                Some("prompt"),
            )
        },
        Case {
            path: "/v1/audio/transcriptions",
            ..c("unknown route", hi(), 404, "not_found", None)
        },
        c(
            "unknown field",
            with(hi(), "temprature", json!(0.5)),
            400,
            "unsupported_parameter",
            Some("temprature"),
        ),
        c(
            "a tool message answering no call",
            chat(
                json!([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]),
            ),
            400,
            "invalid_value",
            Some("messages[1].tool_call_id"),
        ),
        c(
            "a tool message without tool_call_id",
            chat(json!([{"role": "user", "content": "hi"}, {"role": "tool", "content": "1"}])),
            400,
            "invalid_value",
            Some("messages[1].tool_call_id"),
        ),
        c(
            "a call whose arguments are not a JSON object",
            chat(
                json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": "}}]}]),
            ),
            400,
            "invalid_value",
            Some("messages[1].tool_calls[0].function.arguments"),
        ),
        c(
            "a refusal sent back",
            chat(json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no", "refusal": "no"}])),
            400,
            "unsupported_parameter",
            Some("messages[1].refusal"),
        ),
        c(
            "an unknown image_url field",
            chat(
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small, "uuid": "x"}}]}]),
            ),
            400,
            "invalid_json",
            Some("messages[0].content[0]"),
        ),
        c(
            "padded stream chunks",
            with(
                with(hi(), "stream", json!(true)),
                "stream_options",
                json!({"include_obfuscation": true}),
            ),
            400,
            "unsupported_parameter",
            Some("stream_options.include_obfuscation"),
        ),
        c(
            "an unknown message field",
            chat(json!([{"role": "user", "content": "hi", "mood": "good"}])),
            400,
            "invalid_json",
            Some("messages[0].mood"),
        ),
        c(
            "a required call and a response format at once",
            with(
                with(
                    with(hi(), "tools", json!([{"type": "function", "function": {"name": "f"}}])),
                    "tool_choice",
                    json!("required"),
                ),
                "response_format",
                json!({"type": "json_object"}),
            ),
            400,
            "invalid_value",
            Some("tool_choice"),
        ),
        c(
            "a tool_choice naming no tool",
            with(
                with(hi(), "tools", json!([{"type": "function", "function": {"name": "f"}}])),
                "tool_choice",
                json!({"type": "function", "function": {"name": "g"}}),
            ),
            400,
            "invalid_value",
            Some("tool_choice.function.name"),
        ),
        c(
            "a tool whose parameters are no object schema",
            with(
                hi(),
                "tools",
                json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
            ),
            400,
            "invalid_value",
            Some("tools[0].function.parameters"),
        ),
        c(
            "functions, the deprecated form",
            with(hi(), "functions", json!([{"name": "f"}])),
            400,
            "unsupported_parameter",
            Some("functions"),
        ),
        c(
            "logit_bias out of range",
            with(hi(), "logit_bias", json!({"5": -101})),
            400,
            "invalid_value",
            Some("logit_bias"),
        ),
        c(
            "logit_bias not a map",
            with(hi(), "logit_bias", json!([5])),
            400,
            "invalid_json",
            Some("logit_bias"),
        ),
        Case {
            path: "/v1/completions",
            ..c(
                "a chat field on completions",
                json!({"prompt": "a", "messages": []}),
                400,
                "unsupported_parameter",
                Some("messages"),
            )
        },
        c(
            "a schema that is not an object",
            with(
                hi(),
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
            ),
            400,
            "invalid_value",
            Some("response_format.json_schema.schema"),
        ),
        c(
            "a schema the compiler refuses",
            with(
                hi(),
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}),
            ),
            400,
            "invalid_grammar",
            Some("response_format.json_schema.schema"),
        ),
        c(
            "an unknown response_format type",
            with(hi(), "response_format", json!({"type": "xml"})),
            400,
            "invalid_json",
            Some("response_format.type"),
        ),
        c(
            "two constraints",
            with(
                with(hi(), "response_format", json!({"type": "json_object"})),
                "structured_outputs",
                json!({"regex": "a"}),
            ),
            400,
            "invalid_value",
            Some("structured_outputs.regex"),
        ),
        c(
            "a regex that does not parse",
            with(hi(), "structured_outputs", json!({"regex": "(unclosed"})),
            400,
            "invalid_grammar",
            Some("structured_outputs.regex"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_documented_status_and_error_and_the_server_goes_on() {
    let server = server(|args| {
        args.api_key = Some(KEY.into());
        args.max_model_len = Some(256);
        args.limits.max_images_per_request = 2;
        args.limits.max_body_size = "256KiB".parse().unwrap();
    })
    .await;
    let client = reqwest::Client::new();
    let cases = cases();
    assert!(cases.len() >= 25);
    for case in &cases {
        let mut request = client.post(url(&server, case.path));
        if let Some(key) = case.auth {
            request = request.bearer_auth(key);
        }
        request = match &case.body {
            Body::Json(value) => request.json(value),
            Body::Raw(bytes) => request.header("content-type", "application/json").body(bytes.clone()),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = serde_json::from_str(&response.text().await.unwrap())
            .unwrap_or_else(|e| panic!("{}: the error body is not JSON: {e}", case.name));
        let error = &body["error"];
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(error["code"], case.code, "{}: {body}", case.name);
        assert_eq!(error["param"].as_str(), case.param, "{}: {body}", case.name);
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            case.name
        );
        assert!(error["type"].as_str().is_some(), "{}: {body}", case.name);
    }
    // The server still answers.
    let response = client
        .post(url(&server, "/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&hi())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let health = client.get(url(&server, "/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "health needs no key");
    let text = scrape(&client, &server).await;
    let client_errors = metric(
        &text,
        "ocellus_requests_total{route=\"chat_completions\",outcome=\"client_error\"}",
    )
    .unwrap();
    assert!(client_errors >= 25.0, "{client_errors} client errors counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_is_a_json_405() {
    let server = server(|_| {}).await;
    let response = reqwest::get(url(&server, "/v1/chat/completions")).await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}
