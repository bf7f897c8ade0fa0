//! Tool calls as the model writes them: Hermes' format, which Qwen's chat templates teach
//! and our generic tool prompt asks for, one call per block:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! `parse` reads a finished answer into content and calls; `CallStream` does the same as
//! the text arrives, for streams (arguments sent in pieces as OpenAI streams them);
//! `grammar` is the Lark grammar that makes a `required` or named `tool_choice` hold.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::tools::{Tool, ToolChoice, Tools};

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// A call the model made: a function of the request's tools, its arguments a JSON object
/// exactly as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// A finished answer read: its text before the first call (none when blank) and its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

/// How a request's answers are read for calls: the functions it may call, and whether more
/// than one call per answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReader {
    pub names: Vec<String>,
    pub parallel: bool,
}

impl CallReader {
    /// The reader for a request's tools; `None` when the model may not call any.
    pub fn of(tools: Option<&Tools>) -> Option<Self> {
        let tools = tools.filter(|t| t.choice != ToolChoice::None)?;
        Some(Self {
            names: tools.tools.iter().map(|t| t.name.clone()).collect(),
            parallel: tools.parallel,
        })
    }

    /// A finished answer's content and calls. An answer with a call that does not parse, or
    /// that names no tool of the request, is all content: nothing half-read is returned.
    pub fn parse(&self, text: &str) -> Parsed {
        let all_content = || Parsed {
            content: Some(text.to_string()),
            calls: Vec::new(),
        };
        let Some(start) = text.find(OPEN) else {
            return all_content();
        };
        let mut calls = Vec::new();
        let mut rest = &text[start..];
        while let Some(at) = rest.find(OPEN) {
            let after = &rest[at + OPEN.len()..];
            let (body, next) = match after.find(CLOSE) {
                Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
                None => (after, ""),
            };
            match self.call(body) {
                Some(call) => calls.push(call),
                None => return all_content(),
            }
            if !self.parallel {
                break;
            }
            rest = next;
        }
        let content = text[..start].trim_end();
        Parsed {
            content: (!content.is_empty()).then(|| content.to_string()),
            calls,
        }
    }

    /// One block's text (between the tags) as a call of one of the tools.
    fn call(&self, body: &str) -> Option<ParsedCall> {
        #[derive(Deserialize)]
        struct Call<'a> {
            name: String,
            #[serde(borrow)]
            arguments: &'a RawValue,
        }
        let call: Call = serde_json::from_str(body.trim()).ok()?;
        let arguments = call.arguments.get();
        (arguments.starts_with('{') && self.names.contains(&call.name)).then(|| ParsedCall {
            name: call.name,
            arguments: arguments.to_string(),
        })
    }
}

/// What a stream sends for a piece of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Content(String),
    /// A call begins: its place among the answer's calls and its function.
    CallStart {
        index: usize,
        name: String,
    },
    /// More of a call's arguments.
    Arguments {
        index: usize,
        text: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first call: text is content.
    Content,
    /// After `<tool_call>` at this offset, the function's name not yet read.
    Header { body: usize },
    /// Inside a call's arguments, which start at `args`; `sent` bytes of them streamed.
    Arguments { body: usize, args: usize, sent: usize },
    /// Between calls: text is dropped, as `parse` drops it.
    Between,
    /// One call made where only one may be: the rest is dropped.
    Done,
}

/// `CallReader::parse`, as the answer arrives. A call's header goes out once its name is
/// read, its arguments as they come, each piece held back until no closing brace or tag
/// can follow it; content is held back while it could be the start of `<tool_call>`. A call
/// that turns out not to parse cannot be taken back: where `parse` would make the whole
/// answer content, a stream may have sent the call's beginning.
#[derive(Debug)]
pub struct CallStream {
    reader: CallReader,
    text: String,
    /// Bytes of `text` dealt with.
    at: usize,
    state: State,
    calls: usize,
}

impl CallStream {
    pub fn new(reader: CallReader) -> Self {
        Self {
            reader,
            text: String::new(),
            at: 0,
            state: State::Content,
            calls: 0,
        }
    }

    /// Whether any call has begun (the answer then finishes with `tool_calls`).
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// The deltas a new piece of the answer makes ready.
    pub fn push(&mut self, piece: &str) -> Vec<Delta> {
        self.text.push_str(piece);
        let mut out = Vec::new();
        while self.step(&mut out, false) {}
        out
    }

