//! The embedding routes' requests and responses: OpenAI's `/v1/embeddings` (`input` as a
//! string, a list of strings, a token array or a list of them; images as Jina's
//! `{"image": URL}` items or as vLLM's `messages`), vLLM's `/v1/score` (`text_1`,
//! `text_2`, either side texts or image parts) and Jina's and Cohere's `/v1/rerank`
//! (`query`, `documents`, `top_n`). A field these routes do not know is refused by name,
//! never ignored.

use serde::Serialize;
use serde_json::{Map, Value};

use super::ValidationError;

/// One thing to embed, as the request gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    Text(String),
    /// Token ids, as OpenAI's token-array input.
    Tokens(Vec<u32>),
    Image {
        url: String,
    },
}

/// An input and the request field it came from (`input[2]`), for errors about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub input: EmbedInput,
    pub param: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidEmbeddings {
    pub model: Option<String>,
    pub inputs: Vec<Located>,
    pub base64: bool,
    pub dimensions: Option<usize>,
    pub truncate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidScore {
    pub model: Option<String>,
    /// Every left-hand input, then every right-hand one.
    pub left: Vec<Located>,
    pub right: Vec<Located>,
    pub truncate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidRerank {
    pub model: Option<String>,
    pub query: Located,
    pub documents: Vec<Located>,
    /// The documents as given, returned when `return_documents` asks.
    pub echo: Option<Vec<Value>>,
    pub top_n: Option<usize>,
    pub truncate: bool,
}

/// Most inputs one request may hold (`--max-embedding-inputs`).
pub type MaxInputs = usize;

fn object<'a>(body: &'a Value, known: &[&str]) -> Result<&'a Map<String, Value>, ValidationError> {
    let Some(map) = body.as_object() else {
        return Err(ValidationError::Json {
            message: "the body must be a JSON object".into(),
            param: None,
        });
    };
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ValidationError::UnknownField(unknown.clone()));
    }
    Ok(map)
}

fn invalid(param: &str, message: impl Into<String>) -> ValidationError {
    ValidationError::InvalidInput {
        param: param.to_string(),
        message: message.into(),
    }
}

fn string_field(map: &Map<String, Value>, name: &str) -> Result<Option<String>, ValidationError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(name, "must be a string")),
    }
}

fn bool_field(map: &Map<String, Value>, name: &str) -> Result<bool, ValidationError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(name, "must be true or false")),
    }
}

fn count_field(map: &Map<String, Value>, name: &str) -> Result<Option<usize>, ValidationError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 => Ok(Some(n as usize)),
            Some(n) => Err(ValidationError::NotPositive {
                param: name.into(),
                value: n,
            }),
            None => Err(invalid(name, "must be an integer")),
        },
    }
}

fn tokens(values: &[Value], param: &str) -> Result<Vec<u32>, ValidationError> {
    if values.is_empty() {
        return Err(ValidationError::EmptyContent { param: param.into() });
    }
    (values.iter().enumerate())
        .map(|(i, v)| match v.as_u64() {
            Some(id) if id <= u32::MAX as u64 => Ok(id as u32),
            _ => Err(invalid(&format!("{param}[{i}]"), "token ids are integers >= 0")),
        })
        .collect()
}

/// One input in any form the routes take: a string, a token array, `{"text": ...}`,
/// `{"image": URL}`, an OpenAI content part (`text`, `image_url`), or vLLM's
/// `{"content": [part]}`.
pub fn input(value: &Value, param: &str) -> Result<Located, ValidationError> {
    let located = |input| Located {
        input,
        param: param.to_string(),
    };
    let text = |s: &str| match s.is_empty() {
        true => Err(invalid(param, "must not be an empty string")),
        false => Ok(located(EmbedInput::Text(s.to_string()))),
    };
    match value {
        Value::String(s) => text(s),
        Value::Array(values) => Ok(located(EmbedInput::Tokens(tokens(values, param)?))),
        Value::Object(map) => {
            let kind = map.get("type").and_then(Value::as_str);
            let url = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
            match (kind, map.get("text"), map.get("image"), map.get("content")) {
                (Some("video_url"), ..) => Err(ValidationError::VideosNotSupported { param: param.into() }),
                (Some("image_url"), ..) => {
                    let image_url = map.get("image_url");
                    let url = url(image_url.and_then(|u| u.get("url")).or(image_url));
                    url.map(|url| located(EmbedInput::Image { url }))
                        .ok_or_else(|| invalid(&format!("{param}.image_url.url"), "is required"))
                }
                (Some("text") | None, Some(Value::String(s)), None, None) => text(s),
                (None, None, Some(_), None) => url(map.get("image"))
                    .map(|url| located(EmbedInput::Image { url }))
                    .ok_or_else(|| invalid(&format!("{param}.image"), "must be a URL string")),
                (None, None, None, Some(Value::Array(parts))) if parts.len() == 1 => {
                    input(&parts[0], &format!("{param}.content[0]"))
                }
                (None, None, None, Some(_)) => Err(invalid(
                    &format!("{param}.content"),
                    "must hold exactly one part: this model embeds a text or an image, not both",
                )),
                _ => Err(invalid(
                    param,
                    "must be a string, token ids, {\"text\": ...}, {\"image\": URL} or a text or image_url part",
                )),
            }
        }
        _ => Err(invalid(param, "must be a string, a list of token ids or an object")),
    }
}

