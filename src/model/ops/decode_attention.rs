//! Attention of a step's decode tokens, straight from the paged KV pool.
//!
//! Gathering each sequence's blocks into a contiguous copy and running two matmuls of 1–3
//! rows costs more than the attention itself (at batch 8 the copies alone were 190 MB a
//! step). Here one task per (sequence, key range) reads each pool row (every KV head's key
//! or value of a token, contiguous within a block) once for all the query heads. At batch
//! 1 one sequence is fewer tasks than twice the threads, so its keys are split into ranges
//! whose partial softmaxes are merged afterwards, as flash-decoding does.
//!
//! A pool in f16 or bf16 (`--kv-cache-dtype`) is read at half the bytes: a task widens its
//! rows a tile at a time into f32 scratch in L1, asking for the next tile's meanwhile.

use candle_core::{CpuStorage, Device, Layout, Result, Storage, Tensor, bail};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use pulp::Simd;
use rayon::prelude::*;

use super::kernels::{cpu_f32, exp, lane_sum, row_max};
use crate::kv::BLOCK_TOKENS;

/// Value rows per tile of `Attend`'s weighted sum (32 pool rows of 3 KV heads of 64 f32s:
/// 24 KiB, in L1).
const TILE_TOKENS: usize = 32;

/// Fewest keys in a range: below this a range's merge costs about what it saves.
const MIN_RANGE_KEYS: usize = 128;

/// How many quads of key rows ahead the score pass asks for keys and values.
const AHEAD: usize = 2;

/// For each query head, `softmax(scale · q·Kᵀ) · V` over the first `len` keys of its KV
/// head.
///
/// `q`: `[sequences, heads, head_dim]`; `keys`/`values`: a layer's pool,
/// `[rows, kv_heads, head_dim]`; `tables`: each sequence's block table and length.
/// Returns `[sequences, heads * head_dim]`.
pub fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    tables: &[(&[u32], usize)],
    scale: f32,
) -> Result<Tensor> {
    let (seqs, heads, head_dim) = q.dims3()?;
    let (rows, kv_heads, kv_dim) = keys.dims3()?;
    let fits = tables.iter().all(|(blocks, len)| {
        *len > 0
            && *len <= blocks.len() * BLOCK_TOKENS
            && blocks.iter().all(|&b| (b as usize + 1) * BLOCK_TOKENS <= rows)
    });
    if kv_dim != head_dim
        || heads % kv_heads != 0
        || tables.len() != seqs
        || values.dims() != keys.dims()
        || values.dtype() != keys.dtype()
        || !fits
    {
        bail!("decode attention: {seqs}x{heads}x{head_dim} queries, {kv_heads}x{kv_dim} keys, bad block tables")
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = keys.storage_and_layout();
    let (v_storage, v_layout) = values.storage_and_layout();
    let q = cpu_f32(&q_storage, q_layout, "decode attention")?;
    let (k, v) = (PoolRows::of(&k_storage, k_layout)?, PoolRows::of(&v_storage, v_layout)?);
    // Each task reads whole pool rows (every KV head of a token, contiguous within a
    // block) for one key range of one sequence.
    let width = heads * head_dim;
    let row_width = kv_heads * head_dim;
    let longest = tables.iter().map(|(_, len)| *len).max().unwrap_or(0);
    let ranges = ranges_per_sequence(seqs, longest, rayon::current_num_threads());
    let partials: Vec<Partial> = (0..seqs * ranges)
        .into_par_iter()
        .map(|task| {
            let (seq, range) = (task / ranges, task % ranges);
            let (blocks, len) = tables[seq];
            let starts: Vec<usize> = (range * len / ranges..(range + 1) * len / ranges)
                .map(|token| (blocks[token / BLOCK_TOKENS] as usize * BLOCK_TOKENS + token % BLOCK_TOKENS) * row_width)
                .collect();
            pulp::Arch::new().dispatch(Attend {
                q: &q[seq * width..(seq + 1) * width],
                k,
                v,
                starts: &starts,
                kv_heads,
                head_dim,
                scale,
            })
        })
        .collect();
    let mut out = vec![0f32; seqs * width];
    for (out, partials) in out.chunks_exact_mut(width).zip(partials.chunks_exact(ranges)) {
        merge(partials, head_dim, out);
    }
    Tensor::from_vec(out, (seqs, width), &Device::Cpu)
}

/// A layer's key or value pool as stored.
#[derive(Clone, Copy)]
enum PoolRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> PoolRows<'a> {
    fn of(storage: &'a Storage, layout: &Layout) -> Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("decode attention: needs a contiguous KV pool")
        };
        Ok(match storage {
            Storage::Cpu(CpuStorage::F32(data)) => Self::F32(&data[start..end]),
            Storage::Cpu(CpuStorage::F16(data)) => Self::F16(&data[start..end]),
            Storage::Cpu(CpuStorage::BF16(data)) => Self::Bf16(&data[start..end]),
            _ => bail!("decode attention: a CPU KV pool of f32, f16 or bf16 only"),
        })
    }

    /// Asks for the row at `start`, `width` values.
    #[inline(always)]
    fn prefetch(self, start: usize, width: usize) {
        match self {
            Self::F32(rows) => prefetch(&rows[start..start + width]),
            Self::F16(rows) => prefetch(&rows[start..start + width]),
            Self::Bf16(rows) => prefetch(&rows[start..start + width]),
        }
    }

    /// The rows at `starts`, `width` values each, one after another in f32; `each(r)`
    /// before row r (to ask for rows ahead, one for one, rather than a tile's worth at once).
    #[inline(always)]
    fn widen(self, starts: &[usize], width: usize, out: &mut Vec<f32>, each: impl FnMut(usize)) {
        out.resize(starts.len() * width, 0.0);
        match self {
            Self::F32(rows) => widen_with(rows, starts, width, out, each, |row, out| out.copy_from_slice(row)),
            Self::F16(rows) => widen_f16(rows, starts, width, out, each),
            // bf16 is f32's upper half: a shift the compiler vectorises.
            Self::Bf16(rows) => widen_with(rows, starts, width, out, each, |row, out| {
                for (o, x) in out.iter_mut().zip(row) {
                    *o = f32::from_bits(u32::from(x.to_bits()) << 16);
                }
            }),
        }
    }
}

