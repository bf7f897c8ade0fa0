//! `xs · Wᵀ` for a few rows of `xs` (decode steps: one row per sequence), f32 on the CPU.
//!
//! gemm (candle's CPU matmul) packs its operands into panels before multiplying, which pays
//! off over many rows: with one to a few dozen rows the weight is packed, read once and
//! dropped, so every weight is read from memory and written back and read again, and the
//! multiplication itself runs in gemm's narrow-edge kernels. At batch 16 a SmolVLM-256M
//! decode step spent ~100–160 GFLOP/s in them on this 2-core AVX-512 machine, a third of
//! what the FMA units allow. Here each weight row is read from memory once, straight from
//! its `[out, in]` layout: 4 weight rows at a time, a chunk of columns at a time, are made
//! f32 (bf16 widened, f32 as they are) and dotted with every row of `xs`
//! while they sit in L1, 3 input rows at a time on AVX2 (12 vector accumulators, one per
//! output, in its 16 registers), 4 with AVX-512's 32. On AVX2 from 8 rows to a few hundred
//! the `lanes` kernel takes over (the rows across the vector lanes, each weight broadcast).
//! The output columns are split across rayon's threads.

use candle_core::{Device, Result, Tensor, bail};
use rayon::prelude::*;
use std::borrow::Cow;

use super::kernels::{cpu_bf16, cpu_f32};

/// Weight rows per task, about: small enough that both cores share even the narrowest
/// layer (576 outputs), large enough that a task outweighs its dispatch.
const ROWS_PER_TASK: usize = 64;

/// Rows per task for `out` weight rows: about `ROWS_PER_TASK` in evenly shared tasks
/// (`ops::per_task`), a multiple of 4 (the kernels' block).
fn rows_per_task(out: usize) -> usize {
    super::per_task(out, ROWS_PER_TASK).next_multiple_of(4)
}

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
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = cpu_f32(&w_storage, w_layout, "few-row linear")?;
    multiply::<F32>(xs, w, width, out)
}

/// `xs · weightᵀ` with `weight` `[out, in]` in bf16 standing for f32 values (see
/// `exact_bf16`; `in` even): the products of the f32 weights from half the memory traffic.
/// Each 32-bit load holds two neighbouring weights, which become f32 in registers (the even
/// one shifted up, the odd one masked), so the activations are split into their even and odd
/// columns (per chunk of `CHUNK` columns) to meet them.
pub fn linear_bf16(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (rows, width) = xs.dims2()?;
    let (out, weight_width) = weight.dims2()?;
    if width != weight_width || width % 2 != 0 {
        bail!("few-row bf16 linear: [{rows}, {width}] times [{out}, {weight_width}]ᵀ")
    }
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = cpu_bf16(&w_storage, w_layout, "few-row bf16 linear")?;
    let Ok(pairs) = bytemuck::try_cast_slice::<_, u32>(w) else {
        bail!("few-row bf16 linear: weights not aligned to 4 bytes")
    };
    multiply::<Bf16Pairs>(xs, pairs, width, out)
}

/// Whether the lanes kernel runs on this CPU (`lanes::supported`, asked once).
fn lanes_here() -> bool {
    static HERE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HERE.get_or_init(lanes::supported)
}

/// Up to how many rows these kernels are ahead of gemm, for both storage forms:
/// `lanes::MAX_ROWS` where the lanes kernel runs; else (the dot kernel) 64 for weights kept
/// in bf16 (measured when Q8_0 weights were expanded here too: one Qwen3-VL-2B layer at 32
/// rows 33 ms against gemm's 53 on the weights widened whole, at 64 69 against 78, at 256
/// gemm ahead) and 16 for f32 weights, which gemm need not widen (SmolVLM-256M decode at
/// batch 16 47.8 ms against 50.4, AVX-512).
pub fn max_rows(kept: bool) -> usize {
    match (lanes_here(), kept) {
        (true, _) => lanes::MAX_ROWS,
        (false, true) => 64,
        (false, false) => 16,
    }
}

/// A weight layout: how one weight row is stored, how it is dotted with one input row, and
/// how a chunk of it becomes f32 for several.
trait Format {
    type Elem: Sync;
    /// Stored elements per weight row of `width` weights.
    fn row_len(width: usize) -> usize;

    /// The input rows (`width` wide) with each chunk of `chunk` columns in the order
    /// `weights` and `dot` give the weights.
    fn arrange(x: &[f32], _width: usize, _chunk: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(x)
    }

