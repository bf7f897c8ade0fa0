//! TRL's dataset columns in OpenAI's message form, so every source reads like our JSONL:
//! `messages` (or `prompt`, `chosen`, `rejected`) as a string or a list of messages whose
//! content is a string or parts, `{"type": "image"}` parts standing for the row's `images`
//! (a list) or `image` (one) in order, and the null keys Arrow adds when it merges part
//! structs (`{"type": "image", "text": null}`) dropped. Messages already in OpenAI's form
//! (`image_url` parts) pass unchanged.

use serde_json::{Map, Value, json};

/// `field`'s messages (a string as a user message) with the row's images in their places,
/// the image columns taken out of `columns`: what a conversation, or a pair's prompt, opens with.
pub fn with_images(columns: &mut Map<String, Value>, field: &str) -> Result<Vec<Value>, String> {
    let images = take_images(columns)?;
    let mut messages = turns(columns, field, "user")?;
    place_images(&mut messages, &images, field)?;
    Ok(messages)
}

/// The row's images as URLs (data URIs, paths, file:// URLs), taken out of its columns.
fn take_images(columns: &mut Map<String, Value>) -> Result<Vec<String>, String> {
    let (field, values) = match (columns.remove("images"), columns.remove("image")) {
        (Some(_), Some(_)) => return Err("both `images` and `image`: name one (--columns)".into()),
        (Some(Value::Array(list)), None) => ("images", list),
        (Some(Value::Null), None) | (None, None) | (None, Some(Value::Null)) => return Ok(Vec::new()),
        (Some(one), None) => ("images", vec![one]),
        (None, Some(one)) => ("image", vec![one]),
    };
    (values.into_iter().enumerate())
        .map(|(i, value)| image_url(value).map_err(|e| format!("`{field}[{i}]`: {e}")))
        .collect()
}

fn image_url(value: Value) -> Result<String, String> {
    match value {
        Value::String(url) if !url.is_empty() => Ok(url),
        Value::Object(image) if image.contains_key("bytes") => {
            Err("image bytes of a format we do not read (PNG, JPEG, WebP, GIF, BMP, TIFF)".into())
        }
        other => Err(format!("not an image (bytes, a path or a URL): {}", short(&other))),
    }
}

/// `field`'s messages: a string as one message of `role`, or a list of messages with
/// Arrow's null keys dropped. The column must be there.
pub fn turns(columns: &Map<String, Value>, field: &str, role: &str) -> Result<Vec<Value>, String> {
    match columns.get(field) {
        Some(Value::String(text)) => Ok(vec![json!({"role": role, "content": text})]),
        Some(Value::Array(messages)) if !messages.is_empty() => Ok(messages.iter().map(without_nulls).collect()),
        Some(other) => Err(format!(
            "`{field}` must be a string or a non-empty list of messages, not {}",
            short(other)
        )),
        None => {
            let mut names: Vec<&str> = columns.keys().map(String::as_str).collect();
            names.sort();
            Err(format!(
                "no column `{field}` (the row has {}; --columns maps other names)",
                names.join(", ")
            ))
        }
    }
}

fn without_nulls(message: &Value) -> Value {
    let Value::Object(message) = message else {
        return message.clone();
    };
    let mut kept: Map<String, Value> = (message.iter())
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(Value::Array(parts)) = kept.get_mut("content") {
        for part in parts.iter_mut() {
            if let Value::Object(fields) = part {
                fields.retain(|_, v| !v.is_null());
                // Datasets number their parts (llava-instruct-mix-vsft's `index`): a text
                // part is its text.
                if fields.get("type").and_then(Value::as_str) == Some("text") {
                    fields.retain(|k, _| k == "type" || k == "text");
                }
            }
        }
    }
    Value::Object(kept)
}

