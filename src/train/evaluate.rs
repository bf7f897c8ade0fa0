//! `ocellus evaluate`'s data and scoring: held-out rows (any dataset `finetune` reads)
//! whose expected answer is the conversation's last assistant turn, or a preference pair's
//! chosen answer; greedy answers scored by exact match (after trimming whitespace), or by
//! what a regular expression finds in them, overall and per `kind` (the demo task's
//! question types). `runtime::evaluate` generates the answers between the two.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use regex::Regex;
use serde_json::Value;

use super::columns;
use super::data::{DataLimits, read_images};
use super::dataset::{Dataset, Row};
use crate::openai::ChatMessageIn;
use crate::processor::prepare::template_messages;
use crate::processor::{ChatMessage, ImageInput};

/// One held-out conversation: the messages before the answer and their images, its kind
/// and the answer.
pub struct Case {
    pub messages: Vec<ChatMessage>,
    pub images: Vec<ImageInput>,
    /// The messages before the answer as read (images placed as URLs): a preference pair's
    /// prompt when the answer is wrong.
    pub prompt: Vec<Value>,
    pub kind: String,
    pub answer: String,
}

/// Every row of `dataset` as a case.
pub fn read_cases(dataset: &Dataset) -> anyhow::Result<Vec<Case>> {
    Ok(dataset.rows(read_case)?)
}

fn read_case(row: Row) -> Result<Case, String> {
    let limits = DataLimits {
        max_seq_len: usize::MAX,
        max_images: 64,
        max_image_bytes: 64 << 20,
        max_image_pixels: 100_000_000,
    };
    let mut row_columns = row.columns;
    let kind = match row_columns.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        _ => "all".into(),
    };
    let (prompt, answer) = match row_columns.contains_key("chosen") {
        true => {
            let chosen = columns::turns(&row_columns, "chosen", "assistant")?;
            (
                columns::with_images(&mut row_columns, "prompt")?,
                chosen.last().cloned(),
            )
        }
        false => {
            let mut messages = columns::with_images(&mut row_columns, "messages")?;
            let answer = messages.pop();
            (messages, answer)
        }
    };
    let answer = match answer {
        Some(message) if message["role"] == "assistant" => columns::text_of(&message),
        _ => None,
    }
    .ok_or("the last message must be the assistant's answer, as text")?;
    let parsed: Vec<ChatMessageIn> = serde_json::from_value(Value::Array(prompt.clone())).map_err(|e| e.to_string())?;
    let messages = crate::openai::messages(&parsed, &limits.messages(), crate::openai::PixelBudget::default())
        .map_err(|e| e.to_string())?;
    let images = read_images(&messages, row.folder, &limits)?;
    Ok(Case {
        messages: template_messages(&messages),
        images,
        prompt,
        kind,
        answer,
    })
}

/// Preference pairs from the model's own mistakes: for each case whose answer in `answers`
/// is wrong, its prompt, the expected answer chosen and the model's rejected. Image paths
/// are copied as they are: write `out` beside the data. Returns how many.
pub fn write_mistake_pairs(cases: &[Case], answers: &[String], out: &Path) -> anyhow::Result<usize> {
    let mut pairs = String::new();
    let mut count = 0;
    for (case, got) in cases.iter().zip(answers) {
        if got.trim() == case.answer.trim() {
            continue;
        }
        let pair = serde_json::json!({"prompt": case.prompt, "chosen": case.answer.trim(), "rejected": got.trim()});
        pairs.push_str(&pair.to_string());
        pairs.push('\n');
        count += 1;
    }
    std::fs::write(out, pairs).with_context(|| out.display().to_string())?;
    Ok(count)
}

/// What an answer is scored on: the whole answer, or what `pattern` finds in it (its first
/// group if it has one, else the whole match; nothing when it does not match).
pub fn extract<'a>(answer: &'a str, pattern: Option<&Regex>) -> &'a str {
    let Some(pattern) = pattern else {
        return answer.trim();
    };
    match pattern.captures(answer) {
        Some(found) => found.get(1).or_else(|| found.get(0)).map_or("", |m| m.as_str().trim()),
        None => "",
    }
}

/// Accuracy of `answers` (what `pattern` extracts, else the whole answer) against the
/// expected `(kind, answer)` pairs, per kind and over all, with the first few wrong answers.
pub fn score(expected: &[(String, String)], answers: &[String], pattern: Option<&Regex>) -> serde_json::Value {
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (got, (kind, answer)) in answers.iter().zip(expected) {
        let right = extract(got, pattern) == answer.trim();
        let keys: &[&str] = if kind == "all" { &["all"] } else { &[kind, "all"] };
        for &key in keys {
            let entry = tally.entry(key.to_string()).or_default();
            entry.0 += usize::from(right);
            entry.1 += 1;
        }
        if !right && wrong.len() < 10 {
            let mut entry = serde_json::json!({"kind": kind, "expected": answer, "got": got.trim()});
            if pattern.is_some() {
                entry["extracted"] = extract(got, pattern).into();
            }
            wrong.push(entry);
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
        std::fs::create_dir(dir.path().join("images")).unwrap();
        image::RgbImage::new(8, 8)
            .save(dir.path().join("images/1.png"))
            .unwrap();
        let cases = read_cases(&Dataset::file(&data)).unwrap();
        assert_eq!(
            (cases.len(), cases[1].answer.as_str(), cases[1].kind.as_str()),
            (2, "5", "digit")
        );
        let out = dir.path().join("pairs.jsonl");
        let count = write_mistake_pairs(&cases, &["2".into(), " 2\n".into()], &out).unwrap();
        assert_eq!(count, 1);
        let pair: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
        assert_eq!(
            (pair["chosen"].as_str(), pair["rejected"].as_str()),
            (Some("5"), Some("2"))
        );
        assert_eq!(pair["prompt"][0]["content"][0]["image_url"]["url"], "images/1.png");
        assert_eq!(pair["prompt"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_pattern_scores_what_it_finds_in_the_answer() {
        let pattern = Regex::new(r"answer is \(?([A-D])\)?").unwrap();
        assert_eq!(extract("I think the answer is (B).", Some(&pattern)), "B");
        assert_eq!(extract("No idea.", Some(&pattern)), "");
        assert_eq!(extract(" B \n", None), "B");
        let whole = Regex::new(r"\d+").unwrap();
        assert_eq!(extract("It shows 42 apples", Some(&whole)), "42");
        let expected = [("mc".to_string(), "B".to_string()), ("mc".to_string(), "C".to_string())];
        let answers = ["the answer is B".to_string(), "the answer is D".to_string()];
        let scored = score(&expected, &answers, Some(&pattern));
        assert_eq!(scored["accuracy"]["mc"]["correct"], 1);
        assert_eq!(scored["first_wrong"][0]["extracted"], "D");
        assert_eq!(score(&expected, &answers, None)["accuracy"]["all"]["correct"], 0);
    }
}
