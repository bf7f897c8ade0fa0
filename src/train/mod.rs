//! `ocellus finetune`: supervised fine-tuning of a SmolVLM on JSONL conversations, with
//! LoRA or every weight, on candle's autograd. As TRL's SFTTrainer: loss on assistant
//! tokens only, AdamW with a linearly decaying learning rate, gradient clipping and
//! accumulation, an eval loss per epoch, checkpoints that resume exactly.

pub mod adamw;
pub mod checkpoint;
pub mod columns;
pub mod contrastive;
pub mod contrastive_model;
pub mod data;
pub mod dataset;
pub mod dpo;
pub mod evaluate;
pub mod frozen;
pub mod layers;
mod method;
pub mod preference;
pub mod save;
pub mod softmax;
pub mod synthetic;
pub mod text;
mod trainer;
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
use crate::model::{ModelFiles, VisionLanguageModel};
use crate::processor::Processor;
use adamw::{AdamW, AdamWParams};
use data::{DataLimits, Example};
use dataset::Dataset;
use method::{checkpointing, method, trains_vision};
use preference::Pair;
use text::{Method, TrainText, Trainable};
use trainer::{Item, Trainer};

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
    /// Each step's loss.
    pub losses: Vec<f64>,
    /// Under `--method dpo`: each step's rewards, accuracy, margin and log-probabilities.
    pub preference: Vec<dpo::Means>,
    /// Tokens the optimizer steps saw, and the seconds they took (evaluation apart).
    pub tokens: usize,
    pub step_seconds: f64,
}

/// What a run trains on, with its held-out part.
enum Data {
    Conversations(Vec<Example>, Option<Vec<Example>>),
    Pairs(Vec<Pair>, Option<Vec<Pair>>),
}

/// The families `finetune` trains: SmolVLM's decoder and vision encoder have a training
/// form (`text`, `vision`); Qwen3-VL's do not yet.
const TRAINABLE: &[&str] = &["Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"];

pub fn finetune(args: &FinetuneArgs) -> anyhow::Result<Summary> {
    if args.method == FinetuneMethod::Contrastive {
        return contrastive::finetune(args);
    }
    let files = trainable_files(args)?;
    // The served model's vision encoder gives the features a text-only LoRA run trains on.
    let served = served_model(args, &files)?;
    let processor = Processor::load(&files, served.info())?;
    let limits = DataLimits {
        max_seq_len: args.max_seq_len.min(served.info().max_positions),
        max_images: args.max_images,
        max_image_bytes: args.max_image_size.as_u64() as usize,
        max_image_pixels: args.max_image_pixels,
    };
    let data = load_data(args, &processor, &limits)?;
    let method = method(args)?;
    let config = SmolVlmConfig::load(&files.config)?;
    // Where the encoder trains, the served copy's weights would only take memory.
    let served = (!trains_vision(&method)).then_some(served);
    let (train_vision, model, trainables) = build(&config, &files, &method, args.seed, checkpointing(args))?;
    init_lora(args, &method, &trainables)?;
    let vars: Vec<Var> = trainables.iter().map(|t| t.var.clone()).collect();
    let params = AdamWParams {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: args.weight_decay,
    };
    let optimizer = AdamW::new(&vars, params)?;
    let trainer = Trainer {
        args,
        model: &model,
        vision: served.as_deref(),
        train_vision: train_vision.as_ref(),
        image_token: config.image_token_id,
        preference: (args.method == FinetuneMethod::Dpo).then_some(dpo::Preference::of(args)),
    };
    let mut run = Run {
        trainer: &trainer,
        method: &method,
        files: &files,
        trainables: &trainables,
        vars: &vars,
        optimizer,
        state: TrainerState {
            step: 0,
            epoch: 0,
            group: 0,
        },
        summary: Summary::default(),
        evaluated_at: None,
    };
    match data {
        Data::Conversations(mut train, mut eval) => {
            trainer.encode_frozen(train.iter_mut().chain(eval.iter_mut().flatten()))?;
            run.resume()?;
            run.train(&train, eval.as_deref())?;
        }
        Data::Pairs(mut train, mut eval) => {
            trainer.encode_frozen(sides(&mut train).chain(eval.iter_mut().flat_map(|e| sides(e))))?;
            // The reference is the model before any step: scored before a checkpoint loads.
            trainer.score_references(&mut train)?;
            if let Some(eval) = &mut eval {
                trainer.score_references(eval)?;
            }
            run.resume()?;
            run.train(&train, eval.as_deref())?;
        }
    }
    write_output(&args.out, args, &method, &files, &trainables)?;
    eprintln!("saved to {}", args.out.display());
    report(&run.summary);
    Ok(run.summary)
}

