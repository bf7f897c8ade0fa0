//! Checking untrusted requests, one rule at a time, each failure naming the field and
//! giving the limit and the value received. The result is what the engine understands.

use std::sync::Arc;

use super::error::ApiError;
use super::types::{ChatMessageIn, ContentPartIn, MessageContent, SamplingFields, StopField};
use crate::engine::SamplingParams;
use crate::model::lora::Adapter;
use crate::processor::{ChatMessage, ContentPart};

/// Stop strings are matched against the tail of the output at every token; a bound keeps
/// that cheap.
const MAX_STOP_BYTES: usize = 1024;

/// Bounds on what a request may ask for (server flags).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_n: usize,
    pub max_stop_sequences: usize,
    pub max_top_logprobs: usize,
    pub max_images_per_request: usize,
    pub max_videos_per_request: usize,
    pub max_video_frames: usize,
}

/// A request's generation settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sampling: SamplingParams,
    /// `None`: up to the context length.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// The adapter the request's `model` names; `None` for the base model.
    pub adapter: Option<Arc<Adapter>>,
}

/// A video part: where it is, the request's sampling overrides (checked against the
/// limits), and its place in the request.
#[derive(Debug, Clone)]
pub struct VideoRef {
    pub url: String,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
    pub param: String,
}

/// The media parts of a request's messages, in order of kind.
#[derive(Debug, Clone, Default)]
pub struct MediaRefs {
    pub images: Vec<ImageRef>,
    pub videos: Vec<VideoRef>,
}

/// An image part: where it is, how to present it, and its place in the request.
#[derive(Debug, Clone)]
pub struct ImageRef {
    pub url: String,
    pub split: Option<bool>,
    pub param: String,
}

fn range(param: &str, value: f64, low: f64, high: f64, low_inclusive: bool) -> Result<(), ApiError> {
    let above_low = if low_inclusive { value >= low } else { value > low };
    if above_low && value <= high && value.is_finite() {
        return Ok(());
    }
    let open = if low_inclusive { '[' } else { '(' };
    Err(ApiError::invalid(
        param,
        format!("`{param}` must be in {open}{low}, {high}], got {value}"),
    ))
}

fn positive(param: &str, value: i64) -> Result<usize, ApiError> {
    if value < 1 {
        return Err(ApiError::invalid(param, format!("`{param}` must be >= 1, got {value}")));
    }
    Ok(value as usize)
}

/// The settings common to both endpoints. `max_tokens` is the endpoint's effective field
/// (chat prefers `max_completion_tokens`); `logprobs` the number of alternatives, if any.
pub fn settings(
    fields: &SamplingFields,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
    limits: &RequestLimits,
    vocab_size: usize,
) -> Result<Settings, ApiError> {
    let max_tokens = max_tokens.map(|m| positive("max_tokens", m)).transpose()?;
    let temperature = fields.temperature.unwrap_or(1.0);
    range("temperature", temperature, 0.0, 2.0, true)?;
    let top_p = fields.top_p.unwrap_or(1.0);
    range("top_p", top_p, 0.0, 1.0, false)?;
    let presence_penalty = fields.presence_penalty.unwrap_or(0.0);
    range("presence_penalty", presence_penalty, -2.0, 2.0, true)?;
    let frequency_penalty = fields.frequency_penalty.unwrap_or(0.0);
    range("frequency_penalty", frequency_penalty, -2.0, 2.0, true)?;
    let repetition_penalty = fields.repetition_penalty.unwrap_or(1.0);
    range("repetition_penalty", repetition_penalty, 0.0, 10.0, false)?;
    let min_p = fields.min_p.unwrap_or(0.0);
    range("min_p", min_p, 0.0, 1.0, true)?;
    let top_k = match fields.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1 (off) or >= 1, got {k}"),
            ));
        }
    };
    let n = positive("n", fields.n.unwrap_or(1))?;
    if n > limits.max_n {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be <= {}, got {n}", limits.max_n),
        ));
    }
    let min_tokens = fields.min_tokens.unwrap_or(0);
    if min_tokens < 0 || max_tokens.is_some_and(|m| min_tokens as usize > m) {
        let bound = max_tokens.map_or("0 <= min_tokens".to_string(), |m| {
            format!("0 <= min_tokens <= max_tokens ({m})")
        });
        return Err(ApiError::invalid(
            "min_tokens",
            format!("`min_tokens` must satisfy {bound}, got {min_tokens}"),
        ));
    }
    let stop = match &fields.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(list)) => list.clone(),
    };
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        let message = format!(
            "each `stop` sequence may hold at most {MAX_STOP_BYTES} bytes, got {}",
            long.len()
        );
        return Err(ApiError::invalid("stop", message));
    }
    if stop.len() > limits.max_stop_sequences {
        let message = format!(
            "`stop` may hold at most {} sequences, got {}",
            limits.max_stop_sequences,
            stop.len()
        );
        return Err(ApiError::invalid("stop", message));
    }
    let stop_token_ids = fields
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&id| match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab_size => Ok(id),
            _ => Err(ApiError::invalid(
                "stop_token_ids",
                format!("token ids must be in [0, {vocab_size}), got {id}"),
            )),
        })
        .collect::<Result<_, _>>()?;
    if let Some(k) = logprobs.filter(|&k| k > limits.max_top_logprobs) {
        let message = format!(
            "at most {} top log-probabilities per token, got {k}",
            limits.max_top_logprobs
        );
        return Err(ApiError::invalid("top_logprobs", message));
    }
    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        min_p: min_p as f32,
        repetition_penalty: repetition_penalty as f32,
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        seed: fields.seed.map(|s| s as u64),
    };
    Ok(Settings {
        sampling,
        max_tokens,
        min_tokens: min_tokens as usize,
        n,
        stop,
        stop_token_ids,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        logprobs,
        stream,
        include_usage: fields
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        adapter: None,
    })
}

