//! The fields each route takes. A field is honoured or refused by name, never silently
//! ignored: OpenAI's fields that Ocellus does not honour yet are `unsupported`, any other
//! field the route does not know is `unknown` (OpenAI's API refuses those too). A field sent
//! as `null` counts as absent, as OpenAI reads it.

use serde_json::Value;

use super::error::ValidationError;

/// Sampling and stopping fields both generation routes take (`SamplingFields`).
const SAMPLING: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "logit_bias",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

/// `POST /v1/chat/completions`' own fields (`ChatCompletionRequest`).
pub const CHAT: &[&str] = &[
    "model",
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "mm_processor_kwargs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// `POST /v1/completions`' own fields (`CompletionRequest`).
pub const COMPLETION: &[&str] = &["model", "prompt", "logprobs", "echo", "suffix"];

/// OpenAI's request fields that Ocellus does not honour (yet).
const NOT_HONOURED: &[&str] = &[
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "service_tier",
    "store",
    "metadata",
    "best_of",
    "prompt_cache_key",
    "safety_identifier",
];

/// Every field of `body` (a JSON object) is one of the route's `own`, a sampling field, or
/// `null`; else it is refused by name.
pub fn check(body: &Value, own: &[&str]) -> Result<(), ValidationError> {
    let Some(map) = body.as_object() else {
        return Ok(()); // Reading the body reports what it should have been.
    };
    for (name, value) in map {
        if own.contains(&name.as_str()) || SAMPLING.contains(&name.as_str()) || value.is_null() {
            continue;
        }
        return Err(match NOT_HONOURED.iter().find(|&&f| f == name) {
            Some(field) => ValidationError::Unsupported(field),
            None => ValidationError::UnknownField(name.clone()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_and_unhonoured_fields_are_refused_by_name_and_nulls_pass() {
        let chat = |body: Value| check(&body, CHAT);
        assert!(
            chat(json!({"model": "m", "messages": [], "temperature": 1, "response_format": {"type": "text"}})).is_ok()
        );
        assert!(chat(json!({"messages": [], "tools": null, "logit_bias": null})).is_ok());
        assert!(chat(json!({"messages": [], "tools": []})).is_ok());
        assert!(matches!(
            chat(json!({"messages": [], "functions": []})),
            Err(ValidationError::Unsupported("functions"))
        ));
        assert!(chat(json!({"messages": [], "logit_bias": {"1": 5}})).is_ok());
        assert!(matches!(
            chat(json!({"messages": [], "audio": {}})),
            Err(ValidationError::Unsupported("audio"))
        ));
        assert!(
            matches!(chat(json!({"messages": [], "temprature": 1})), Err(ValidationError::UnknownField(f)) if f == "temprature")
        );
        assert!(
            matches!(check(&json!({"prompt": "a", "messages": []}), COMPLETION), Err(ValidationError::UnknownField(f)) if f == "messages")
        );
        assert!(check(&json!([1, 2]), CHAT).is_ok());
    }
}
