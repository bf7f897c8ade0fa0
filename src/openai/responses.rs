//! OpenAI's Responses API (`POST /v1/responses`), stateless: a request is read as the chat
//! completion request it amounts to (`input` items as messages, `instructions` as the system
//! message, `input_image` as an image part, `text.format` as `response_format`,
//! `max_output_tokens` as `max_tokens`), which then goes through chat's validation, so every
//! rule is checked once. `Names` writes chat's field names in an error back as the request
//! spelled them. What needs stored state (`previous_response_id`, `store: true`) or tools is
//! refused by name.

use serde_json::{Map, Value, json};

use super::error::ValidationError;

/// The fields `/v1/responses` takes (vLLM's sampling extensions among them).
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "stream",
    "stream_options",
    "store",
    "metadata",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "truncation",
    "include",
    "background",
    "reasoning",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
];

/// Fields copied to the chat request as they are.
const SAME_IN_CHAT: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "stream",
    "user",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
];

/// The Responses API's fields that need stored state or that Ocellus does not honour (yet).
const NOT_HONOURED: &[&str] = &[
    "previous_response_id",
    "conversation",
    "prompt",
    "top_logprobs",
    "max_tool_calls",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
];

/// A Responses request as the chat request it amounts to.
#[derive(Debug)]
pub struct Translated {
    /// A chat completion request's JSON body.
    pub chat: Value,
    pub names: Names,
}

/// Where each chat message came from in the Responses request: `instructions` or `input[i]`.
#[derive(Debug, Clone, Default)]
pub struct Names {
    messages: Vec<String>,
}

pub fn translate(body: &Value) -> Result<Translated, ValidationError> {
    let Some(request) = body.as_object() else {
        return Err(ValidationError::Json {
            message: "the body must be a JSON object".into(),
            param: None,
        });
    };
    let present = |name: &str| request.get(name).filter(|v| !v.is_null());
    for name in request.keys().filter(|n| present(n).is_some()) {
        if !FIELDS.contains(&name.as_str()) {
            return Err(match NOT_HONOURED.iter().find(|&&f| f == name) {
                Some(field) => ValidationError::Unsupported(field),
                None => ValidationError::UnknownField(name.clone()),
            });
        }
    }
    check_stateless(&present)?;
    let mut chat = Map::new();
    for &name in SAME_IN_CHAT {
        if let Some(value) = present(name) {
            chat.insert(name.into(), value.clone());
        }
    }
    if let Some(max) = present("max_output_tokens") {
        chat.insert("max_tokens".into(), max.clone());
    }
    if let Some(format) = present("text").map(text_format).transpose()?.flatten() {
        chat.insert("response_format".into(), format);
    }
    let mut names = Names::default();
    let mut messages = Vec::new();
    if let Some(instructions) = present("instructions") {
        let Some(text) = instructions.as_str() else {
            return Err(invalid("instructions", "must be a string"));
        };
        messages.push(json!({"role": "system", "content": text}));
        names.messages.push("instructions".into());
    }
    match present("input") {
        None => return Err(ValidationError::MissingContent { param: "input".into() }),
        Some(Value::String(text)) => {
            messages.push(json!({"role": "user", "content": text}));
            names.messages.push("input".into());
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                messages.push(message(item, &format!("input[{i}]"))?);
                names.messages.push(format!("input[{i}]"));
            }
        }
        Some(_) => return Err(invalid("input", "must be a string or a list of messages")),
    }
    chat.insert("messages".into(), Value::Array(messages));
    Ok(Translated {
        chat: Value::Object(chat),
        names,
    })
}

fn invalid(param: &str, message: &str) -> ValidationError {
    ValidationError::InvalidInput {
        param: param.into(),
        message: message.into(),
    }
}

fn unsupported(param: &str, message: &str) -> ValidationError {
    ValidationError::UnsupportedValue {
        param: param.into(),
        message: message.into(),
    }
}

/// The fields whose every value but the stateless, tool-less one is refused.
fn check_stateless<'a>(present: &impl Fn(&str) -> Option<&'a Value>) -> Result<(), ValidationError> {
    let is = |name: &str, ok: &dyn Fn(&Value) -> bool| present(name).is_none_or(ok);
    if !is("store", &|v| v == &json!(false)) {
        return Err(unsupported(
            "store",
            "must be false: this server keeps no responses; send `store: false`",
        ));
    }
    if !is("background", &|v| v == &json!(false)) {
        return Err(unsupported(
            "background",
            "must be false: responses are not run in the background here",
        ));
    }
    if !is("tools", &|v| v.as_array().is_some_and(Vec::is_empty)) {
        return Err(unsupported(
            "tools",
            "is not supported on /v1/responses yet; use /v1/chat/completions",
        ));
    }
    if !is("tool_choice", &|v| v == "auto" || v == "none") {
        return Err(unsupported(
            "tool_choice",
            "may only be `auto` or `none`: there are no tools",
        ));
    }
    if !is("parallel_tool_calls", &Value::is_boolean) {
        return Err(invalid("parallel_tool_calls", "must be a boolean"));
    }
    if !is("truncation", &|v| v == "disabled") {
        return Err(unsupported(
            "truncation",
            "must be `disabled`: a prompt longer than the context is refused",
        ));
    }
    if !is("include", &|v| v.as_array().is_some_and(Vec::is_empty)) {
        return Err(unsupported(
            "include",
            "is not supported: nothing extra can be included",
        ));
    }
    if !is("reasoning", &|v| {
        v.as_object().is_some_and(|o| o.values().all(Value::is_null))
    }) {
        return Err(unsupported(
            "reasoning",
            "is not supported: the models served do not reason apart",
        ));
    }
    if !is("stream_options", &|v| {
        v.as_object()
            .is_some_and(|o| o.values().all(|x| x.is_null() || x == &json!(false)))
    }) {
        return Err(unsupported(
            "stream_options",
            "may only set `include_obfuscation: false`",
        ));
    }
    if !is("metadata", &|v| {
        v.as_object().is_some_and(|o| o.values().all(Value::is_string))
    }) {
        return Err(invalid("metadata", "must map keys to strings"));
    }
    Ok(())
}

