//! Products over many rows (prefill) with weights stored in a form other than f32 (kept in
//! bf16): the weight widened to f32, on every thread, into a buffer kept per thread, and
//! handed to gemm as candle's matmul hands it an f32 weight.

use candle_core::{Device, Result, Tensor, bail};
use rayon::prelude::*;

use super::kernels::cpu_f32;
use super::{Strided, gemm_f32};

/// Widened f32 weights per slab, at most: 64 MiB, which holds most projections whole. In
/// slabs of 1 MiB (to stay in L2) each slab was its own gemm, which packed the activations
/// again every time: one Qwen3-VL-2B layer (bf16-kept) at 256 rows took 235 ms against
/// dense f32's 162; whole, 175 (`cargo bench --bench few_rows`, AVX2, 2 threads).
const SLAB_ELEMENTS: usize = 16 * 1024 * 1024;

thread_local! {
    /// The widened slab, kept between calls: a fresh allocation of up to `SLAB_ELEMENTS`
    /// f32s per projection was mapped and zeroed by the kernel page by page each time.
    static WIDENED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `xs · weightᵀ` for a weight `[out, width]` stored in another form: `widen(first, values)`
/// writes weight rows from `first` as f32 into `values` (whole rows). The weight is widened
/// slab by slab, on every thread, into a buffer kept per thread, and each slab handed to
/// gemm.
pub fn linear(xs: &Tensor, (out, width): (usize, usize), widen: impl Fn(usize, &mut [f32]) + Sync) -> Result<Tensor> {
    let (rows, xs_width) = xs.dims2()?;
    if width != xs_width || width == 0 {
        bail!("widened linear: [{rows}, {xs_width}] times [{out}, {width}]ᵀ")
    }
    let xs = xs.contiguous()?;
    let (x_storage, x_layout) = xs.storage_and_layout();
    let x = cpu_f32(&x_storage, x_layout, "widened linear")?;
    let slabs = (out * width).div_ceil(SLAB_ELEMENTS).max(1);
    let slab_rows = out.div_ceil(slabs).next_multiple_of(16);
    let mut ys = vec![0f32; rows * out];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Taken out of the thread's slot for the call, and put back after: while gemm waits for
    // its jobs this worker may steal another step's (another engine, or the vision thread's
    // encode) and come back here with the slot empty, which then gets a buffer of its own.
    let mut widened = WIDENED.take();
    for first in (0..out).step_by(slab_rows) {
        let columns = slab_rows.min(out - first);
        if widened.len() < columns * width {
            widened.resize(columns * width, 0.0);
        }
        let part_rows = columns.div_ceil(threads).max(1);
        widened[..columns * width]
            .par_chunks_mut(part_rows * width)
            .enumerate()
            .for_each(|(i, values)| widen(first + i * part_rows, values));
        // SAFETY: dst is `ys` from column `first`, `rows` rows `out` apart, each `columns`
        // wide (in bounds: the slabs partition the columns); lhs is `x`, `rows` rows of
        // `width`; rhs is the widened slab read transposed (`columns` rows of `width`).
        unsafe {
            gemm_f32(
                (rows, columns, width),
                Strided::rows(ys.as_mut_ptr().add(first), out),
                Strided::rows(x.as_ptr(), width),
                Strided {
                    ptr: widened.as_ptr(),
                    row: 1,
                    col: width,
                },
                parallelism,
            )
        }
    }
    WIDENED.set(widened);
    Tensor::from_vec(ys, (rows, out), &Device::Cpu)
}