#[inline(always)]
fn widen_with<T>(
    rows: &[T],
    starts: &[usize],
    width: usize,
    out: &mut [f32],
    mut each: impl FnMut(usize),
    convert: impl Fn(&[T], &mut [f32]),
) {
    for (r, (out, &start)) in out.chunks_exact_mut(width).zip(starts).enumerate() {
        each(r);
        convert(&rows[start..start + width], out);
    }
}

/// `PoolRows::widen` of f16 rows. With F16C, one call for a tile's rows: `half`'s slice
/// conversion calls a function per 8 values, which made an f16 cache slower to read than
/// an f32 one (q8_0 at batch 1 after 512 tokens: 7.2 against 6.1 ms a step).
fn widen_f16(rows: &[f16], starts: &[usize], width: usize, out: &mut [f32], each: impl FnMut(usize)) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the features it is compiled for were just detected.
        return unsafe { widen_f16_f16c(rows, starts, width, out, each) };
    }
    widen_with(rows, starts, width, out, each, |row, out| row.convert_to_f32_slice(out));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16_f16c(rows: &[f16], starts: &[usize], width: usize, out: &mut [f32], each: impl FnMut(usize)) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    widen_with(rows, starts, width, out, each, |row, out| {
        let (eights, rest) = row.as_chunks::<8>();
        let (outs, out_rest) = out.as_chunks_mut::<8>();
        for (o, x) in outs.iter_mut().zip(eights) {
            // SAFETY: 8 f16s are 16 bytes read, 8 f32s 32 bytes written, both in bounds
            // (unaligned loads and stores); the features were detected by the caller.
            unsafe {
                _mm256_storeu_ps(
                    o.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast::<__m128i>())),
                )
            };
        }
        for (o, x) in out_rest.iter_mut().zip(rest) {
            *o = x.to_f32();
        }
    });
}

