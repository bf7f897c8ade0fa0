//! Fused CPU kernels for the element-wise work between matmuls, in f32.
//!
//! Composed from candle's ops, a LayerNorm is eight passes over the activations with an
//! allocation each, and candle's GELU calls `tanhf` once per element on one thread: in the
//! SigLIP encoder that GELU alone was a fifth of the time (6 ns an element, against 0.5 ns
//! for `expf`), and softmax's `expf` another tenth. These kernels make one pass per row,
//! spread over rayon's threads (candle's own pool), with their loops compiled for the CPU's
//! vector extensions (pulp picks AVX-512, AVX2 or plain SSE at run time) and an exponential
//! those loops can vectorise. Each computes what transformers computes, up to rounding;
//! callers use them for f32 tensors on the CPU and candle's ops everywhere else.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Rows handed to one rayon task: enough work to outweigh the dispatch.
pub(super) const MIN_ELEMENTS_PER_TASK: usize = 16 * 1024;

/// Whether `xs` can take these kernels.
pub fn applies(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32
}

/// `gelu_pytorch_tanh`: `0.5·x·(1 + tanh(u))` with `u = √(2/π)·(x + 0.044715·x³)`, written as
/// `x / (1 + e^(-2u))` (the same function: `1 + tanh(u) = 2·sigmoid(2u)`), which needs one
/// exponential and cancels nothing.
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    xs.apply_op1_no_bwd(&GeluTanh)
}

/// Llama's gated MLP activation on stacked `[gate | up]` rows: `silu(gate) · up`, with
/// `silu(x) = x / (1 + e^(-x))`. candle's SiLU called `expf` per element and the product
/// was another pass over two copied halves: 7% of a batch-16 decode step.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.apply_op1_no_bwd(&SiluMul)
}

/// Softmax over the last dimension, each row shifted by its maximum as PyTorch does, written
/// over `scores` itself (contiguous f32 on the CPU, held by no
/// one else: attention scores fresh from their matmul): no second buffer of the scores'
/// size to allocate and fault in (48 MB per SigLIP tile and layer).
pub fn softmax_last_dim_in_place(scores: &Tensor) -> Result<()> {
    scores.inplace_op1(&SoftmaxInPlace { causal: None })
}

/// Softmax over `row[..visible]` in place and the rest set to 0: a row of causal scores.
pub fn masked_softmax_row_in_place(row: &mut [f32], visible: usize) {
    let visible = visible.min(row.len());
    vectorized(SoftmaxRowInPlace { row, visible })
}

/// Causal softmax over `scores` in place, `[.., rows, keys]` with row `r` the query at
/// position `start + r % queries` (heads' rows one after another): it sees keys
/// `0..=start + r % queries`, and the rest get probability 0, exactly as adding a −∞ mask
/// before `softmax_last_dim_in_place` gives, without building the mask or adding it.
pub fn causal_softmax_in_place(scores: &Tensor, queries: usize, start: usize) -> Result<()> {
    scores.inplace_op1(&SoftmaxInPlace {
        causal: Some((queries.max(1), start)),
    })
}

/// LayerNorm over the last dimension with PyTorch's two-pass statistics (see `norm.rs`).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    xs.apply_op3_no_bwd(weight, bias, &LayerNormOp { eps: eps as f32 })
}

/// Llama's RMSNorm over the last dimension: `weight · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    xs.apply_op2_no_bwd(weight, &RmsNormOp { eps: eps as f32 })
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: f32 only, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: needs a contiguous input"),
    }
}

/// Runs `f` over matching chunks of `input` and a fresh output, in parallel.
fn par_map(input: &[f32], chunk: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut output = vec![0f32; input.len()];
    let chunk = chunk.max(1);
    output
        .par_chunks_mut(chunk)
        .zip(input.par_chunks(chunk))
        .for_each(|(out, inp)| f(inp, out));
    output
}

