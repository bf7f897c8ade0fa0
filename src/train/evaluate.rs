//! `ocellus evaluate`'s data and scoring: held-out conversations whose last assistant turn
//! is the expected answer, and greedy answers scored by exact match (after trimming
//! whitespace), overall and per `kind` (the demo task's question types). `runtime::evaluate`
//! generates the answers between the two.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use super::data::{DataLimits, read_images};
use crate::openai::{ChatMessageIn, MessageContent};
use crate::processor::prepare::template_messages;
use crate::processor::{ChatMessage, ImageInput};

/// One held-out conversation: the messages before the answer and their images, its kind
/// and the answer.
pub struct Case {
    pub messages: Vec<ChatMessage>,
    pub images: Vec<ImageInput>,
    pub kind: String,
    pub answer: String,
}

#[derive(serde::Deserialize)]
struct Line {
    #[serde(default)]
    kind: Option<String>,
    messages: Vec<ChatMessageIn>,
}

/// Every conversation of a JSONL file, its images read relative to the file.
pub fn read_cases(file: &Path) -> anyhow::Result<Vec<Case>> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let folder = file.parent().unwrap_or(Path::new("."));
    let limits = DataLimits {
        max_seq_len: usize::MAX,
        max_images: 64,
        max_image_bytes: 64 << 20,
        max_image_pixels: 100_000_000,
    };
    let mut cases = Vec::new();
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", file.display(), index + 1);
        let mut parsed: Line = serde_json::from_str(line).with_context(at)?;
        let answer = match parsed.messages.pop() {
            Some(ChatMessageIn {
                role,
                content: Some(MessageContent::Text(answer)),
                ..
            }) if role == "assistant" => answer,
            _ => anyhow::bail!("{}: the last message must be the assistant's answer, as text", at()),
        };
        let messages = crate::openai::messages(
            &parsed.messages,
            &limits.messages(),
            crate::openai::PixelBudget::default(),
        )
        .with_context(at)?;
        let images = read_images(&messages, folder, &limits).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        cases.push(Case {
            messages: template_messages(&messages),
            images,
            kind: parsed.kind.unwrap_or_else(|| "all".into()),
            answer,
        });
    }
    anyhow::ensure!(!cases.is_empty(), "{}: no conversations", file.display());
    Ok(cases)
}

/// Exact-match accuracy of `answers` against the expected `(kind, answer)` pairs, per kind
/// and over all, with the first few wrong answers.
pub fn score(expected: &[(String, String)], answers: &[String]) -> serde_json::Value {
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (got, (kind, answer)) in answers.iter().zip(expected) {
        let right = got.trim() == answer.trim();
        let keys: &[&str] = if kind == "all" { &["all"] } else { &[kind, "all"] };
        for &key in keys {
            let entry = tally.entry(key.to_string()).or_default();
            entry.0 += usize::from(right);
            entry.1 += 1;
        }
        if !right && wrong.len() < 10 {
            wrong.push(serde_json::json!({"kind": kind, "expected": answer, "got": got.trim()}));
        }
    }
    let accuracy: serde_json::Map<String, serde_json::Value> = (tally.iter())
        .map(|(kind, (right, total))| {
            let score =
                serde_json::json!({"correct": right, "total": total, "accuracy": *right as f64 / *total as f64});
            (kind.clone(), score)
        })
        .collect();
    serde_json::json!({"accuracy": accuracy, "first_wrong": wrong})
}
