//! One optimizer step and the eval loss, for what a run trains on: conversations (SFT: the
//! mean cross-entropy per assistant token) or preference pairs (DPO: the mean loss per
//! pair). Images are encoded once per forward for all its sequences.

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::adamw::AdamW;
use super::data::Example;
use super::dataset::Location;
use super::dpo::{Preference, Stats};
use super::preference::Pair;
use super::text::{Sequence, TrainText};
use super::vision::{self, TrainVision};
use crate::config::FinetuneArgs;
use crate::model::{Pixels, VisionLanguageModel};

pub(super) struct Trainer<'a> {
    pub args: &'a FinetuneArgs,
    pub model: &'a TrainText,
    /// The served model, whose frozen encoder gives the features when none trains.
    pub vision: Option<&'a dyn VisionLanguageModel>,
    /// The trainable encoder (`--method full`, or a LoRA on it or the connector); otherwise
    /// the serving model's, frozen.
    pub train_vision: Option<&'a vision::TrainVision>,
    pub image_token: u32,
    /// Under `--method dpo`.
    pub preference: Option<Preference>,
}

/// What a step is made of.
pub(super) trait Item {
    fn at(&self) -> Location;
    fn tokens(&self) -> usize;
    /// A step's loss is its items' summed loss over their summed weight: target tokens for
    /// a conversation, 1 for a pair.
    fn weight(&self) -> usize;
    /// The summed loss of one forward's items, and what it measured.
    fn loss(trainer: &Trainer, items: &[&Self], dropout: Option<&mut ChaCha8Rng>) -> anyhow::Result<(Tensor, Stats)>
    where
        Self: Sized;
}

impl Item for Example {
    fn at(&self) -> Location {
        self.at
    }

    fn tokens(&self) -> usize {
        self.token_ids.len()
    }

    fn weight(&self) -> usize {
        self.target_count()
    }

    fn loss(
        trainer: &Trainer,
        items: &[&Self],
        mut dropout: Option<&mut ChaCha8Rng>,
    ) -> anyhow::Result<(Tensor, Stats)> {
        let seqs = trainer.sequences(items, &mut dropout)?;
        let (loss, _) = trainer.model.loss(&seqs, trainer.image_token, dropout)?;
        Ok((loss, Stats::default()))
    }
}

impl Item for Pair {
    fn at(&self) -> Location {
        self.at
    }

    fn tokens(&self) -> usize {
        Pair::tokens(self)
    }

    fn weight(&self) -> usize {
        1
    }

    fn loss(trainer: &Trainer, items: &[&Self], dropout: Option<&mut ChaCha8Rng>) -> anyhow::Result<(Tensor, Stats)> {
        let preference = trainer.preference.context("pairs are trained under --method dpo")?;
        let policy = trainer.log_probs(items, dropout)?;
        Ok(preference.loss(&policy, items)?)
    }
}

