//! Causal attention of one sequence's prompt chunk against its keys: the cached prefix and
//! the chunk itself (grouped-query heads share a KV head).
//!
//! On the CPU in f32 each task is one query head of one block of the chunk's rows: the
//! scores of its rows against the keys they may see (`q · kᵀ` over keys up to the block's
//! last position, not the whole sequence: half the products of a prompt without a prefix
//! are masked), a masked softmax in place and the product with `v`, each a single-threaded
//! gemm reading the heads where they lie. Composed from candle's ops, the scores of every
//! head against every key were computed, masked and stored (`[heads, n, start + n]`: 27 MiB
//! for SmolVLM's 876-token photo prompt, per layer) before the second matmul read them.

use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

use super::{Operand, Out, Strided, attend_block, kernels, last_contiguous};

/// Rows of a task's block of queries: enough that gemm's kernel runs full (its blocks are
/// 16 rows), few enough that a chunk splits into many tasks (the later blocks see more keys:
/// small tasks keep both threads busy to the end).
const BLOCK_ROWS: usize = 64;

/// `q`: `[n, heads, head_dim]` (scaled), the queries at positions `start..start + n`;
/// `keys`, `values`: `[start + n, kv_heads, head_dim]`. Query `i` sees keys `0..=start + i`.
/// Returns `[n, heads * head_dim]`.
pub fn attention(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
    let (n, heads, head_dim) = q.dims3()?;
    let (total, kv_heads, kv_dim) = keys.dims3()?;
    if values.dims() != keys.dims()
        || kv_dim != head_dim
        || total != start + n
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        bail!(
            "prefill attention: q {:?}, keys {:?}, values {:?} from position {start}",
            q.dims(),
            keys.dims(),
            values.dims()
        )
    }
    if ![q, keys, values].iter().all(|t| kernels::applies(t)) {
        return with_candle(q, keys, values, start);
    }
    let (q, keys, values) = (last_contiguous(q)?, last_contiguous(keys)?, last_contiguous(values)?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let chunk = Chunk {
        q: Operand::of(&qs, ql, (n, heads, head_dim))?,
        k: Operand::of(&ks, kl, (total, kv_heads, head_dim))?,
        v: Operand::of(&vs, vl, (total, kv_heads, head_dim))?,
        start,
        group: heads / kv_heads,
        head_dim,
        width: heads * head_dim,
    };
    let mut out = vec![0f32; n * chunk.width];
    let target = Out(out.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..heads)
        .flat_map(|h| (0..n).step_by(BLOCK_ROWS).map(move |first| (h, first)))
        .collect();
    tasks.into_par_iter().for_each_init(Vec::new, |scores, (h, first)| {
        chunk.task(h, first, BLOCK_ROWS.min(n - first), scores, &target)
    });
    Tensor::from_vec(out, (n, chunk.width), &Device::Cpu)
}

/// The same through candle's ops (other devices and dtypes): query heads that share a KV
/// head are grouped into one matmul instead of repeating the keys; every query's scores
/// against every key, masked.
fn with_candle(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
    let (n, heads, head_dim) = q.dims3()?;
    let (total, kv_heads, _) = keys.dims3()?;
    let group = heads / kv_heads;
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv_heads, group * n, head_dim))?;
    let (k, v) = (keys.transpose(0, 1)?, values.transpose(0, 1)?);
    let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let probs = if kernels::applies(&scores) && scores.is_contiguous() {
        // Rows are (KV head, query head, query): query i is row % n.
        kernels::causal_softmax_in_place(&scores, n, start)?;
        scores
    } else {
        if n > 1 {
            let mask = causal_mask(n, start, total, q.device())?;
            scores = scores.reshape((kv_heads, group, n, total))?.broadcast_add(&mask)?;
            scores = scores.reshape((kv_heads, group * n, total))?;
        }
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs
        .to_dtype(v.dtype())?
        .matmul(&v)?
        .reshape((heads, n, head_dim))?
        .transpose(0, 1)?
        .reshape((n, heads * head_dim))
}

/// `[n, total]`: query i (at position start + i) sees keys 0..=start + i.
fn causal_mask(n: usize, start: usize, total: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}

/// The operands of one call.
struct Chunk<'a> {
    q: Operand<'a>,
    k: Operand<'a>,
    v: Operand<'a>,
    /// The position of the chunk's first query.
    start: usize,
    /// Query heads per KV head.
    group: usize,
    head_dim: usize,
    /// The output's row: every head's values.
    width: usize,
}

