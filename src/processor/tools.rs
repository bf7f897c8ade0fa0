//! The generic tool prompt, for chat templates that do not render tools themselves
//! (SmolVLM's): the conversation rewritten into messages any template shows, in the words
//! and format of Qwen's templates (Hermes' `<tool_call>` blocks), which the answer parser
//! (`openai::tool_calls`) reads back:
//!
//! - the tools go into the system message (one is added first if there is none), after its
//!   text, as a `# Tools` section listing each tool's JSON on a line of its own;
//! - an assistant message's calls become `<tool_call>` blocks after its text;
//! - tool messages become a user message, each answer in a `<tool_response>` block
//!   (consecutive answers share one message).

use serde_json::Value;

use super::pyjson::dumps;
use super::template::{ChatMessage, ContentPart};
use crate::openai::tool_calls::{CLOSE, OPEN};

/// The tool section's words before the tools, and after (Qwen2.5's and Qwen3's).
const INTRO: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const OUTRO: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// The system prompt's tool section: each tool's JSON on a line of its own.
pub fn tools_section(tools: &[Value]) -> String {
    let mut text = String::from(INTRO);
    for tool in tools {
        text.push('\n');
        text.push_str(&dumps(tool, None).expect("a JSON value serializes"));
    }
    text.push_str(OUTRO);
    text
}

/// The conversation with its tools, calls and answers written as plain messages.
pub fn rewrite(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for message in messages {
        match message.role.as_str() {
            "tool" => {
                let response = format!("<tool_response>\n{}\n</tool_response>", text_of(message));
                match out.last_mut() {
                    Some(last) if last.tool_call_id.is_some() => append_text(last, &format!("\n{response}")),
                    _ => out.push(ChatMessage {
                        tool_call_id: message.tool_call_id.clone(),
                        ..ChatMessage::text("user", &response)
                    }),
                }
            }
            _ => {
                let mut plain = ChatMessage {
                    role: message.role.clone(),
                    content: message.content.clone(),
                    name: message.name.clone(),
                    ..ChatMessage::default()
                };
                for call in &message.tool_calls {
                    let separator = if plain.content.is_empty() { "" } else { "\n" };
                    let arguments = dumps(&call.function.arguments, None).expect("a JSON value serializes");
                    let block = format!(
                        "{separator}{OPEN}\n{{\"name\": \"{}\", \"arguments\": {arguments}}}\n{CLOSE}",
                        call.function.name
                    );
                    append_text(&mut plain, &block);
                }
                out.push(plain);
            }
        }
    }
    // The marker only kept consecutive answers together.
    for message in &mut out {
        message.tool_call_id = None;
    }
    if !tools.is_empty() {
        let section = tools_section(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => append_text(first, &format!("\n\n{section}")),
            _ => out.insert(0, ChatMessage::text("system", &section)),
        }
    }
    out
}

/// A message's text parts, joined.
fn text_of(message: &ChatMessage) -> String {
    (message.content.iter())
        .filter_map(|part| match part {
            ContentPart::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// `text` added to the message's last text part, or as a new one.
fn append_text(message: &mut ChatMessage, text: &str) {
    match message.content.last_mut() {
        Some(ContentPart::Text { text: last }) => last.push_str(text),
        _ => message.content.push(ContentPart::Text { text: text.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::processor::template::{TemplateFunction, TemplateToolCall};

    #[test]
    fn tools_calls_and_answers_become_plain_messages() {
        let call = TemplateToolCall {
            id: "call_1".into(),
            kind: "function",
            function: TemplateFunction {
                name: "get_weather".into(),
                arguments: json!({"city": "Paris"}),
            },
        };
        let answer = |text: &str| ChatMessage {
            role: "tool".into(),
            tool_call_id: Some("call_1".into()),
            ..ChatMessage::text("tool", text)
        };
        let messages = [
            ChatMessage::text("user", "Weather?"),
            ChatMessage {
                tool_calls: vec![call.clone(), call],
                ..ChatMessage {
                    content: Vec::new(),
                    ..ChatMessage::text("assistant", "")
                }
            },
            answer("sunny"),
            answer("rainy"),
            ChatMessage::text("user", "Thanks"),
        ];
        let tool = json!({"type": "function", "function": {"name": "get_weather"}});
        let out = rewrite(&messages, &[tool]);
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "user"]);
        assert!(
            text_of(&out[0])
                .contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}\n</tools>")
        );
        let block = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(text_of(&out[2]), format!("{block}\n{block}"));
        assert_eq!(
            text_of(&out[3]),
            "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
        );
        assert!(out.iter().all(|m| m.tool_call_id.is_none() && m.tool_calls.is_empty()));
    }
}
