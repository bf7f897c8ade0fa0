//! A linear layer of the text model as it is stored: dense, dense f32 kept in bf16 because
//! its values are exactly bf16 (`exact_bf16`), or quantized to Q8_0 (`q8_0`); and which kernel
//! multiplies it for how many rows.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::Linear;

use super::q8_0::{self, Q8_0Matrix};
use super::{exact_bf16, few_rows};

pub enum Proj {
    Dense(Linear),
    /// An f32 layer whose weights are all bf16 values, stored as bf16 and widened as read:
    /// the same products as `Dense`, half the bytes.
    ExactBf16 {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Weights in Q8_0 blocks (ggml's: 32 `i8`s and a scale).
    Q8_0 {
        weight: Q8_0Weight,
        bias: Option<Tensor>,
    },
}

pub enum Q8_0Weight {
    /// On the CPU, laid out for `q8_0::linear`, which multiplies any number of rows in
    /// integers, their activations rounded to 8 bits too. A Qwen3-VL-2B layer (`cargo bench
    /// --bench few_rows`, AVX2, 2 threads, against dense f32 in the same run): at 1 row 2.1
    /// ms against 7.7 (a quarter of the bytes), 16 rows 8.5 against 11.8, 256 rows 132
    /// against 158, 1024 rows 619 against 688; gemm on the blocks widened to f32 (how
    /// prefill chunks were multiplied before) 713 there.
    Cpu(Q8_0Matrix),
    /// Elsewhere, candle's.
    Device(QMatMul),
}

impl Proj {
    /// One dense layer computing `layers`' outputs side by side (they share their input).
    pub fn stacked(layers: &[Linear]) -> Result<Self> {
        let weights: Vec<Tensor> = layers.iter().map(|l| l.weight().clone()).collect();
        let biases: Option<Vec<Tensor>> = layers.iter().map(|l| l.bias().cloned()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Self::Dense(Linear::new(Tensor::cat(&weights, 0)?, bias)))
    }

    /// Keeps a dense f32 CPU layer in bf16 if all its weights are bf16 values; returns
    /// whether it did.
    pub fn compact(&mut self) -> Result<bool> {
        let Self::Dense(linear) = self else {
            return Ok(false);
        };
        let Some(weight) = exact_bf16::compact(linear.weight())? else {
            return Ok(false);
        };
        *self = Self::ExactBf16 {
            weight,
            bias: linear.bias().cloned(),
        };
        Ok(true)
    }

    /// Whether it was quantized (a layer whose input width is not a multiple of the block
    /// stays dense).
    pub fn quantize_q8_0(&mut self) -> Result<bool> {
        let (weight, bias) = match self {
            Self::Dense(linear) => (linear.weight().to_dtype(DType::F32)?, linear.bias().cloned()),
            Self::ExactBf16 { weight, bias } => (weight.to_dtype(DType::F32)?, bias.clone()),
            Self::Q8_0 { .. } => return Ok(false),
        };
        if weight.dim(1)? % GgmlDType::Q8_0.block_size() != 0 {
            return Ok(false);
        }
        let blocks = QTensor::quantize(&weight, GgmlDType::Q8_0)?;
        let weight = match weight.device().is_cpu() {
            true => Q8_0Weight::Cpu(Q8_0Matrix::from_qtensor(&blocks)?),
            false => Q8_0Weight::Device(QMatMul::from_arc(Arc::new(blocks))?),
        };
        *self = Self::Q8_0 { weight, bias };
        Ok(true)
    }
}

impl Module for Proj {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => dense_forward(linear, xs),
            Self::ExactBf16 { weight, bias } => {
                let (rows, width) = (rows(xs), xs.dim(candle_core::D::Minus1)?);
                let flat = xs.reshape((rows, width))?;
                let ys = if rows <= few_rows::max_rows(true) {
                    few_rows::linear_bf16(&flat, weight)?
                } else {
                    exact_bf16::linear(&flat, weight)?
                };
                finish(ys, bias.as_ref(), xs)
            }
            Self::Q8_0 { weight, bias } => {
                let flat = xs.to_dtype(DType::F32)?;
                let ys = match weight {
                    Q8_0Weight::Cpu(matrix) => {
                        let flat = flat.reshape((rows(xs), xs.dim(candle_core::D::Minus1)?))?;
                        q8_0::linear(&flat, matrix)?
                    }
                    Q8_0Weight::Device(weight) => weight.forward(&flat)?,
                };
                finish(ys.to_dtype(xs.dtype())?, bias.as_ref(), xs)
            }
        }
    }
}

/// Rows of `xs` (all dimensions but the last).
fn rows(xs: &Tensor) -> usize {
    xs.dims().iter().rev().skip(1).product()
}

/// `ys` (`[rows, out]`) plus the bias, shaped like `xs` with `out` as its last dimension.
fn finish(ys: Tensor, bias: Option<&Tensor>, xs: &Tensor) -> Result<Tensor> {
    let ys = match bias {
        Some(bias) => ys.broadcast_add(bias)?,
        None => ys,
    };
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = ys.dim(1)?;
    ys.reshape(dims)
}

/// `xs · Wᵀ (+ b)`. gemm (candle's CPU matmul) is weakest on few rows:
/// - up to `few_rows::max_rows` rows `few_rows::linear` reads each weight once, straight
///   from its layout, where gemm packs it first: at one row a matrix-vector product is bound
///   by memory bandwidth, which gemm's single-threaded GEMV left a third short of (28 GB/s
///   from one core of this 2-core machine, 41 GB/s from both), and on AVX2 its lanes kernel
///   is ahead of gemm to 256 rows;
/// - without that kernel, from 17 to 64 rows against a tall weight gemm is slow ([8, 1536] x
///   [1536, 576] took 1.19 ms, the same product as (W · xsᵀ)ᵀ 0.25 ms: it vectorises along
///   the rows), so the product is computed the other way round.
fn dense_forward(linear: &Linear, xs: &Tensor) -> Result<Tensor> {
    let rows = rows(xs);
    let few = few_rows::max_rows(false);
    if rows > few.max(64) || !xs.device().is_cpu() {
        return linear.forward(xs);
    }
    let (weight, width) = (linear.weight(), xs.dim(candle_core::D::Minus1)?);
    let flat = xs.reshape((rows, width))?;
    let ys = if rows <= few && few_rows::applies(&flat, weight) {
        few_rows::linear(&flat, weight)?
    } else {
        weight.matmul(&flat.t()?)?.t()?.contiguous()?
    };
    finish(ys, linear.bias(), xs)
}