/// Key ranges per sequence: enough tasks for every thread twice over, none shorter than
/// `MIN_RANGE_KEYS`.
fn ranges_per_sequence(seqs: usize, longest: usize, threads: usize) -> usize {
    let wanted = (2 * threads).div_ceil(seqs.max(1));
    wanted.min(longest / MIN_RANGE_KEYS).max(1)
}

/// One key range's softmax before normalisation, per query head j of the group: the
/// scores' maximum `max[j]`, `sum[j] = Σ e^(s − max)` and `acc[j] = Σ e^(s − max) · v`.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// Writes the group's outputs: each head's ranges rescaled to their common maximum and
/// divided by the total (one range: `acc / sum`).
fn merge(partials: &[Partial], head_dim: usize, out: &mut [f32]) {
    for (j, out) in out.chunks_exact_mut(head_dim).enumerate() {
        let max = partials.iter().map(|p| p.max[j]).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = partials
            .iter()
            .map(|p| if p.sum[j] > 0.0 { (p.max[j] - max).exp() } else { 0.0 })
            .collect();
        let total: f32 = partials.iter().zip(&weights).map(|(p, w)| w * p.sum[j]).sum();
        let inv = 1.0 / total;
        out.fill(0.0);
        for (p, &w) in partials.iter().zip(&weights) {
            for (o, &a) in out.iter_mut().zip(&p.acc[j * head_dim..(j + 1) * head_dim]) {
                *o += w * a;
            }
        }
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

/// One key range of one sequence, for all its query heads.
struct Attend<'a> {
    /// The sequence's query heads, one after another; those of a KV head adjacent.
    q: &'a [f32],
    k: PoolRows<'a>,
    v: PoolRows<'a>,
    /// Where each key's row (every KV head's key, or value, of a token) starts in `k` and
    /// `v`, in token order.
    starts: &'a [usize],
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

impl Attend<'_> {
    /// `scale · q·k` of every query head for the keys at `starts` in `k` (the range's keys
    /// from `first` on), into their columns of `scores` (head i's row: `n` wide). With
    /// `values`, asks for keys and values ahead.
    #[inline(always)]
    fn score<S: Simd>(
        &self,
        simd: S,
        k: &[f32],
        starts: &[usize],
        first: usize,
        values: Option<&[f32]>,
        scores: &mut [f32],
    ) {
        let d = self.head_dim;
        let n = self.starts.len();
        let group = self.q.len() / d / self.kv_heads;
        let row_width = self.kv_heads * d;
        // Four keys at a time: four independent chains of FMAs and reductions (one key at a
        // time, each score waited on its own chain).
        let (quads, rest) = starts.as_chunks::<4>();
        for (i, quad) in quads.iter().enumerate() {
            // Rows two quads ahead, asked for while these are dotted: this machine's
            // prefetchers leave the pass waiting on memory (one layer's attention at 512
            // tokens of context from DRAM, 2 threads: 65-80 -> 49 us at batch 1). Their
            // values too, so that the value pass finds them in cache: with the next quad's
            // keys alone, batch 8 took 300 us, with both 265-290.
            if let Some(v) = values {
                for &start in quads.get(i + AHEAD).into_iter().flatten() {
                    prefetch(&k[start..start + row_width]);
                    prefetch(&v[start..start + row_width]);
                }
            }
            for (h, qs) in self.q.chunks_exact(group * d).enumerate() {
                let keys = quad.map(|start| &k[start + h * d..start + (h + 1) * d]);
                for (j, q) in qs.chunks_exact(d).enumerate() {
                    let row = (h * group + j) * n + first + 4 * i;
                    for (u, dot) in dots(simd, q, keys).into_iter().enumerate() {
                        scores[row + u] = dot * self.scale;
                    }
                }
            }
        }
        for (t, &start) in rest.iter().enumerate() {
            let t = first + 4 * quads.len() + t;
            for (i, q) in self.q.chunks_exact(d).enumerate() {
                let key = start + (i / group) * d;
                let [dot] = dots(simd, q, [&k[key..key + d]]);
                scores[i * n + t] = dot * self.scale;
            }
        }
    }
}

impl pulp::WithSimd for Attend<'_> {
    type Output = Partial;

    /// In pulp's vector registers along the head dimension, reduced once per score (loops
    /// on arrays of partial sums left the reductions to scalar adds, one chain per score).
    /// One layer's attention at 512 tokens of context on 2 threads, against that form: 31
    /// → 22–24 µs at batch 1, 229 → 177–198 µs at batch 8 (minima of 3000 calls).
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Partial {
        let (d, n) = (self.head_dim, self.starts.len());
        let heads = self.q.len() / d;
        let group = heads / self.kv_heads;
        let row_width = self.kv_heads * d;
        // Head i's scores are row i of `scores`; its keys and values are at `(i / group) * d`
        // within a pool row.
        let mut scores = vec![0f32; heads * n];
        // An f32 pool is read in place; a 16-bit one a tile at a time, widened into `wide`
        // (where a tile's rows are `dense`) while the next tile's keys and values are
        // asked for.
        let mut wide = Vec::new();
        let dense: Vec<usize> = (0..TILE_TOKENS.min(n)).map(|t| t * row_width).collect();
        let tiles = || self.starts.chunks(TILE_TOKENS);
        match (self.k, self.v) {
            (PoolRows::F32(k), PoolRows::F32(v)) => self.score(simd, k, self.starts, 0, Some(v), &mut scores),
            (k, v) => {
                for (tile, (starts, next)) in tiles().zip(tiles().skip(1).chain([&[][..]])).enumerate() {
                    k.widen(starts, row_width, &mut wide, |r| {
                        if let Some(&start) = next.get(r) {
                            k.prefetch(start, row_width);
                            v.prefetch(start, row_width);
                        }
                    });
                    self.score(
                        simd,
                        &wide,
                        &dense[..starts.len()],
                        tile * TILE_TOKENS,
                        None,
                        &mut scores,
                    );
                }
            }
        }
        let (mut max, mut sum) = (vec![f32::NEG_INFINITY; heads], vec![0f32; heads]);
        if n > 0 {
            for (i, row) in scores.chunks_exact_mut(n).enumerate() {
                max[i] = row_max(row);
                for x in row.iter_mut() {
                    *x = exp(*x - max[i]);
                }
                sum[i] = lane_sum(row);
            }
        }
        // Values tile by tile: a tile's rows stay in L1 while the query heads of each KV
        // head accumulate them in registers, four vectors of the head dimension at a time,
        // stored once per tile rather than once per token. The heads of a group share each
        // value load and run side by side: one head's four accumulators alone are four
        // chains of dependent FMAs, which waited on the FMA latency token after token.
        let mut acc = vec![0f32; heads * d];
        for (tile, starts) in tiles().enumerate() {
            let first = tile * TILE_TOKENS;
            let (values, starts) = match self.v {
                PoolRows::F32(v) => (v, starts),
                v => {
                    v.widen(starts, row_width, &mut wide, |_| {});
                    (&wide[..], &dense[..starts.len()])
                }
            };
            for (h, accs) in acc.chunks_exact_mut(group * d).enumerate() {
                let weights = |j: usize| &scores[(h * group + j) * n + first..][..starts.len()];
                let tile = Tile {
                    v: values,
                    starts,
                    offset: h * d,
                };
                let mut rows = accs.chunks_exact_mut(d).enumerate();
                // Up to four heads at a time (four accumulators each, sixteen in all).
                while rows.len() > 0 {
                    let left = rows.len();
                    let mut next = || rows.next().map(|(j, acc)| (weights(j), acc)).expect("counted");
                    match left {
                        1 => tile.weigh(simd, [next()]),
                        2 => tile.weigh(simd, [next(), next()]),
                        3 => tile.weigh(simd, [next(), next(), next()]),
                        _ => tile.weigh(simd, [next(), next(), next(), next()]),
                    }
                }
            }
        }
        Partial { max, sum, acc }
    }
}