/// Both completions of every pair.
fn sides(pairs: &mut [Pair]) -> impl Iterator<Item = &mut Example> {
    (pairs.iter_mut()).flat_map(|Pair { chosen, rejected, .. }| [chosen, rejected])
}

/// The model as the server loads it, for its vision encoder (and the processor's facts).
/// Under --quantize its text layers, which the run does not use, shrink to Q8_0. (Its vision
/// encoder stays f32: in bf16 it saved 230 MB of 5 GB on SmolVLM-256M's shapes but halved
/// the tokens/s on an AVX2 machine, as image features are most of a LoRA step's work.)
fn served_model(args: &FinetuneArgs, files: &ModelFiles) -> anyhow::Result<Box<dyn VisionLanguageModel>> {
    let mut served = crate::model::load(files, DType::F32, &Device::Cpu)?;
    if args.quantize.is_some() {
        served.quantize_text(crate::model::Quantization::Q8_0)?;
    }
    Ok(served)
}

/// `--model`'s folder: a local folder, a built-in demo model or a hub id (as `serve` takes it).
pub(crate) fn model_dir(model: &str) -> anyhow::Result<PathBuf> {
    use crate::model::hub;
    Ok(hub::resolve_model(
        model,
        &hub::cache_dir_from_env(),
        hub::offline_from_env(),
    )?)
}

/// The model folder of `--model`, if its family trains.
fn trainable_files(args: &FinetuneArgs) -> anyhow::Result<ModelFiles> {
    let files = ModelFiles::locate(&model_dir(&args.model)?)?;
    let family = crate::model::registry::family(&files)?;
    if !TRAINABLE.contains(&family.architectures[0]) {
        anyhow::bail!(
            "{}: fine-tuning {} is not supported yet (Ocellus trains {}); the model can be served",
            files.config.display(),
            family.architectures[0],
            TRAINABLE.join(", ")
        )
    }
    Ok(files)
}

/// The run's speed and memory, as the last lines of its log.
fn report(summary: &Summary) {
    let peak = peak_resident_bytes().map_or("unknown".into(), |b| format!("{} MiB", b >> 20));
    eprintln!(
        "{} tokens in {:.1} s of steps ({:.0} tokens/s); peak resident memory {peak}",
        summary.tokens,
        summary.step_seconds,
        summary.tokens as f64 / summary.step_seconds.max(1e-9)
    );
}

/// The process's peak resident set (Linux's VmHWM), what `--quantize` and
/// `--gradient-checkpointing` are there to lower.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `--data` and `--eval`: conversations, or preference pairs under `--method dpo`.
fn load_data(args: &FinetuneArgs, processor: &Processor, limits: &DataLimits) -> anyhow::Result<Data> {
    let columns = dataset::Columns::parse(&args.columns).map_err(|e| anyhow::anyhow!("--columns {e}"))?;
    let train = Dataset::open(&args.data, &args.split, &columns)?;
    let eval = (args.eval.as_deref())
        .map(|eval| Dataset::open(eval, &args.eval_split, &columns))
        .transpose()?;
    Ok(match args.method {
        FinetuneMethod::Dpo => {
            let load = |set: Dataset| preference::load(&set, processor, limits);
            Data::Pairs(load(train)?, eval.map(load).transpose()?)
        }
        _ => {
            let load = |set: Dataset| data::load(&set, processor, limits);
            Data::Conversations(load(train)?, eval.map(load).transpose()?)
        }
    })
}