/// `text.format` as chat's `response_format`; `None` for plain text.
fn text_format(text: &Value) -> Result<Option<Value>, ValidationError> {
    let Some(text) = text.as_object() else {
        return Err(invalid("text", "must be an object"));
    };
    for (name, _) in text.iter().filter(|(_, v)| !v.is_null()) {
        match name.as_str() {
            "format" => {}
            "verbosity" => return Err(ValidationError::Unsupported("text.verbosity")),
            other => return Err(ValidationError::UnknownField(format!("text.{other}"))),
        }
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let Some(fields) = format.as_object() else {
        return Err(invalid("text.format", "must be an object"));
    };
    Ok(match fields.get("type").and_then(Value::as_str) {
        Some("text") if fields.len() == 1 => None,
        Some("json_schema") => {
            let schema: Map<String, Value> = (fields.iter())
                .filter(|(k, _)| k.as_str() != "type")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Some(json!({"type": "json_schema", "json_schema": schema}))
        }
        _ => Some(format.clone()),
    })
}

/// One `input` item as a chat message.
fn message(item: &Value, param: &str) -> Result<Value, ValidationError> {
    let Some(fields) = item.as_object() else {
        return Err(invalid(param, "must be a message: an object with `role` and `content`"));
    };
    if let Some(kind) = fields.get("type").and_then(Value::as_str).filter(|&t| t != "message") {
        return Err(unsupported(
            &format!("{param}.type"),
            &format!("`{kind}` items are not supported: this server is stateless and runs no tools; send messages"),
        ));
    }
    let mut message = Map::new();
    for (name, value) in fields {
        match name.as_str() {
            // What an output message read back carries besides its content.
            "type" | "id" | "status" => {}
            "role" => {
                message.insert("role".into(), value.clone());
            }
            "content" => {
                message.insert("content".into(), content(value, &format!("{param}.content"))?);
            }
            other => return Err(ValidationError::UnknownField(format!("{param}.{other}"))),
        }
    }
    Ok(Value::Object(message))
}

fn content(content: &Value, param: &str) -> Result<Value, ValidationError> {
    let Some(parts) = content.as_array() else {
        return Ok(content.clone()); // A string, or chat's error for anything else.
    };
    let parts = parts
        .iter()
        .enumerate()
        .map(|(k, part)| content_part(part, &format!("{param}[{k}]")));
    Ok(Value::Array(parts.collect::<Result<_, _>>()?))
}

/// An input part as chat's: `input_text`/`output_text` as text, `input_image` as an image.
fn content_part(part: &Value, param: &str) -> Result<Value, ValidationError> {
    let Some(fields) = part.as_object() else {
        return Err(invalid(param, "must be a content part object"));
    };
    let kind = fields.get("type").and_then(Value::as_str).unwrap_or_default();
    let allowed: &[&str] = match kind {
        "input_text" => &["type", "text"],
        // An earlier answer read back: its annotations and logprobs are output only.
        "output_text" => &["type", "text", "annotations", "logprobs"],
        "input_image" => &["type", "image_url", "detail", "file_id"],
        _ => {
            return Err(unsupported(
                &format!("{param}.type"),
                &format!("must be input_text or input_image (or output_text in an assistant message), got `{kind}`"),
            ));
        }
    };
    if let Some(other) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ValidationError::UnknownField(format!("{param}.{other}")));
    }
    if kind != "input_image" {
        return Ok(json!({"type": "text", "text": fields.get("text").cloned().unwrap_or(Value::Null)}));
    }
    if fields.get("file_id").is_some_and(|f| !f.is_null()) {
        return Err(unsupported(
            &format!("{param}.file_id"),
            "is not supported: this server keeps no files; send `image_url` (a URL or a data URI)",
        ));
    }
    let mut image = Map::new();
    match fields.get("image_url") {
        Some(Value::String(url)) => image.insert("url".into(), json!(url)),
        _ => return Err(invalid(&format!("{param}.image_url"), "must be a URL or a data URI")),
    };
    if let Some(detail) = fields.get("detail").filter(|d| !d.is_null()) {
        image.insert("detail".into(), detail.clone());
    }
    Ok(json!({"type": "image_url", "image_url": image}))
}

impl Names {
    /// Chat's field names in `text` (an error's message or `param`) as the Responses request
    /// spelled them.
    pub fn rename(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("messages") {
            out.push_str(&rest[..at]);
            let after = &rest[at + "messages".len()..];
            let index = after
                .strip_prefix('[')
                .and_then(|a| a.split_once(']'))
                .and_then(|(n, tail)| Some((n.parse::<usize>().ok()?, tail)));
            match index {
                Some((i, tail)) if i < self.messages.len() => {
                    let name = &self.messages[i];
                    out.push_str(name);
                    // The instructions and a string input are the message's content itself.
                    let plain = name == "instructions" || name == "input";
                    rest = if plain {
                        tail.strip_prefix(".content").unwrap_or(tail)
                    } else {
                        tail
                    };
                }
                _ => {
                    out.push_str("input");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out.replace("response_format.json_schema", "text.format")
            .replace("response_format", "text.format")
            .replace("max_tokens", "max_output_tokens")
    }
}

#[cfg(test)]
mod tests;
