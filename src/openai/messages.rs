//! Chat messages, validated: roles, content as parts, images and videos only in user
//! messages, within the per-request counts. Each media part keeps its place in the request
//! (`param`), so that an error about it later names the field.

use super::error::ValidationError;
use super::types::{ChatMessageIn, ContentPartIn, MessageContent, MmProcessorKwargs, VideoUrl};
use super::validate::{Limits, positive, range};

/// Highest sampling rate a request may ask for: beyond it frames are nearly identical.
const MAX_VIDEO_FPS: f64 = 60.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `system` or `developer`.
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
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
        other => {
            return Err(ValidationError::UnknownRole {
                index,
                role: other.to_string(),
            });
        }
    };
    let param = format!("messages[{index}].content");
    let content = match &message.content {
        None => return Err(ValidationError::MissingContent { param }),
        Some(MessageContent::Text(text)) => vec![Part::Text(text.clone())],
        Some(MessageContent::Parts(parts)) if parts.is_empty() => return Err(ValidationError::EmptyContent { param }),
        Some(MessageContent::Parts(parts)) => (parts.iter().enumerate())
            .map(|(j, part)| one_part(role, &format!("{param}[{j}]"), part, limits, budget))
            .collect::<Result<_, _>>()?,
    };
    Ok(Message { role, content })
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
        let bad = parse(serde_json::json!([{"role": "tool", "content": "x"}]));
        assert_eq!(bad.unwrap_err().param().as_deref(), Some("messages[0].role"));
    }
}
