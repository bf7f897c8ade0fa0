//! vLLM's /tokenize and /detokenize: a prompt's tokens as the tokenizer gives them, a
//! conversation's as chat prompts the model (its image counted as its image tokens), tokens
//! back to text, and each bad input refused by name.

mod common;

use common::http::*;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_conversations_count_as_the_model_sees_them() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let (tokenize, detokenize) = (url(&server, "/tokenize"), url(&server, "/detokenize"));
    let tokenizer = load_fixture_model(MODEL).processor.tokenizer().clone();

    let text = "Once upon a time, a cat.";
    for special in [true, false] {
        let request = json!({"model": MODEL, "prompt": text, "add_special_tokens": special, "return_token_strs": true});
        let (status, body) = post(&client, &tokenize, &request).await;
        assert_eq!(status, 200, "{body}");
        let expected = tokenizer.encode(text, special).unwrap();
        assert_eq!(body["tokens"], json!(expected.get_ids()));
        assert_eq!(body["count"], json!(expected.get_ids().len()));
        assert_eq!(body["token_strs"], json!(expected.get_tokens()));
        let (status, back) = post(&client, &detokenize, &json!({"model": MODEL, "tokens": body["tokens"]})).await;
        assert_eq!(status, 200, "{back}");
        assert_eq!(
            back["prompt"],
            json!(tokenizer.decode(expected.get_ids(), false).unwrap())
        );
        if !special {
            assert_eq!(back["prompt"], text);
        }
    }
    let models: Value = (client
        .get(url(&server, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await)
        .unwrap();
    let (_, body) = post(&client, &tokenize, &json!({"prompt": "a"})).await;
    assert_eq!(body["max_model_len"], models["data"][0]["max_model_len"]);
    assert_eq!(body["token_strs"], Value::Null);

    // A conversation with an image: as many tokens as chat's prompt.
    let messages = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": fixture_image_uri("wide")}},
        {"type": "text", "text": "What is in this picture?"},
    ]}]);
    let chat = json!({"model": MODEL, "messages": messages, "max_tokens": 1});
    let (status, chat) = post(&client, &url(&server, "/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{chat}");
    let (status, body) = post(&client, &tokenize, &json!({"model": MODEL, "messages": messages})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], chat["usage"]["prompt_tokens"]);
    let image_token = tokenizer.token_to_id("<image>").unwrap();
    let image_tokens = (body["tokens"].as_array().unwrap().iter())
        .filter(|t| **t == json!(image_token))
        .count();
    assert_eq!(image_tokens, 9 * 16, "9 tiles of 16 tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_by_name() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let (tokenize, detokenize) = (url(&server, "/tokenize"), url(&server, "/detokenize"));
    let user = json!([{"role": "user", "content": "Hi"}]);
    let broken = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo"}}]}]);
    let cases = [
        (
            &tokenize,
            json!({"prompt": "a", "messages": user}),
            "invalid_value",
            "prompt",
        ),
        (&tokenize, json!({"model": MODEL}), "invalid_value", "prompt"),
        (
            &tokenize,
            json!({"messages": user, "chat_template": "{{ x }}"}),
            "unsupported_parameter",
            "chat_template",
        ),
        (
            &tokenize,
            json!({"messages": user, "add_generation_prompt": false}),
            "unsupported_parameter",
            "add_generation_prompt",
        ),
        (
            &tokenize,
            json!({"prompt": "a", "truncate": 3}),
            "unsupported_parameter",
            "truncate",
        ),
        (
            &tokenize,
            json!({"messages": broken}),
            "invalid_image",
            "messages[0].content[0].image_url",
        ),
        (&detokenize, json!({"tokens": [1, -1]}), "invalid_value", "tokens[1]"),
        (
            &detokenize,
            json!({"tokens": [1u64 << 33]}),
            "invalid_value",
            "tokens[0]",
        ),
    ];
    for (route, request, code, param) in cases {
        let (status, body) = post(&client, route, &request).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert_eq!(
            (&body["error"]["code"], &body["error"]["param"]),
            (&json!(code), &json!(param)),
            "{request}: {body}"
        );
    }
    let (status, body) = post(&client, &detokenize, &json!({"model": "nope", "tokens": [1]})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("model_not_found")),
        "{body}"
    );
}
