//! Fused CPU kernels for the element-wise work between matmuls, in f32.
//!
//! Composed from candle's ops, a LayerNorm is eight passes over the activations with an
//! allocation each, and candle's GELU calls `tanhf` once per element on one thread: in the
//! SigLIP encoder that GELU alone was a fifth of the time (6 ns an element, against 0.5 ns
//! for `expf`). These kernels make one pass per row, spread over rayon's threads (candle's
//! own pool). Each computes what transformers computes, up to rounding; callers use them for
//! f32 tensors on the CPU and candle's ops everywhere else.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Rows handed to one rayon task: enough work to outweigh the dispatch.
const MIN_ELEMENTS_PER_TASK: usize = 16 * 1024;

/// Whether `xs` can take these kernels.
pub fn applies(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32
}

/// `gelu_pytorch_tanh`: `0.5·x·(1 + tanh(u))` with `u = √(2/π)·(x + 0.044715·x³)`, written as
/// `x / (1 + e^(-2u))` (the same function: `1 + tanh(u) = 2·sigmoid(2u)`), which needs one
/// `expf` and cancels nothing.
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    xs.apply_op1_no_bwd(&GeluTanh)
}

/// LayerNorm over the last dimension with PyTorch's two-pass statistics (see `norm.rs`).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    xs.apply_op3_no_bwd(weight, bias, &LayerNormOp { eps: eps as f32 })
}

/// Llama's RMSNorm over the last dimension: `weight · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    xs.apply_op2_no_bwd(weight, &RmsNormOp { eps: eps as f32 })
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: f32 only, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: needs a contiguous input"),
    }
}

/// Runs `f` over matching chunks of `input` and a fresh output, in parallel.
fn par_map(input: &[f32], chunk: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut output = vec![0f32; input.len()];
    let chunk = chunk.max(1);
    output
        .par_chunks_mut(chunk)
        .zip(input.par_chunks(chunk))
        .for_each(|(out, inp)| f(inp, out));
    output
}

/// `par_map` over whole rows of `width`.
fn map_rows(input: &[f32], width: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let width = width.max(1);
    par_map(input, MIN_ELEMENTS_PER_TASK.div_ceil(width) * width, |inp, out| {
        for (out, inp) in out.chunks_exact_mut(width).zip(inp.chunks_exact(width)) {
            f(inp, out)
        }
    })
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, self.name())?;
        // √(2/π), as PyTorch's kernel spells it (M_SQRT2 · M_2_SQRTPI · 0.5).
        const K: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
        let out = par_map(input, MIN_ELEMENTS_PER_TASK, |inp, out| {
            for (o, &x) in out.iter_mut().zip(inp) {
                let u = K * (x + 0.044715 * x * x * x);
                *o = x / (1.0 + (-2.0 * u).exp());
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(s1, l1, self.name())?;
        let weight = contiguous_f32(s2, l2, self.name())?;
        let bias = contiguous_f32(s3, l3, self.name())?;
        let width = l1.shape().dims().last().copied().unwrap_or(1);
        if weight.len() != width || bias.len() != width {
            bail!(
                "layer-norm: weight {} and bias {} for rows of {width}",
                weight.len(),
                bias.len()
            )
        }
        let n = width as f32;
        let out = map_rows(input, width, |row, out| {
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for (((o, x), w), b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (x - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-f32"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(s1, l1, self.name())?;
        let weight = contiguous_f32(s2, l2, self.name())?;
        let width = l1.shape().dims().last().copied().unwrap_or(1);
        if weight.len() != width {
            bail!("rms-norm: weight {} for rows of {width}", weight.len())
        }
        let n = width as f32;
        let out = map_rows(input, width, |row, out| {
            let rstd = 1.0 / (row.iter().map(|x| x * x).sum::<f32>() / n + self.eps).sqrt();
            for ((o, x), w) in out.iter_mut().zip(row).zip(weight) {
                *o = w * (x * rstd);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff <= tol, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn gelu_matches_the_tanh_formula_and_its_tails() -> Result<()> {
        // 40000 values (more than one task, and a tail) from -12 to 12.
        let xs = Tensor::arange(-20_000f32, 20_000.0, &Device::Cpu)?.affine(6e-4, 0.0)?;
        close(&gelu_tanh(&xs)?, &xs.gelu()?, 2e-6)?;
        let tails = Tensor::new(&[-100f32, -20.0, 0.0, 20.0, 100.0], &Device::Cpu)?;
        assert_eq!(gelu_tanh(&tails)?.to_vec1::<f32>()?, [-0.0, -0.0, 0.0, 20.0, 100.0]);
        Ok(())
    }

    #[test]
    fn norms_match_their_composed_forms() -> Result<()> {
        let dev = &Device::Cpu;
        let xs = (Tensor::randn(0f32, 3.0, (37, 96), dev)? + 50.0)?;
        let (w, b) = (Tensor::randn(1f32, 0.1, 96, dev)?, Tensor::randn(0f32, 0.1, 96, dev)?);
        let centered = xs.broadcast_sub(&xs.mean_keepdim(1)?)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        let composed = centered
            .broadcast_div(&(var + 1e-6)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)?;
        // Rows near 50 with a spread of 3: both forms lose a few digits of the mean.
        close(&layer_norm(&xs, &w, &b, 1e-6)?, &composed, 3e-5)?;
        let rms = (xs.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?;
        close(
            &rms_norm(&xs, &w, 1e-5)?,
            &xs.broadcast_div(&rms)?.broadcast_mul(&w)?,
            3e-5,
        )
    }
}
