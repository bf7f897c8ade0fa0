//! `ocellus evaluate` on an embedding model: zero-shot classification and text-to-image
//! retrieval over image/caption pairs (`ocellus demo-data --captions` writes them). Each
//! line gives an image, its caption, and labels (captions that differ in one attribute)
//! with the index of the true one: the image is classified as the label nearest to it
//! (CLIP's zero-shot rule), per `kind`. Retrieval asks, for each caption, which of all the
//! images is nearest: a hit if that image has the same caption (recall@1).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;
use serde_json::{Value, json};

use crate::model::Pixels;
use crate::model::embedding::EmbeddingModel;
use crate::processor::embed::EmbedProcessor;
use crate::processor::local::{LocalImageLimits, read_image};

#[derive(serde::Deserialize)]
struct Line {
    kind: String,
    image: String,
    text: String,
    labels: Vec<String>,
    label: usize,
}

/// Images and texts embedded this many at a time.
const BATCH: usize = 32;

pub fn evaluate(model: &dyn EmbeddingModel, processor: &EmbedProcessor, data: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(data).with_context(|| data.display().to_string())?;
    let lines: Vec<Line> = (text.lines().enumerate())
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", data.display(), i + 1)))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!lines.is_empty(), "{}: no pairs", data.display());
    let folder = data.parent().unwrap_or(Path::new("."));
    let limits = LocalImageLimits {
        max_bytes: 20 << 20,
        max_pixels: 40_000_000,
    };
    let pixels: Vec<Pixels> = (lines.iter())
        .map(|l| {
            let image = read_image(&l.image, folder, &limits).map_err(anyhow::Error::msg)?;
            Ok(processor.preprocess_image(&image).map_err(anyhow::Error::msg)?.0)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut images = Vec::new();
    for chunk in pixels.chunks(BATCH) {
        images.push(model.embed_images(&chunk.iter().collect::<Vec<_>>())?);
    }
    let images = Tensor::cat(&images, 0)?;
    // Every distinct text once.
    let mut texts: Vec<&str> = lines
        .iter()
        .flat_map(|l| l.labels.iter().chain([&l.text]))
        .map(String::as_str)
        .collect();
    texts.sort_unstable();
    texts.dedup();
    let ids = (texts.iter())
        .map(|t| Ok(processor.tokenize(t, true)?.ids))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut embedded = Vec::new();
    for chunk in ids.chunks(BATCH) {
        embedded.push(model.embed_texts(&chunk.iter().map(Vec::as_slice).collect::<Vec<_>>())?);
    }
    let similarity = images.matmul(&Tensor::cat(&embedded, 0)?.t()?)?.to_vec2::<f32>()?;
    let column = |t: &str| {
        texts
            .binary_search(&t)
            .expect("every text was embedded. This is a bug.")
    };
    let best = |scores: &mut dyn Iterator<Item = f32>| {
        (scores.enumerate())
            .fold((0, f32::NEG_INFINITY), |b, (i, s)| if s > b.1 { (i, s) } else { b })
            .0
    };
    let mut per_kind: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let row = &similarity[i];
        let picked = best(&mut line.labels.iter().map(|l| row[column(l)]));
        let query = column(&line.text);
        let retrieved = best(&mut similarity.iter().map(|r| r[query]));
        let counts = per_kind.entry(&line.kind).or_default();
        counts[0] += (picked == line.label) as usize;
        counts[1] += (lines[retrieved].text == line.text) as usize;
        counts[2] += 1;
    }
    let ratio = |hits: usize, n: usize| hits as f64 / n.max(1) as f64;
    let kinds: serde_json::Map<String, Value> = (per_kind.iter())
        .map(|(kind, c)| {
            let report =
                json!({ "zero_shot_accuracy": ratio(c[0], c[2]), "recall_at_1": ratio(c[1], c[2]), "count": c[2] });
            (kind.to_string(), report)
        })
        .collect();
    let total = |k: usize| per_kind.values().map(|c| c[k]).sum::<usize>();
    Ok(json!({
        "pairs": lines.len(),
        "zero_shot_accuracy": ratio(total(0), lines.len()),
        "recall_at_1": ratio(total(1), lines.len()),
        "per_kind": kinds,
    }))
}
