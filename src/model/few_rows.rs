//! `xs · Wᵀ` for a few rows of `xs` (decode steps: one row per sequence), f32 on the CPU.
//!
//! gemm (candle's CPU matmul) packs its operands into panels before multiplying, which pays
//! off over many rows: with one to a few dozen rows the weight is packed, read once and
//! dropped, so every weight is read from memory and written back and read again, and the
//! multiplication itself runs in gemm's narrow-edge kernels. At batch 16 a SmolVLM-256M
//! decode step spent ~100–160 GFLOP/s in them on this 2-core AVX-512 machine, a third of
//! what the FMA units allow. Here each weight row is read from memory once, straight from
//! its `[out, in]` layout, and dotted with every row of `xs` while it sits in L1: blocks of
//! 4 weight rows by 4 input rows keep 16 vector accumulators (one per output), which is the
//! FMA units' throughput with 8 loads per 16 FMAs. The output columns are split across
//! rayon's threads.

use candle_core::{Device, Result, Tensor, bail};
use rayon::prelude::*;

use super::kernels::cpu_f32;

/// Weight rows per task: small enough that both cores share even the narrowest layer
/// (576 outputs), large enough that a task outweighs its dispatch.
const ROWS_PER_TASK: usize = 64;

/// Whether `linear` takes `xs` (`[rows, in]`, rows ≤ 64) and `weight` (`[out, in]`).
pub fn applies(xs: &Tensor, weight: &Tensor) -> bool {
    super::kernels::applies(xs) && super::kernels::applies(weight) && weight.is_contiguous()
}

/// `xs · weightᵀ`: `xs` `[rows, in]`, `weight` `[out, in]`, both f32 on the CPU;
/// returns `[rows, out]`.
pub fn linear(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (rows, width) = xs.dims2()?;
    let (out, weight_width) = weight.dims2()?;
    if width != weight_width {
        bail!("few-row linear: [{rows}, {width}] times [{out}, {weight_width}]ᵀ")
    }
    let xs = xs.contiguous()?;
    let (x_storage, x_layout) = xs.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let (x, w) = (
        cpu_f32(&x_storage, x_layout, "few-row linear")?,
        cpu_f32(&w_storage, w_layout, "few-row linear")?,
    );
    // Each task owns a range of output columns, computed as [rows, columns] and copied into
    // place (the output is a few rows: the copy is negligible next to the weights' traffic).
    let parts: Vec<Vec<f32>> = w
        .par_chunks(ROWS_PER_TASK * width)
        .map(|w| {
            let mut part = vec![0f32; rows * (w.len() / width)];
            pulp::Arch::new().dispatch(Block {
                x,
                w,
                width,
                out: &mut part,
            });
            part
        })
        .collect();
    let mut ys = vec![0f32; rows * out];
    let mut column = 0;
    for part in &parts {
        let columns = part.len() / rows.max(1);
        for (row, values) in part.chunks_exact(columns.max(1)).enumerate() {
            ys[row * out + column..row * out + column + columns].copy_from_slice(values);
        }
        column += columns;
    }
    Tensor::from_vec(ys, (rows, out), &Device::Cpu)
}

/// `out[r][c] = x_r · w_c` for every input row r and weight row c of one task.
struct Block<'a> {
    x: &'a [f32],
    w: &'a [f32],
    width: usize,
    /// `[rows, w rows]`.
    out: &'a mut [f32],
}

impl pulp::WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let width = self.width;
        let rows = self.x.len() / width;
        let columns = self.w.len() / width;
        let (x, w) = (self.x, self.w);
        let mut c = 0;
        while c < columns {
            let mut r = 0;
            if c + 4 <= columns {
                let w = [
                    row(w, c, width),
                    row(w, c + 1, width),
                    row(w, c + 2, width),
                    row(w, c + 3, width),
                ];
                while r + 4 <= rows {
                    let dots = dots::<S, 4, 4>(
                        simd,
                        w,
                        [
                            row(x, r, width),
                            row(x, r + 1, width),
                            row(x, r + 2, width),
                            row(x, r + 3, width),
                        ],
                    );
                    for (i, dots) in dots.iter().enumerate() {
                        for (j, &d) in dots.iter().enumerate() {
                            self.out[(r + j) * columns + c + i] = d;
                        }
                    }
                    r += 4;
                }
                while r < rows {
                    let dots = dots::<S, 4, 1>(simd, w, [row(x, r, width)]);
                    for (i, dots) in dots.iter().enumerate() {
                        self.out[r * columns + c + i] = dots[0];
                    }
                    r += 1;
                }
                c += 4;
            } else {
                while r < rows {
                    self.out[r * columns + c] = dots::<S, 1, 1>(simd, [row(w, c, width)], [row(x, r, width)])[0][0];
                    r += 1;
                }
                c += 1;
            }
        }
    }
}

#[inline(always)]
fn row(data: &[f32], index: usize, width: usize) -> &[f32] {
    &data[index * width..(index + 1) * width]
}

/// The W·X dot products of `W` weight rows with `X` input rows, one vector accumulator
/// each, reduced at the end. Written with pulp's vector types: the same loops on arrays were
/// left scalar by LLVM (accumulators in memory).
#[inline(always)]
fn dots<S: pulp::Simd, const W: usize, const X: usize>(simd: S, w: [&[f32]; W], x: [&[f32]; X]) -> [[f32; X]; W] {
    let mut w_vectors = [&[][..]; W];
    let mut w_tails = [&[][..]; W];
    for i in 0..W {
        (w_vectors[i], w_tails[i]) = S::as_simd_f32s(w[i]);
    }
    let mut x_vectors = [&[][..]; X];
    let mut x_tails = [&[][..]; X];
    for j in 0..X {
        (x_vectors[j], x_tails[j]) = S::as_simd_f32s(x[j]);
    }
    let mut sums = [[simd.splat_f32s(0.0); X]; W];
    for v in 0..w_vectors[0].len() {
        let mut xv = [simd.splat_f32s(0.0); X];
        for j in 0..X {
            xv[j] = x_vectors[j][v];
        }
        for i in 0..W {
            let wv = w_vectors[i][v];
            for j in 0..X {
                sums[i][j] = simd.mul_add_f32s(wv, xv[j], sums[i][j]);
            }
        }
    }
    let mut dots = [[0f32; X]; W];
    for i in 0..W {
        for j in 0..X {
            let mut total = simd.reduce_sum_f32s(sums[i][j]);
            for (a, b) in w_tails[i].iter().zip(x_tails[j]) {
                total = a.mul_add(*b, total);
            }
            dots[i][j] = total;
        }
    }
    dots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
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
    fn refuses_mismatched_widths() {
        let xs = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 9), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(linear(&xs, &w).is_err());
    }
}
