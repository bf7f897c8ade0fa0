//! Tests of `few_rows`, beside it to keep each file short.

use super::*;

pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn equals_candles_matmul_for_every_row_count_and_ragged_edges() {
    // 133 outputs: three tasks, the last one ending in a block of 1; width 70: a tail
    // past the last full vector.
    for (rows, out, width) in [(1, 133, 70), (3, 133, 64), (4, 5, 16), (9, 133, 70), (16, 576, 576)] {
        let xs = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (out, width), &Device::Cpu).unwrap();
        let expected = xs.matmul(&w.t().unwrap()).unwrap();
        let got = linear(&xs, &w).unwrap();
        assert_eq!(got.dims(), &[rows, out]);
        let tolerance = 1e-5 * width as f32;
        assert!(max_difference(&got, &expected) < tolerance, "{rows}x{out}x{width}");
    }
}

#[test]
fn bf16_pairs_equal_the_f32_weights_for_every_row_count_and_ragged_edges() {
    // width 70: 35 pairs, a tail of 3 past two 16-pair vectors (AVX-512); 133 outputs:
    // three tasks, the last one ending in a block of 1.
    for (rows, out, width) in [(1, 133, 70), (4, 5, 16), (9, 133, 70), (16, 576, 576), (2, 3, 2)] {
        let xs = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (out, width), &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::BF16)
            .unwrap();
        let expected = xs
            .matmul(&w.to_dtype(candle_core::DType::F32).unwrap().t().unwrap())
            .unwrap();
        let got = linear_bf16(&xs, &w).unwrap();
        assert_eq!(got.dims(), &[rows, out]);
        assert!(
            max_difference(&got, &expected) < 1e-5 * width as f32,
            "{rows}x{out}x{width}"
        );
    }
    let odd = Tensor::zeros((4, 9), candle_core::DType::BF16, &Device::Cpu).unwrap();
    let xs = Tensor::zeros((1, 9), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(linear_bf16(&xs, &odd).is_err());
}

#[test]
fn refuses_mismatched_widths() {
    let xs = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 9), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(linear(&xs, &w).is_err());
}

#[test]
fn every_form_equals_the_f32_product_across_chunks_row_groups_and_column_tails() {
    // Width 2112: two full chunks of CHUNK columns and a 64-wide one; rows 2 to 64 in
    // groups of 4, 3, 2 and 1 (the dot kernel) or of 16 and a tail (`lanes`, from 8 rows:
    // 8 in tiles of 12 weight rows, 29 = 12 + 12 + 5; 9 and 33 in tiles of 6 and a
    // one-vector tail on AVX2); 7 outputs: a group of 4 weight rows and 3 left over.
    let width = 2 * CHUNK + 64;
    for (rows, out) in [(2, 7), (5, 7), (8, 29), (9, 13), (16, 133), (33, 9), (64, 4), (200, 30)] {
        let xs = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (out, width), &Device::Cpu).unwrap();
        let tolerance = 1e-5 * width as f32;
        let got = linear(&xs, &w).unwrap();
        let expected = xs.matmul(&w.t().unwrap()).unwrap();
        assert!(max_difference(&got, &expected) < tolerance, "f32 {rows}x{out}");

        let bf16 = w.to_dtype(candle_core::DType::BF16).unwrap();
        let got = linear_bf16(&xs, &bf16).unwrap();
        let widened = bf16.to_dtype(candle_core::DType::F32).unwrap();
        let expected = xs.matmul(&widened.t().unwrap()).unwrap();
        assert!(max_difference(&got, &expected) < tolerance, "bf16 {rows}x{out}");
    }
}
