//! `ocellus finetune`: supervised fine-tuning of a SmolVLM on JSONL conversations, with
//! LoRA or every weight, on candle's autograd. As TRL's SFTTrainer: loss on assistant
//! tokens only, AdamW with a linearly decaying learning rate, gradient clipping and
//! accumulation, an eval loss per epoch, checkpoints that resume exactly.

pub mod adamw;
pub mod contrastive;
pub mod contrastive_model;
pub mod data;
pub mod evaluate;
pub mod save;
pub mod synthetic;
pub mod text;
pub mod vision;
pub mod zero_shot;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{FinetuneArgs, FinetuneMethod};
use crate::model::smolvlm::SmolVlmConfig;
use crate::model::weights::SafetensorsWeights;
use crate::model::{ModelFiles, Pixels, VisionLanguageModel};
use crate::processor::Processor;
use adamw::{AdamW, AdamWParams};
use data::{DataLimits, Example};
use text::{LoraSpec, Method, Sequence, TrainText, Trainable};

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct TrainerState {
    /// Optimizer steps done.
    step: usize,
    epoch: usize,
    /// Accumulation groups of `epoch` done.
    group: usize,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub steps: usize,
    /// Mean assistant-token loss of the first and the last optimizer step.
    pub first_loss: f64,
    pub last_loss: f64,
    /// Eval loss before training (unless resumed), after each epoch, and at the end.
    pub eval_losses: Vec<f64>,
}

/// The families `finetune` trains: SmolVLM's decoder and vision encoder have a training
/// form (`text`, `vision`); Qwen3-VL's do not yet.
const TRAINABLE: &[&str] = &["Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"];

pub fn finetune(args: &FinetuneArgs) -> anyhow::Result<Summary> {
    if args.method == FinetuneMethod::Contrastive {
        return contrastive::finetune(args);
    }
    // The served model's vision encoder gives the features a LoRA run trains on.
    let files = ModelFiles::locate(Path::new(&args.model))?;
    let family = crate::model::registry::family(&files)?;
    if !TRAINABLE.contains(&family.architectures[0]) {
        anyhow::bail!(
            "{}: fine-tuning {} is not supported yet (Ocellus trains {}); the model can be served",
            files.config.display(),
            family.architectures[0],
            TRAINABLE.join(", ")
        )
    }
    let served = crate::model::load(&files, DType::F32, &Device::Cpu)?;
    let processor = Processor::load(&files, served.info())?;
    let limits = DataLimits {
        max_seq_len: args.max_seq_len.min(served.info().max_positions),
        max_images: args.max_images,
        max_image_bytes: args.max_image_size.as_u64() as usize,
        max_image_pixels: args.max_image_pixels,
    };
    let train = data::load(&args.data, &processor, &limits)?;
    let eval = args
        .eval
        .as_ref()
        .map(|f| data::load(f, &processor, &limits))
        .transpose()?;
    let method = method(args)?;
    let config = SmolVlmConfig::load(&files.config)?;
    let (train_vision, model, trainables) = build(&config, &files, &method, args.seed)?;
    let vars: Vec<Var> = trainables.iter().map(|t| t.var.clone()).collect();
    let params = AdamWParams {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: args.weight_decay,
    };
    let mut optimizer = AdamW::new(&vars, params)?;
    let mut state = TrainerState {
        step: 0,
        epoch: 0,
        group: 0,
    };
    if let Some(dir) = &args.resume {
        state = resume(dir, &trainables, &mut optimizer)?;
        tracing::info!(step = state.step, epoch = state.epoch, "resumed");
    }
    let trainer = Trainer {
        args,
        model: &model,
        vision: served.as_ref(),
        train_vision: train_vision.as_ref(),
        image_token: config.image_token_id,
    };
    let mut run = Run {
        trainer: &trainer,
        method: &method,
        files: &files,
        trainables: &trainables,
        vars: &vars,
        optimizer,
        state,
        summary: Summary::default(),
        evaluated_at: None,
    };
    run.train(&train, eval.as_deref())?;
    write_output(&args.out, args, &method, &files, &trainables)?;
    eprintln!("saved to {}", args.out.display());
    Ok(run.summary)
}

/// The models a run trains: the text model with the method's trainable weights and, under
/// `--method full`, the vision encoder and connector too.
fn build(
    config: &SmolVlmConfig,
    files: &ModelFiles,
    method: &Method,
    seed: u64,
) -> anyhow::Result<(Option<vision::TrainVision>, TrainText, Vec<Trainable>)> {
    let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(DType::F32, &Device::Cpu);
    let (train_vision, mut trainables) = match method {
        Method::Full => {
            let hidden = config.text_config.hidden_size;
            let (vision, vars) = vision::TrainVision::new(&config.vision_config, config.scale_factor, hidden, &vb)?;
            (Some(vision), vars)
        }
        Method::Lora(_) => (None, Vec::new()),
    };
    let (model, text) = TrainText::new(&config.text_config, config.tie_word_embeddings, vb, method, seed)?;
    trainables.extend(text);
    Ok((train_vision, model, trainables))
}

