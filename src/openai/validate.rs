//! Checking untrusted requests, one rule at a time (each a `ValidationError` variant), into
//! typed values: `ValidChat` and `ValidCompletion`, whose `Options` hold the sampling and stopping
//! fields both endpoints share.

use super::error::{MAX_STOP_BYTES, ValidationError};
use super::messages::{Message, PixelBudget, messages};
use super::structured::{self, Constrained};
use super::types::{ChatCompletionRequest, CompletionRequest, PromptField, SamplingFields, StopField};
use super::{tool_calls, tools};

/// Bounds on what a request may ask for (server flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_n: usize,
    pub max_stop_sequences: usize,
    pub max_top_logprobs: usize,
    pub max_images_per_request: usize,
    pub max_videos_per_request: usize,
    pub max_video_frames: usize,
    /// The largest pixel budget (`max_pixels`) a request may give an image.
    pub max_image_budget_pixels: usize,
    /// Most inputs (texts and images) of one embedding, score or rerank request.
    pub max_embedding_inputs: usize,
    /// How deeply a JSON schema constraining the output may nest.
    pub max_schema_depth: usize,
}

/// OpenAI's default `max_tokens` for completions (chat has none).
const DEFAULT_COMPLETION_TOKENS: i64 = 16;

/// A request's generation settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// 0: greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// `None`: up to the context length.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Added to these tokens' logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    pub ignore_eos: bool,
    /// Report log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// What the output must follow (`response_format`, `structured_outputs`).
    pub constraint: Option<Constrained>,
}

/// A chat completion request, validated.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub options: Options,
    /// The functions the model may call; `None` when it may call none (no tools, or
    /// `tool_choice: "none"`: they stay out of the prompt, as vLLM's
    /// `--exclude-tools-when-tool-choice-none` does).
    pub tools: Option<tools::Tools>,
}

/// A (text) completion request, validated.
#[derive(Debug, Clone)]
pub struct ValidCompletion {
    pub model: Option<String>,
    pub prompt: String,
    pub options: Options,
}

/// Validates a chat request; `vocab_size` bounds `stop_token_ids`.
pub fn chat(
    request: &ChatCompletionRequest,
    fields: &SamplingFields,
    limits: &Limits,
    vocab_size: usize,
) -> Result<ValidChat, ValidationError> {
    let logprobs = chat_logprobs(request.logprobs, request.top_logprobs)?;
    let max_tokens = request.max_completion_tokens.or(fields.max_tokens);
    let mut options = options(fields, max_tokens, logprobs, limits, vocab_size)?;
    let budget = PixelBudget::of_request(request.mm_processor_kwargs.as_ref(), limits)?;
    let messages = messages(&request.messages, limits, budget)?;
    let tools = tools::tools(
        request.tools.as_deref(),
        request.tool_choice.as_ref(),
        request.parallel_tool_calls,
        limits.max_schema_depth,
    )?;
    let tools = tools.filter(|t| t.choice != tools::ToolChoice::None);
    // A required or named call is held to the grammar of calls, which no other constraint
    // can share.
    if let Some(grammar) = tools.as_ref().and_then(tool_calls::grammar) {
        if let Some(other) = &options.constraint {
            return Err(ValidationError::InvalidInput {
                param: "tool_choice".into(),
                message: format!(
                    "\"required\" or a named function cannot be combined with `{}`: the answer is the call",
                    other.param
                ),
            });
        }
        options.constraint = Some(structured::Constrained {
            constraint: structured::OutputConstraint::Grammar(grammar),
            param: "tools".into(),
        });
    }
    Ok(ValidChat {
        model: request.model.clone(),
        messages,
        options,
        tools,
    })
}

/// Validates a completion request: one non-empty prompt, no `echo` nor `suffix`.
pub fn completion(
    request: &CompletionRequest,
    fields: &SamplingFields,
    limits: &Limits,
    vocab_size: usize,
) -> Result<ValidCompletion, ValidationError> {
    let prompt = match &request.prompt {
        PromptField::One(text) => text.clone(),
        PromptField::Many(list) if list.len() == 1 => list[0].clone(),
        PromptField::Many(list) => return Err(ValidationError::PromptCount { count: list.len() }),
    };
    if prompt.is_empty() {
        return Err(ValidationError::EmptyPrompt);
    }
    if request.echo == Some(true) {
        return Err(ValidationError::Unsupported("echo"));
    }
    if request.suffix.is_some() {
        return Err(ValidationError::Unsupported("suffix"));
    }
    let logprobs = match request.logprobs {
        Some(value) if value < 0 => {
            return Err(ValidationError::Negative {
                param: "logprobs",
                value,
            });
        }
        k => k.map(|k| k as usize),
    };
    let max_tokens = Some(fields.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS));
    Ok(ValidCompletion {
        model: request.model.clone(),
        prompt,
        options: options(fields, max_tokens, logprobs, limits, vocab_size)?,
    })
}

