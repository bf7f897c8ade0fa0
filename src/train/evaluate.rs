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

/// Preference pairs from the model's own mistakes: for each conversation of `data` (in
/// order, as `read_cases` reads them) whose answer in `answers` is wrong, its messages
/// before the answer as the prompt, the expected answer chosen and the model's rejected.
/// Image paths are copied as they are: write `out` beside `data`. Returns how many.
pub fn write_mistake_pairs(data: &Path, answers: &[String], out: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(data).with_context(|| data.display().to_string())?;
    let mut pairs = String::new();
    let mut count = 0;
    for (line, got) in text.lines().filter(|l| !l.trim().is_empty()).zip(answers) {
        let mut value: serde_json::Value = serde_json::from_str(line).with_context(|| data.display().to_string())?;
        let messages = value["messages"]
            .as_array_mut()
            .context("a conversation without `messages`")?;
        let expected = messages.pop().context("a conversation without an answer")?;
        let expected = expected["content"]
            .as_str()
            .context("an answer that is not text")?
            .trim()
            .to_string();
        if got.trim() == expected {
            continue;
        }
        let pair = serde_json::json!({"prompt": messages, "chosen": expected, "rejected": got.trim()});
        pairs.push_str(&pair.to_string());
        pairs.push('\n');
        count += 1;
    }
    std::fs::write(out, pairs).with_context(|| out.display().to_string())?;
    Ok(count)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wrong_answers_become_pairs_with_the_prompt_as_sent() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("test.jsonl");
        let line = |answer: &str| {
            let user = serde_json::json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/1.png"}}, {"type": "text", "text": "Which digit?"}]});
            serde_json::json!({"kind": "digit", "messages": [user, {"role": "assistant", "content": answer}]})
                .to_string()
        };
        std::fs::write(&data, format!("{}\n\n{}\n", line("2"), line("5"))).unwrap();
        let out = dir.path().join("pairs.jsonl");
        let count = write_mistake_pairs(&data, &["2".into(), " 2\n".into()], &out).unwrap();
        assert_eq!(count, 1);
        let pair: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
        assert_eq!(
            (pair["chosen"].as_str(), pair["rejected"].as_str()),
            (Some("5"), Some("2"))
        );
        assert_eq!(pair["prompt"][0]["content"][0]["image_url"]["url"], "images/1.png");
        assert_eq!(pair["prompt"].as_array().unwrap().len(), 1);
    }
}