/// A run under way: the optimizer, where it stands, and what it measured.
struct Run<'a> {
    trainer: &'a Trainer<'a>,
    method: &'a Method,
    files: &'a ModelFiles,
    trainables: &'a [Trainable],
    vars: &'a [Var],
    optimizer: AdamW,
    state: TrainerState,
    summary: Summary,
    /// The step of the last eval loss, so that a run ending mid-epoch reports one too.
    evaluated_at: Option<usize>,
}

impl Run<'_> {
    /// Epochs over `train` up to `--epochs` or `--max-steps`, with eval losses before (unless
    /// resumed), after each epoch and at the end.
    fn train(&mut self, train: &[Example], eval: Option<&[Example]>) -> anyhow::Result<()> {
        let args = self.trainer.args;
        let per_step = args.batch_size.max(1) * args.gradient_accumulation_steps.max(1);
        let total_steps = args.max_steps.unwrap_or(train.len().div_ceil(per_step) * args.epochs);
        let trainable: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        eprintln!(
            "{} training and {} eval examples; {trainable} trainable parameters; {total_steps} steps",
            train.len(),
            eval.map_or(0, <[Example]>::len)
        );
        if let Some(eval) = eval
            && args.resume.is_none()
        {
            let loss = self.evaluate(eval)?;
            eprintln!("eval loss before training: {loss:.4}");
        }
        let progress = indicatif::ProgressBar::new(total_steps as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
                .expect("a valid template. This is a bug."),
        );
        progress.set_position(self.state.step as u64);
        let mut throughput = (Instant::now(), 0usize);
        while self.state.epoch < args.epochs && self.state.step < total_steps {
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                args.seed ^ (self.state.epoch as u64 + 1),
            ));
            let groups: Vec<&[usize]> = order.chunks(per_step).collect();
            while self.state.group < groups.len() && self.state.step < total_steps {
                let batch: Vec<&Example> = groups[self.state.group].iter().map(|&i| &train[i]).collect();
                self.step(&batch, total_steps, &mut throughput, &progress)?;
            }
            if self.state.group < groups.len() {
                break;
            }
            self.state.epoch += 1;
            self.state.group = 0;
            if let Some(eval) = eval {
                let loss = self.evaluate(eval)?;
                say(&progress, format!("epoch {}: eval loss {loss:.4}", self.state.epoch));
            }
        }
        if let Some(eval) = eval
            && self.evaluated_at != Some(self.state.step)
        {
            let loss = self.evaluate(eval)?;
            say(&progress, format!("step {}: eval loss {loss:.4}", self.state.step));
        }
        progress.finish_and_clear();
        Ok(())
    }

    /// One optimizer step over `batch`, with its progress, log line and checkpoint.
    fn step(
        &mut self,
        batch: &[&Example],
        total_steps: usize,
        (started, tokens_seen): &mut (Instant, usize),
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        let args = self.trainer.args;
        let state = &mut self.state;
        let lr = learning_rate(args.lr, args.warmup_steps, total_steps, state.step);
        let loss = self
            .trainer
            .step(batch, self.vars, &mut self.optimizer, lr, state.step)?;
        state.step += 1;
        state.group += 1;
        *tokens_seen += batch.iter().map(|e| e.token_ids.len()).sum::<usize>();
        let summary = &mut self.summary;
        if summary.steps == 0 {
            summary.first_loss = loss;
        }
        summary.last_loss = loss;
        summary.steps += 1;
        let rate = *tokens_seen as f64 / started.elapsed().as_secs_f64();
        progress.set_message(format!("loss {loss:.4} lr {lr:.2e} {rate:.0} tokens/s"));
        progress.set_position(state.step as u64);
        if progress.is_hidden() && state.step.is_multiple_of(args.logging_steps.max(1)) {
            eprintln!(
                "step {} epoch {} loss {loss:.4} lr {lr:.2e} {rate:.0} tokens/s",
                state.step, state.epoch
            );
        }
        let state = *state;
        checkpoint(
            args,
            self.method,
            self.files,
            self.trainables,
            &self.optimizer,
            state,
            progress,
        )
    }

    /// The eval loss now, recorded.
    fn evaluate(&mut self, eval: &[Example]) -> anyhow::Result<f64> {
        let loss = self.trainer.eval_loss(eval)?;
        self.summary.eval_losses.push(loss);
        self.evaluated_at = Some(self.state.step);
        Ok(loss)
    }
}

