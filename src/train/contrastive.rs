//! `ocellus finetune --method contrastive`: a CLIP or SigLIP trained on image/caption
//! pairs with in-batch negatives — CLIP's symmetric InfoNCE with its learned temperature,
//! SigLIP's pairwise sigmoid loss with its learned bias — every weight or LoRA pairs
//! (merged into the weights when saved), AdamW with warmup and linear decay, gradient
//! clipping. The output is a model folder transformers loads as it loads the base.
//!
//! Data: JSONL, one pair per line, `{"image": "photos/1.png", "text": "a red square"}`, or
//! a conversation in the fine-tuning format whose first image is the image and whose
//! assistant reply (else its user text) is the caption. Images are paths relative to the
//! file's folder, `file://` URLs or `data:` URIs.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::Summary;
use super::adamw::{AdamW, AdamWParams};
use super::contrastive_model::{Params, TrainClip, TrainContrastive, TrainSiglip, Weights};
use super::text::Trainable;
use crate::config::{ContrastiveWeights, FinetuneArgs};
use crate::model::weights::SafetensorsWeights;
use crate::model::{ModelFiles, registry};
use crate::processor::embed::EmbedProcessor;
use crate::processor::local::{LocalImageLimits, read_image};

/// One pair, ready for the towers.
pub struct Pair {
    pub pixels: Tensor,
    pub ids: Vec<u32>,
}

pub fn finetune(args: &FinetuneArgs) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        args.resume.is_none() && args.save_steps.is_none() && !args.gradient_checkpointing,
        "--resume, --save-steps and --gradient-checkpointing are not supported with --method contrastive yet"
    );
    anyhow::ensure!(
        args.batch_size >= 2,
        "--batch-size must be at least 2: the batch's other pairs are the negatives"
    );
    let files = ModelFiles::locate(&super::model_dir(&args.model)?)?;
    let family = registry::embedding_family(&files)?;
    let processor = EmbedProcessor::load(&files)?;
    let limits = LocalImageLimits {
        max_bytes: args.max_image_size.as_u64() as usize,
        max_pixels: args.max_image_pixels,
    };
    let train = load(&args.data, &processor, &limits)?;
    let eval = args.eval.as_ref().map(|f| load(f, &processor, &limits)).transpose()?;
    let (model, params) = build(args, &files, family.architectures[0])?;
    let vars: Vec<Var> = params.trainables.iter().map(|t| t.var.clone()).collect();
    let adam = AdamWParams {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: args.weight_decay,
    };
    let mut optimizer = AdamW::new(&vars, adam)?;
    let batch = args.batch_size;
    let total = args.max_steps.unwrap_or(train.len() / batch * args.epochs).max(1);
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    eprintln!(
        "{} training pairs, {} eval; {trainable} trainable parameters; {total} steps of {batch}",
        train.len(),
        eval.as_ref().map_or(0, Vec::len)
    );
    let mut summary = Summary::default();
    if let Some(eval) = &eval {
        summary.eval_losses.push(evaluate(&model, eval, batch)?);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = Vec::new();
    while summary.steps < total {
        if order.len() < batch {
            order = (0..train.len()).collect();
            order.shuffle(&mut rng);
        }
        let picked: Vec<&Pair> = order
            .split_off(order.len() - batch)
            .iter()
            .map(|&i| &train[i])
            .collect();
        let loss = batch_loss(&model, &picked)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let mut grads: Vec<Tensor> = (vars.iter())
            .map(|v| grads.get(v).cloned().map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        clip_gradients(&mut grads, args.max_grad_norm)?;
        optimizer.step(&vars, &grads, learning_rate(args, summary.steps, total))?;
        if summary.steps == 0 {
            summary.first_loss = value;
        }
        summary.steps += 1;
        summary.last_loss = value;
        if summary.steps % args.logging_steps.max(1) == 0 || summary.steps == total {
            eprintln!("step {}/{total}: loss {value:.4}", summary.steps);
        }
        let epoch_end = summary.steps % (train.len() / batch).max(1) == 0;
        if let (Some(eval), true) = (&eval, epoch_end || summary.steps == total) {
            let loss = evaluate(&model, eval, batch)?;
            eprintln!("eval loss: {loss:.4}");
            summary.eval_losses.push(loss);
        }
    }
    save(&args.out, &files, &params)?;
    eprintln!("saved to {}", args.out.display());
    Ok(summary)
}

/// The trainable model of a CLIP or SigLIP folder, and what it trains.
fn build(args: &FinetuneArgs, files: &ModelFiles, architecture: &str) -> anyhow::Result<(TrainContrastive, Params)> {
    let weights = match args.contrastive_weights {
        ContrastiveWeights::Full => Weights::Full,
        ContrastiveWeights::Lora => Weights::Lora {
            r: args.lora_r,
            alpha: args.lora_alpha,
        },
    };
    let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(DType::F32, &Device::Cpu);
    let mut params = Params::new(vb, weights, args.seed);
    let model = match architecture {
        "CLIPModel" => TrainContrastive::Clip(TrainClip::new(
            &crate::model::clip::ClipConfig::load(&files.config)?,
            &mut params,
        )?),
        "SiglipModel" => TrainContrastive::Siglip(TrainSiglip::new(
            &crate::model::siglip::SiglipConfig::load(&files.config)?,
            &mut params,
        )?),
        other => anyhow::bail!("contrastive fine-tuning trains CLIPModel and SiglipModel, not {other}"),
    };
    Ok((model, params))
}

/// The loss of a batch of pairs against each other.
fn batch_loss(model: &TrainContrastive, pairs: &[&Pair]) -> candle_core::Result<Tensor> {
    let pixels = Tensor::cat(&pairs.iter().map(|p| &p.pixels).collect::<Vec<_>>(), 0)?;
    let ids: Vec<Vec<u32>> = pairs.iter().map(|p| p.ids.clone()).collect();
    let n = ids.len();
    let duplicates: Vec<f32> = (0..n * n)
        .map(|k| (k / n != k % n && ids[k / n] == ids[k % n]) as u8 as f32)
        .collect();
    let duplicates = Tensor::from_vec(duplicates, (n, n), pixels.device())?;
    model.loss(&model.images(&pixels)?, &model.texts(&ids)?, &duplicates)
}

/// The mean loss over batches of the eval pairs (a last partial batch of 2 or more too).
fn evaluate(model: &TrainContrastive, eval: &[Pair], batch: usize) -> candle_core::Result<f64> {
    let mut total = (0.0, 0);
    for chunk in eval.chunks(batch).filter(|c| c.len() >= 2) {
        let pairs: Vec<&Pair> = chunk.iter().collect();
        total.0 += batch_loss(model, &pairs)?.to_scalar::<f32>()? as f64;
        total.1 += 1;
    }
    Ok(total.0 / total.1.max(1) as f64)
}

/// Warmup from 0, then linear decay to 0, as transformers' default schedule.
fn learning_rate(args: &FinetuneArgs, step: usize, total: usize) -> f64 {
    if step < args.warmup_steps {
        return args.lr * (step + 1) as f64 / args.warmup_steps as f64;
    }
    let left = total.saturating_sub(step) as f64 / total.saturating_sub(args.warmup_steps).max(1) as f64;
    args.lr * left
}

/// Scales the gradients so that their global L2 norm is at most `max` (PyTorch's
/// `clip_grad_norm_`).
fn clip_gradients(grads: &mut [Tensor], max: f64) -> candle_core::Result<()> {
    let mut sum = 0.0;
    for g in grads.iter() {
        sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sum.sqrt();
    if max > 0.0 && norm > max {
        let scale = max / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(())
}

/// Reads every pair of a JSONL file; an error names the file and line.
pub fn load(file: &Path, processor: &EmbedProcessor, limits: &LocalImageLimits) -> anyhow::Result<Vec<Pair>> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let folder = file.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let pair = parse(line, folder, processor, limits)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), index + 1))?;
        pairs.push(pair);
    }
    anyhow::ensure!(pairs.len() >= 2, "{}: fewer than two pairs", file.display());
    Ok(pairs)
}

