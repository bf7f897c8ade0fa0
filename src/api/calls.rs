//! Chat answers read for tool calls (`openai::tool_calls`) into OpenAI's response shapes:
//! `message.tool_calls` for a whole answer, `delta.tool_calls` pieces for a stream. An
//! answer that calls a function finishes with `tool_calls`.

use serde_json::{Value, json};

use crate::openai::tool_calls::{CallReader, CallStream, Delta};
use crate::openai::{AssistantMessage, FunctionCallOut, ToolCallOut, tool_call_id};

/// A finished answer as the assistant's message, and its finish reason.
pub fn message(
    reader: Option<&CallReader>,
    text: &str,
    finish: Option<&'static str>,
) -> (AssistantMessage, Option<&'static str>) {
    let Some(reader) = reader else {
        let message = AssistantMessage {
            role: "assistant",
            content: Some(text.to_string()),
            tool_calls: Vec::new(),
        };
        return (message, finish);
    };
    let parsed = reader.parse(text);
    let finish = if parsed.calls.is_empty() {
        finish
    } else {
        Some("tool_calls")
    };
    let tool_calls = (parsed.calls.into_iter())
        .map(|call| ToolCallOut {
            id: tool_call_id(),
            kind: "function",
            function: FunctionCallOut {
                name: call.name,
                arguments: call.arguments,
            },
        })
        .collect();
    let message = AssistantMessage {
        role: "assistant",
        content: parsed.content,
        tool_calls,
    };
    (message, finish)
}

/// One choice's stream read for calls.
pub struct StreamedCalls(CallStream);

impl StreamedCalls {
    pub fn new(reader: CallReader) -> Self {
        Self(CallStream::new(reader))
    }

    /// The chat deltas a piece of the answer makes ready (`end`: the answer's last piece).
    pub fn deltas(&mut self, text: &str, end: bool) -> Vec<Value> {
        let mut deltas = self.0.push(text);
        if end {
            deltas.extend(self.0.finish());
        }
        deltas.into_iter().map(delta).collect()
    }

    /// The finish reason, given the engine's.
    pub fn finish_reason(&self, reason: &'static str) -> &'static str {
        if self.0.called() { "tool_calls" } else { reason }
    }
}

fn delta(delta: Delta) -> Value {
    match delta {
        Delta::Content(text) => json!({"content": text}),
        Delta::CallStart { index, name } => json!({"tool_calls": [{
            "index": index,
            "id": tool_call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }]}),
        Delta::Arguments { index, text } => json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]}),
    }
}