/// A line above the progress bar, or on stderr where there is no bar (no terminal).
fn say(progress: &indicatif::ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

/// A checkpoint every `--save-steps` steps.
fn checkpoint(
    args: &FinetuneArgs,
    method: &Method,
    files: &ModelFiles,
    trainables: &[Trainable],
    optimizer: &AdamW,
    state: TrainerState,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let Some(every) = args.save_steps.filter(|&n| n > 0) else {
        return Ok(());
    };
    if !state.step.is_multiple_of(every) {
        return Ok(());
    }
    let dir = args.out.join(format!("checkpoint-{}", state.step));
    write_output(&dir, args, method, files, trainables)?;
    optimizer.save(&dir.join("optimizer.safetensors"))?;
    let file = dir.join("trainer_state.json");
    std::fs::write(&file, serde_json::to_string(&state)?).with_context(|| file.display().to_string())?;
    say(progress, format!("checkpoint {}", dir.display()));
    Ok(())
}

fn write_output(
    dir: &Path,
    args: &FinetuneArgs,
    method: &Method,
    files: &ModelFiles,
    trainables: &[Trainable],
) -> anyhow::Result<()> {
    match method {
        Method::Lora(spec) => save::save_adapter(dir, spec, &base_name(&args.model), trainables),
        Method::Full => save::save_full(dir, files, trainables),
    }
}

/// The base model as an adapter's config names it: a folder by its own name.
fn base_name(model: &str) -> String {
    let path = Path::new(model);
    path.file_name()
        .map_or_else(|| model.to_string(), |n| n.to_string_lossy().into_owned())
}

/// Restores the trainables, the optimizer and the position from a checkpoint folder.
fn resume(dir: &Path, trainables: &[Trainable], optimizer: &mut AdamW) -> anyhow::Result<TrainerState> {
    let state_file = dir.join("trainer_state.json");
    let state: TrainerState =
        serde_json::from_str(&std::fs::read_to_string(&state_file).with_context(|| state_file.display().to_string())?)
            .with_context(|| state_file.display().to_string())?;
    let weights: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && !p.ends_with("optimizer.safetensors"))
        .collect();
    let mut tensors = std::collections::HashMap::new();
    for file in &weights {
        tensors.extend(candle_core::safetensors::load(file, &Device::Cpu).with_context(|| file.display().to_string())?);
    }
    for t in trainables {
        let saved = (tensors.get(&t.name)).with_context(|| format!("{}: no tensor `{}`", dir.display(), t.name))?;
        anyhow::ensure!(
            saved.shape() == t.var.shape(),
            "{}: `{}` is {:?}, this run's is {:?} (same flags as the run that wrote it?)",
            dir.display(),
            t.name,
            saved.shape(),
            t.var.shape()
        );
        t.var.set(&saved.to_dtype(DType::F32)?)?;
    }
    optimizer.load(&dir.join("optimizer.safetensors"))?;
    Ok(state)
}

fn method(args: &FinetuneArgs) -> anyhow::Result<Method> {
    Ok(match args.method {
        FinetuneMethod::Full => Method::Full,
        FinetuneMethod::Contrastive => {
            anyhow::bail!("--method contrastive trains embedding models (train::contrastive)")
        }
        FinetuneMethod::Lora => {
            anyhow::ensure!(args.lora_r > 0, "--lora-r must be at least 1");
            anyhow::ensure!(
                (0.0..1.0).contains(&args.lora_dropout),
                "--lora-dropout must be in [0, 1)"
            );
            for t in &args.lora_target_modules {
                anyhow::ensure!(
                    save::LORA_MODULES.contains(&t.as_str()),
                    "--lora-target-modules: `{t}` is not one of {}",
                    save::LORA_MODULES.join(", ")
                );
            }
            Method::Lora(LoraSpec {
                rank: args.lora_r,
                alpha: args.lora_alpha,
                dropout: args.lora_dropout,
                targets: args.lora_target_modules.clone(),
            })
        }
    })
}

/// transformers' linear schedule: warmup from 0, then down to 0 at the last step.
fn learning_rate(peak: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    peak * (total.saturating_sub(step)) as f64 / (total - warmup).max(1) as f64
}

struct Trainer<'a> {
    args: &'a FinetuneArgs,
    model: &'a TrainText,
    vision: &'a dyn VisionLanguageModel,
    /// The trainable encoder (`--method full`); otherwise the serving model's, frozen.
    train_vision: Option<&'a vision::TrainVision>,
    image_token: u32,
}

