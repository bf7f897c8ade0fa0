//! Preference data for `--method dpo`: JSONL, one pair per line in TRL's preference
//! columns, `{"prompt": [...messages...], "chosen": [...], "rejected": [...]}`; each of the
//! three may be a plain string instead (a user message, an assistant message). Images sit in
//! the prompt's messages as in SFT data. A pair becomes two conversations, prompt + chosen
//! and prompt + rejected, tokenized as the server would, their targets the completion's
//! tokens only (TRL's conversational DPO: from where the prompt with its generation prompt
//! ends).

use std::path::Path;

use serde_json::{Value, json};

use super::data::{DataError, DataLimits, Example, conversation, read_lines};
use crate::openai::ChatMessageIn;
use crate::processor::Processor;

/// A prompt with a preferred and a dispreferred completion.
pub struct Pair {
    /// 1-based, in its file.
    pub line: usize,
    pub chosen: Example,
    pub rejected: Example,
    /// The reference model's log-probabilities of the two completions (chosen, rejected),
    /// computed once before training.
    pub reference: [f32; 2],
}

impl Pair {
    pub fn tokens(&self) -> usize {
        self.chosen.token_ids.len() + self.rejected.token_ids.len()
    }
}

/// Reads and tokenizes every pair of `file` (blank lines skipped); errors name the line.
pub fn load(file: &Path, processor: &Processor, limits: &DataLimits) -> Result<Vec<Pair>, DataError> {
    read_lines(file, |line, number, folder| {
        parse_line(line, number, folder, processor, limits)
    })
}

fn parse_line(
    line: &str,
    number: usize,
    folder: &Path,
    processor: &Processor,
    limits: &DataLimits,
) -> Result<Pair, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or("not a JSON object with `prompt`, `chosen` and `rejected`")?;
    if let Some(other) = object
        .keys()
        .find(|k| !["prompt", "chosen", "rejected"].contains(&k.as_str()))
    {
        return Err(format!(
            "`{other}`: a pair holds `prompt`, `chosen` and `rejected` only"
        ));
    }
    let prompt = turns(object, "prompt", "user")?;
    let side = |field: &str| -> Result<Example, String> {
        let completion = turns(object, field, "assistant")?;
        if let Some(i) = completion.iter().position(|m| m["role"] != "assistant") {
            return Err(format!("`{field}[{i}]`: a completion holds assistant messages only"));
        }
        let messages: Vec<Value> = prompt.iter().chain(&completion).cloned().collect();
        let messages: Vec<ChatMessageIn> =
            serde_json::from_value(Value::Array(messages)).map_err(|e| format!("`{field}`: {e}"))?;
        conversation(&messages, prompt.len(), number, folder, processor, limits).map_err(|e| format!("`{field}`: {e}"))
    };
    Ok(Pair {
        line: number,
        chosen: side("chosen")?,
        rejected: side("rejected")?,
        reference: [0.0; 2],
    })
}

/// A field's messages: a list as given, or a string as one message of `role`.
fn turns(object: &serde_json::Map<String, Value>, field: &str, role: &str) -> Result<Vec<Value>, String> {
    match object.get(field) {
        Some(Value::String(text)) => Ok(vec![json!({"role": role, "content": text})]),
        Some(Value::Array(messages)) if !messages.is_empty() => Ok(messages.clone()),
        _ => Err(format!("`{field}` must be a string or a non-empty list of messages")),
    }
}
