//! A dense layer's bias, activation and residual, applied over its GEMM's output in place.
//!
//! Composed from candle's ops, `Linear` then GELU then `+ residual` is three more passes,
//! each into a fresh buffer: in the SigLIP encoder 47 MB of new pages per tile and layer,
//! which the kernel zeroes on first touch (5–8% of an encode went to zeroing pages). Here
//! the GEMM's output, fresh and held by no one else, takes all of it in one pass. The
//! arithmetic is the composed form's, in its order: `x·Wᵀ + b`, then GELU, then
//! `+ residual`, so the results are the same to the bit.

use candle_core::{CpuStorage, DType, Layout, Module, Result, Tensor, bail};
use candle_nn::Linear;
use rayon::prelude::*;

use super::kernels::{self, Kernel, MIN_ELEMENTS_PER_TASK, gelu, quick_gelu, vectorized};

/// What follows the bias.
#[derive(Clone, Copy)]
pub enum Then<'a> {
    Nothing,
    /// `gelu_pytorch_tanh`, as `kernels::gelu_tanh`.
    GeluTanh,
    /// CLIP's `quick_gelu`: `x · sigmoid(1.702 · x)`.
    QuickGelu,
    /// A residual of the output's shape.
    Add(&'a Tensor),
}

/// `then(xs · Wᵀ + b)` for `xs` `[rows, in]`.
pub fn linear(layer: &Linear, xs: &Tensor, then: Then<'_>) -> Result<Tensor> {
    let fits = |t: &Tensor| t.dtype() == DType::F32 && t.is_contiguous();
    let residual_fits = match then {
        Then::Add(residual) => fits(residual) && residual.dims() == [xs.dim(0)?, layer.weight().dim(0)?],
        _ => true,
    };
    let bias = layer.bias().filter(|b| fits(b) && b.rank() == 1);
    let (Some(bias), true, true) = (bias, kernels::applies(xs) && xs.rank() == 2, residual_fits) else {
        return composed(layer, xs, then);
    };
    let ys = xs.matmul(&layer.weight().t()?)?;
    match then {
        Then::Nothing => ys.inplace_op2(bias, &Bias { act: Act::None })?,
        Then::GeluTanh => ys.inplace_op2(bias, &Bias { act: Act::GeluTanh })?,
        Then::QuickGelu => ys.inplace_op2(bias, &Bias { act: Act::QuickGelu })?,
        Then::Add(residual) => ys.inplace_op3(bias, residual, &BiasAdd)?,
    }
    Ok(ys)
}

/// The same with candle's ops (other devices and dtypes, layers without a bias).
fn composed(layer: &Linear, xs: &Tensor, then: Then<'_>) -> Result<Tensor> {
    let ys = layer.forward(xs)?;
    match then {
        Then::Nothing => Ok(ys),
        Then::GeluTanh if kernels::applies(&ys) => kernels::gelu_tanh(&ys),
        Then::GeluTanh => ys.gelu(),
        Then::QuickGelu => &ys * candle_nn::ops::sigmoid(&(&ys * 1.702)?)?,
        Then::Add(residual) => ys + residual,
    }
}

/// The output's rows and the bias, checked.
fn rows<'a>(
    ys: &'a mut CpuStorage,
    layout: &Layout,
    bias: &'a CpuStorage,
    bias_layout: &Layout,
) -> Result<(&'a mut [f32], &'a [f32])> {
    let (CpuStorage::F32(ys), CpuStorage::F32(bias)) = (ys, bias) else {
        bail!("linear epilogue: f32 only")
    };
    let (Some((begin, end)), Some((b_begin, b_end))) = (layout.contiguous_offsets(), bias_layout.contiguous_offsets())
    else {
        bail!("linear epilogue: needs contiguous tensors")
    };
    let bias = &bias[b_begin..b_end];
    if bias.is_empty() || layout.dims().last() != Some(&bias.len()) {
        bail!("linear epilogue: a bias of {} for {:?}", bias.len(), layout.dims())
    }
    Ok((&mut ys[begin..end], bias))
}

/// Elements per rayon task: whole rows, enough of them to outweigh the dispatch.
fn task_len(width: usize) -> usize {
    MIN_ELEMENTS_PER_TASK.div_ceil(width) * width
}

/// The activation after the bias.
#[derive(Clone, Copy)]
enum Act {
    None,
    GeluTanh,
    QuickGelu,
}