/// A side that may be one input or a list of them (`input`, `text_1`, `documents`).
fn inputs(value: &Value, param: &str, limit: MaxInputs) -> Result<Vec<Located>, ValidationError> {
    let list = match value {
        // A flat list of integers is one token array, as OpenAI reads it.
        Value::Array(values) if values.iter().all(Value::is_number) && !values.is_empty() => {
            return Ok(vec![input(value, param)?]);
        }
        Value::Array(values) => values,
        Value::Null => return Err(ValidationError::MissingContent { param: param.into() }),
        one => return Ok(vec![input(one, param)?]),
    };
    if list.is_empty() {
        return Err(ValidationError::EmptyContent { param: param.into() });
    }
    if list.len() > limit {
        return Err(ValidationError::TooManyInputs {
            param: param.into(),
            limit,
            count: list.len(),
        });
    }
    (list.iter().enumerate())
        .map(|(i, v)| input(v, &format!("{param}[{i}]")))
        .collect()
}

/// vLLM's chat-style embedding request: one user message whose single part is embedded.
fn from_messages(value: &Value) -> Result<Located, ValidationError> {
    let messages = value.as_array().filter(|m| m.len() == 1).ok_or_else(|| {
        invalid(
            "messages",
            "must hold exactly one message: this model embeds one text or image per conversation",
        )
    })?;
    let content = messages[0]
        .get("content")
        .ok_or_else(|| ValidationError::MissingContent {
            param: "messages[0].content".into(),
        })?;
    match content {
        Value::String(_) => input(content, "messages[0].content"),
        _ => input(&serde_json::json!({ "content": content }), "messages[0]"),
    }
}

pub fn embeddings(body: &Value, limit: MaxInputs) -> Result<ValidEmbeddings, ValidationError> {
    const KNOWN: &[&str] = &[
        "model",
        "input",
        "messages",
        "encoding_format",
        "dimensions",
        "user",
        "truncate",
    ];
    let map = object(body, KNOWN)?;
    let inputs = match (map.get("input"), map.get("messages")) {
        (Some(input), None) => inputs(input, "input", limit)?,
        (None, Some(messages)) => vec![from_messages(messages)?],
        (Some(_), Some(_)) => return Err(invalid("messages", "give `input` or `messages`, not both")),
        (None, None) => return Err(ValidationError::MissingContent { param: "input".into() }),
    };
    let base64 = match string_field(map, "encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid(
                "encoding_format",
                format!("must be float or base64, got `{other}`"),
            ));
        }
    };
    string_field(map, "user")?;
    Ok(ValidEmbeddings {
        model: string_field(map, "model")?,
        inputs,
        base64,
        dimensions: count_field(map, "dimensions")?,
        truncate: bool_field(map, "truncate")?,
    })
}

pub fn score(body: &Value, limit: MaxInputs) -> Result<ValidScore, ValidationError> {
    let map = object(body, &["model", "text_1", "text_2", "truncate", "user"])?;
    let side = |name: &str| inputs(map.get(name).unwrap_or(&Value::Null), name, limit);
    let (left, right) = (side("text_1")?, side("text_2")?);
    if left.len() != 1 && left.len() != right.len() {
        return Err(invalid(
            "text_2",
            format!(
                "`text_1` has {} inputs: give one, or as many as `text_2` ({})",
                left.len(),
                right.len()
            ),
        ));
    }
    string_field(map, "user")?;
    Ok(ValidScore {
        model: string_field(map, "model")?,
        left,
        right,
        truncate: bool_field(map, "truncate")?,
    })
}

pub fn rerank(body: &Value, limit: MaxInputs) -> Result<ValidRerank, ValidationError> {
    const KNOWN: &[&str] = &[
        "model",
        "query",
        "documents",
        "top_n",
        "return_documents",
        "truncate",
        "user",
    ];
    let map = object(body, KNOWN)?;
    let query = input(map.get("query").unwrap_or(&Value::Null), "query")?;
    let documents = match map.get("documents") {
        Some(Value::Array(_)) => inputs(&map["documents"], "documents", limit)?,
        Some(_) => return Err(invalid("documents", "must be a list")),
        None => {
            return Err(ValidationError::MissingContent {
                param: "documents".into(),
            });
        }
    };
    // `true` unless set, as Jina's and vLLM's rerank.
    let echo = match map.get("return_documents") {
        Some(Value::Bool(false)) => None,
        None | Some(Value::Null | Value::Bool(true)) => map["documents"].as_array().cloned(),
        Some(_) => return Err(invalid("return_documents", "must be true or false")),
    };
    string_field(map, "user")?;
    Ok(ValidRerank {
        model: string_field(map, "model")?,
        query,
        documents,
        echo,
        top_n: count_field(map, "top_n")?,
        truncate: bool_field(map, "truncate")?,
    })
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<EmbeddingOut>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingOut {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingValue,
}

/// Floats, or their little-endian f32 bytes in base64 (`encoding_format: "base64"`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct ScoreList {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<ScoreOut>,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct ScoreOut {
    pub index: usize,
    pub object: &'static str,
    pub score: f32,
}