/// One tile of value rows, at one KV head's offset within them.
struct Tile<'a> {
    v: &'a [f32],
    starts: &'a [usize],
    offset: usize,
}

impl Tile<'_> {
    /// `acc += Σ_t e[t] · v_t` over the tile's tokens t, for each of `G` query heads
    /// `(e, acc)` of this KV head, in token order as one head alone would add them.
    #[inline(always)]
    fn weigh<S: Simd, const G: usize>(&self, simd: S, heads: [(&[f32], &mut [f32]); G]) {
        let d = heads[0].1.len();
        let es = heads.each_ref().map(|(e, _)| *e);
        let mut accs = heads.map(|(_, acc)| S::as_mut_simd_f32s(acc));
        let row = |start: usize| &self.v[start + self.offset..start + self.offset + d];
        let vectors = accs[0].0.len();
        for c in 0..vectors / 4 {
            let mut regs: [[S::f32s; 4]; G] = std::array::from_fn(|j| std::array::from_fn(|k| accs[j].0[4 * c + k]));
            for (t, &start) in self.starts.iter().enumerate() {
                let (values, _) = S::as_simd_f32s(row(start));
                let values: [S::f32s; 4] = std::array::from_fn(|k| values[4 * c + k]);
                for (regs, e) in regs.iter_mut().zip(&es) {
                    let p = simd.splat_f32s(e[t]);
                    for (reg, &value) in regs.iter_mut().zip(&values) {
                        *reg = simd.mul_add_f32s(p, value, *reg);
                    }
                }
            }
            for (regs, (acc, _)) in regs.iter().zip(accs.iter_mut()) {
                acc[4 * c..4 * c + 4].copy_from_slice(regs);
            }
        }
        let done = 4 * (vectors / 4);
        if done == vectors && accs[0].1.is_empty() {
            return;
        }
        for (t, &start) in self.starts.iter().enumerate() {
            let (values, value_tail) = S::as_simd_f32s(row(start));
            for ((acc, acc_tail), e) in accs.iter_mut().zip(&es) {
                let p = simd.splat_f32s(e[t]);
                for (a, &v) in acc[done..].iter_mut().zip(&values[done..]) {
                    *a = simd.mul_add_f32s(p, v, *a);
                }
                for (a, v) in acc_tail.iter_mut().zip(value_tail) {
                    *a = e[t].mul_add(*v, *a);
                }
            }
        }
    }
}

/// Asks for `row`'s cache lines ahead of their use.
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(64 / size_of::<T>()) {
        // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// `q · k` for each of `keys`.
#[inline(always)]
fn dots<S: Simd, const U: usize>(simd: S, q: &[f32], keys: [&[f32]; U]) -> [f32; U] {
    let (qs, q_tail) = S::as_simd_f32s(q);
    let split = keys.map(|k| S::as_simd_f32s(k));
    let mut sums = [simd.splat_f32s(0.0); U];
    for (c, &q) in qs.iter().enumerate() {
        for (sum, (k, _)) in sums.iter_mut().zip(&split) {
            *sum = simd.mul_add_f32s(q, k[c], *sum);
        }
    }
    let mut dots = [0f32; U];
    for ((dot, sum), (_, k_tail)) in dots.iter_mut().zip(sums).zip(&split) {
        *dot = simd.reduce_sum_f32s(sum);
        for (q, k) in q_tail.iter().zip(*k_tail) {
            *dot = q.mul_add(*k, *dot);
        }
    }
    dots
}

#[cfg(test)]
#[path = "decode_attention_tests.rs"]
mod tests;