/// `par_map` over whole rows of `width`.
fn map_rows(input: &[f32], width: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let width = width.max(1);
    par_map(input, MIN_ELEMENTS_PER_TASK.div_ceil(width) * width, |inp, out| {
        for (out, inp) in out.chunks_exact_mut(width).zip(inp.chunks_exact(width)) {
            f(inp, out)
        }
    })
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, self.name())?;
        let out = par_map(input, MIN_ELEMENTS_PER_TASK, |inp, out| {
            vectorized(Gelu { input: inp, out })
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, self.name())?;
        let mut dims = layout.shape().dims().to_vec();
        let Some(width) = dims.last_mut().filter(|w| **w % 2 == 0) else {
            bail!(
                "{}: needs [.., 2 * intermediate], got {:?}",
                self.name(),
                layout.shape()
            )
        };
        *width /= 2;
        let half = (*width).max(1);
        let rows = MIN_ELEMENTS_PER_TASK.div_ceil(half);
        let mut out = vec![0f32; input.len() / 2];
        out.par_chunks_mut(rows * half)
            .zip(input.par_chunks(rows * 2 * half))
            .for_each(|(out, input)| {
                for (out, row) in out.chunks_exact_mut(half).zip(input.chunks_exact(2 * half)) {
                    let (gate, up) = row.split_at(half);
                    vectorized(SiluTimes { gate, up, out })
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

struct SiluTimes<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    out: &'a mut [f32],
}

impl Kernel for SiluTimes<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for ((o, &g), &u) in self.out.iter_mut().zip(self.gate).zip(self.up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

struct SoftmaxInPlace {
    /// (queries, start) for a causal mask.
    causal: Option<(usize, usize)>,
}

impl candle_core::InplaceOp1 for SoftmaxInPlace {
    fn name(&self) -> &'static str {
        "softmax-in-place-f32"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else {
            bail!("{}: f32 only, got {:?}", self.name(), storage.dtype())
        };
        let Some((begin, end)) = layout.contiguous_offsets() else {
            bail!("{}: needs a contiguous input", self.name())
        };
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows_per_task = MIN_ELEMENTS_PER_TASK.div_ceil(width);
        let causal = self.causal;
        data[begin..end]
            .par_chunks_mut(rows_per_task * width)
            .enumerate()
            .for_each(|(task, rows)| {
                for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                    let visible = match causal {
                        Some((queries, start)) => (start + (task * rows_per_task + i) % queries + 1).min(width),
                        None => width,
                    };
                    vectorized(SoftmaxRowInPlace { row, visible })
                }
            });
        Ok(())
    }
}

/// A loop body to compile for the CPU's vector extensions: pulp runs `run` inside a
/// function built for AVX-512, AVX2+FMA or SSE, whichever the CPU has. Everything `run`
/// calls must be `#[inline(always)]` (a closure cannot be relied on to be), or it is compiled
/// for the baseline and called.
pub(super) trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

struct Vectorized<K>(K);

impl<K: Kernel> pulp::WithSimd for Vectorized<K> {
    type Output = K::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> K::Output {
        self.0.run()
    }
}

pub(super) fn vectorized<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Vectorized(kernel))
}

struct Gelu<'a> {
    input: &'a [f32],
    out: &'a mut [f32],
}

impl Kernel for Gelu<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (o, &x) in self.out.iter_mut().zip(self.input) {
            *o = gelu(x);
        }
    }
}

/// `gelu_pytorch_tanh` of one element (see `gelu_tanh`).
#[inline(always)]
pub(super) fn gelu(x: f32) -> f32 {
    // √(2/π), as PyTorch's kernel spells it (M_SQRT2 · M_2_SQRTPI · 0.5).
    const K: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
    let u = K * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// CLIP's `quick_gelu` of one element: `x · sigmoid(1.702 · x)`, as transformers writes it.
#[inline(always)]
pub(super) fn quick_gelu(x: f32) -> f32 {
    x * (1.0 / (1.0 + exp(-(1.702 * x))))
}

/// Softmax of `row[..visible]` in place, `row[visible..]` set to 0.
struct SoftmaxRowInPlace<'a> {
    row: &'a mut [f32],
    visible: usize,
}

impl Kernel for SoftmaxRowInPlace<'_> {
    type Output = ();

    /// The maximum, `e^(x − max)`, their lane sum, times its inverse; the hidden entries
    /// are exact zeros.
    #[inline(always)]
    fn run(self) {
        let (row, visible) = (self.row, self.visible);
        let max = row_max(&row[..visible]);
        if max == f32::NEG_INFINITY {
            row.fill(f32::NAN);
            return;
        }
        let (shown, hidden) = row.split_at_mut(visible);
        for x in shown.iter_mut() {
            *x = exp(*x - max);
        }
        hidden.fill(0.0);
        let inv = 1.0 / lane_sum(row);
        for x in row[..visible].iter_mut() {
            *x *= inv;
        }
    }
}

