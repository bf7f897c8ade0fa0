//! Bidirectional attention of the vision encoders: every patch of a frame (SmolVLM's tile,
//! Qwen3-VL's image or pair of video frames) attends to every patch of the same frame, per
//! head.
//!
//! On the CPU in f32 each task is one head of one block of a frame's queries: its scores
//! (`q · kᵀ`), their softmax and the product with `v`, each a single-threaded gemm reading
//! the heads where they lie (rows of the stacked projections) and writing the output in
//! place. Through candle every matmul was a call of its own, with gemm's threads joined in
//! each: per layer of Qwen3-VL-2B's vision on a 1024x768 image, 16 heads x 9 blocks x 2 small
//! products (`K` = 64, or `N` = 64) ran at 80–118 GFLOP/s of the 2 cores' ~175, half the
//! encoder's time for a third of its FLOPs.

use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

use super::{Operand, Out, Strided, attend_block, kernels, last_contiguous};

/// `q`, `k`, `v`: `[rows, heads, head_dim]` (q already scaled), the rows a run of frames
/// of `frames[i]` patches each; returns `[rows, heads * head_dim]`. At most `scores_bytes`
/// of scores per task (per thread on the CPU, per call of candle's matmul elsewhere).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, frames: &[usize], scores_bytes: usize) -> Result<Tensor> {
    attention_masked(q, k, v, frames, scores_bytes, false)
}

/// The same, each position seeing only those before it and itself when `causal` (CLIP's
/// text tower: many short texts in one call, instead of a call per text).
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    frames: &[usize],
    scores_bytes: usize,
    causal: bool,
) -> Result<Tensor> {
    let (rows, heads, head_dim) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || frames.iter().sum::<usize>() != rows {
        bail!(
            "frame attention: q {:?}, k {:?}, v {:?} over frames of {frames:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if [q, k, v].iter().all(|t| kernels::applies(t)) {
        return on_cpu(q, k, v, frames, scores_bytes, causal);
    }
    if causal {
        let mut outputs = Vec::with_capacity(frames.len());
        let mut first = 0;
        for &len in frames {
            let part = |t: &Tensor| t.narrow(0, first, len);
            outputs.push(super::prefill_attention::attention(&part(q)?, &part(k)?, &part(v)?, 0)?);
            first += len;
        }
        return Tensor::cat(&outputs, 0);
    }
    let mut outputs = Vec::with_capacity(frames.len());
    let mut first = 0;
    for &len in frames {
        let part = |t: &Tensor| -> Result<Tensor> { t.narrow(0, first, len)?.transpose(0, 1)?.contiguous() };
        outputs.push(with_candle(&part(q)?, &part(k)?, &part(v)?, scores_bytes)?.transpose(0, 1)?);
        first += len;
    }
    Tensor::cat(&outputs, 0)?.reshape((rows, heads * head_dim))
}

/// One frame through candle's ops: `q`, `k`, `v` `[heads, patches, head_dim]`; a few heads
/// and a block of queries at a time, so that their scores are still in cache when the
/// softmax and the second matmul read them (softmax is per row: blocks of rows give the
/// same result).
fn with_candle(q: &Tensor, k: &Tensor, v: &Tensor, scores_bytes: usize) -> Result<Tensor> {
    let (heads, len, _) = q.dims3()?;
    let block_rows = (scores_bytes / (len * 4)).clamp(1, len);
    let group = (scores_bytes / (block_rows * len * 4)).clamp(1, heads);
    let mut per_head = Vec::with_capacity(heads.div_ceil(group));
    for h in (0..heads).step_by(group) {
        let hn = group.min(heads - h);
        let (q, kt, v) = (q.narrow(0, h, hn)?, k.narrow(0, h, hn)?.t()?, v.narrow(0, h, hn)?);
        let mut blocks = Vec::with_capacity(len.div_ceil(block_rows));
        for start in (0..len).step_by(block_rows) {
            let n = block_rows.min(len - start);
            let scores = q.narrow(1, start, n)?.matmul(&kt)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
            blocks.push(probs.matmul(&v)?);
        }
        per_head.push(Tensor::cat(&blocks, 1)?);
    }
    Tensor::cat(&per_head, 0)
}

fn on_cpu(q: &Tensor, k: &Tensor, v: &Tensor, frames: &[usize], scores_bytes: usize, causal: bool) -> Result<Tensor> {
    let (rows, heads, head_dim) = q.dims3()?;
    let (q, k, v) = (last_contiguous(q)?, last_contiguous(k)?, last_contiguous(v)?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let shape = (rows, heads, head_dim);
    let (q, k, v) = (
        Operand::of(&qs, ql, shape)?,
        Operand::of(&ks, kl, shape)?,
        Operand::of(&vs, vl, shape)?,
    );
    let width = heads * head_dim;
    let mut out = vec![0f32; rows * width];
    let target = Out(out.as_mut_ptr());
    // (first row of the frame, its patches, head, first query, queries)
    let mut tasks = Vec::new();
    let mut first = 0;
    for &len in frames {
        let block = (scores_bytes / (len.max(1) * 4)).clamp(1, len.max(1));
        for h in 0..heads {
            for start in (0..len).step_by(block) {
                tasks.push((first, len, h, start, block.min(len - start)));
            }
        }
        first += len;
    }
    let operands = Operands {
        q,
        k,
        v,
        head_dim,
        width,
        causal,
    };
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scores, task| operands.task(task, scores, &target));
    Tensor::from_vec(out, (rows, width), &Device::Cpu)
}

/// The three operands of one call and the output's shape.
struct Operands<'a> {
    q: Operand<'a>,
    k: Operand<'a>,
    v: Operand<'a>,
    head_dim: usize,
    width: usize,
    causal: bool,
}