/// The models a run trains: the text model with the method's trainable weights and, under
/// `--method full` or a LoRA reaching the vision encoder or connector, those too (else the
/// served model's frozen encoder gives the features).
fn build(
    config: &SmolVlmConfig,
    files: &ModelFiles,
    method: &Method,
    seed: u64,
    checkpointing: bool,
) -> anyhow::Result<(Option<vision::TrainVision>, TrainText, Vec<Trainable>)> {
    let vb = SafetensorsWeights::open(&files.weights)?.into_var_builder(DType::F32, &Device::Cpu);
    let mut builder = layers::Builder::new(method, seed);
    let train_vision = if trains_vision(method) {
        let hidden = config.text_config.hidden_size;
        let mut vision =
            vision::TrainVision::new(&config.vision_config, config.scale_factor, hidden, &vb, &mut builder)?;
        vision.checkpoint_layers(checkpointing);
        Some(vision)
    } else {
        None
    };
    let mut model = TrainText::new(&config.text_config, config.tie_word_embeddings, vb, &mut builder)?;
    model.checkpoint_layers(checkpointing);
    Ok((train_vision, model, builder.into_trainables()))
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
    /// Continues from `--resume`'s checkpoint, if given.
    fn resume(&mut self) -> anyhow::Result<()> {
        if let Some(dir) = &self.trainer.args.resume {
            self.state = resume(dir, self.trainables, &mut self.optimizer)?;
            tracing::info!(step = self.state.step, epoch = self.state.epoch, "resumed");
        }
        Ok(())
    }

    /// Epochs over `train` up to `--epochs` or `--max-steps`, with eval losses before (unless
    /// resumed), after each epoch and at the end.
    fn train<T: Item>(&mut self, train: &[T], eval: Option<&[T]>) -> anyhow::Result<()> {
        let args = self.trainer.args;
        let per_step = args.batch_size.max(1) * args.gradient_accumulation_steps.max(1);
        let total_steps = args.max_steps.unwrap_or(train.len().div_ceil(per_step) * args.epochs);
        let trainable: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        eprintln!(
            "{} training and {} eval examples; {trainable} trainable parameters; {total_steps} steps",
            train.len(),
            eval.map_or(0, <[T]>::len)
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
                let batch: Vec<&T> = groups[self.state.group].iter().map(|&i| &train[i]).collect();
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
    fn step<T: Item>(
        &mut self,
        batch: &[&T],
        total_steps: usize,
        (started, tokens_seen): &mut (Instant, usize),
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        let args = self.trainer.args;
        let state = &mut self.state;
        let lr = learning_rate(args.lr, args.warmup_steps, total_steps, state.step);
        let began = Instant::now();
        let (loss, stats) = self
            .trainer
            .step(batch, self.vars, &mut self.optimizer, lr, state.step)?;
        self.summary.step_seconds += began.elapsed().as_secs_f64();
        self.summary.tokens += batch.iter().map(|e| e.tokens()).sum::<usize>();
        state.step += 1;
        state.group += 1;
        *tokens_seen += batch.iter().map(|e| e.tokens()).sum::<usize>();
        let preference = (stats.pairs > 0).then(|| stats.means());
        self.summary.preference.extend(preference);
        let summary = &mut self.summary;
        if summary.steps == 0 {
            summary.first_loss = loss;
        }
        summary.last_loss = loss;
        summary.losses.push(loss);
        summary.steps += 1;
        let rate = *tokens_seen as f64 / started.elapsed().as_secs_f64();
        progress.set_message(format!("loss {loss:.4} lr {lr:.2e} {rate:.0} tokens/s"));
        progress.set_position(state.step as u64);
        if progress.is_hidden() && state.step.is_multiple_of(args.logging_steps.max(1)) {
            let rewards = preference.map(|m| format!(" {m}")).unwrap_or_default();
            eprintln!(
                "step {} epoch {} loss {loss:.4}{rewards} lr {lr:.2e} {rate:.0} tokens/s",
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
    fn evaluate<T: Item>(&mut self, eval: &[T]) -> anyhow::Result<f64> {
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
    set_trainables(dir, &tensors, trainables)?;
    optimizer.load(&dir.join("optimizer.safetensors"))?;
    Ok(state)
}

/// Every trainable set from the tensor of its name, read from `dir`.
fn set_trainables(
    dir: &Path,
    tensors: &std::collections::HashMap<String, Tensor>,
    trainables: &[Trainable],
) -> anyhow::Result<()> {
    for t in trainables {
        let saved = (tensors.get(&t.name)).with_context(|| format!("{}: no tensor `{}`", dir.display(), t.name))?;
        anyhow::ensure!(
            saved.shape() == t.var.shape(),
            "{}: `{}` is {:?}, this run's is {:?} (same rank and modules?)",
            dir.display(),
            t.name,
            saved.shape(),
            t.var.shape()
        );
        t.var.set(&saved.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// `--lora-init`: the LoRA pairs start from a PEFT adapter's weights.
fn init_lora(args: &FinetuneArgs, method: &Method, trainables: &[Trainable]) -> anyhow::Result<()> {
    let Some(dir) = &args.lora_init else {
        return Ok(());
    };
    anyhow::ensure!(
        matches!(method, Method::Lora(_)),
        "--lora-init starts LoRA pairs: it needs LoRA training"
    );
    let file = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).with_context(|| file.display().to_string())?;
    set_trainables(dir, &tensors, trainables)
}

/// transformers' linear schedule: warmup from 0, then down to 0 at the last step.
fn learning_rate(peak: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    peak * (total.saturating_sub(step)) as f64 / (total - warmup).max(1) as f64
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
}
