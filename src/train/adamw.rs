//! AdamW (Loshchilov and Hutter, arXiv:1711.05101) as PyTorch computes it, with its
//! moments saved in checkpoints: candle-nn's `AdamW` keeps them private, and resuming
//! without them restarts the second-moment estimates (a burst of over-large steps).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    params: AdamWParams,
    /// Steps taken, for the bias corrections.
    step: usize,
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let moments = (vars.iter())
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            step: 0,
            moments,
        })
    }

    /// One update of `vars` by `grads` (same order) at learning rate `lr`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let (correct1, correct2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        for ((var, grad), (m, v)) in vars.iter().zip(grads).zip(&mut self.moments) {
            *m = ((&*m * p.beta1)? + (grad * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (grad.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&*m / correct1)? / ((&*v / correct2)?.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    pub fn steps(&self) -> usize {
        self.step
    }

    pub fn save(&self, file: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for (i, (m, v)) in self.moments.iter().enumerate() {
            tensors.insert(format!("{i}.m"), m.clone());
            tensors.insert(format!("{i}.v"), v.clone());
        }
        let step = Tensor::new(&[self.step as u32], &candle_core::Device::Cpu)?;
        tensors.insert("step".into(), step);
        candle_core::safetensors::save(&tensors, file)
    }

    /// Restores moments saved by `save` for the same variables.
    pub fn load(&mut self, file: &Path) -> Result<()> {
        let mut tensors = candle_core::safetensors::load(file, self.moments[0].0.device())?;
        for (i, (m, v)) in self.moments.iter_mut().enumerate() {
            let mut take = |kind: &str| {
                (tensors.remove(&format!("{i}.{kind}")))
                    .ok_or_else(|| candle_core::Error::Msg(format!("{}: no `{i}.{kind}`", file.display())))
            };
            let (saved_m, saved_v) = (take("m")?, take("v")?);
            if saved_m.shape() != m.shape() {
                candle_core::bail!(
                    "{}: `{i}.m` is {:?}, the variable {:?}",
                    file.display(),
                    saved_m.shape(),
                    m.shape()
                )
            }
            (*m, *v) = (saved_m, saved_v);
        }
        let step = tensors
            .remove("step")
            .ok_or_else(|| candle_core::Error::Msg("no `step`".into()))?;
        self.step = step.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_steps_match_pytorchs_adamw() -> Result<()> {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) on p = [1, -2], grads [0.5, 0.25]
        // then [-1, 2]: p = [0.899, -2.098], then [0.9347114, -2.1780486] (torch 2.15).
        let var = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let params = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut adam = AdamW::new(std::slice::from_ref(&var), params)?;
        adam.step(
            std::slice::from_ref(&var),
            &[Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?],
            0.1,
        )?;
        let p = var.as_tensor().to_vec1::<f32>()?;
        assert!((p[0] - 0.899).abs() < 1e-6 && (p[1] + 2.098).abs() < 1e-6, "{p:?}");
        adam.step(
            std::slice::from_ref(&var),
            &[Tensor::new(&[-1f32, 2.0], &Device::Cpu)?],
            0.1,
        )?;
        let p = var.as_tensor().to_vec1::<f32>()?;
        assert!(
            (p[0] - 0.9347114).abs() < 1e-6 && (p[1] + 2.1780486).abs() < 1e-6,
            "{p:?}"
        );
        Ok(())
    }
}