impl Operands<'_> {
    /// One head of one block of a frame's queries: `(first row of the frame, its patches,
    /// head, first query, queries)`.
    fn task(
        &self,
        (first, len, h, start, n): (usize, usize, usize, usize, usize),
        scores: &mut Vec<f32>,
        target: &Out,
    ) {
        let Self {
            q,
            k,
            v,
            head_dim,
            width,
            causal,
        } = self;
        let causal = *causal;
        let (head_dim, width) = (*head_dim, *width);
        // SAFETY: every operand pointer and stride stays within its storage (`Operand::of`
        // checked the last element of the whole view; these are rows `first..first + len`
        // of head `h`); the output region (rows `first + start..` of `n`, columns
        // `h * head_dim..` of `head_dim`) is this task's alone.
        unsafe {
            attend_block(
                (n, len, head_dim),
                Strided::rows(q.at(first + start, h), q.row),
                Strided::rows(k.at(first, h), k.row),
                Strided::rows(v.at(first, h), v.row),
                Strided::rows(target.ptr().add((first + start) * width + h * head_dim), width),
                scores,
                |i| if causal { start + i + 1 } else { len },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::few_rows::tests::max_difference;

    #[test]
    fn equals_candles_attention_per_frame_and_head_in_blocks_of_queries() -> Result<()> {
        let (heads, head_dim) = (3, 8);
        let frames = [5, 12, 1];
        let rows: usize = frames.iter().sum();
        // q, k and v as the encoders hand them over: views of one stacked projection.
        let qkv = Tensor::randn(0f32, 1.0, (rows, 3, heads, head_dim), &Device::Cpu)?;
        let part = |i| qkv.narrow(1, i, 1).and_then(|t| t.squeeze(1));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let mut expected = Vec::new();
        let mut first = 0;
        for len in frames {
            let frame = |t: &Tensor| t.narrow(0, first, len).and_then(|t| t.transpose(0, 1)?.contiguous());
            let (q, k, v) = (frame(&q)?, frame(&k)?, frame(&v)?);
            let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            expected.push(probs.matmul(&v)?.transpose(0, 1)?);
            first += len;
        }
        let expected = Tensor::cat(&expected, 0)?.reshape((rows, heads * head_dim))?;
        // Scores of 3 rows of the longest frame at a time: blocks of 3, 3, 3, 3.
        for scores_bytes in [3 * 12 * 4, 1 << 20] {
            let got = attention(&q, &k, &v, &frames, scores_bytes)?;
            assert!(max_difference(&got, &expected) < 1e-5, "{scores_bytes}");
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let (q, k, v) = (
                q.to_dtype(DType::F64)?,
                k.to_dtype(DType::F64)?,
                v.to_dtype(DType::F64)?,
            );
            let through_candle = attention(&q, &k, &v, &frames, scores_bytes)?.to_dtype(DType::F32)?;
            assert!(max_difference(&through_candle, &expected) < 1e-5);
        }
        assert!(attention(&q, &k, &v, &[5, 12], 1 << 20).is_err());
        Ok(())
    }

    #[test]
    fn causal_frames_equal_prefill_attention_per_frame() -> Result<()> {
        let (heads, head_dim) = (2, 8);
        let frames = [5, 9, 1];
        let rows: usize = frames.iter().sum();
        let qkv = Tensor::randn(0f32, 1.0, (rows, 3, heads, head_dim), &Device::Cpu)?;
        let part = |i| qkv.narrow(1, i, 1).and_then(|t| t.squeeze(1));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let mut expected = Vec::new();
        let mut first = 0;
        for len in frames {
            let frame = |t: &Tensor| t.narrow(0, first, len);
            expected.push(crate::model::ops::prefill_attention::attention(
                &frame(&q)?,
                &frame(&k)?,
                &frame(&v)?,
                0,
            )?);
            first += len;
        }
        let expected = Tensor::cat(&expected, 0)?;
        // Blocks of 2 queries: later blocks see more keys.
        for scores_bytes in [2 * 9 * 4, 1 << 20] {
            let got = attention_masked(&q, &k, &v, &frames, scores_bytes, true)?;
            assert!(max_difference(&got, &expected) < 1e-5, "{scores_bytes}");
        }
        Ok(())
    }
}
