//! Chat messages, validated: roles, content as parts, images and videos only in user
//! messages, within the per-request counts. Each media part keeps its place in the request
//! (`param`), so that an error about it later names the field.

use super::error::ValidationError;
use super::types::{ChatMessageIn, ContentPartIn, MessageContent, MmProcessorKwargs, ToolCallIn, VideoUrl};
use super::validate::{Limits, positive, range};

/// Highest sampling rate a request may ask for: beyond it frames are nearly identical.
const MAX_VIDEO_FPS: f64 = 60.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `system` or `developer`.
    System,
    User,
    Assistant,
    /// A tool's answer to a call.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    /// Empty only for an assistant message that holds calls.
    pub content: Vec<Part>,
    /// An assistant message's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool message: the call it answers (one of an earlier assistant message's).
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A call an earlier answer made, sent back with the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON object.
    pub arguments: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(ImagePart),
    Video(VideoPart),
}

/// How much of an image the request asks the model to see (`detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Auto,
    Low,
    High,
}

/// The pixel budget a request gives an image (`min_pixels`, `max_pixels`), for families that
/// resize to one; `None`: the model's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PixelBudget {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

impl PixelBudget {
    pub fn is_set(&self) -> bool {
        self.min_pixels.is_some() || self.max_pixels.is_some()
    }

    /// The request's `mm_processor_kwargs`, checked.
    pub fn of_request(kwargs: Option<&MmProcessorKwargs>, limits: &Limits) -> Result<Self, ValidationError> {
        let Some(kwargs) = kwargs else {
            return Ok(Self::default());
        };
        Self::default().with(kwargs.min_pixels, kwargs.max_pixels, "mm_processor_kwargs", limits)
    }

    /// This budget with a part's own values in place of its, checked (`at`: where they are).
    fn with(self, min: Option<i64>, max: Option<i64>, at: &str, limits: &Limits) -> Result<Self, ValidationError> {
        let checked = |value: Option<i64>, name: &str| -> Result<Option<usize>, ValidationError> {
            let Some(value) = value else { return Ok(None) };
            let param = format!("{at}.{name}");
            if value > limits.max_image_budget_pixels as i64 {
                return Err(ValidationError::TooManyPixels {
                    param,
                    limit: limits.max_image_budget_pixels,
                    value,
                });
            }
            Ok(Some(positive(&param, value)?))
        };
        let budget = Self {
            min_pixels: checked(min, "min_pixels")?.or(self.min_pixels),
            max_pixels: checked(max, "max_pixels")?.or(self.max_pixels),
        };
        if let (Some(min_pixels), Some(max_pixels)) = (budget.min_pixels, budget.max_pixels)
            && min_pixels > max_pixels
        {
            return Err(ValidationError::PixelBounds {
                param: format!("{at}.min_pixels"),
                min_pixels,
                max_pixels,
            });
        }
        Ok(budget)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImagePart {
    pub url: String,
    pub detail: Detail,
    pub budget: PixelBudget,
    /// Its place in the request (`messages[1].content[0].image_url`).
    pub param: String,
}

/// A video, and the request's sampling for it (within the server's limits).
#[derive(Debug, Clone, PartialEq)]
pub struct VideoPart {
    pub url: String,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
    pub param: String,
}

impl Message {
    pub fn images(&self) -> impl Iterator<Item = &ImagePart> {
        self.content.iter().filter_map(|p| match p {
            Part::Image(image) => Some(image),
            _ => None,
        })
    }

    pub fn videos(&self) -> impl Iterator<Item = &VideoPart> {
        self.content.iter().filter_map(|p| match p {
            Part::Video(video) => Some(video),
            _ => None,
        })
    }
}

/// OpenAI messages, checked, with their media parts in place; `budget`: the request's pixel
/// budget for images that set none.
pub fn messages(
    input: &[ChatMessageIn],
    limits: &Limits,
    budget: PixelBudget,
) -> Result<Vec<Message>, ValidationError> {
    if input.is_empty() {
        return Err(ValidationError::NoMessages);
    }
    let out = (input.iter().enumerate())
        .map(|(index, message)| one_message(index, message, limits, budget))
        .collect::<Result<Vec<_>, _>>()?;
    let images = out.iter().flat_map(Message::images).count();
    if images > limits.max_images_per_request {
        return Err(ValidationError::TooManyImages {
            limit: limits.max_images_per_request,
            count: images,
        });
    }
    answered_calls(&out)?;
    let videos = out.iter().flat_map(Message::videos).count();
    if videos > limits.max_videos_per_request {
        return Err(ValidationError::TooManyVideos {
            limit: limits.max_videos_per_request,
            count: videos,
        });
    }
    Ok(out)
}

fn one_message(
    index: usize,
    message: &ChatMessageIn,
    limits: &Limits,
    budget: PixelBudget,
) -> Result<Message, ValidationError> {
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(ValidationError::UnknownRole {
                index,
                role: other.to_string(),
            });
        }
    };
    output_only_fields_are_empty(index, message)?;
    let tool_calls = tool_calls(index, role, message.tool_calls.as_deref())?;
    let tool_call_id = match (role, &message.tool_call_id) {
        (Role::Tool, Some(id)) => Some(id.clone()),
        (Role::Tool, None) => return Err(invalid(index, "tool_call_id", "is required in a tool message")),
        (_, Some(_)) => return Err(invalid(index, "tool_call_id", "is only allowed in a tool message")),
        (_, None) => None,
    };
    let param = format!("messages[{index}].content");
    let content = match &message.content {
        // An assistant message that only calls tools has no content (OpenAI sends null).
        None | Some(MessageContent::Text(_)) if !tool_calls.is_empty() && blank(message.content.as_ref()) => Vec::new(),
        None => return Err(ValidationError::MissingContent { param }),
        Some(MessageContent::Text(text)) => vec![Part::Text(text.clone())],
        Some(MessageContent::Parts(parts)) if parts.is_empty() => return Err(ValidationError::EmptyContent { param }),
        Some(MessageContent::Parts(parts)) => (parts.iter().enumerate())
            .map(|(j, part)| one_part(role, &format!("{param}[{j}]"), part, limits, budget))
            .collect::<Result<_, _>>()?,
    };
    Ok(Message {
        role,
        content,
        tool_calls,
        tool_call_id,
        name: message.name.clone(),
    })
}