/// Puts `images` into `messages`: each `{"type": "image"}` part takes the next one (a part
/// naming its own `image`, `url` or `path` keeps it); with no placeholders at all, the
/// images open the first user message, as TRL's recipes build a prompt from an image and a
/// question. Every image must find its place.
fn place_images(messages: &mut [Value], images: &[String], field: &str) -> Result<(), String> {
    let placeholders = count_placeholders(messages);
    if placeholders == 0 {
        if images.is_empty() {
            return Ok(());
        }
        let first_user = (messages.iter_mut())
            .find(|m| m["role"] == "user")
            .ok_or_else(|| format!("`{field}` has no user message for the row's images"))?;
        let mut content: Vec<Value> = images.iter().map(|url| image_part(url)).collect();
        match first_user.get("content").cloned() {
            Some(Value::String(text)) => content.push(json!({"type": "text", "text": text})),
            Some(Value::Array(parts)) => content.extend(parts),
            _ => {}
        }
        first_user["content"] = Value::Array(content);
        return Ok(());
    }
    if placeholders != images.len() {
        return Err(format!(
            "`{field}` has {placeholders} image placeholders but the row has {} images",
            images.len()
        ));
    }
    let mut next = images.iter();
    for part in messages.iter_mut().filter_map(parts_mut).flatten() {
        if part["type"] != "image" {
            continue;
        }
        let own = ["image", "url", "path"]
            .iter()
            .find_map(|k| part.get(*k).and_then(Value::as_str));
        *part = match own {
            Some(url) => image_part(url),
            None => image_part(next.next().expect("placeholders counted. This is a bug.")),
        };
    }
    Ok(())
}

fn count_placeholders(messages: &[Value]) -> usize {
    (messages.iter().filter_map(|m| m["content"].as_array()).flatten())
        .filter(|p| p["type"] == "image" && ["image", "url", "path"].iter().all(|k| p.get(*k).is_none()))
        .count()
}

fn parts_mut(message: &mut Value) -> Option<&mut Vec<Value>> {
    message.get_mut("content").and_then(Value::as_array_mut)
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

/// A message's text: its string content, or its text parts joined.
pub fn text_of(message: &Value) -> Option<String> {
    match &message["content"] {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Option<Vec<&str>> = parts.iter().map(|p| p["text"].as_str()).collect();
            texts.map(|t| t.concat())
        }
        _ => None,
    }
}

/// A value in an error, cut short (a row may hold megabytes of image bytes).
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn trl_placeholders_take_the_rows_images_in_order_and_arrow_nulls_go() {
        let mut columns = row(r#"{"images": ["data:image/png;base64,AA", "b.png"], "messages": [
                {"role": "user", "content": [{"type": "image", "text": null, "index": 0}, {"type": "text", "text": "Same?", "index": null}, {"type": "image", "text": null, "index": 1}]},
                {"role": "assistant", "content": [{"type": "text", "text": "No."}], "tool_calls": null}]}"#);
        let images = take_images(&mut columns).unwrap();
        let mut messages = turns(&columns, "messages", "user").unwrap();
        place_images(&mut messages, &images, "messages").unwrap();
        let user = &messages[0]["content"];
        assert_eq!(user[0]["image_url"]["url"], "data:image/png;base64,AA");
        assert_eq!(user[1], json!({"type": "text", "text": "Same?"}));
        assert_eq!(user[2]["image_url"]["url"], "b.png");
        assert!(messages[1].get("tool_calls").is_none());
        assert_eq!(messages[1]["content"][0], json!({"type": "text", "text": "No."}));
        assert_eq!(text_of(&messages[1]).as_deref(), Some("No."));
    }

    #[test]
    fn images_without_placeholders_open_the_first_user_message() {
        let mut columns = row(r#"{"image": "a.png", "prompt": "Which digit?"}"#);
        let images = take_images(&mut columns).unwrap();
        let mut prompt = turns(&columns, "prompt", "user").unwrap();
        place_images(&mut prompt, &images, "prompt").unwrap();
        assert_eq!(
            prompt[0]["content"],
            json!([{"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "Which digit?"}])
        );
    }

    #[test]
    fn mismatches_and_missing_columns_are_named() {
        let mut columns = row(
            r#"{"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]}"#,
        );
        let images = take_images(&mut columns).unwrap();
        let mut messages = turns(&columns, "messages", "user").unwrap();
        let error = place_images(&mut messages, &images, "messages").unwrap_err();
        assert!(
            error.contains("2 image placeholders") && error.contains("1 images"),
            "{error}"
        );
        let error = turns(&columns, "conversation", "user").unwrap_err();
        assert!(
            error.contains("no column `conversation`") && error.contains("messages"),
            "{error}"
        );
        let error = take_images(&mut row(r#"{"images": [{"bytes": "AAAA", "path": null}]}"#)).unwrap_err();
        assert!(error.contains("images[0]") && error.contains("format"), "{error}");
        let error = take_images(&mut row(r#"{"images": [3]}"#)).unwrap_err();
        assert!(error.contains("not an image"), "{error}");
    }
}
