//! CPU kernels the families share: the fused element-wise passes (`kernels`, `epilogue`,
//! `norm`), matrix-vector products for few rows (`few_rows`, `exact_bf16`), products over
//! many rows on weights widened to f32 (`widened`), the linear layer that picks among them
//! (`proj`), paged decode attention (`decode_attention`) and the vision encoders' attention
//! within frames (`frame_attention`).
//! Each computes what the composed candle ops compute; tests hold them to it.

pub mod decode_attention;
pub mod epilogue;
pub mod exact_bf16;
pub mod few_rows;
pub mod frame_attention;
pub mod kernels;
pub mod norm;
pub mod proj;
pub mod widened;

/// An operand of `gemm_f32`: its first element and its row and column strides, in elements.
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row: usize,
    pub col: usize,
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