fn invalid(index: usize, field: &str, message: &str) -> ValidationError {
    ValidationError::InvalidInput {
        param: format!("messages[{index}].{field}"),
        message: message.into(),
    }
}

/// Absent or an empty string.
fn blank(content: Option<&MessageContent>) -> bool {
    match content {
        None => true,
        Some(MessageContent::Text(text)) => text.is_empty(),
        Some(MessageContent::Parts(_)) => false,
    }
}

/// Fields of an assistant message that a response carries and a client may send back with
/// the conversation: accepted empty, refused by name otherwise (nothing would honour them).
fn output_only_fields_are_empty(index: usize, message: &ChatMessageIn) -> Result<(), ValidationError> {
    let unsupported = |field: &str, why: &str| ValidationError::UnsupportedValue {
        param: format!("messages[{index}].{field}"),
        message: why.into(),
    };
    if message.refusal.as_deref().is_some_and(|r| !r.is_empty()) {
        return Err(unsupported(
            "refusal",
            "is not sent back to the model: send the text as `content`",
        ));
    }
    if message.annotations.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err(unsupported("annotations", "are not supported"));
    }
    if message.audio.as_ref().is_some_and(|a| !a.is_null()) {
        return Err(unsupported("audio", "is not supported: this server takes no audio"));
    }
    if message.function_call.as_ref().is_some_and(|f| !f.is_null()) {
        return Err(unsupported(
            "function_call",
            "is OpenAI's older form: send `tool_calls`",
        ));
    }
    Ok(())
}

/// An assistant message's calls, checked: functions with valid names and a JSON object of
/// arguments (given as a string, as OpenAI returns it).
fn tool_calls(index: usize, role: Role, calls: Option<&[ToolCallIn]>) -> Result<Vec<ToolCall>, ValidationError> {
    let calls = calls.unwrap_or_default();
    if role != Role::Assistant {
        return match calls.is_empty() {
            true => Ok(Vec::new()),
            false => Err(invalid(index, "tool_calls", "are only allowed in an assistant message")),
        };
    }
    (calls.iter().enumerate())
        .map(|(j, call)| {
            let field = |name: &str| format!("tool_calls[{j}].{name}");
            if call.kind != "function" {
                return Err(invalid(index, &field("type"), "must be \"function\""));
            }
            if !super::tools::valid_name(&call.function.name) {
                let message = "must be 1 to 64 letters, digits, underscores or dashes";
                return Err(invalid(index, &field("function.name"), message));
            }
            let arguments = serde_json::from_str::<serde_json::Value>(&call.function.arguments)
                .ok()
                .filter(serde_json::Value::is_object)
                .ok_or_else(|| {
                    invalid(
                        index,
                        &field("function.arguments"),
                        "must be a JSON object, as a string",
                    )
                })?;
            Ok(ToolCall {
                id: call.id.clone(),
                name: call.function.name.clone(),
                arguments,
            })
        })
        .collect()
}

