//! Direct Preference Optimisation as TRL's `DPOTrainer` computes it: each completion scored
//! by its summed log-probability under the policy and under the reference (the model before
//! training: a new LoRA adapter's base, or the initial weights, scored once before the first
//! step, so no second copy is kept), the log-ratio of chosen over rejected against the
//! reference's, and one of TRL's losses on it (`sigmoid`, the DPO paper's; `hinge`; `ipo`,
//! per-token averaged), plus, with a weight, TRL's `sft` term (the chosen completions' mean
//! token NLL). Rewards, reward accuracy and margins as TRL logs them.

use candle_core::{Result, Tensor};

use super::preference::Pair;
pub use crate::config::DpoLoss;

/// A DPO run's settings (`--beta`, `--dpo-loss`, `--sft-weight`).
#[derive(Debug, Clone, Copy)]
pub struct Preference {
    pub beta: f64,
    pub loss: DpoLoss,
    pub sft_weight: f64,
}

/// Sums over pairs of what TRL logs as means.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub pairs: usize,
    pub chosen_rewards: f64,
    pub rejected_rewards: f64,
    /// Pairs whose chosen reward is above the rejected one.
    pub accurate: usize,
    pub chosen_logps: f64,
    pub rejected_logps: f64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.pairs += other.pairs;
        self.chosen_rewards += other.chosen_rewards;
        self.rejected_rewards += other.rejected_rewards;
        self.accurate += other.accurate;
        self.chosen_logps += other.chosen_logps;
        self.rejected_logps += other.rejected_logps;
    }

    /// TRL's names and means: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
    /// `rewards/margins`, `logps/chosen`, `logps/rejected`.
    pub fn means(&self) -> Means {
        let n = self.pairs.max(1) as f64;
        Means {
            chosen_rewards: self.chosen_rewards / n,
            rejected_rewards: self.rejected_rewards / n,
            accuracy: self.accurate as f64 / n,
            margin: (self.chosen_rewards - self.rejected_rewards) / n,
            chosen_logps: self.chosen_logps / n,
            rejected_logps: self.rejected_logps / n,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Means {
    pub chosen_rewards: f64,
    pub rejected_rewards: f64,
    pub accuracy: f64,
    pub margin: f64,
    pub chosen_logps: f64,
    pub rejected_logps: f64,
}

impl std::fmt::Display for Means {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rewards/chosen {:.4} rewards/rejected {:.4} rewards/accuracies {:.2} rewards/margins {:.4} logps/chosen {:.3} logps/rejected {:.3}",
            self.chosen_rewards,
            self.rejected_rewards,
            self.accuracy,
            self.margin,
            self.chosen_logps,
            self.rejected_logps
        )
    }
}

impl Preference {
    pub fn of(args: &crate::config::FinetuneArgs) -> Self {
        Self {
            beta: args.beta,
            loss: args.dpo_loss,
            sft_weight: args.sft_weight,
        }
    }

    /// The summed loss of `pairs` (a scalar with gradients through `policy`) and its stats;
    /// `policy`: the completions' log-probabilities, `[chosen 0, rejected 0, chosen 1, ...]`.
    pub fn loss(&self, policy: &Tensor, pairs: &[&Pair]) -> Result<(Tensor, Stats)> {
        let n = pairs.len();
        let policy = policy.reshape((n, 2))?;
        let reference: Vec<f32> = pairs.iter().flat_map(|p| p.reference).collect();
        let reference = Tensor::from_vec(reference, (n, 2), policy.device())?;
        let ratios = (&policy - &reference)?;
        let (chosen, rejected) = (ratios.narrow(1, 0, 1)?.squeeze(1)?, ratios.narrow(1, 1, 1)?.squeeze(1)?);
        let per_pair = match self.loss {
            DpoLoss::Sigmoid => softplus(&((&chosen - &rejected)? * -self.beta)?)?,
            DpoLoss::Hinge => ((&chosen - &rejected)? * -self.beta)?.affine(1.0, 1.0)?.relu()?,
            DpoLoss::Ipo => {
                let lengths = |side: fn(&Pair) -> &super::data::Example| {
                    let counts: Vec<f32> = pairs.iter().map(|p| side(p).target_count().max(1) as f32).collect();
                    Tensor::from_vec(counts, n, policy.device())
                };
                let chosen = chosen.div(&lengths(|p| &p.chosen)?)?;
                let rejected = rejected.div(&lengths(|p| &p.rejected)?)?;
                ((chosen - rejected)? - 1.0 / (2.0 * self.beta))?.sqr()?
            }
        };
        let stats = self.stats(&policy.detach(), &ratios.detach())?;
        let mut loss = per_pair.sum_all()?;
        if self.sft_weight > 0.0 {
            // TRL's `sft` term is the mean over the batch's chosen tokens, added once per
            // batch: `n` times here, as the step divides the summed loss by its pairs.
            let tokens: usize = pairs.iter().map(|p| p.chosen.target_count()).sum();
            let chosen_sum = policy.narrow(1, 0, 1)?.sum_all()?;
            let sft = (chosen_sum * (-self.sft_weight * n as f64 / tokens.max(1) as f64))?;
            loss = (loss + sft)?;
        }
        Ok((loss, stats))
    }