struct Bias {
    act: Act,
}

impl candle_core::InplaceOp2 for Bias {
    fn name(&self) -> &'static str {
        "bias-in-place-f32"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (ys, bias) = rows(s1, l1, s2, l2)?;
        let act = self.act;
        ys.par_chunks_mut(task_len(bias.len())).for_each(|rows| {
            for row in rows.chunks_exact_mut(bias.len()) {
                vectorized(Row {
                    row,
                    bias,
                    residual: None,
                    act,
                })
            }
        });
        Ok(())
    }
}

struct BiasAdd;

impl candle_core::InplaceOp3 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-in-place-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (ys, bias) = rows(s1, l1, s2, l2)?;
        let (CpuStorage::F32(residual), Some((begin, end))) = (s3, l3.contiguous_offsets()) else {
            bail!("linear epilogue: a contiguous f32 residual")
        };
        let residual = &residual[begin..end];
        if residual.len() != ys.len() {
            bail!(
                "linear epilogue: a residual of {} for {} outputs",
                residual.len(),
                ys.len()
            )
        }
        let task = task_len(bias.len());
        ys.par_chunks_mut(task)
            .zip(residual.par_chunks(task))
            .for_each(|(rows, residuals)| {
                for (row, residual) in rows
                    .chunks_exact_mut(bias.len())
                    .zip(residuals.chunks_exact(bias.len()))
                {
                    vectorized(Row {
                        row,
                        bias,
                        residual: Some(residual),
                        act: Act::None,
                    })
                }
            });
        Ok(())
    }
}

struct Row<'a> {
    row: &'a mut [f32],
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    act: Act,
}

impl Kernel for Row<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let pairs = self.row.iter_mut().zip(self.bias);
        match (self.residual, self.act) {
            (Some(residual), _) => pairs.zip(residual).for_each(|((y, b), r)| *y = (*y + b) + r),
            (None, Act::GeluTanh) => pairs.for_each(|(y, b)| *y = gelu(*y + b)),
            (None, Act::QuickGelu) => pairs.for_each(|(y, b)| *y = quick_gelu(*y + b)),
            (None, Act::None) => pairs.for_each(|(y, b)| *y += b),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_the_composed_ops_to_the_bit() -> Result<()> {
        let dev = &Device::Cpu;
        // 37 rows of 70: rows split unevenly across tasks, widths no vector divides.
        let layer = Linear::new(
            Tensor::randn(0f32, 1.0, (70, 48), dev)?,
            Some(Tensor::randn(0f32, 1.0, 70, dev)?),
        );
        let xs = Tensor::randn(0f32, 1.0, (37, 48), dev)?;
        let residual = Tensor::randn(0f32, 1.0, (37, 70), dev)?;
        let plain = layer.forward(&xs)?;
        let cases = [
            (Then::Nothing, plain.clone()),
            (Then::GeluTanh, kernels::gelu_tanh(&plain)?),
            (
                Then::QuickGelu,
                (&plain * candle_nn::ops::sigmoid(&(&plain * 1.702)?)?)?,
            ),
            (Then::Add(&residual), (&plain + &residual)?),
        ];
        for (i, (then, expected)) in cases.into_iter().enumerate() {
            let got = linear(&layer, &xs, then)?;
            let (got, expected) = (
                got.flatten_all()?.to_vec1::<f32>()?,
                expected.flatten_all()?.to_vec1::<f32>()?,
            );
            // quick_gelu's exp is the kernels' own, not libm's: equal to rounding.
            let largest = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = if matches!(then, Then::QuickGelu) { 1e-5 } else { 0.0 };
            assert!(largest <= bound, "case {i}: {largest}");
        }
        Ok(())
    }

    #[test]
    fn layers_it_cannot_take_fall_back_to_candle() -> Result<()> {
        let dev = &Device::Cpu;
        let layer = Linear::new(Tensor::randn(0f32, 1.0, (8, 16), dev)?, None);
        let xs = Tensor::randn(0f32, 1.0, (3, 16), dev)?;
        let residual = Tensor::ones((3, 8), DType::F32, dev)?;
        let got = linear(&layer, &xs, Then::Add(&residual))?;
        let expected = (layer.forward(&xs)? + 1.0)?;
        assert_eq!(got.to_vec2::<f32>()?, expected.to_vec2::<f32>()?);
        Ok(())
    }
}
