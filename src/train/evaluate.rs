//! `ocellus evaluate`: greedy answers to held-out conversations, scored by exact match
//! (after trimming whitespace) against each conversation's last assistant turn, overall and
//! per `kind` (the demo task's question types).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;

use super::data::{DataLimits, read_image};
use crate::api::types::{ChatMessageIn, MessageContent};
use crate::api::validate;
use crate::config::EvaluateArgs;
use crate::engine::{EngineConfig, GenerationRequest};
use crate::kv::blocks_for;
use crate::model::lora::Adapter;
use crate::processor::ImageInput;

#[derive(serde::Deserialize)]
struct Line {
    #[serde(default)]
    kind: Option<String>,
    messages: Vec<ChatMessageIn>,
}

pub fn run(args: &EvaluateArgs) -> anyhow::Result<serde_json::Value> {
    let loaded = crate::load_model(&args.model, crate::model::WeightDType::F32, &Device::Cpu)?;
    let adapter = match &args.lora {
        Some(dir) => {
            let model = &loaded.model;
            let adapter = Adapter::load(
                "eval",
                dir,
                &model.adapter_layout(),
                usize::MAX,
                model.dtype(),
                model.device(),
            )?;
            Some(Arc::new(adapter))
        }
        None => None,
    };
    let text = std::fs::read_to_string(&args.data).with_context(|| args.data.display().to_string())?;
    let folder = args.data.parent().unwrap_or(Path::new("."));
    let limits = DataLimits {
        max_seq_len: usize::MAX,
        max_images: 64,
        max_image_bytes: 64 << 20,
        max_image_pixels: 100_000_000,
    };
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    let mut longest = 0;
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", args.data.display(), index + 1);
        let mut parsed: Line = serde_json::from_str(line).with_context(at)?;
        let answer = match parsed.messages.pop() {
            Some(ChatMessageIn {
                role,
                content: Some(MessageContent::Text(answer)),
                ..
            }) if role == "assistant" => answer,
            _ => anyhow::bail!("{}: the last message must be the assistant's answer, as text", at()),
        };
        let (messages, media) = validate::messages(&parsed.messages, &limits.messages()).with_context(at)?;
        let images = (media.images.iter())
            .map(|i| {
                let image =
                    read_image(&i.url, folder, &limits).map_err(|e| anyhow::anyhow!("{}: {}: {e}", at(), i.param))?;
                Ok(ImageInput { image, split: i.split })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let prompt = loaded.processor.process(&messages, &images).with_context(at)?;
        longest = longest.max(prompt.token_ids.len());
        let mut request = GenerationRequest::greedy(prompt, args.max_tokens);
        request.adapter = adapter.clone();
        requests.push(request);
        expected.push((parsed.kind.unwrap_or_else(|| "all".into()), answer));
    }
    anyhow::ensure!(!requests.is_empty(), "{}: no conversations", args.data.display());
    let config = EngineConfig {
        max_num_seqs: 64,
        max_batch_tokens: 4096.max(longest + 64),
        max_model_len: loaded.model.info().max_positions,
        vision_cache_bytes: 64 << 20,
        prefix_caching: true,
    };
    let blocks = 64 * blocks_for(longest + args.max_tokens);
    let tokenizer = loaded.processor.tokenizer().clone();
    let (_processor, mut engine) = loaded.into_engine(config, blocks)?;
    let (generations, _) = crate::engine::generate(&mut engine, requests, |_| {})?;
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (generation, (kind, answer)) in generations.iter().zip(&expected) {
        let got = tokenizer
            .decode(&generation.tokens, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
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
    Ok(serde_json::json!({"accuracy": accuracy, "first_wrong": wrong}))
}