    /// The deltas the end of the answer releases.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        while self.step(&mut out, true) {}
        out
    }

    /// One move of the state machine; false when it must wait for more text.
    fn step(&mut self, out: &mut Vec<Delta>, end: bool) -> bool {
        let rest = &self.text[self.at..];
        match self.state {
            State::Content => {
                if let Some(open) = rest.find(OPEN) {
                    push_content(out, rest[..open].trim_end());
                    self.open(open);
                    return true;
                }
                // Held back: trailing blanks (dropped if a call follows) and any start of the tag.
                let keep = if end {
                    rest.len()
                } else {
                    rest[..rest.len() - tag_prefix(rest, OPEN)].trim_end().len()
                };
                push_content(out, &rest[..keep]);
                self.at += keep;
                false
            }
            State::Between => match rest.find(OPEN) {
                Some(open) => {
                    self.open(open);
                    true
                }
                None => false,
            },
            State::Header { body } => self.header(out, body, end),
            State::Arguments { body, args, sent } => self.arguments(out, body, args, sent, end),
            State::Done => false,
        }
    }

    fn open(&mut self, offset: usize) {
        self.at += offset + OPEN.len();
        self.state = State::Header { body: self.at };
    }

    /// Reads `{"name": "...", "arguments": ` once it has all come; a call written otherwise
    /// is sent whole when it closes.
    fn header(&mut self, out: &mut Vec<Delta>, body: usize, end: bool) -> bool {
        let rest = &self.text[body..];
        if let Some(found) = header().captures(rest)
            && self.reader.names.iter().any(|n| n == &found[1])
        {
            out.push(Delta::CallStart {
                index: self.calls,
                name: found[1].to_string(),
            });
            let args = body + found.get(0).expect("the whole match").end() - 1;
            self.state = State::Arguments { body, args, sent: 0 };
            return true;
        }
        let closed = rest.find(CLOSE);
        if closed.is_none() && !end {
            return false;
        }
        let body_text = &rest[..closed.unwrap_or(rest.len())];
        match self.reader.call(body_text) {
            Some(call) => {
                out.push(Delta::CallStart {
                    index: self.calls,
                    name: call.name,
                });
                out.push(Delta::Arguments {
                    index: self.calls,
                    text: call.arguments,
                });
                self.close(closed.map_or(self.text.len(), |c| body + c + CLOSE.len()));
            }
            None => {
                // Not a call after all: the text is content if nothing was called yet.
                if self.calls == 0 {
                    push_content(out, &self.text[body - OPEN.len()..]);
                }
                self.at = self.text.len();
                self.state = State::Done;
            }
        }
        true
    }

    fn arguments(&mut self, out: &mut Vec<Delta>, body: usize, args: usize, sent: usize, end: bool) -> bool {
        let index = self.calls;
        let rest = &self.text[args..];
        let closed = rest.find(CLOSE);
        if closed.is_some() || end {
            let body_end = closed.map_or(self.text.len(), |c| args + c);
            if let Some(call) = self.reader.call(&self.text[body..body_end])
                && call.arguments.len() > sent
                && call.arguments.starts_with(&rest[..sent])
            {
                let text = call.arguments[sent..].to_string();
                out.push(Delta::Arguments { index, text });
            }
            self.close(closed.map_or(self.text.len(), |c| args + c + CLOSE.len()));
            return true;
        }
        // Held back: what could still be the arguments' closing brace, the call's, and the
        // start of `</tool_call>` (once they close, only blanks, `}` and the tag may follow).
        let ready = rest[..rest.len() - tag_prefix(rest, CLOSE)]
            .trim_end_matches(|c: char| c == '}' || c.is_whitespace())
            .len();
        if ready > sent {
            out.push(Delta::Arguments {
                index,
                text: rest[sent..ready].to_string(),
            });
            self.state = State::Arguments {
                body,
                args,
                sent: ready,
            };
        }
        false
    }

    fn close(&mut self, after: usize) {
        self.calls += 1;
        self.at = after;
        self.state = if self.reader.parallel {
            State::Between
        } else {
            State::Done
        };
    }
}

fn push_content(out: &mut Vec<Delta>, text: &str) {
    if !text.is_empty() {
        out.push(Delta::Content(text.to_string()));
    }
}

/// How many bytes at the end of `text` could begin `tag`.
fn tag_prefix(text: &str, tag: &str) -> usize {
    (1..tag.len()).rev().find(|&n| text.ends_with(&tag[..n])).unwrap_or(0)
}

/// A call's beginning up to the brace that opens its arguments.
fn header() -> &'static regex::Regex {
    static HEADER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    HEADER.get_or_init(|| {
        regex::Regex::new(r#"^\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*\{"#)
            .expect("a valid regex")
    })
}

/// The Lark grammar (llguidance's dialect) of an answer that is only calls: one of the named
/// function, or one or more (`parallel`) of any of the tools, each in the block the model
/// writes and its arguments valid under the function's schema. `None` for `auto` and `none`.
pub fn grammar(tools: &Tools) -> Option<String> {
    let callable: Vec<&Tool> = match &tools.choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => tools.tools.iter().collect(),
        ToolChoice::Function(name) => tools.tools.iter().filter(|t| &t.name == name).collect(),
    };
    let alternatives: Vec<String> = (0..callable.len()).map(|i| format!("call_{i}")).collect();
    let mut lark = match tools.parallel && tools.choice == ToolChoice::Required {
        true => "start: call (\"\\n\" call)*\n".to_string(),
        false => "start: call\n".to_string(),
    };
    lark.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    for (rule, tool) in alternatives.iter().zip(callable) {
        let mut schema = tool.schema();
        if let Some(map) = schema.as_object_mut() {
            // The arguments written as `json.dumps` writes them, as in the template's examples.
            map.entry("x-guidance").or_insert_with(
                || serde_json::json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false}),
            );
        }
        let head = format!("{OPEN}\n{{\"name\": \"{}\", \"arguments\": ", tool.name);
        let tail = format!("}}\n{CLOSE}");
        lark.push_str(&format!(
            "{rule}: {} %json {schema} {}\n",
            lark_string(&head),
            lark_string(&tail)
        ));
    }
    Some(lark)
}

/// A Lark string literal.
fn lark_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
#[path = "tool_calls_tests.rs"]
mod tests;
