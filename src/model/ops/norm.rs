//! Normalisations written as transformers writes them, in f32 whatever the weights' dtype.
//! candle's fused LayerNorm computes the variance as E[x²] - E[x]², which loses digits when
//! the mean is large next to the spread (deep ViT residual streams); PyTorch uses Welford's
//! moments, which a two-pass variance matches to rounding.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::kernels;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if kernels::applies(xs) && xs.is_contiguous() {
            return kernels::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(if dtype == DType::F64 { DType::F64 } else { DType::F32 })?;
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Llama's RMSNorm: `weight * (x / sqrt(mean(x²) + eps))`, normalised in f32 (or wider).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if kernels::applies(xs) && xs.is_contiguous() {
            return kernels::rms_norm(xs, &self.weight, self.eps);
        }
        let dtype = xs.dtype();
        let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let xs = xs.to_dtype(wide)?;
        let rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xs.broadcast_div(&rms)?.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_large_mean_does_not_swallow_the_variance() -> Result<()> {
        // Values 10000 + {-1, 1}: E[x²] ~ 1e8 has an f32 ulp of 8, so the one-pass formula
        // (candle_nn::ops::layer_norm) gets the variance of 1 wrong.
        let xs = Tensor::new(&[[9999f32, 10001.0, 9999.0, 10001.0]], &Device::Cpu)?;
        let ln = LayerNorm {
            weight: Tensor::ones(4, DType::F32, &Device::Cpu)?,
            bias: Tensor::zeros(4, DType::F32, &Device::Cpu)?,
            eps: 1e-6,
        };
        let out = ln.forward(&xs)?.squeeze(0)?.to_vec1::<f32>()?;
        for (o, e) in out.iter().zip([-1.0, 1.0, -1.0, 1.0]) {
            assert!((o - e).abs() < 1e-5, "{out:?}");
        }
        let (w, b) = (&ln.weight, &ln.bias);
        let one_pass = candle_nn::ops::layer_norm(&xs, w, b, 1e-6)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        assert!(
            (one_pass[0] + 1.0).abs() > 1e-3,
            "the one-pass formula got it right: {one_pass:?}"
        );
        Ok(())
    }
}