/// Chat's `logprobs` and `top_logprobs` as a number of alternatives.
pub fn chat_logprobs(logprobs: Option<bool>, top_logprobs: Option<i64>) -> Result<Option<usize>, ApiError> {
    match (logprobs.unwrap_or(false), top_logprobs) {
        (_, Some(k)) if k < 0 => Err(ApiError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be >= 0, got {k}"),
        )),
        (false, Some(k)) if k > 0 => Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs: true`",
        )),
        (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
        (false, _) => Ok(None),
    }
}

/// OpenAI messages to the chat template's shape, and the media parts in order.
pub fn messages(input: &[ChatMessageIn], limits: &RequestLimits) -> Result<(Vec<ChatMessage>, MediaRefs), ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut images = Vec::new();
    let mut videos = Vec::new();
    let mut out = Vec::with_capacity(input.len());
    for (i, message) in input.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                let message =
                    format!("`messages[{i}].role` must be system, developer, user or assistant, got `{other}`");
                return Err(ApiError::invalid(&format!("messages[{i}].role"), message));
            }
        };
        let param = format!("messages[{i}].content");
        let content = match &message.content {
            None => return Err(ApiError::invalid(&param, format!("`{param}` is required"))),
            Some(MessageContent::Text(text)) => vec![ContentPart::Text { text: text.clone() }],
            Some(MessageContent::Parts(parts)) if parts.is_empty() => {
                return Err(ApiError::invalid(
                    &param,
                    format!("`{param}` must not be an empty list"),
                ));
            }
            Some(MessageContent::Parts(parts)) => {
                let mut content = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    content.push(match part {
                        ContentPartIn::Text { text } => ContentPart::Text { text: text.clone() },
                        ContentPartIn::ImageUrl { image_url } => {
                            let param = format!("{param}[{j}].image_url");
                            if role != "user" {
                                let message = format!("images are only allowed in user messages (`{param}`)");
                                return Err(ApiError::invalid(&param, message));
                            }
                            let split = match image_url.detail.as_deref() {
                                None | Some("auto") | Some("high") => None,
                                Some("low") => Some(false),
                                Some(other) => {
                                    let message = format!("`{param}.detail` must be auto, low or high, got `{other}`");
                                    return Err(ApiError::invalid(&format!("{param}.detail"), message));
                                }
                            };
                            images.push(ImageRef {
                                url: image_url.url.clone(),
                                split,
                                param,
                            });
                            ContentPart::Image
                        }
                        ContentPartIn::VideoUrl { video_url } => {
                            let param = format!("{param}[{j}].video_url");
                            if role != "user" {
                                let message = format!("videos are only allowed in user messages (`{param}`)");
                                return Err(ApiError::invalid(&param, message));
                            }
                            videos.push(video_ref(video_url, param, limits)?);
                            ContentPart::Video
                        }
                    });
                }
                content
            }
        };
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    if images.len() > limits.max_images_per_request {
        let message = format!(
            "at most {} images per request, got {}",
            limits.max_images_per_request,
            images.len()
        );
        return Err(ApiError::InvalidRequest {
            message,
            param: Some("messages".into()),
            code: "too_many_images",
        });
    }
    if videos.len() > limits.max_videos_per_request {
        let message = format!(
            "at most {} videos per request, got {}",
            limits.max_videos_per_request,
            videos.len()
        );
        return Err(ApiError::InvalidRequest {
            message,
            param: Some("messages".into()),
            code: "too_many_videos",
        });
    }
    Ok((out, MediaRefs { images, videos }))
}

/// Highest sampling rate a request may ask for: beyond it frames are nearly identical.
const MAX_VIDEO_FPS: f64 = 60.0;

fn video_ref(video: &super::types::VideoUrl, param: String, limits: &RequestLimits) -> Result<VideoRef, ApiError> {
    if let Some(fps) = video.fps {
        range(&format!("{param}.fps"), fps, 0.0, MAX_VIDEO_FPS, false)?;
    }
    let max_frames = match video.max_frames {
        None => None,
        Some(n) if n < 1 => {
            let message = format!("`{param}.max_frames` must be >= 1, got {n}");
            return Err(ApiError::invalid(&format!("{param}.max_frames"), message));
        }
        Some(n) if n as u64 > limits.max_video_frames as u64 => {
            let message = format!(
                "`{param}.max_frames` may be at most {} on this server, got {n}",
                limits.max_video_frames
            );
            return Err(ApiError::InvalidRequest {
                message,
                param: Some(format!("{param}.max_frames")),
                code: "too_many_video_frames",
            });
        }
        Some(n) => Some(n as usize),
    };
    Ok(VideoRef {
        url: video.url.clone(),
        fps: video.fps,
        max_frames,
        param,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_n: 4,
        max_stop_sequences: 2,
        max_top_logprobs: 5,
        max_images_per_request: 1,
        max_videos_per_request: 1,
        max_video_frames: 8,
    };

    fn check(fields: SamplingFields) -> Result<Settings, ApiError> {
        settings(&fields, fields.max_tokens, None, &LIMITS, 100)
    }

    fn param_of(err: ApiError) -> String {
        match err {
            ApiError::InvalidRequest { param, .. } => param.unwrap_or_default(),
            other => panic!("not an invalid request: {other:?}"),
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(SamplingFields, &str)> = vec![
            (
                SamplingFields {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingFields {
                    temperature: Some(2.5),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingFields {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingFields {
                    presence_penalty: Some(-3.0),
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingFields {
                    frequency_penalty: Some(2.1),
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingFields {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingFields {
                    min_p: Some(1.5),
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingFields {
                    top_k: Some(-2),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingFields {
                    n: Some(5),
                    ..Default::default()
                },
                "n",
            ),
            (
                SamplingFields {
                    min_tokens: Some(9),
                    max_tokens: Some(8),
                    ..Default::default()
                },
                "min_tokens",
            ),
            (
                SamplingFields {
                    stop: Some(StopField::Many(vec!["a".into(); 3])),
                    ..Default::default()
                },
                "stop",
            ),
            (
                SamplingFields {
                    stop_token_ids: Some(vec![100]),
                    ..Default::default()
                },
                "stop_token_ids",
            ),
        ];
        for (fields, param) in cases {
            assert_eq!(param_of(check(fields).unwrap_err()), param);
        }
    }

    #[test]
    fn defaults_are_openai_s() {
        let s = check(SamplingFields::default()).unwrap();
        assert_eq!(
            (s.sampling.temperature, s.sampling.top_p, s.n, s.max_tokens),
            (1.0, 1.0, 1, None)
        );
        assert!(!s.stream && s.stop.is_empty());
    }

    #[test]
    fn video_parts_carry_their_sampling_within_the_limits() {
        let parse = |part: serde_json::Value| {
            let input: Vec<ChatMessageIn> =
                serde_json::from_value(serde_json::json!([{"role": "user", "content": [part]}])).unwrap();
            super::messages(&input, &LIMITS)
        };
        let (_, media) = parse(serde_json::json!(
            {"type": "video_url", "video_url": {"url": "data:x", "fps": 2.0, "max_frames": 8}}
        ))
        .unwrap();
        assert_eq!((media.videos[0].fps, media.videos[0].max_frames), (Some(2.0), Some(8)));
        let too_many = parse(serde_json::json!({"type": "video_url", "video_url": {"url": "x", "max_frames": 9}}));
        assert!(
            matches!(
                too_many,
                Err(ApiError::InvalidRequest {
                    code: "too_many_video_frames",
                    ..
                })
            ),
            "{too_many:?}"
        );
        let zero_fps = parse(serde_json::json!({"type": "video_url", "video_url": {"url": "x", "fps": 0}}));
        assert_eq!(param_of(zero_fps.unwrap_err()), "messages[0].content[0].video_url.fps");
    }

    #[test]
    fn messages_map_roles_images_and_details() {
        let input: Vec<ChatMessageIn> = serde_json::from_value(serde_json::json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}}
            ]}
        ]))
        .unwrap();
        let (messages, media) = super::messages(&input, &LIMITS).unwrap();
        assert_eq!(messages[0].role, "system");
        assert_eq!(media.images.len(), 1);
        assert_eq!(media.images[0].split, Some(false));
        assert_eq!(media.images[0].param, "messages[1].content[1].image_url");
        let bad: Vec<ChatMessageIn> =
            serde_json::from_value(serde_json::json!([{"role": "tool", "content": "x"}])).unwrap();
        assert_eq!(
            param_of(super::messages(&bad, &LIMITS).unwrap_err()),
            "messages[0].role"
        );
    }
}