pub(super) fn range(param: &str, value: f64, low: f64, high: f64, low_inclusive: bool) -> Result<(), ValidationError> {
    let above_low = if low_inclusive { value >= low } else { value > low };
    if above_low && value <= high && value.is_finite() {
        return Ok(());
    }
    Err(ValidationError::OutOfRange {
        param: param.to_string(),
        low,
        high,
        low_inclusive,
        value,
    })
}

pub(super) fn positive(param: &str, value: i64) -> Result<usize, ValidationError> {
    if value < 1 {
        return Err(ValidationError::NotPositive {
            param: param.to_string(),
            value,
        });
    }
    Ok(value as usize)
}

/// The options common to both endpoints. `max_tokens` is the endpoint's effective field
/// (chat prefers `max_completion_tokens`); `logprobs` the number of alternatives, if any.
pub fn options(
    fields: &SamplingFields,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
    limits: &Limits,
    vocab_size: usize,
) -> Result<Options, ValidationError> {
    let max_tokens = max_tokens.map(|m| positive("max_tokens", m)).transpose()?;
    let ranged = |param, value: Option<f64>, default, low, high, inclusive| {
        let value = value.unwrap_or(default);
        range(param, value, low, high, inclusive).map(|()| value as f32)
    };
    let temperature = ranged("temperature", fields.temperature, 1.0, 0.0, 2.0, true)?;
    let top_p = ranged("top_p", fields.top_p, 1.0, 0.0, 1.0, false)?;
    let presence_penalty = ranged("presence_penalty", fields.presence_penalty, 0.0, -2.0, 2.0, true)?;
    let frequency_penalty = ranged("frequency_penalty", fields.frequency_penalty, 0.0, -2.0, 2.0, true)?;
    let repetition_penalty = ranged("repetition_penalty", fields.repetition_penalty, 1.0, 0.0, 10.0, false)?;
    let min_p = ranged("min_p", fields.min_p, 0.0, 0.0, 1.0, true)?;
    let top_k = match fields.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        value => return Err(ValidationError::TopK { value }),
    };
    let n = positive("n", fields.n.unwrap_or(1))?;
    if n > limits.max_n {
        return Err(ValidationError::TooManyChoices {
            limit: limits.max_n,
            value: n,
        });
    }
    let min_tokens = fields.min_tokens.unwrap_or(0);
    if min_tokens < 0 || max_tokens.is_some_and(|m| min_tokens as usize > m) {
        return Err(ValidationError::MinTokens {
            value: min_tokens,
            max_tokens,
        });
    }
    let stop = stop(fields.stop.as_ref(), limits)?;
    let stop_token_ids = (fields.stop_token_ids.iter().flatten())
        .map(|&value| match u32::try_from(value) {
            Ok(id) if (id as usize) < vocab_size => Ok(id),
            _ => Err(ValidationError::StopTokenId { vocab_size, value }),
        })
        .collect::<Result<_, _>>()?;
    if let Some(value) = logprobs.filter(|&k| k > limits.max_top_logprobs) {
        return Err(ValidationError::TooManyLogprobs {
            limit: limits.max_top_logprobs,
            value,
        });
    }
    let constraint = structured::of_fields(fields, limits.max_schema_depth)?;
    let logit_bias = logit_bias(fields.logit_bias.as_ref(), vocab_size)?;
    let (stream, include_usage) = streaming(fields)?;
    Ok(Options {
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        seed: fields.seed.map(|s| s as u64),
        max_tokens,
        min_tokens: min_tokens as usize,
        n,
        stop,
        stop_token_ids,
        logit_bias,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        logprobs,
        stream,
        include_usage,
        constraint,
    })
}

/// `stream`, and whether the stream ends with a usage chunk (`stream_options`).
fn streaming(fields: &SamplingFields) -> Result<(bool, bool), ValidationError> {
    let stream = fields.stream.unwrap_or(false);
    let Some(options) = &fields.stream_options else {
        return Ok((stream, false));
    };
    if !stream {
        return Err(ValidationError::StreamOptionsWithoutStream);
    }
    if options.include_obfuscation == Some(true) {
        return Err(ValidationError::UnsupportedValue {
            param: "stream_options.include_obfuscation".into(),
            message: "true is not supported: chunks are not padded (send false or leave it out)".into(),
        });
    }
    Ok((stream, options.include_usage.unwrap_or(false)))
}