fn parse(line: &str, folder: &Path, processor: &EmbedProcessor, limits: &LocalImageLimits) -> Result<Pair, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let (url, caption) = match (&value["image"], &value["text"], &value["messages"]) {
        (Value::String(url), Value::String(text), _) => (url.clone(), text.clone()),
        (_, _, Value::Array(messages)) => from_messages(messages)?,
        _ => return Err("neither {\"image\", \"text\"} nor `messages`".into()),
    };
    let image = read_image(&url, folder, limits)?;
    let (pixels, _) = processor.preprocess_image(&image)?;
    let text = processor.tokenize(&caption, true).map_err(|e| e.to_string())?;
    Ok(Pair {
        pixels: pixels.values,
        ids: text.ids,
    })
}

/// The first image of a conversation and its caption: the assistant's reply, else the
/// user's text.
fn from_messages(messages: &[Value]) -> Result<(String, String), String> {
    let parts = |m: &Value| -> Vec<Value> {
        match &m["content"] {
            Value::String(s) => vec![serde_json::json!({"type": "text", "text": s})],
            Value::Array(parts) => parts.clone(),
            _ => Vec::new(),
        }
    };
    let url = (messages.iter().flat_map(parts))
        .find_map(|p| p["image_url"]["url"].as_str().map(str::to_string))
        .ok_or("the conversation has no image")?;
    let text_of = |role: &str| -> Option<String> {
        let texts: Vec<String> = (messages.iter().filter(|m| m["role"] == role).flat_map(parts))
            .filter_map(|p| p["text"].as_str().map(str::to_string))
            .collect();
        (!texts.is_empty()).then(|| texts.join(" "))
    };
    let caption = text_of("assistant")
        .or_else(|| text_of("user"))
        .ok_or("the conversation has no caption")?;
    Ok((url, caption))
}

/// The base folder with the trained weights in place (LoRA pairs merged).
fn save(dir: &Path, base: &ModelFiles, params: &Params) -> anyhow::Result<()> {
    let mut saved: Vec<Trainable> = (params.trainables.iter())
        .filter(|t| !t.name.ends_with(".lora_A") && !t.name.ends_with(".lora_B"))
        .map(|t| Trainable {
            name: t.name.clone(),
            var: t.var.clone(),
        })
        .collect();
    for (name, weight, a, b, scale) in &params.merges {
        let merged = (weight + (b.matmul(a)? * *scale)?)?;
        saved.push(Trainable {
            name: name.clone(),
            var: Var::from_tensor(&merged)?,
        });
    }
    super::save::save_full(dir, base, &saved)
}
