//! Tool calling. Prompts with tools, calls and tool answers render as transformers renders
//! them through Qwen3-VL's own template (tests/fixtures/reference/tool-prompts.json, from
//! scripts/fixtures_tools.py); SmolVLM, whose template knows no tools, gets the generic tool
//! prompt. On the random-weight fixtures, which left alone never call anything, a required
//! or named `tool_choice` always gives calls of the request's tools whose arguments satisfy
//! their schemas, and a stream's pieces add up to the whole answer's calls.

mod common;

use common::http::*;
use common::*;
use ocellus::openai::{self, ChatCompletionRequest, Limits, SamplingFields};
use ocellus::processor::prepare::template_messages;
use serde_json::{Value, json};

const LIMITS: Limits = Limits {
    max_n: 4,
    max_stop_sequences: 4,
    max_top_logprobs: 5,
    max_images_per_request: 4,
    max_videos_per_request: 1,
    max_video_frames: 8,
    max_image_budget_pixels: 1 << 22,
    max_embedding_inputs: 4,
    max_schema_depth: 32,
};

/// A request's conversation rendered as the server renders it.
fn render(processor: &ocellus::processor::Processor, body: &Value) -> String {
    let request: ChatCompletionRequest = openai::from_json(body).unwrap();
    let chat = openai::chat(&request, &SamplingFields::default(), &LIMITS, 1 << 20).unwrap();
    let tools: Vec<Value> = (chat.tools.iter())
        .flat_map(|t| &t.tools)
        .map(|t| t.as_json())
        .collect();
    (processor.render_conversation(&template_messages(&chat.messages), &tools, true)).unwrap()
}

fn reference_cases() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("reference/tool-prompts.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases["cases"].as_object().unwrap().clone()
}

#[test]
fn prompts_with_tools_render_as_transformers_renders_them() {
    let loaded = load_fixture_model("tiny-qwen3vl");
    for (name, case) in reference_cases() {
        let text = render(
            &loaded.processor,
            &json!({"messages": case["messages"], "tools": case["tools"]}),
        );
        assert_eq!(text, case["prompt"].as_str().unwrap(), "{name}");
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(loaded.processor.tokenize(&text).unwrap(), ids, "{name}");
    }
}

#[test]
fn smolvlm_gets_the_generic_tool_prompt() {
    let loaded = load_fixture_model("tiny-idefics3");
    let case = &reference_cases()["round_trip"];
    let text = render(
        &loaded.processor,
        &json!({"messages": case["messages"], "tools": case["tools"]}),
    );
    // SmolVLM's template writes each message as `Role: text<end_of_utterance>`.
    assert!(
        text.starts_with("<|im_start|>System: # Tools\n\nYou may call one or more functions"),
        "{text}"
    );
    assert!(text.contains("\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"The weather in a city, in °C\""), "{text}");
    let calls = "Assistant: <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 2}}\n</tool_call><end_of_utterance>";
    assert!(text.contains(calls), "{text}");
    let answers = "User: <tool_response>\n18 °C, sunny\n</tool_response>\n<tool_response>\n9 °C, rain\n</tool_response><end_of_utterance>\nAssistant:";
    assert!(text.ends_with(answers), "{text}");
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            }, "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "find_photos", "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 10},
            "tags": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}
        }, "required": ["query"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "now"}}
    ])
}