/// `ln Σ eˣ` over `row`, shifted by its maximum: a log-softmax's normaliser (logprobs over
/// the vocabulary, for every sequence at every step: libm's `exp` per element took a tenth
/// of a batch-16 decode step).
pub fn log_sum_exp(row: &[f32]) -> f32 {
    vectorized(LogSumExp { row })
}

struct LogSumExp<'a> {
    row: &'a [f32],
}

impl Kernel for LogSumExp<'_> {
    type Output = f32;

    #[inline(always)]
    fn run(self) -> f32 {
        let max = row_max(self.row);
        if !max.is_finite() {
            return max;
        }
        let mut sums = [0f32; LANES];
        let chunks = self.row.chunks_exact(LANES);
        let mut total = 0f32;
        for &x in chunks.remainder() {
            total += exp(x - max);
        }
        for chunk in chunks {
            for (s, &x) in sums.iter_mut().zip(chunk) {
                *s += exp(x - max);
            }
        }
        (sums.iter().sum::<f32>() + total).ln() + max
    }
}

#[inline(always)]
pub(super) fn row_max(row: &[f32]) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in maxima.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    tail.iter().chain(&maxima).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// Lanes of the partial maxima and sums: written as arrays so that the compiler turns them
/// into vector registers (a plain fold is sequential under IEEE rules).
pub(super) const LANES: usize = 16;

/// A sum in `LANES` partial sums (vectorisable), the tail added last: softmax's order.
#[inline(always)]
pub(super) fn lane_sum(values: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (s, &e) in sums.iter_mut().zip(chunk) {
            *s += e;
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// `e^x` in plain arithmetic the compiler vectorises (libm's `expf` is a call per
/// element): Cody–Waite reduction `x = n·ln2 + r`, Cephes' degree-6 polynomial for `e^r`,
/// and `2^n` built in the exponent bits. Within 2 ulp of `expf` on [-87, 88]; below that
/// it returns e^-87.3 instead of a subnormal (about 1e-38, nothing next to a softmax's
/// sum of at least 1).
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5·2²³ rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let p = p * r * r + r + 1.0;
    // `shifted`'s low bits hold n itself (an integer well inside ±2²²): read there with
    // integer vector ops. `n as i32` is a saturating conversion, which the compiler left
    // scalar, lane by lane: 80% of the exponential's time.
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits(((n + 127) << 23) as u32)
}

/// The contiguous f32 data of a CPU tensor's storage, for kernels called outside a CustomOp.
pub(super) fn cpu_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => contiguous_f32(cpu, layout, op),
        _ => bail!("{op}: CPU tensors only"),
    }
}

