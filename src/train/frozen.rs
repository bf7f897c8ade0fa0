//! The frozen weights of a LoRA run: a linear layer whose backward gives the gradient of its
//! input only. candle's `matmul` differentiates both sides, so a frozen `[out, in]` weight
//! used to cost a weight-sized gradient per layer per backward, computed and thrown away;
//! this op skips it. Under `--quantize q8_0` (QLoRA) the weight is kept in ggml's Q8_0 blocks
//! (8.5 bits a weight) and expanded to f32 one layer at a time for its product, as
//! bitsandbytes expands its 4-bit blocks: the activations stay f32, and the backward uses
//! the same expanded weight as the forward.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};

/// A weight that does not train.
#[derive(Clone)]
pub enum Frozen {
    Dense(Tensor),
    Q8_0(Arc<QTensor>),
}

impl Frozen {
    /// `weight` as it is, or in Q8_0 blocks when `quantize` and its rows split into whole
    /// blocks (else dense, as the server's `--quantize` leaves such a layer).
    pub fn new(weight: Tensor, quantize: bool) -> Result<Self> {
        let width = weight.dims().last().copied().unwrap_or(0);
        if !quantize || weight.rank() != 2 || width % GgmlDType::Q8_0.block_size() != 0 {
            return Ok(Frozen::Dense(weight));
        }
        let blocks = QTensor::quantize(&weight.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
        Ok(Frozen::Q8_0(Arc::new(blocks)))
    }

    /// The weight in f32 (Q8_0 blocks expanded: a transient copy).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Frozen::Dense(weight) => Ok(weight.clone()),
            Frozen::Q8_0(blocks) => blocks.dequantize(&Device::Cpu),
        }
    }

    /// `xs · weightᵀ` for `xs` `[rows, in]`, differentiable in `xs` only.
    pub fn linear(&self, xs: &Tensor) -> Result<Tensor> {
        xs.contiguous()?.apply_op1(FrozenLinear(self.clone()))
    }
}

struct FrozenLinear(Frozen);

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("frozen linear: a non-contiguous input")
        };
        let xs = Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &Device::Cpu)?;
        let ys = xs.matmul(&self.0.dense()?.t()?)?;
        let shape = ys.shape().clone();
        Ok((CpuStorage::F32(ys.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0.dense()?)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn gives_matmuls_values_and_input_gradient_q8_0_close() -> Result<()> {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (48, 64), &device)?;
        let xs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 64), &device)?)?;
        let upstream = Tensor::randn(0f32, 1.0, (5, 48), &device)?;
        let expected = xs.matmul(&weight.t()?)?;
        let expected_grad = (&expected * &upstream)?.sum_all()?.backward()?;
        for (quantize, tolerance) in [(false, 0.0), (true, 0.2)] {
            let frozen = Frozen::new(weight.clone(), quantize)?;
            assert_eq!(matches!(frozen, Frozen::Q8_0(_)), quantize);
            let ys = frozen.linear(xs.as_tensor())?;
            let grads = (&ys * &upstream)?.sum_all()?.backward()?;
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tolerance);
            assert!(close(&values(&ys), &values(&expected)), "values, quantized: {quantize}");
            let (got, want) = (grads.get(&xs).unwrap(), expected_grad.get(&xs).unwrap());
            assert!(close(&values(got), &values(want)), "gradient, quantized: {quantize}");
        }
        // A width that is not whole blocks stays dense.
        assert!(matches!(
            Frozen::new(Tensor::zeros((4, 40), DType::F32, &device)?, true)?,
            Frozen::Dense(_)
        ));
        Ok(())
    }
}