    /// The weights of columns `k0..k0 + kc` of weight row `w` as f32 (in `buffer` or in
    /// place).
    fn weights<'a>(w: &'a [Self::Elem], k0: usize, kc: usize, buffer: &'a mut [f32]) -> &'a [f32];

    /// A whole weight row as f32, chunk by chunk in the order `arrange` gives the inputs:
    /// in `buffer` (`width` long) for the formats whose `weights` fill the buffer given.
    #[inline(always)]
    fn row_f32<'a>(w: &'a [Self::Elem], width: usize, buffer: &'a mut [f32]) -> &'a [f32] {
        for k0 in (0..width).step_by(CHUNK) {
            let kc = CHUNK.min(width - k0);
            Self::weights(w, k0, kc, &mut buffer[k0..k0 + kc]);
        }
        &buffer[..width]
    }

    /// One weight row with one input row (arranged in one chunk), for a single input row
    /// (decode at batch 1). There 4 weight rows at a time are four memory streams, which
    /// this machine's prefetchers follow at half the speed of one: a one-row GEMV read 13
    /// GB/s per core that way and 22 GB/s row by row.
    fn dot<S: pulp::Simd>(simd: S, w: &[Self::Elem], x: &[f32]) -> f32;
}

/// Splits the weight rows into tasks of `rows_per_task` over rayon's threads, each filling
/// `[rows, its weight rows]` (`Block`).
fn multiply<F: Format>(xs: &Tensor, w: &[F::Elem], width: usize, out: usize) -> Result<Tensor> {
    let rows = xs.dim(0)?;
    let xs = xs.contiguous()?;
    let (x_storage, x_layout) = xs.storage_and_layout();
    let x = cpu_f32(&x_storage, x_layout, "few-row linear")?;
    // Once for every task: split per task, bf16's 16 rows were copied 2374 times per step
    // for Qwen3-VL's vocabulary, 300 MB.
    let x = F::arrange(x, width, if rows == 1 { width } else { CHUNK });
    let row_len = F::row_len(width);
    let packed = (rows >= lanes::LANES_FROM && lanes_here()).then(|| lanes::pack(&x, rows, width));
    // Each task owns a range of output columns, computed as [rows, columns] and copied into
    // place (the output is a few rows: the copy is negligible next to the weights' traffic).
    let parts: Vec<Vec<f32>> = w
        .par_chunks(rows_per_task(out) * row_len)
        .map_init(
            || vec![0f32; 4 * CHUNK],
            |buffers, w| {
                let mut part = vec![0f32; rows * (w.len() / row_len)];
                match &packed {
                    Some(packed) => pulp::Arch::new().dispatch(lanes::Tile::<F> {
                        packed,
                        rows,
                        w,
                        width,
                        row_len,
                        out: &mut part,
                        buffer: buffers,
                    }),
                    None => pulp::Arch::new().dispatch(dot::Block::<F> {
                        x: &x,
                        w,
                        width,
                        row_len,
                        out: &mut part,
                        buffers,
                    }),
                }
                part
            },
        )
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

/// Input columns multiplied at a time on several rows: 4 weight rows of a chunk, as f32,
/// are 16 KB, which stay in L1 while every input row passes them. (Whole rows of Qwen3-VL's
/// 6144-wide down projection are 96 KB: from L2, the weights' loads on top of the inputs'
/// exceeded what L2 delivers.)
const CHUNK: usize = 1024;

struct F32;

impl Format for F32 {
    type Elem = f32;

    fn row_len(width: usize) -> usize {
        width
    }

    #[inline(always)]
    fn weights<'a>(w: &'a [f32], k0: usize, kc: usize, _: &'a mut [f32]) -> &'a [f32] {
        &w[k0..k0 + kc]
    }

    /// The row itself.
    #[inline(always)]
    fn row_f32<'a>(w: &'a [f32], width: usize, _: &'a mut [f32]) -> &'a [f32] {
        &w[..width]
    }

    /// Four accumulators along the row, so that the FMAs' latency does not bind.
    #[inline(always)]
    fn dot<S: pulp::Simd>(simd: S, w: &[f32], x: &[f32]) -> f32 {
        let (w_vectors, w_tail) = S::as_simd_f32s(w);
        let (x_vectors, x_tail) = S::as_simd_f32s(x);
        let mut sums = [simd.splat_f32s(0.0); 4];
        let (w_quads, w_rest) = w_vectors.as_chunks::<4>();
        let (x_quads, x_rest) = x_vectors.as_chunks::<4>();
        for (w, x) in w_quads.iter().zip(x_quads) {
            for k in 0..4 {
                sums[k] = simd.mul_add_f32s(w[k], x[k], sums[k]);
            }
        }
        for (k, (w, x)) in w_rest.iter().zip(x_rest).enumerate() {
            sums[k] = simd.mul_add_f32s(*w, *x, sums[k]);
        }
        let sum = simd.add_f32s(simd.add_f32s(sums[0], sums[1]), simd.add_f32s(sums[2], sums[3]));
        let mut dot = simd.reduce_sum_f32s(sum);
        for (a, b) in w_tail.iter().zip(x_tail) {
            dot = a.mul_add(*b, dot);
        }
        dot
    }
}

/// bf16 weights read two at a time as `u32`s; the activations come split into their even
/// columns followed by their odd ones (`arrange`).
struct Bf16Pairs;

impl Format for Bf16Pairs {
    type Elem = u32;

    fn row_len(width: usize) -> usize {
        width / 2
    }

    /// Per chunk, the even columns followed by the odd ones.
    fn arrange(x: &[f32], width: usize, chunk: usize) -> Cow<'_, [f32]> {
        let mut split = Vec::with_capacity(x.len());
        for row in x.chunks_exact(width) {
            for part in row.chunks(chunk) {
                split.extend(part.iter().step_by(2));
                split.extend(part.iter().skip(1).step_by(2));
            }
        }
        Cow::Owned(split)
    }

    /// The even weights then the odd ones (a bf16 is the top half of its f32).
    #[inline(always)]
    fn weights<'a>(w: &'a [u32], k0: usize, kc: usize, buffer: &'a mut [f32]) -> &'a [f32] {
        let (even, odd) = buffer[..kc].split_at_mut(kc / 2);
        for ((pair, even), odd) in w[k0 / 2..(k0 + kc) / 2].iter().zip(even).zip(odd) {
            *even = f32::from_bits(pair << 16);
            *odd = f32::from_bits(pair & 0xffff_0000);
        }
        &buffer[..kc]
    }

    /// Four accumulators: the even and odd weights of two vectors of pairs at a time.
    #[inline(always)]
    fn dot<S: pulp::Simd>(simd: S, w: &[u32], x: &[f32]) -> f32 {
        let half = x.len() / 2;
        let (w_vectors, w_tail) = S::as_simd_u32s(w);
        let (even, odd) = (S::as_simd_f32s(&x[..half]).0, S::as_simd_f32s(&x[half..]).0);
        let (shift, high) = (simd.splat_u32s(16), simd.splat_u32s(0xffff_0000));
        let widen = |pairs: S::u32s| {
            (
                simd.transmute_f32s_u32s(simd.wrapping_dyn_shl_u32s(pairs, shift)),
                simd.transmute_f32s_u32s(simd.and_u32s(pairs, high)),
            )
        };
        let mut sums = [simd.splat_f32s(0.0); 4];
        let mut v = 0;
        while v + 2 <= w_vectors.len() {
            for k in 0..2 {
                let (w_even, w_odd) = widen(w_vectors[v + k]);
                sums[2 * k] = simd.mul_add_f32s(w_even, even[v + k], sums[2 * k]);
                sums[2 * k + 1] = simd.mul_add_f32s(w_odd, odd[v + k], sums[2 * k + 1]);
            }
            v += 2;
        }
        if v < w_vectors.len() {
            let (w_even, w_odd) = widen(w_vectors[v]);
            sums[0] = simd.mul_add_f32s(w_even, even[v], sums[0]);
            sums[1] = simd.mul_add_f32s(w_odd, odd[v], sums[1]);
        }
        let sum = simd.add_f32s(simd.add_f32s(sums[0], sums[1]), simd.add_f32s(sums[2], sums[3]));
        let mut dot = simd.reduce_sum_f32s(sum);
        let done = w.len() - w_tail.len();
        for (k, &pair) in w_tail.iter().enumerate() {
            dot = f32::from_bits(pair << 16).mul_add(x[done + k], dot);
            dot = f32::from_bits(pair & 0xffff_0000).mul_add(x[half + done + k], dot);
        }
        dot
    }
}

/// Up to 8 rows: each weight row dotted with a few input rows at a time.
#[path = "few_rows_dot.rs"]
mod dot;

/// From 8 rows: the input rows across the vector lanes, the weights broadcast.
#[path = "few_rows_lanes.rs"]
mod lanes;

#[cfg(test)]
#[path = "few_rows_tests.rs"]
pub(crate) mod tests;
