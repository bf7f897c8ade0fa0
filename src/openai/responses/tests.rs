use serde_json::json;

use super::*;

fn chat(body: Value) -> Value {
    translate(&body).unwrap().chat
}

fn refused(body: Value) -> ValidationError {
    translate(&body).unwrap_err()
}

#[test]
fn a_string_input_and_instructions_are_a_system_and_a_user_message() {
    let body = json!({
        "model": "m", "input": "Hello", "instructions": "Be brief.", "max_output_tokens": 12,
        "temperature": 0, "top_p": 0.9, "store": false, "stream": true, "metadata": {"k": "v"},
        "tools": [], "tool_choice": "auto", "truncation": "disabled", "include": [], "reasoning": {"effort": null},
    });
    assert_eq!(
        chat(body),
        json!({
            "model": "m", "temperature": 0, "top_p": 0.9, "stream": true, "max_tokens": 12,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        })
    );
}

#[test]
fn items_become_messages_with_text_and_image_parts() {
    let body = json!({"input": [
        {"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
        ]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "A cat.", "annotations": [], "logprobs": []}]},
        {"role": "user", "content": "And its colour?"},
    ]});
    assert_eq!(
        chat(body)["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": "And its colour?"},
        ])
    );
}

#[test]
fn text_format_is_response_format() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let body = json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": true}}});
    assert_eq!(
        chat(body)["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}})
    );
    assert_eq!(
        chat(json!({"input": "x", "text": {"format": {"type": "json_object"}}}))["response_format"],
        json!({"type": "json_object"})
    );
    assert!(
        chat(json!({"input": "x", "text": {"format": {"type": "text"}}}))
            .get("response_format")
            .is_none()
    );
}

#[test]
fn state_tools_and_unknown_fields_are_refused_by_name() {
    let param = |e: ValidationError| (e.code(), e.param().unwrap_or_default());
    let cases = [
        (
            json!({"input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"input": "x", "conversation": "c"}), "conversation"),
        (json!({"input": "x", "store": true}), "store"),
        (json!({"input": "x", "background": true}), "background"),
        (json!({"input": "x", "tools": [{"type": "web_search"}]}), "tools"),
        (json!({"input": "x", "tool_choice": "required"}), "tool_choice"),
        (json!({"input": "x", "truncation": "auto"}), "truncation"),
        (
            json!({"input": "x", "include": ["message.output_text.logprobs"]}),
            "include",
        ),
        (json!({"input": "x", "reasoning": {"effort": "high"}}), "reasoning"),
        (json!({"input": "x", "text": {"verbosity": "low"}}), "text.verbosity"),
        (json!({"input": "x", "temprature": 1}), "temprature"),
        (
            json!({"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]}),
            "input[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
            "input[0].content[0].file_id",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a", "x": 1}]}]}),
            "input[0].content[0].x",
        ),
    ];
    for (body, field) in cases {
        let (code, at) = param(refused(body.clone()));
        assert_eq!((code, at.as_str()), ("unsupported_parameter", field), "{body}");
    }
    assert!(matches!(refused(json!({"model": "m"})), ValidationError::MissingContent { param } if param == "input"));
    assert!(matches!(refused(json!({"input": 3})), ValidationError::InvalidInput { param, .. } if param == "input"));
    // A null is absent, as OpenAI reads it.
    assert!(translate(&json!({"input": "x", "previous_response_id": null, "store": null})).is_ok());
}

#[test]
fn chat_names_in_errors_are_written_as_the_request_spelled_them() {
    let names = translate(
        &json!({"instructions": "i", "input": [{"role": "user", "content": "a"}, {"role": "user", "content": []}]}),
    )
    .unwrap()
    .names;
    assert_eq!(
        names.rename("messages[2].content[0].image_url"),
        "input[1].content[0].image_url"
    );
    assert_eq!(
        names.rename("`messages[0].content` must not be empty"),
        "`instructions` must not be empty"
    );
    assert_eq!(names.rename("messages"), "input");
    assert_eq!(
        names.rename("`max_tokens` must be >= 1"),
        "`max_output_tokens` must be >= 1"
    );
    assert_eq!(names.rename("response_format.json_schema.name"), "text.format.name");
    let plain = translate(&json!({"input": "hi"})).unwrap().names;
    assert_eq!(plain.rename("messages[0].content"), "input");
}
