//! f32 weights whose every value is a bf16 (a bf16 checkpoint, as SmolVLM's are, served at
//! `--dtype f32`), kept in 16 bits and widened to f32 as they are read.
//!
//! Widening a bf16 is exact (it is the top half of the f32), so every product is the one
//! the f32 weight gives: the same outputs, bit for bit, from half the bytes. A decode step
//! reads every weight once and is bound by memory bandwidth, so it runs up to twice as fast,
//! and the weights take half the memory. Products over many rows (prefill) widen the weight
//! for gemm (`widened`).

use candle_core::{DType, Device, Result, Tensor};
use half::bf16;

use super::kernels::{cpu_bf16, cpu_f32};

/// The weight as bf16 if it is an f32 CPU matrix of even width whose every value is exactly
/// a bf16 (the low 16 bits of each f32 are zero); `None` otherwise.
pub fn compact(weight: &Tensor) -> Result<Option<Tensor>> {
    // An even width: `few_rows::linear_bf16` reads the weights in pairs.
    let even = weight.dims().last().is_some_and(|w| w % 2 == 0);
    if !weight.device().is_cpu() || weight.dtype() != DType::F32 || weight.rank() != 2 || !even {
        return Ok(None);
    }
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let values = cpu_f32(&storage, layout, "exact bf16")?;
    if values.iter().any(|v| v.to_bits() & 0xffff != 0) {
        return Ok(None);
    }
    let halves: Vec<bf16> = values
        .iter()
        .map(|v| bf16::from_bits((v.to_bits() >> 16) as u16))
        .collect();
    Ok(Some(Tensor::from_vec(halves, weight.shape(), &Device::Cpu)?))
}

struct Widen<'a> {
    values: &'a [bf16],
    out: &'a mut [f32],
}

impl pulp::WithSimd for Widen<'_> {
    type Output = ();

    /// A plain loop, compiled for the CPU's vector extensions (zero-extend and shift).
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (o, v) in self.out.iter_mut().zip(self.values) {
            *o = f32::from_bits(u32::from(v.to_bits()) << 16);
        }
    }
}

/// `xs · weightᵀ`: `xs` `[rows, in]` f32, `weight` `[out, in]` bf16, both on the CPU; returns
/// `[rows, out]` f32. For any number of rows; `few_rows::linear_bf16` is faster for a few.
pub fn linear(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out, width) = weight.dims2()?;
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = cpu_bf16(&w_storage, w_layout, "bf16 linear")?;
    super::widened::linear(xs, (out, width), |first, values| {
        let values_of = &w[first * width..first * width + values.len()];
        pulp::Arch::new().dispatch(Widen {
            values: values_of,
            out: values,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_exact(shape: (usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .and_then(|t| t.to_dtype(DType::F32))
            .unwrap()
    }

    #[test]
    fn compacts_only_weights_that_are_exactly_bf16() {
        let exact = bf16_exact((3, 40));
        let compacted = compact(&exact).unwrap().expect("bf16 values compact");
        assert_eq!(compacted.dtype(), DType::BF16);
        let back = compacted.to_dtype(DType::F32).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), exact.to_vec2::<f32>().unwrap());
        let mut values = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[77] = f32::from_bits(values[77].to_bits() | 1);
        let one_off = Tensor::from_vec(values, (3, 40), &Device::Cpu).unwrap();
        assert!(compact(&one_off).unwrap().is_none());
        // odd widths stay f32: the few-row kernel reads pairs
        assert!(compact(&bf16_exact((2, 3))).unwrap().is_none());
    }

    #[test]
    fn linear_equals_the_f32_matmul_across_slabs() {
        // 600 x 900 is three slabs (the last one short); 70 rows takes gemm's general path.
        for (rows, out, width) in [(70, 600, 900), (17, 40, 24), (1, 5, 4)] {
            let weight = bf16_exact((out, width));
            let xs = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
            let expected = xs.matmul(&weight.t().unwrap()).unwrap();
            let got = linear(&xs, &compact(&weight).unwrap().unwrap()).unwrap();
            let difference = crate::model::ops::few_rows::tests::max_difference(&got, &expected);
            assert!(difference <= 1e-5 * width as f32, "{rows}x{out}x{width}: {difference}");
        }
    }
}