/// Every tool message answers a call of an earlier assistant message, as OpenAI requires.
fn answered_calls(messages: &[Message]) -> Result<(), ValidationError> {
    let mut calls: Vec<&str> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        calls.extend(message.tool_calls.iter().map(|c| c.id.as_str()));
        if let Some(id) = &message.tool_call_id
            && !calls.contains(&id.as_str())
        {
            return Err(invalid(
                index,
                "tool_call_id",
                "names no call of an earlier assistant message",
            ));
        }
    }
    Ok(())
}

fn one_part(
    role: Role,
    at: &str,
    part: &ContentPartIn,
    limits: &Limits,
    budget: PixelBudget,
) -> Result<Part, ValidationError> {
    let user_only = |kind, param: &str| match role {
        Role::User => Ok(()),
        _ => Err(ValidationError::MediaOutsideUserMessage {
            kind,
            param: param.to_string(),
        }),
    };
    Ok(match part {
        ContentPartIn::Text { text } => Part::Text(text.clone()),
        ContentPartIn::ImageUrl { image_url } => {
            let param = format!("{at}.image_url");
            user_only("images", &param)?;
            let detail = match image_url.detail.as_deref() {
                None | Some("auto") => Detail::Auto,
                Some("high") => Detail::High,
                Some("low") => Detail::Low,
                Some(other) => {
                    return Err(ValidationError::UnknownDetail {
                        param: format!("{param}.detail"),
                        value: other.to_string(),
                    });
                }
            };
            let budget = budget.with(image_url.min_pixels, image_url.max_pixels, &param, limits)?;
            Part::Image(ImagePart {
                url: image_url.url.clone(),
                detail,
                budget,
                param,
            })
        }
        ContentPartIn::VideoUrl { video_url } => {
            let param = format!("{at}.video_url");
            user_only("videos", &param)?;
            Part::Video(video_part(video_url, param, limits)?)
        }
    })
}

fn video_part(video: &VideoUrl, param: String, limits: &Limits) -> Result<VideoPart, ValidationError> {
    if let Some(fps) = video.fps {
        range(&format!("{param}.fps"), fps, 0.0, MAX_VIDEO_FPS, false)?;
    }
    let max_frames = match video.max_frames {
        None => None,
        Some(value) if value > limits.max_video_frames as i64 => {
            return Err(ValidationError::TooManyVideoFrames {
                param: format!("{param}.max_frames"),
                limit: limits.max_video_frames,
                value,
            });
        }
        Some(value) => Some(positive(&format!("{param}.max_frames"), value)?),
    };
    Ok(VideoPart {
        url: video.url.clone(),
        fps: video.fps,
        max_frames,
        param,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::validate::tests::LIMITS;

    fn parse(messages: serde_json::Value) -> Result<Vec<Message>, ValidationError> {
        let input: Vec<ChatMessageIn> = serde_json::from_value(messages).unwrap();
        super::messages(&input, &LIMITS, PixelBudget::default())
    }

    #[test]
    fn video_parts_carry_their_sampling_within_the_limits() {
        let one = |part: serde_json::Value| parse(serde_json::json!([{"role": "user", "content": [part]}]));
        let parsed = one(serde_json::json!(
            {"type": "video_url", "video_url": {"url": "data:x", "fps": 2.0, "max_frames": 8}}
        ))
        .unwrap();
        let video = parsed[0].videos().next().unwrap();
        assert_eq!((video.fps, video.max_frames), (Some(2.0), Some(8)));
        let too_many = one(serde_json::json!({"type": "video_url", "video_url": {"url": "x", "max_frames": 9}}));
        assert_eq!(too_many.unwrap_err().code(), "too_many_video_frames");
        let zero_fps = one(serde_json::json!({"type": "video_url", "video_url": {"url": "x", "fps": 0}}));
        assert_eq!(
            zero_fps.unwrap_err().param().as_deref(),
            Some("messages[0].content[0].video_url.fps")
        );
    }

    #[test]
    fn messages_map_roles_images_and_details() {
        let parsed = parse(serde_json::json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}}
            ]}
        ]))
        .unwrap();
        assert_eq!(parsed[0].role, Role::System);
        let images: Vec<&ImagePart> = parsed.iter().flat_map(Message::images).collect();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].detail, Detail::Low);
        assert_eq!(images[0].param, "messages[1].content[1].image_url");
        let bad = parse(serde_json::json!([{"role": "function", "content": "x"}]));
        assert_eq!(bad.unwrap_err().param().as_deref(), Some("messages[0].role"));
    }
}