impl Trainer<'_> {
    /// The sequences of `examples` with their image features: one vision forward for all
    /// their tiles, split back per example (with LoRA dropout from `dropout` where the
    /// encoder trains).
    fn sequences<'e>(
        &self,
        examples: &[&'e Example],
        dropout: &mut Option<&mut ChaCha8Rng>,
    ) -> anyhow::Result<Vec<Sequence<'e>>> {
        let pixels: Vec<Tensor> = (examples.iter().filter(|e| e.features.is_none()))
            .filter_map(|e| e.pixel_values.clone())
            .collect();
        let mut features = if pixels.is_empty() {
            None
        } else {
            let pixels = Tensor::cat(&pixels, 0)?;
            let rows = match self.train_vision {
                Some(vision) => vision.forward(&pixels, dropout)?,
                None => {
                    let tiles = Pixels {
                        values: pixels.clone(),
                        grid: None,
                    };
                    let vision = self
                        .vision
                        .context("no vision encoder, trained or frozen. This is a bug.")?;
                    let mut encoded = vision.encode_images(&[&tiles], None)?;
                    encoded.remove(0).embeds.detach()
                }
            };
            Some((rows.dim(0)? / pixels.dim(0)?, rows, 0))
        };
        let mut seqs = Vec::with_capacity(examples.len());
        for e in examples {
            let own = match (&e.features, &e.pixel_values, &mut features) {
                (Some(own), _, _) => Some(own.clone()),
                (None, Some(p), Some((per_tile, rows, offset))) => {
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

    /// With the vision encoder and connector frozen (a LoRA on the text model only), each
    /// example's image features once, before
    /// training, in place of its pixels: every later step (and epoch) reuses them, and they
    /// are about a twentieth of their tiles' size.
    pub fn encode_frozen<'e>(&self, examples: impl Iterator<Item = &'e mut Example>) -> anyhow::Result<()> {
        let (None, Some(vision)) = (self.train_vision, self.vision) else {
            return Ok(());
        };
        for example in examples {
            if let Some(values) = example.pixel_values.take() {
                let tiles = Pixels { values, grid: None };
                let mut encoded = vision.encode_images(&[&tiles], None)?;
                example.features = Some(encoded.remove(0).embeds.detach());
            }
        }
        Ok(())
    }

    /// The completions' summed log-probabilities, `[chosen 0, rejected 0, chosen 1, ...]`.
    fn log_probs(&self, pairs: &[&Pair], mut dropout: Option<&mut ChaCha8Rng>) -> anyhow::Result<Tensor> {
        let examples: Vec<&Example> = pairs.iter().flat_map(|p| [&p.chosen, &p.rejected]).collect();
        let seqs = self.sequences(&examples, &mut dropout)?;
        Ok(self.model.sequence_log_probs(&seqs, self.image_token, dropout)?)
    }

    /// Scores every pair's completions under the model as it is now (before the first step:
    /// the reference), `--batch-size` pairs per forward.
    pub fn score_references(&self, pairs: &mut [Pair]) -> anyhow::Result<()> {
        for chunk in pairs.chunks_mut(self.args.batch_size.max(1)) {
            let refs: Vec<&Pair> = chunk.iter().collect();
            let scores = self.log_probs(&refs, None)?.to_vec1::<f32>()?;
            for (pair, score) in chunk.iter_mut().zip(scores.chunks(2)) {
                pair.reference = [score[0], score[1]];
            }
        }
        Ok(())
    }

    /// One optimizer step over `batch`, `--batch-size` items per forward; returns its loss
    /// (per target token, or per pair) and what it measured.
    pub fn step<T: Item>(
        &self,
        batch: &[&T],
        vars: &[Var],
        optimizer: &mut AdamW,
        lr: f64,
        step: usize,
    ) -> anyhow::Result<(f64, Stats)> {
        let weight: usize = batch.iter().map(|e| e.weight()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut total, mut stats) = (0.0, Stats::default());
        let mut rng = ChaCha8Rng::seed_from_u64(self.args.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step as u64));
        for chunk in batch.chunks(self.args.batch_size.max(1)) {
            let rows = || chunk.iter().map(|e| e.at().to_string()).collect::<Vec<_>>().join("; ");
            let (loss, measured) = T::loss(self, chunk, Some(&mut rng)).with_context(|| format!("at {}", rows()))?;
            stats.add(&measured);
            let scaled = (loss / weight.max(1) as f64)?;
            total += scaled.to_scalar::<f32>()? as f64;
            self.backward(&scaled, &mut grads, vars)?;
        }
        let grads: Vec<Tensor> = (grads.into_iter().zip(vars))
            .map(|(g, v)| g.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grads = clip(grads, self.args.max_grad_norm)?;
        optimizer.step(vars, &grads, lr)?;
        Ok((total, stats))
    }

    /// The backward pass of one forward's loss, its gradients added to `grads`. Under
    /// --gradient-checkpointing the loss's graph stops at each tower's last layer output:
    /// those layers' gradients come from running them again, last first; the text model's
    /// first, whose first layer's input carries the image features' gradient back to the
    /// vision encoder's output.
    fn backward(&self, loss: &Tensor, grads: &mut [Option<Tensor>], vars: &[Var]) -> anyhow::Result<()> {
        let vision_tape = self.train_vision.and_then(|v| v.take_tape());
        let mut vision_grad: Option<Tensor> = None;
        let mut collect = |store: &GradStore, grads: &mut [Option<Tensor>]| -> candle_core::Result<()> {
            accumulate(grads, vars, store)?;
            if let Some(tape) = &vision_tape
                && let Some(g) = store.get(TrainVision::tape_output(tape))
            {
                vision_grad = Some(match vision_grad.take() {
                    Some(sum) => (sum + g)?,
                    None => g.clone(),
                });
            }
            Ok(())
        };
        let store = loss.backward()?;
        collect(&store, grads)?;
        if let Some(tape) = self.model.take_tape() {
            let grad = store.get(TrainText::tape_output(&tape)).cloned();
            let grad = grad.map_or_else(|| TrainText::tape_output(&tape).zeros_like(), Ok)?;
            drop(store);
            self.model.backward_layers(tape, &grad, |part| collect(part, grads))?;
        }
        if let (Some(tape), Some(vision)) = (vision_tape, self.train_vision) {
            let grad = vision_grad.map_or_else(|| TrainVision::tape_output(&tape).zeros_like(), Ok)?;
            vision.backward_layers(tape, &grad, |part| accumulate(grads, vars, part))?;
        }
        Ok(())
    }

    /// The loss over `items` (per target token, or per pair), without dropout.
    pub fn eval_loss<T: Item>(&self, items: &[T]) -> anyhow::Result<f64> {
        let (mut sum, mut weight) = (0.0, 0);
        let all: Vec<&T> = items.iter().collect();
        for chunk in all.chunks(self.args.batch_size.max(1)) {
            let (loss, _) = T::loss(self, chunk, None)?;
            sum += loss.to_scalar::<f32>()? as f64;
            weight += chunk.iter().map(|e| e.weight()).sum::<usize>();
        }
        Ok(sum / weight.max(1) as f64)
    }
}

/// Adds `store`'s gradients of `vars` to the running sums.
fn accumulate(grads: &mut [Option<Tensor>], vars: &[Var], store: &GradStore) -> candle_core::Result<()> {
    for (slot, var) in grads.iter_mut().zip(vars) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(sum) => (sum + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
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
    use candle_core::Device;

    use super::*;

    #[test]
    fn clipping_keeps_the_direction_and_caps_the_norm() -> candle_core::Result<()> {
        let g = vec![Tensor::new(&[3f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?];
        let clipped = clip(g, 1.0)?;
        let (a, b) = (clipped[0].to_vec1::<f32>()?[0], clipped[1].to_vec1::<f32>()?[0]);
        assert!((a - 0.6).abs() < 1e-5 && (b - 0.8).abs() < 1e-5, "{a} {b}");
        Ok(())
    }
}
