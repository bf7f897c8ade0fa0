//! Tests of `q8_0`, beside it to keep each file short.

use super::*;

fn quantized(out: usize, width: usize) -> (Tensor, QTensor) {
    let w = Tensor::randn(0f32, 1.0, (out, width), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    (w, q)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

/// `xs` rounded per block as `round_rows` rounds them, times the blocks' values, in f64.
fn reference(xs: &Tensor, q: &QTensor) -> Vec<f32> {
    let (rows, width) = xs.dims2().unwrap();
    let rounded = round_rows(&values(xs));
    let x: Vec<f64> = (0..rows * width)
        .map(|k| f64::from(rounded.quants[k]) * f64::from(rounded.scales[k / BLOCK]))
        .collect();
    let w = values(&q.dequantize(&Device::Cpu).unwrap());
    let out = w.len() / width;
    let mut ys = vec![0f32; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let dot: f64 = (0..width).map(|k| x[r * width + k] * f64::from(w[o * width + k])).sum();
            ys[r * out + o] = dot as f32;
        }
    }
    ys
}

#[test]
fn multiplies_the_rounded_activations_by_the_blocks_for_every_tail() {
    // Rows 1–3 and 5, 9, 33: register blocks of 4 rows and their tails; 8, 13, 24, 133
    // outputs: one group, a padded one, an odd count of groups (a block of one), several
    // tasks; width 2112: 66 blocks.
    for (rows, out, width) in [
        (1, 8, 32),
        (2, 13, 64),
        (3, 24, 96),
        (5, 133, 2112),
        (9, 13, 96),
        (33, 40, 64),
    ] {
        let xs = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
        let (w, q) = quantized(out, width);
        let matrix = Q8_0Matrix::from_qtensor(&q).unwrap();
        let expected = reference(&xs, &q);
        let portable = values(&linear_with(&xs, &matrix, Kernel::Portable).unwrap());
        // f32 sums of one term per block: off by about a rounding per block.
        let largest = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = largest_difference(&portable, &expected);
        assert!(
            worst < 1e-6 * (width / BLOCK) as f32 * largest,
            "{rows}x{out}x{width}: {worst}"
        );
        // Here (x86-64 with AVX2, as CI's machine) the vector kernel gives the very same
        // values: the same exact integer sums and the same f32 operations.
        if Kernel::here() == Kernel::Avx2 {
            let avx2 = linear(&xs, &matrix).unwrap();
            assert_eq!(avx2.dims(), &[rows, out]);
            assert_eq!(values(&avx2), portable, "{rows}x{out}x{width}");
        }
        // and the activations really were rounded: not the f32 product with the blocks
        let unrounded = values(&xs.matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap());
        assert!(portable.iter().zip(&unrounded).any(|(a, b)| (a - b).abs() > 1e-4));
        // yet close to the unquantized weights' product
        let exact = values(&xs.matmul(&w.t().unwrap()).unwrap());
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let far = largest_difference(&portable, &exact);
        assert!(far < 0.05 * scale, "{rows}x{out}x{width}: {far} of {scale}");
    }
}

#[test]
fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
    // Batched equals alone: a row alone, and at each position of a 37-row batch.
    let (_, q) = quantized(70, 128);
    let matrix = Q8_0Matrix::from_qtensor(&q).unwrap();
    let batch = Tensor::randn(0f32, 1.0, (37, 128), &Device::Cpu).unwrap();
    let together = values(&linear(&batch, &matrix).unwrap());
    for r in [0, 3, 4, 35, 36] {
        let alone = values(&linear(&batch.narrow(0, r, 1).unwrap(), &matrix).unwrap());
        assert_eq!(alone, together[r * 70..(r + 1) * 70], "row {r}");
    }
}

#[test]
fn zero_activations_and_refusals() {
    let (_, q) = quantized(8, 64);
    let matrix = Q8_0Matrix::from_qtensor(&q).unwrap();
    // A block of zeros has scale 0 and stays 0, not NaN.
    let zeros = Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(values(&linear(&zeros, &matrix).unwrap()).iter().all(|&v| v == 0.0));
    let narrow = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(linear(&narrow, &matrix).is_err());
    let q4 = QTensor::quantize(
        &Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::Q4_0,
    )
    .unwrap();
    assert!(Q8_0Matrix::from_qtensor(&q4).is_err());
}
