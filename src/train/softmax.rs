//! Softmax over the last dimension for training, with a backward that needs only its output:
//! `dx = y · (dy - Σ dy·y)`. candle's differentiable softmax is composed of five ops (max,
//! subtract, exp, sum, divide), each keeping a tensor of the scores' size for the backward
//! pass; its fused kernel has no backward. In SigLIP's attention at 1,024 patches those
//! tensors are 48 MB per tile, head set and layer each: a LoRA on SmolVLM-256M's vision tower
//! went past 24 GB at batch 4 with them.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// `softmax(xs)` over the last dimension (f32, on the CPU).
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "train-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((start, end)), Some(&width)) = (layout.contiguous_offsets(), layout.dims().last()) else {
            bail!("softmax: a non-contiguous input")
        };
        let xs = &storage.as_slice::<f32>()?[start..end];
        let mut ys = xs.to_vec();
        if width > 0 {
            ys.par_chunks_mut(width).for_each(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                row.iter_mut().for_each(|v| *v /= sum);
            });
        }
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }

    fn bwd(&self, _xs: &Tensor, ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * ys)?.sum_keepdim(D::Minus1)?;
        Ok(Some((ys * grad.broadcast_sub(&dot)?)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn gives_candles_softmax_and_its_gradient() -> Result<()> {
        let device = Device::Cpu;
        let xs = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (2, 3, 7), &device)?))?;
        let upstream = Tensor::randn(0f32, 1.0, (2, 3, 7), &device)?;
        let expected = candle_nn::ops::softmax(&xs, D::Minus1)?;
        let expected_grad = (&expected * &upstream)?.sum_all()?.backward()?;
        let ys = softmax_last_dim(&xs)?;
        let grad = (&ys * &upstream)?.sum_all()?.backward()?;
        let largest = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(largest(&ys, &expected)? < 1e-6);
        assert!(largest(grad.get(&xs).unwrap(), expected_grad.get(&xs).unwrap())? < 1e-6);
        Ok(())
    }
}