    fn stats(&self, policy: &Tensor, ratios: &Tensor) -> Result<Stats> {
        let (policy, ratios) = (policy.to_vec2::<f32>()?, ratios.to_vec2::<f32>()?);
        let mut stats = Stats {
            pairs: policy.len(),
            ..Stats::default()
        };
        for (logps, ratio) in policy.iter().zip(&ratios) {
            let (chosen, rejected) = (self.beta * ratio[0] as f64, self.beta * ratio[1] as f64);
            stats.chosen_rewards += chosen;
            stats.rejected_rewards += rejected;
            stats.accurate += usize::from(chosen > rejected);
            stats.chosen_logps += logps[0] as f64;
            stats.rejected_logps += logps[1] as f64;
        }
        Ok(stats)
    }
}

/// `log(1 + e^x)`, written so that neither large `x` nor large `-x` overflows:
/// `max(x, 0) + log(1 + e^-|x|)` (so `-logsigmoid(z)` is `softplus(-z)`).
fn softplus(xs: &Tensor) -> Result<Tensor> {
    xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::data::Example;

    fn example(targets: usize) -> Example {
        Example {
            at: crate::train::dataset::Location::Line(1),
            token_ids: vec![0; targets + 1],
            targets: (0..=targets).map(|t| t > 0).collect(),
            pixel_values: None,
            features: None,
        }
    }

    fn pair(reference: [f32; 2]) -> Pair {
        Pair {
            at: crate::train::dataset::Location::Line(1),
            chosen: example(2),
            rejected: example(4),
            reference,
        }
    }

    #[test]
    fn losses_rewards_and_accuracy_are_trl_s() -> Result<()> {
        let pairs = [pair([-3.0, -5.0]), pair([-2.0, -2.0])];
        let refs: Vec<&Pair> = pairs.iter().collect();
        // Pair 0: log-ratios (+1, -1); pair 1: (-0.5, +0.5).
        let policy = Tensor::new(&[-2.0f32, -6.0, -2.5, -1.5], &Device::Cpu)?;
        let beta = 0.1;
        let weighted = |kind, sft_weight| -> Result<(f64, Stats)> {
            let (loss, stats) = Preference {
                beta,
                loss: kind,
                sft_weight,
            }
            .loss(&policy, &refs)?;
            Ok((loss.to_scalar::<f32>()? as f64, stats))
        };
        let loss = |kind| weighted(kind, 0.0);
        let softplus = |x: f64| (1.0 + x.exp()).ln();
        let (sigmoid, stats) = loss(DpoLoss::Sigmoid)?;
        assert!(
            (sigmoid - (softplus(-beta * 2.0) + softplus(beta * 1.0))).abs() < 1e-6,
            "{sigmoid}"
        );
        let (hinge, _) = loss(DpoLoss::Hinge)?;
        assert!(
            (hinge - ((1.0 - beta * 2.0) + (1.0 + beta * 1.0))).abs() < 1e-5,
            "{hinge}"
        );
        let (ipo, _) = loss(DpoLoss::Ipo)?;
        let ipo_pair = |c: f64, r: f64| (c / 2.0 - r / 4.0 - 1.0 / (2.0 * beta)).powi(2);
        assert!(
            (ipo - (ipo_pair(1.0, -1.0) + ipo_pair(-0.5, 0.5))).abs() < 1e-3,
            "{ipo}"
        );
        let means = stats.means();
        assert_eq!((stats.pairs, stats.accurate), (2, 1));
        assert!((means.chosen_rewards - beta * 0.25).abs() < 1e-6);
        assert!((means.margin - beta * 0.5).abs() < 1e-6);
        assert!((means.rejected_logps - -3.75).abs() < 1e-6);
        // The SFT term: 0.5 x the mean NLL of the 4 chosen tokens (4.5 / 4), per pair.
        let (with_sft, _) = weighted(DpoLoss::Sigmoid, 0.5)?;
        assert!((with_sft - sigmoid - 2.0 * 0.5 * 4.5 / 4.0).abs() < 1e-5, "{with_sft}");
        Ok(())
    }

    #[test]
    fn softplus_neither_overflows_nor_loses_small_values() -> Result<()> {
        let xs = Tensor::new(&[-100f32, 0.0, 100.0], &Device::Cpu)?;
        let ys = softplus(&xs)?.to_vec1::<f32>()?;
        assert!(ys[0] >= 0.0 && ys[0] < 1e-30 && (ys[1] - 2f32.ln()).abs() < 1e-6 && (ys[2] - 100.0).abs() < 1e-4);
        Ok(())
    }
}