#[derive(Debug, Serialize)]
pub struct RerankList {
    pub id: String,
    pub model: String,
    pub usage: EmbeddingUsage,
    pub results: Vec<RerankOut>,
}

#[derive(Debug, Serialize)]
pub struct RerankOut {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<Value>,
    pub relevance_score: f32,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn kinds(request: &ValidEmbeddings) -> Vec<EmbedInput> {
        request.inputs.iter().map(|l| l.input.clone()).collect()
    }

    #[test]
    fn every_input_form_reads_as_texts_tokens_or_images() {
        let text = |s: &str| EmbedInput::Text(s.into());
        let image = |u: &str| EmbedInput::Image { url: u.into() };
        let cases = [
            (json!({"input": "a cat"}), vec![text("a cat")]),
            (json!({"input": ["a", "b"]}), vec![text("a"), text("b")]),
            (json!({"input": [1, 2, 3]}), vec![EmbedInput::Tokens(vec![1, 2, 3])]),
            (
                json!({"input": [[1], [2, 3]]}),
                vec![EmbedInput::Tokens(vec![1]), EmbedInput::Tokens(vec![2, 3])],
            ),
            (
                json!({"input": [{"text": "a"}, {"image": "u"}]}),
                vec![text("a"), image("u")],
            ),
            (
                json!({"input": [{"type": "image_url", "image_url": {"url": "u"}}, {"type": "text", "text": "t"}]}),
                vec![image("u"), text("t")],
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}),
                vec![image("u")],
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                vec![text("hi")],
            ),
        ];
        for (body, expected) in cases {
            let request = embeddings(&body, 8).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(kinds(&request), expected, "{body}");
        }
        let request = embeddings(&json!({"input": ["a", "b"]}), 8).unwrap();
        assert_eq!(request.inputs[1].param, "input[1]");
    }

    #[test]
    fn refusals_name_the_field() {
        let param = |body: serde_json::Value| embeddings(&body, 2).unwrap_err().param();
        assert_eq!(param(json!({"input": []})), Some("input".into()));
        assert_eq!(param(json!({"input": ["a", "b", "c"]})), Some("input".into()));
        assert_eq!(param(json!({"input": "a", "nope": 1})), Some("nope".into()));
        assert_eq!(param(json!({"input": [{"text": "a"}, 7.5]})), Some("input[1]".into()));
        assert_eq!(param(json!({"input": ["a", ""]})), Some("input[1]".into()));
        assert_eq!(param(json!({"input": [-1]})), Some("input[0]".into()));
        assert_eq!(param(json!({"input": "a", "dimensions": 0})), Some("dimensions".into()));
        assert_eq!(param(json!({"input": "a", "messages": []})), Some("messages".into()));
        let both = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
        assert_eq!(param(both), Some("messages[0].content".into()));
        let video = json!({"input": [{"type": "video_url", "video_url": {"url": "v"}}]});
        assert_eq!(embeddings(&video, 2).unwrap_err().code(), "videos_not_supported");
    }

    #[test]
    fn score_pairs_one_against_many_or_one_to_one() {
        assert!(score(&json!({"text_1": "a", "text_2": ["b", "c", "d"]}), 8).is_ok());
        assert!(score(&json!({"text_1": ["a", "b"], "text_2": ["c", "d"]}), 8).is_ok());
        let error = score(&json!({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), 8).unwrap_err();
        assert_eq!(error.param(), Some("text_2".into()));
        assert_eq!(
            score(&json!({"text_2": "b"}), 8).unwrap_err().param(),
            Some("text_1".into())
        );
    }

    #[test]
    fn rerank_echoes_documents_unless_asked_not_to() {
        let request = rerank(
            &json!({"query": "q", "documents": ["a", {"image": "u"}], "top_n": 1}),
            8,
        )
        .unwrap();
        assert_eq!(request.echo.as_ref().map(Vec::len), Some(2));
        assert_eq!(request.top_n, Some(1));
        let request = rerank(&json!({"query": "q", "documents": ["a"], "return_documents": false}), 8).unwrap();
        assert!(request.echo.is_none());
        assert_eq!(
            rerank(&json!({"query": "q", "documents": "a"}), 8).unwrap_err().param(),
            Some("documents".into())
        );
        assert_eq!(
            rerank(&json!({"query": "q", "documents": ["a"], "top_n": 0}), 8)
                .unwrap_err()
                .param(),
            Some("top_n".into())
        );
    }
}
