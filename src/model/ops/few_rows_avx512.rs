//! The AVX-512 Q8_0 matrix-vector product of `few_rows` (decode at batch 1); see
//! `few_rows::avx512` for why it exists.

use std::arch::x86_64::*;

use super::{Q8_0_BYTES, Q8_0_WEIGHTS};

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
}

/// `out[c] = x · w_c` for each weight row of `w` (Q8_0 blocks of `x.len()` weights).
#[target_feature(enable = "avx512f,f16c")]
pub fn q8_0_gemv(x: &[f32], w: &[u8], out: &mut [f32]) {
    let row_bytes = x.len() / Q8_0_WEIGHTS * Q8_0_BYTES;
    for (c, o) in out.iter_mut().enumerate() {
        let row = &w[c * row_bytes..(c + 1) * row_bytes];
        let mut pairs = row.chunks_exact(2 * Q8_0_BYTES);
        let mut xs = x.chunks_exact(2 * Q8_0_WEIGHTS);
        let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (pair, x) in pairs.by_ref().zip(xs.by_ref()) {
            let (first, second) = pair.split_at(Q8_0_BYTES);
            let (x0, x1) = x.split_at(Q8_0_WEIGHTS);
            even = block(first, x0, even);
            odd = block(second, x1, odd);
        }
        // An odd block count leaves one block in both.
        let (last, x) = (pairs.remainder(), xs.remainder());
        if !last.is_empty() {
            even = block(last, x, even);
        }
        *o = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
    }
}

/// `sum + scale · (q · x)` for one block (`Q8_0_BYTES` bytes) and its 32 activations.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn block(block: &[u8], x: &[f32], sum: __m512) -> __m512 {
    let block: &[u8; Q8_0_BYTES] = block.try_into().expect("one Q8_0 block");
    let x: &[f32; Q8_0_WEIGHTS] = x.try_into().expect("32 activations per block");
    let scale = _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes([block[0], block[1]])));
    // SAFETY: each load reads 16 bytes or 16 f32s inside the arrays above.
    let (q0, q1, x0, x1) = unsafe {
        (
            _mm_loadu_si128(block.as_ptr().add(2).cast()),
            _mm_loadu_si128(block.as_ptr().add(18).cast()),
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        )
    };
    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), x0);
    let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), x1, t);
    _mm512_fmadd_ps(scale, t, sum)
}
