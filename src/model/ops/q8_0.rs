//! Q8_0 weights (ggml's: per 32 weights of a row one scale and 32 `i8`s) multiplied in
//! integers, as llama.cpp multiplies them: each input row is rounded to 8 bits per block of
//! 32 too (scale `max |x| / 127`, kept in f32), a block's 32 products are summed exactly in
//! `i32`, and its two scales are applied once in f32.
//!
//! Expanded to f32 and multiplied in the FMA units (the previous kernels: few rows as f32
//! weights are, prefill chunks by gemm on the weights widened), q8_0 did a little more work
//! than f32 (the expansion on top of the same FMAs): a Qwen3-VL-2B layer at 16 rows, and the
//! server at concurrency 16, ran slower than f32. In integers, AVX2's `vpmaddubsw` makes 32
//! products per instruction where an FMA makes 8, and the weights stay a quarter of f32's
//! bytes: that layer at 16 rows went from 0.9x to 1.4x f32's speed, at 512 rows 1.16x (see
//! `Proj`). The rounding costs some closeness to f32 (`tests/quantized.rs`), as it does in
//! llama.cpp and candle, whose Q8_0 kernels round the activations the same way.
//!
//! The layout is the one the multiplication wants, not ggml's: 8 weight rows at a time (a
//! `group`, one 8-lane vector of outputs) and, per block, 8 steps of 4 weights of each row
//! (`[row 0: 4 weights][row 1: 4 weights]…`, one 32-byte vector), so that a step is one load
//! and a broadcast of the input row's 4 matching activations; the scales per block are the
//! group's 8 rows' f32s, one vector.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor, bail};
use rayon::prelude::*;

use super::kernels::cpu_f32;

/// Weights per block (and per scale).
pub const BLOCK: usize = 32;
/// Weight rows per group: the lanes of one vector of `i32` (or f32) outputs.
const GROUP: usize = 8;
/// Weights of one row per step: the 4 bytes of one 32-bit lane.
const STEP: usize = 4;
const STEPS: usize = BLOCK / STEP;
/// Bytes of ggml's Q8_0 block: an f16 scale and the 32 `i8`s.
const GGML_BLOCK_BYTES: usize = 2 + BLOCK;

/// Weight groups per task, about: 64 weight rows, as `few_rows` splits its tasks.
const GROUPS_PER_TASK: usize = 8;

/// A `[out, width]` weight in Q8_0, laid out for `linear`.
pub struct Q8_0Matrix {
    out: usize,
    width: usize,
    /// `[groups][blocks][STEPS][GROUP rows][STEP]`; the rows past `out` are zeros.
    quants: Vec<i8>,
    /// `[groups][blocks][GROUP rows]`, the blocks' scales as f32.
    scales: Vec<f32>,
}

impl Q8_0Matrix {
    /// The blocks of a Q8_0 `QTensor` (`[out, width]`, as `QTensor::quantize` rounds them)
    /// in this layout.
    pub fn from_qtensor(weight: &QTensor) -> Result<Self> {
        let (out, width) = weight.shape().dims2()?;
        if weight.dtype() != GgmlDType::Q8_0 || width % BLOCK != 0 || width == 0 {
            bail!("Q8_0 matrix from {:?} [{out}, {width}]", weight.dtype())
        }
        let data = weight.data()?;
        let blocks = width / BLOCK;
        if data.len() != out * blocks * GGML_BLOCK_BYTES {
            bail!("Q8_0 matrix: {} bytes for [{out}, {width}]", data.len())
        }
        let groups = out.div_ceil(GROUP);
        let mut quants = vec![0i8; groups * GROUP * width];
        let mut scales = vec![0f32; groups * blocks * GROUP];
        for (row, ggml) in data.chunks_exact(blocks * GGML_BLOCK_BYTES).enumerate() {
            let (g, lane) = (row / GROUP, row % GROUP);
            for (b, block) in ggml.chunks_exact(GGML_BLOCK_BYTES).enumerate() {
                let first = (g * blocks + b) * GROUP;
                scales[first + lane] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (s, four) in block[2..].chunks_exact(STEP).enumerate() {
                    let at = ((g * blocks + b) * STEPS + s) * GROUP * STEP + lane * STEP;
                    for (q, &byte) in quants[at..at + STEP].iter_mut().zip(four) {
                        *q = byte as i8;
                    }
                }
            }
        }
        Ok(Self {
            out,
            width,
            quants,
            scales,
        })
    }

    /// `(out, width)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.width)
    }

    fn blocks(&self) -> usize {
        self.width / BLOCK
    }
}

/// Rows of activations rounded to 8 bits per block: `quants` `[rows, width]`, `scales`
/// `[rows, blocks]`.
struct Rounded {
    quants: Vec<i8>,
    scales: Vec<f32>,
}

/// ggml's `quantize_row_q8_0` with its scale kept in f32: per block `d = max |x| / 127`,
/// `q = round(x / d)`.
fn round_rows(x: &[f32]) -> Rounded {
    let mut quants = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    for (block, quants) in x.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in quants.iter_mut().zip(block) {
            *q = (v * inverse).round() as i8;
        }
        scales.push(scale);
    }
    Rounded { quants, scales }
}

/// `xs · weightᵀ`: `xs` `[rows, width]` f32 on the CPU, rounded to 8 bits per block;
/// returns `[rows, out]`. Each row's values depend on that row alone (batched equals alone).
pub fn linear(xs: &Tensor, weight: &Q8_0Matrix) -> Result<Tensor> {
    linear_with(xs, weight, Kernel::here())
}