impl Chunk<'_> {
    /// Query head `h` of the chunk's rows `first..first + rows`.
    fn task(&self, h: usize, first: usize, rows: usize, scores: &mut Vec<f32>, target: &Out) {
        let Self {
            q,
            k,
            v,
            start,
            group,
            head_dim,
            width,
        } = self;
        // The block's last query sees keys up to its own position: no later key is read.
        let seen = start + first + rows;
        let kv_head = h / group;
        // SAFETY: `Operand::of` checked the whole views; these are query rows
        // `first..first + rows` of head `h` and key rows `0..seen <= start + n` of its KV
        // head; the output region (rows `first..` of `rows`, columns `h * head_dim..` of
        // `head_dim`) is this task's alone.
        unsafe {
            attend_block(
                (rows, seen, *head_dim),
                Strided::rows(q.at(first, h), q.row),
                Strided::rows(k.at(0, kv_head), k.row),
                Strided::rows(v.at(0, kv_head), v.row),
                Strided::rows(target.ptr().add(first * width + h * head_dim), *width),
                scores,
                |i| start + first + i + 1,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::D;

    use super::*;
    use crate::model::ops::few_rows::tests::max_difference;

    /// The composed form: every head against every key, a −∞ mask, softmax, `· v`.
    fn composed(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize) -> Result<Tensor> {
        let (n, heads, head_dim) = q.dims3()?;
        let (total, kv_heads, _) = keys.dims3()?;
        let group = heads / kv_heads;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let t = t.transpose(0, 1)?.contiguous()?; // [kv_heads, total, d]
            Tensor::cat(
                &(0..heads)
                    .map(|h| t.narrow(0, h / group, 1))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )
        };
        let q = q.transpose(0, 1)?.contiguous()?;
        let scores = q.matmul(&repeat(keys)?.t()?)?;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, total), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        probs
            .matmul(&repeat(values)?)?
            .transpose(0, 1)?
            .reshape((n, heads * head_dim))
    }

    #[test]
    fn causal_mask_lets_a_chunk_see_the_cached_prefix() -> Result<()> {
        let mask = causal_mask(2, 3, 5, &Device::Cpu)?.to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(mask, vec![vec![0.0, 0.0, 0.0, 0.0, inf], vec![0.0; 5]]);
        Ok(())
    }

    #[test]
    fn equals_masked_attention_over_blocks_prefixes_and_shared_kv_heads() -> Result<()> {
        let (heads, kv_heads, head_dim) = (6, 2, 8);
        // A whole prompt; a chunk after a cached prefix; chunks over several blocks with a tail.
        for (start, n) in [(0, 5), (7, 3), (0, 2 * BLOCK_ROWS + 9), (40, BLOCK_ROWS + 1)] {
            let total = start + n;
            // q as the decoder hands it over: a view of the stacked projection's rows.
            let qkv = Tensor::randn(0f32, 1.0, (n, heads + 2, head_dim), &Device::Cpu)?;
            let q = qkv.narrow(1, 1, heads)?;
            let keys = Tensor::randn(0f32, 1.0, (total, kv_heads, head_dim), &Device::Cpu)?;
            let values = Tensor::randn(0f32, 1.0, (total, kv_heads, head_dim), &Device::Cpu)?;
            let got = attention(&q, &keys, &values, start)?;
            let expected = composed(&q, &keys, &values, start)?;
            assert!(max_difference(&got, &expected) < 1e-5, "start {start}, n {n}");
            // The path of other devices and dtypes, in f64.
            let wide = |t: &Tensor| t.to_dtype(DType::F64);
            let through_candle = attention(&wide(&q)?, &wide(&keys)?, &wide(&values)?, start)?;
            assert!(max_difference(&through_candle.to_dtype(DType::F32)?, &expected) < 1e-5);
        }
        let q = Tensor::zeros((4, 6, 8), DType::F32, &Device::Cpu)?;
        let kv = Tensor::zeros((5, 2, 8), DType::F32, &Device::Cpu)?;
        assert!(
            attention(&q, &kv, &kv, 0).is_err(),
            "4 queries from 0 see 4 keys, not 5"
        );
        Ok(())
    }
}
