//! The model's own chat template, rendered with minijinja the way transformers renders it
//! with Jinja2 (trim_blocks, lstrip_blocks, `raise_exception`, Python string methods,
//! unescaped `tojson`).

use std::path::Path;

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use super::ProcessorError;
use crate::model::LoadError;
use crate::model::files::{ChatTemplateFile, read_json};

/// One message as chat templates see it: content is always a list of parts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
    /// An assistant message's calls, their arguments as JSON values (vLLM gives templates
    /// objects, not OpenAI's strings: templates print them with `tojson`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<TemplateToolCall>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The author's name, for templates that show it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A call of an assistant message, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TemplateToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: TemplateFunction,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TemplateFunction {
    pub name: String,
    pub arguments: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    Text {
        text: String,
    },
    /// An image's place; the images themselves travel beside the messages, in order.
    Image,
    /// A video's place, likewise.
    Video,
}

impl ChatMessage {
    pub fn text(role: &str, text: &str) -> Self {
        Self {
            role: role.to_string(),
            content: vec![ContentPart::Text { text: text.to_string() }],
            ..Self::default()
        }
    }
}

/// Special tokens the template may refer to (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
    /// Conversations that hold a video render with the family's own template, if it has one.
    has_video_template: bool,
    /// The template renders `tools` itself (Qwen's do); else the processor writes them into
    /// the conversation (`processor::tools`).
    renders_tools: bool,
}

impl ChatTemplate {
    /// The model's template, and `video_template`, which the family may use instead for
    /// conversations that hold a video.
    pub fn load(
        source: &ChatTemplateFile,
        tokens: TemplateTokens,
        video_template: Option<&str>,
    ) -> Result<Self, LoadError> {
        let (file, text) = read_source(source)?;
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid. This is a bug.");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        // Jinja2's tojson as transformers registers it: `json.dumps`, no HTML escaping.
        env.add_filter(
            "tojson",
            |value: Value, kwargs: Kwargs| -> Result<String, minijinja::Error> {
                let indent: Option<usize> = kwargs.get("indent")?;
                kwargs.assert_all_used()?;
                super::pyjson::dumps(&value, indent)
                    .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
            },
        );
        let renders_tools = text.contains("tools");
        env.add_template_owned("chat", text).map_err(|e| LoadError::Template {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(video) = video_template {
            env.add_template_owned("video", video.to_string())
                .map_err(|e| LoadError::Template {
                    file: file.to_path_buf(),
                    message: format!("the family's video template: {e}"),
                })?;
        }
        Ok(Self {
            env,
            tokens,
            has_video_template: video_template.is_some(),
            renders_tools,
        })
    }

    /// Whether the template renders `tools`, tool calls and tool messages itself.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// The conversation as text; `tools`: the functions the model may call, in OpenAI's shape
    /// (`{"type": "function", "function": {...}}`), none when empty.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, ProcessorError> {
        let has_video = messages
            .iter()
            .any(|m| m.content.iter().any(|p| matches!(p, ContentPart::Video)));
        let name = if has_video && self.has_video_template {
            "video"
        } else {
            "chat"
        };
        let template = (self.env.get_template(name)).expect("the templates were added at load. This is a bug.");
        let tools = if tools.is_empty() {
            Value::from(())
        } else {
            Value::from(Serde(tools))
        };
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            ..Value::from(Serde(&self.tokens))
        };
        template
            .render(ctx)
            .map_err(|e| ProcessorError::Template { message: e.to_string() })
    }
}

fn read_source(source: &ChatTemplateFile) -> Result<(&Path, String), LoadError> {
    match source {
        ChatTemplateFile::Jinja(path) => {
            std::fs::read_to_string(path)
                .map(|t| (path.as_path(), t))
                .map_err(|e| LoadError::Io {
                    file: path.clone(),
                    source: e,
                })
        }
        ChatTemplateFile::Json(path) => {
            #[derive(serde::Deserialize)]
            struct File {
                chat_template: String,
            }
            Ok((path.as_path(), read_json::<File>(path)?.chat_template))
        }
        ChatTemplateFile::TokenizerConfig(path) => {
            #[derive(serde::Deserialize)]
            struct Named {
                name: String,
                template: String,
            }
            #[derive(serde::Deserialize)]
            #[serde(untagged)]
            enum Template {
                One(String),
                Named(Vec<Named>),
            }
            #[derive(serde::Deserialize)]
            struct File {
                chat_template: Template,
            }
            let text = match read_json::<File>(path)?.chat_template {
                Template::One(t) => t,
                Template::Named(list) => {
                    let pick = list.iter().position(|t| t.name == "default").unwrap_or(0);
                    list.into_iter()
                        .nth(pick)
                        .map(|t| t.template)
                        .ok_or_else(|| LoadError::invalid(path, "chat_template", "is an empty list of templates"))?
                }
            };
            Ok((path.as_path(), text))
        }
    }
}