impl Trainer<'_> {
    /// The sequences of `examples` with their image features: one vision forward for all
    /// their tiles, split back per example.
    fn sequences<'e>(&self, examples: &[&'e Example]) -> anyhow::Result<Vec<Sequence<'e>>> {
        let pixels: Vec<Tensor> = examples.iter().filter_map(|e| e.pixel_values.clone()).collect();
        let mut features = if pixels.is_empty() {
            None
        } else {
            let pixels = Tensor::cat(&pixels, 0)?;
            let rows = match self.train_vision {
                Some(vision) => vision.forward(&pixels)?,
                None => {
                    let tiles = Pixels {
                        values: pixels.clone(),
                        grid: None,
                    };
                    let mut encoded = self.vision.encode_images(&[&tiles])?;
                    encoded.remove(0).embeds.detach()
                }
            };
            Some((rows.dim(0)? / pixels.dim(0)?, rows, 0))
        };
        let mut seqs = Vec::with_capacity(examples.len());
        for e in examples {
            let own = match (&e.pixel_values, &mut features) {
                (Some(p), Some((per_tile, rows, offset))) => {
                    let n = p.dim(0)? * *per_tile;
                    let own = rows.narrow(0, *offset, n)?;
                    *offset += n;
                    Some(own)
                }
                _ => None,
            };
            seqs.push(Sequence {
                ids: &e.token_ids,
                targets: &e.targets,
                features: own,
            });
        }
        Ok(seqs)
    }

    /// One optimizer step over `batch`, `--batch-size` sequences per forward; returns its
    /// mean loss per target token.
    fn step(
        &self,
        batch: &[&Example],
        vars: &[Var],
        optimizer: &mut AdamW,
        lr: f64,
        step: usize,
    ) -> anyhow::Result<f64> {
        let targets: usize = batch.iter().map(|e| e.target_count()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut total = 0.0;
        let mut rng = ChaCha8Rng::seed_from_u64(self.args.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step as u64));
        for chunk in batch.chunks(self.args.batch_size.max(1)) {
            let lines = || chunk.iter().map(|e| e.line.to_string()).collect::<Vec<_>>().join(", ");
            let seqs = self.sequences(chunk).with_context(|| format!("lines {}", lines()))?;
            let (loss, _) = (self.model.loss(&seqs, self.image_token, Some(&mut rng)))
                .with_context(|| format!("lines {}", lines()))?;
            let scaled = (loss / targets as f64)?;
            total += scaled.to_scalar::<f32>()? as f64;
            let store = scaled.backward()?;
            for (slot, var) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let grads: Vec<Tensor> = (grads.into_iter().zip(vars))
            .map(|(g, v)| g.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grads = clip(grads, self.args.max_grad_norm)?;
        optimizer.step(vars, &grads, lr)?;
        Ok(total)
    }

    /// Mean loss per target token over `examples`, without dropout.
    fn eval_loss(&self, examples: &[Example]) -> anyhow::Result<f64> {
        let (mut sum, mut count) = (0.0, 0);
        let all: Vec<&Example> = examples.iter().collect();
        for chunk in all.chunks(self.args.batch_size.max(1)) {
            let seqs = self.sequences(chunk)?;
            let (loss, n) = self.model.loss(&seqs, self.image_token, None)?;
            sum += loss.to_scalar::<f32>()? as f64;
            count += n;
        }
        Ok(sum / count.max(1) as f64)
    }
}

/// Scales the gradients down to a global L2 norm of `max_norm` (0: no clipping).
fn clip(grads: Vec<Tensor>, max_norm: f64) -> candle_core::Result<Vec<Tensor>> {
    if max_norm <= 0.0 {
        return Ok(grads);
    }
    let mut squares = 0.0;
    for g in &grads {
        squares += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = squares.sqrt();
    if norm <= max_norm {
        return Ok(grads);
    }
    let factor = max_norm / (norm + 1e-6);
    grads.into_iter().map(|g| g * factor).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_falls_linearly_to_zero() {
        assert_eq!(learning_rate(1.0, 0, 4, 0), 1.0);
        assert_eq!(learning_rate(1.0, 0, 4, 2), 0.5);
        assert_eq!(learning_rate(1.0, 2, 6, 1), 0.5);
        assert_eq!(learning_rate(1.0, 2, 6, 4), 0.5);
        assert_eq!(learning_rate(1.0, 2, 6, 6), 0.0);
    }

    #[test]
    fn clipping_keeps_the_direction_and_caps_the_norm() -> candle_core::Result<()> {
        let g = vec![Tensor::new(&[3f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?];
        let clipped = clip(g, 1.0)?;
        let (a, b) = (clipped[0].to_vec1::<f32>()?[0], clipped[1].to_vec1::<f32>()?[0]);
        assert!((a - 0.6).abs() < 1e-5 && (b - 0.8).abs() < 1e-5, "{a} {b}");
        Ok(())
    }
}