/// The calls of a non-streamed answer, or of a stream's chunks put together by index:
/// (name, arguments) each.
fn calls_of(answer: &Value) -> Vec<(String, String)> {
    let calls = answer["choices"][0]["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    (calls.iter())
        .map(|call| {
            assert_eq!(call["type"], "function");
            assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
            let function = &call["function"];
            (
                function["name"].as_str().unwrap().into(),
                function["arguments"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn streamed_calls(events: &[String]) -> (Vec<(String, String)>, Option<String>) {
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = None;
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        for piece in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = piece["index"].as_u64().unwrap() as usize;
            if let Some(name) = piece["function"]["name"].as_str() {
                assert_eq!(index, calls.len(), "{event}");
                assert!(piece["id"].as_str().unwrap().starts_with("call_"), "{event}");
                calls.push((name.into(), String::new()));
            }
            calls[index]
                .1
                .push_str(piece["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (calls, finish)
}

async fn calls_follow_their_schemas(model: &str) {
    let server = server_on(model, |args| args.max_model_len = Some(8192)).await;
    let client = reqwest::Client::new();
    let tools = tools();
    let schema_of = |name: &str| {
        let tool = tools
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["function"]["name"] == name)
            .unwrap();
        let none = json!({"type": "object", "properties": {}, "additionalProperties": false});
        tool["function"].get("parameters").cloned().unwrap_or(none)
    };
    let named = json!({"type": "function", "function": {"name": "find_photos"}});
    let choices = [(json!("required"), true), (json!("required"), false), (named, true)];
    for seed in 0..10 {
        for (tool_choice, parallel) in &choices {
            let mut body = json!({
                "model": model, "messages": [{"role": "user", "content": "Find me photos of cats."}],
                "tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel,
                "temperature": 1, "seed": seed, "max_tokens": 600,
            });
            let (status, answer) = post(&client, &url(&server, "/v1/chat/completions"), &body).await;
            assert_eq!(status, 200, "{answer}");
            let choice = &answer["choices"][0];
            assert_eq!(
                choice["finish_reason"], "tool_calls",
                "{model} seed {seed} {tool_choice}: {answer}"
            );
            assert!(choice["message"]["content"].is_null(), "{answer}");
            let calls = calls_of(&answer);
            let one = !parallel || tool_choice.is_object();
            assert!(if one { calls.len() == 1 } else { !calls.is_empty() }, "{answer}");
            for (name, arguments) in &calls {
                if tool_choice.is_object() {
                    assert_eq!(name, "find_photos");
                }
                let arguments: Value = serde_json::from_str(arguments).unwrap();
                let validator = jsonschema::validator_for(&schema_of(name)).unwrap();
                assert!(validator.is_valid(&arguments), "{name}({arguments}) breaks its schema");
            }
            if seed == 0 {
                // Each of several choices is read on its own.
                let mut several = body.clone();
                several["n"] = json!(3);
                let (status, answer) = post(&client, &url(&server, "/v1/chat/completions"), &several).await;
                assert_eq!(status, 200, "{answer}");
                for choice in answer["choices"].as_array().unwrap() {
                    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
                    assert!(!choice["message"]["tool_calls"].as_array().unwrap().is_empty());
                }
            }
            body["stream"] = json!(true);
            let response = client
                .post(url(&server, "/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let (streamed, finish) = streamed_calls(&sse(response).await);
            assert_eq!(
                (streamed, finish.as_deref()),
                (calls, Some("tool_calls")),
                "{model} seed {seed}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_calls_follow_their_schemas_on_smolvlm() {
    calls_follow_their_schemas(MODEL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_calls_follow_their_schemas_on_qwen3vl() {
    calls_follow_their_schemas("tiny-qwen3vl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_answer_sent_back_gets_an_answer_from_transformers_prompt() {
    let server = server_on("tiny-qwen3vl", |args| args.max_model_len = Some(8192)).await;
    let client = reqwest::Client::new();
    for (name, case) in reference_cases() {
        let body = json!({"model": "tiny-qwen3vl", "messages": case["messages"], "tools": case["tools"], "max_tokens": 4, "temperature": 0});
        let (status, answer) = post(&client, &url(&server, "/v1/chat/completions"), &body).await;
        assert_eq!(status, 200, "{name}: {answer}");
        let ids = case["input_ids"].as_array().unwrap().len();
        assert_eq!(answer["usage"]["prompt_tokens"], ids, "{name}");
        // Left to choose, the random model writes text: its answer is content.
        assert!(answer["choices"][0]["message"]["content"].is_string(), "{answer}");
    }
}