/// A contiguous bf16 CPU tensor's values.
pub(super) fn cpu_bf16<'a>(storage: &'a candle_core::Storage, layout: &Layout, op: &str) -> Result<&'a [half::bf16]> {
    let candle_core::Storage::Cpu(CpuStorage::BF16(data)) = storage else {
        bail!("{op}: bf16 CPU tensors only")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: needs a contiguous input"),
    }
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(s1, l1, self.name())?;
        let weight = contiguous_f32(s2, l2, self.name())?;
        let bias = contiguous_f32(s3, l3, self.name())?;
        let width = l1.shape().dims().last().copied().unwrap_or(1);
        if weight.len() != width || bias.len() != width {
            bail!(
                "layer-norm: weight {} and bias {} for rows of {width}",
                weight.len(),
                bias.len()
            )
        }
        let n = width as f32;
        let out = map_rows(input, width, |row, out| {
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for (((o, x), w), b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (x - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-f32"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(s1, l1, self.name())?;
        let weight = contiguous_f32(s2, l2, self.name())?;
        let width = l1.shape().dims().last().copied().unwrap_or(1);
        if weight.len() != width {
            bail!("rms-norm: weight {} for rows of {width}", weight.len())
        }
        let n = width as f32;
        let out = map_rows(input, width, |row, out| {
            let rstd = 1.0 / (row.iter().map(|x| x * x).sum::<f32>() / n + self.eps).sqrt();
            for ((o, x), w) in out.iter_mut().zip(row).zip(weight) {
                *o = w * (x * rstd);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_mul_matches_candles_silu_times_up() {
        let xs = Tensor::randn(0f32, 3.0, (5, 2 * 37), &Device::Cpu).unwrap();
        let expected =
            (candle_nn::ops::silu(&xs.narrow(1, 0, 37).unwrap()).unwrap() * xs.narrow(1, 37, 37).unwrap()).unwrap();
        let got = silu_mul(&xs).unwrap();
        assert_eq!(got.dims(), &[5, 37]);
        let diff: f32 = (got - expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        assert!(silu_mul(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        let row: Vec<f32> = (0..49_155).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let expected = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
        assert!(
            (log_sum_exp(&row) as f64 - expected).abs() < 1e-5,
            "{} vs {expected}",
            log_sum_exp(&row)
        );
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert!((log_sum_exp(&[0.0, 0.0]) - 2f32.ln()).abs() < 1e-7);
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff <= tol, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn gelu_matches_the_tanh_formula_and_its_tails() -> Result<()> {
        // 40000 values (more than one task, and a tail) from -12 to 12.
        let xs = Tensor::arange(-20_000f32, 20_000.0, &Device::Cpu)?.affine(6e-4, 0.0)?;
        close(&gelu_tanh(&xs)?, &xs.gelu()?, 2e-6)?;
        let tails = Tensor::new(&[-100f32, -20.0, 0.0, 20.0, 100.0], &Device::Cpu)?;
        let gelu = gelu_tanh(&tails)?.to_vec1::<f32>()?;
        assert!(gelu[..2].iter().all(|g| g.abs() < 1e-30), "{gelu:?}");
        assert_eq!(gelu[2..], [0.0, 20.0, 100.0]);
        Ok(())
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 1.7e-4;
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                (ours - libm).abs() <= 2.0 * (libm * f32::EPSILON),
                "{x}: {ours} vs {libm}"
            );
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_matches_candles_on_wide_and_masked_rows() -> Result<()> {
        let dev = &Device::Cpu;
        // Rows of 1030 (not a multiple of the lanes) with a spread of ±40 and masked tails.
        let xs = (Tensor::randn(0f32, 20.0, (7, 1030), dev)?.clamp(-40f32, 40f32))?;
        let mask = Tensor::arange(0u32, 1030, dev)?.ge(1000u32)?.where_cond(
            &Tensor::full(f32::NEG_INFINITY, 1030, dev)?,
            &Tensor::zeros(1030, DType::F32, dev)?,
        )?;
        let xs = xs.broadcast_add(&mask)?;
        let ours = xs.copy()?;
        softmax_last_dim_in_place(&ours)?;
        close(&ours, &candle_nn::ops::softmax_last_dim(&xs)?, 5e-7)
    }

    #[test]
    fn causal_softmax_equals_adding_the_mask_first() -> Result<()> {
        let dev = &Device::Cpu;
        // 2 heads x 3 queries at positions 5..8 over 8 keys; rows spread over tasks too.
        let (queries, start, keys) = (3, 5, 8);
        let xs = Tensor::randn(0f32, 3.0, (2, queries, keys), dev)?;
        let mask: Vec<f32> = (0..queries)
            .flat_map(|i| (0..keys).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (queries, keys), dev)?;
        let expected = candle_nn::ops::softmax_last_dim(&xs.broadcast_add(&mask)?)?;
        let ours = xs.copy()?;
        causal_softmax_in_place(&ours, queries, start)?;
        close(&ours, &expected, 5e-7)?;
        // the hidden keys are exactly zero
        assert_eq!(ours.get(1)?.get(0)?.to_vec1::<f32>()?[6..], [0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn norms_match_their_composed_forms() -> Result<()> {
        let dev = &Device::Cpu;
        let xs = (Tensor::randn(0f32, 3.0, (37, 96), dev)? + 50.0)?;
        let (w, b) = (Tensor::randn(1f32, 0.1, 96, dev)?, Tensor::randn(0f32, 0.1, 96, dev)?);
        let centered = xs.broadcast_sub(&xs.mean_keepdim(1)?)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        let composed = centered
            .broadcast_div(&(var + 1e-6)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)?;
        // Rows near 50 with a spread of 3: both forms lose a few digits of the mean.
        close(&layer_norm(&xs, &w, &b, 1e-6)?, &composed, 3e-5)?;
        let rms = (xs.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?;
        close(
            &rms_norm(&xs, &w, 1e-5)?,
            &xs.broadcast_div(&rms)?.broadcast_mul(&w)?,
            3e-5,
        )
    }
}