/// Which code multiplies: AVX2's integer instructions, or portable Rust computing the same
/// values (the same exact integer sums, the same f32 operations in the same order).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kernel {
    Avx2,
    Portable,
}

impl Kernel {
    fn here() -> Self {
        static HERE: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *HERE.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
            Kernel::Portable
        })
    }
}

pub(crate) fn linear_with(xs: &Tensor, weight: &Q8_0Matrix, kernel: Kernel) -> Result<Tensor> {
    let (rows, width) = xs.dims2()?;
    let (out, weight_width) = weight.dims();
    if width != weight_width {
        bail!("Q8_0 linear: [{rows}, {width}] times [{out}, {weight_width}]ᵀ")
    }
    let xs = xs.contiguous()?;
    let (x_storage, x_layout) = xs.storage_and_layout();
    let rounded = round_rows(cpu_f32(&x_storage, x_layout, "Q8_0 linear")?);
    let groups = out.div_ceil(GROUP);
    let per_task = super::per_task(groups, GROUPS_PER_TASK);
    let firsts: Vec<usize> = (0..groups).step_by(per_task).collect();
    // Each task computes its groups' columns as [rows, columns], copied into place after.
    let parts: Vec<Vec<f32>> = firsts
        .par_iter()
        .map(|&first| {
            let tile = Tile {
                x: &rounded,
                w: weight,
                rows,
                first,
                groups: per_task.min(groups - first),
            };
            tile.run(kernel)
        })
        .collect();
    let mut ys = vec![0f32; rows * out];
    for (part, &first) in parts.iter().zip(&firsts) {
        let (column, columns) = (first * GROUP, part.len() / rows.max(1));
        let kept = columns.min(out - column);
        for (row, values) in part.chunks_exact(columns.max(1)).enumerate() {
            ys[row * out + column..][..kept].copy_from_slice(&values[..kept]);
        }
    }
    Tensor::from_vec(ys, (rows, out), &Device::Cpu)
}

/// One task: weight groups `first..first + groups` times every row.
struct Tile<'a> {
    x: &'a Rounded,
    w: &'a Q8_0Matrix,
    rows: usize,
    first: usize,
    groups: usize,
}

/// Rows and groups of one register block on AVX2: 4 rows by 2 groups are 8 `i32`
/// accumulators, with the 2 groups' weights and their absolute values 12 of the 16
/// registers. (The f32 sums wait in memory between blocks.)
const ROWS_PER_BLOCK: usize = 4;
const GROUPS_PER_BLOCK: usize = 2;

/// Input rows a task passes its weights at a time: 64 rows of a 2048-wide layer are 128 KB,
/// which stay in L2 beside the task's weights while all of them pass.
const ROWS_PER_CHUNK: usize = 64;

impl Tile<'_> {
    /// `[rows, groups * GROUP]`.
    fn run(&self, kernel: Kernel) -> Vec<f32> {
        let columns = self.groups * GROUP;
        let mut part = vec![0f32; self.rows * columns];
        for chunk in (0..self.rows).step_by(ROWS_PER_CHUNK) {
            let chunk_rows = ROWS_PER_CHUNK.min(self.rows - chunk);
            for g in (0..self.groups).step_by(GROUPS_PER_BLOCK) {
                let pair = GROUPS_PER_BLOCK.min(self.groups - g);
                for r in (chunk..chunk + chunk_rows).step_by(ROWS_PER_BLOCK) {
                    let rows = ROWS_PER_BLOCK.min(chunk + chunk_rows - r);
                    let mut sums = [[[0f32; GROUP]; GROUPS_PER_BLOCK]; ROWS_PER_BLOCK];
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `Kernel::Avx2` is chosen only where the CPU has AVX2 and FMA.
                        Kernel::Avx2 => unsafe { avx2::block(self, self.first + g, pair, r, rows, &mut sums) },
                        _ => self.portable(self.first + g, pair, r, rows, &mut sums),
                    }
                    for (i, sums) in sums.iter().enumerate().take(rows) {
                        for (v, sums) in sums.iter().enumerate().take(pair) {
                            part[(r + i) * columns + (g + v) * GROUP..][..GROUP].copy_from_slice(sums);
                        }
                    }
                }
            }
        }
        part
    }

    /// The block of rows `r..r + rows` by groups `g..g + pair` in plain Rust.
    fn portable(&self, g: usize, pair: usize, r: usize, rows: usize, sums: &mut [[[f32; GROUP]; 2]; 4]) {
        let (width, blocks) = (self.w.width, self.w.blocks());
        for b in 0..blocks {
            for (i, sums) in sums.iter_mut().enumerate().take(rows) {
                let x = &self.x.quants[(r + i) * width + b * BLOCK..][..BLOCK];
                let x_scale = self.x.scales[(r + i) * blocks + b];
                for (v, sums) in sums.iter_mut().enumerate().take(pair) {
                    let group = (g + v) * blocks + b;
                    let w = &self.w.quants[group * BLOCK * GROUP..][..BLOCK * GROUP];
                    for (lane, sum) in sums.iter_mut().enumerate() {
                        let mut dot = 0i32;
                        for s in 0..STEPS {
                            for t in 0..STEP {
                                let q = w[(s * GROUP + lane) * STEP + t];
                                dot += i32::from(q) * i32::from(x[s * STEP + t]);
                            }
                        }
                        let scale = x_scale * self.w.scales[group * GROUP + lane];
                        *sum = (dot as f32).mul_add(scale, *sum);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "q8_0_avx2.rs"]
mod avx2;

#[cfg(test)]
#[path = "q8_0_tests.rs"]
mod tests;
