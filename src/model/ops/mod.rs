//! CPU kernels the families share: the fused element-wise passes (`kernels`, `epilogue`,
//! `norm`), matrix-vector products for few rows (`few_rows`, `exact_bf16`), products over
//! many rows on weights widened to f32 (`widened`), Q8_0 weights times 8-bit activations
//! (`q8_0`), the linear layer that picks among them
//! (`proj`), paged decode attention (`decode_attention`), a prompt chunk's causal attention
//! (`prefill_attention`) and the vision encoders' attention within frames (`frame_attention`).
//! Each computes what the composed candle ops compute; tests hold them to it.

pub mod decode_attention;
pub mod epilogue;
pub mod exact_bf16;
pub mod few_rows;
pub mod frame_attention;
pub mod kernels;
pub mod norm;
pub mod prefill_attention;
pub mod proj;
pub mod q8_0;
pub mod widened;

use candle_core::{CpuStorage, D, Layout, Result, Storage, Tensor, bail};

/// A `[rows, heads, head_dim]` f32 operand of the attention kernels as its storage, first
/// element and row and head strides (the last dimension contiguous).
pub(crate) struct Operand<'a> {
    data: &'a [f32],
    offset: usize,
    pub row: usize,
    head: usize,
}

impl<'a> Operand<'a> {
    /// A `[rows, heads, head_dim]` view's storage and strides, checked to lie within it.
    pub fn of(storage: &'a Storage, layout: &Layout, (rows, heads, head_dim): (usize, usize, usize)) -> Result<Self> {
        let Storage::Cpu(CpuStorage::F32(data)) = storage else {
            bail!("attention: f32 CPU tensors only")
        };
        let stride = layout.stride();
        let operand = Self {
            data,
            offset: layout.start_offset(),
            row: stride[0],
            head: stride[1],
        };
        let last = |rows: usize, heads: usize| operand.offset + (rows - 1) * operand.row + (heads - 1) * operand.head;
        if rows > 0 && heads > 0 && last(rows, heads) + head_dim > data.len() {
            bail!("attention: a view past its storage")
        }
        Ok(operand)
    }

    /// The element at `(row, head, 0)`, as a pointer.
    pub fn at(&self, row: usize, head: usize) -> *const f32 {
        self.data[self.offset + row * self.row + head * self.head..].as_ptr()
    }
}

/// An attention kernel's output, written by every task at its own rows and head's columns.
pub(crate) struct Out(pub *mut f32);
// SAFETY: tasks write disjoint `[block rows, head_dim]` regions of one live buffer.
unsafe impl Sync for Out {}

impl Out {
    /// The buffer (a method, so that closures capture the `Sync` wrapper, not the pointer).
    pub fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Units of work (weight rows, groups of them) per task for `units` of them: about `about`,
/// in a number of tasks that rayon's threads share evenly. 576 rows in tasks of 64 made 9
/// tasks, 5 on one core and 4 on the other, which then waited a ninth of the layer; tasks
/// of 60 make 10, 5 each.
pub(crate) fn per_task(units: usize, about: usize) -> usize {
    let tasks = units
        .div_ceil(about)
        .next_multiple_of(rayon::current_num_threads())
        .max(1);
    units.div_ceil(tasks).max(1)
}

/// `t` (rank 3) as it is if its last dimension is contiguous, else copied.
pub(crate) fn last_contiguous(t: &Tensor) -> Result<Tensor> {
    match t.stride()[2] == 1 || t.dim(D::Minus1)? == 1 {
        true => Ok(t.clone()),
        false => t.contiguous(),
    }
}

/// An operand of `gemm_f32`: its first element and its row and column strides, in elements.
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row: usize,
    pub col: usize,
}

impl<P> Strided<P> {
    /// Rows `row` apart, each contiguous.
    pub fn rows(ptr: P, row: usize) -> Self {
        Self { ptr, row, col: 1 }
    }
}

/// `dst = lhs · rhs` in f32 through gemm (`lhs` `m x k`, `rhs` `k x n`, `dst` `m x n`,
/// overwritten), each operand read or written through its strides.
///
/// # Safety
/// Every element the shapes and strides reach lies within its operand's allocation, and
/// `dst`'s elements are this call's alone while it runs.
pub(crate) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col as isize,
            dst.row as isize,
            false,
            lhs.ptr,
            lhs.col as isize,
            lhs.row as isize,
            rhs.ptr,
            rhs.col as isize,
            rhs.row as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// One head's block of `rows` queries against `keys` keys, on the calling thread: the scores
/// `q · kᵀ` (into `scores`), each row `i`'s softmax over its first `visible(i)` keys (the
/// rest 0), times `v`, into `out`. `q`, `k` and `v` are rows of `head_dim` (`k`, `v`: `keys`
/// rows), each at its operand's strides; the attention kernels' common step.
///
/// # Safety
/// As `gemm_f32`'s: every row the shapes and strides reach lies within its operand, and
/// `out`'s `rows` rows of `head_dim` are this call's alone.
pub(crate) unsafe fn attend_block(
    (rows, keys, head_dim): (usize, usize, usize),
    q: Strided<*const f32>,
    k: Strided<*const f32>,
    v: Strided<*const f32>,
    out: Strided<*mut f32>,
    scores: &mut Vec<f32>,
    visible: impl Fn(usize) -> usize,
) {
    scores.resize(rows * keys, 0.0);
    // kᵀ: column j is key row j.
    let kt = Strided {
        ptr: k.ptr,
        row: k.col,
        col: k.row,
    };
    // SAFETY: the caller's; `scores` holds `rows` rows of `keys`.
    unsafe {
        gemm_f32(
            (rows, keys, head_dim),
            Strided::rows(scores.as_mut_ptr(), keys),
            q,
            kt,
            gemm::Parallelism::None,
        )
    };
    for (i, row) in scores.chunks_exact_mut(keys.max(1)).enumerate() {
        kernels::masked_softmax_row_in_place(row, visible(i));
    }
    // SAFETY: as above.
    unsafe {
        gemm_f32(
            (rows, head_dim, keys),
            out,
            Strided::rows(scores.as_ptr(), keys),
            v,
            gemm::Parallelism::None,
        )
    };
}