/// OpenAI's `logit_bias`: token ids (JSON keys, so strings) below `vocab_size`, each to a
/// number in [-100, 100].
fn logit_bias(
    field: Option<&serde_json::Map<String, serde_json::Value>>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ValidationError> {
    (field.into_iter().flatten())
        .map(|(key, value)| {
            let id = key.parse::<u32>().ok().filter(|&id| (id as usize) < vocab_size);
            let bias = value.as_f64().filter(|b| (-100.0..=100.0).contains(b));
            match (id, bias) {
                (Some(id), Some(bias)) => Ok((id, bias as f32)),
                _ => Err(ValidationError::LogitBias {
                    key: key.clone(),
                    value: value.to_string(),
                    vocab_size,
                }),
            }
        })
        .collect()
}

fn stop(field: Option<&StopField>, limits: &Limits) -> Result<Vec<String>, ValidationError> {
    let stop = match field {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(list)) => list.clone(),
    };
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ValidationError::StopTooLong { bytes: long.len() });
    }
    if stop.len() > limits.max_stop_sequences {
        return Err(ValidationError::TooManyStops {
            limit: limits.max_stop_sequences,
            count: stop.len(),
        });
    }
    Ok(stop)
}

/// Chat's `logprobs` and `top_logprobs` as a number of alternatives.
fn chat_logprobs(logprobs: Option<bool>, top_logprobs: Option<i64>) -> Result<Option<usize>, ValidationError> {
    match (logprobs.unwrap_or(false), top_logprobs) {
        (_, Some(value)) if value < 0 => Err(ValidationError::Negative {
            param: "top_logprobs",
            value,
        }),
        (false, Some(k)) if k > 0 => Err(ValidationError::TopLogprobsWithoutLogprobs),
        (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
        (false, _) => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const LIMITS: Limits = Limits {
        max_n: 4,
        max_stop_sequences: 2,
        max_top_logprobs: 5,
        max_images_per_request: 1,
        max_videos_per_request: 1,
        max_video_frames: 8,
        max_image_budget_pixels: 1 << 20,
        max_embedding_inputs: 3,
        max_schema_depth: 8,
    };

    fn check(fields: serde_json::Value) -> Result<Options, ValidationError> {
        let fields: SamplingFields = serde_json::from_value(fields).unwrap();
        options(&fields, fields.max_tokens, None, &LIMITS, 100)
    }

    #[test]
    fn each_rule_names_its_field() {
        use serde_json::json;
        let cases = [
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"presence_penalty": -3.0}), "presence_penalty"),
            (json!({"frequency_penalty": 2.1}), "frequency_penalty"),
            (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"n": 5}), "n"),
            (json!({"min_tokens": 9, "max_tokens": 8}), "min_tokens"),
            (json!({"stop": ["a", "a", "a"]}), "stop"),
            (json!({"stop_token_ids": [100]}), "stop_token_ids"),
            (json!({"logit_bias": {"100": 1}}), "logit_bias"),
            (json!({"logit_bias": {"7": 100.5}}), "logit_bias"),
            (json!({"logit_bias": {"seven": 1}}), "logit_bias"),
            (json!({"logit_bias": {"7": "1"}}), "logit_bias"),
        ];
        for (fields, param) in cases {
            let err = check(fields).unwrap_err();
            assert_eq!(err.param().as_deref(), Some(param), "{err}");
            assert_eq!((err.status(), err.code()), (400, "invalid_value"));
        }
    }

    #[test]
    fn logit_bias_maps_ids_to_biases() {
        let s = check(serde_json::json!({"logit_bias": {"7": -100, "99": 2.5}})).unwrap();
        let mut bias = s.logit_bias;
        bias.sort_by_key(|&(id, _)| id);
        assert_eq!(bias, vec![(7, -100.0), (99, 2.5)]);
        // Not a map: the body's shape is wrong.
        assert!(serde_json::from_value::<SamplingFields>(serde_json::json!({"logit_bias": [1]})).is_err());
    }

    #[test]
    fn defaults_are_openai_s() {
        let s = check(serde_json::json!({})).unwrap();
        assert_eq!((s.temperature, s.top_p, s.n, s.max_tokens), (1.0, 1.0, 1, None));
        assert!(!s.stream && s.stop.is_empty());
    }

    #[test]
    fn messages_give_both_the_limit_and_the_value() {
        let err = check(serde_json::json!({"temperature": 3})).unwrap_err();
        assert_eq!(err.to_string(), "`temperature` must be in [0, 2], got 3");
        let err = check(serde_json::json!({"min_tokens": 9, "max_tokens": 8})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`min_tokens` must satisfy 0 <= min_tokens <= max_tokens (8), got 9"
        );
    }
}
