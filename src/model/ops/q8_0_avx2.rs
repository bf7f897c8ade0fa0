//! `q8_0`'s register block in AVX2: per step, one load of a group's 8 rows × 4 weights, a
//! broadcast of each input row's 4 matching activations, and per (row, group) `vpsignb`
//! (the activations take the weights' signs, so that `vpmaddubsw` may read the weights'
//! magnitudes as unsigned: at most 2 · 128 · 127 per pair of products, inside `i16`),
//! `vpmaddubsw`, `vpmaddwd` by ones (pairs of pairs into `i32`) and an add. A block's `i32`
//! sums are exact; its two scales are applied once per block.

use std::arch::x86_64::*;

use super::{BLOCK, GROUP, STEP, STEPS, Tile};

/// The `rows` rows from `r` by the `pair` groups from `g` into `sums` (`[row][group][lane]`).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block(
    tile: &Tile,
    g: usize,
    pair: usize,
    r: usize,
    rows: usize,
    sums: &mut [[[f32; GROUP]; 2]; 4],
) {
    // SAFETY (all arms): the caller's CPU has AVX2 and FMA.
    unsafe {
        match (rows, pair) {
            (4, 2) => multiply::<4, 2>(tile, g, r, sums),
            (3, 2) => multiply::<3, 2>(tile, g, r, sums),
            (2, 2) => multiply::<2, 2>(tile, g, r, sums),
            (1, 2) => multiply::<1, 2>(tile, g, r, sums),
            (4, 1) => multiply::<4, 1>(tile, g, r, sums),
            (3, 1) => multiply::<3, 1>(tile, g, r, sums),
            (2, 1) => multiply::<2, 1>(tile, g, r, sums),
            (1, 1) => multiply::<1, 1>(tile, g, r, sums),
            _ => unreachable!("blocks of 1–4 rows by 1–2 groups"),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn multiply<const R: usize, const V: usize>(tile: &Tile, g: usize, r: usize, sums: &mut [[[f32; GROUP]; 2]; 4]) {
    let (width, blocks) = (tile.w.width, tile.w.blocks());
    let group_len = blocks * BLOCK * GROUP;
    // Bounds checked once here; the loops below index within these slices.
    let x = &tile.x.quants[r * width..(r + R) * width];
    let x_scales = &tile.x.scales[r * blocks..(r + R) * blocks];
    let w = &tile.w.quants[g * group_len..(g + V) * group_len];
    let w_scales = &tile.w.scales[g * blocks * GROUP..(g + V) * blocks * GROUP];
    let ones = _mm256_set1_epi16(1);
    let mut totals = [[_mm256_setzero_ps(); V]; R];
    for b in 0..blocks {
        let mut dots = [[_mm256_setzero_si256(); V]; R];
        for s in 0..STEPS {
            let mut weights = [_mm256_setzero_si256(); V];
            let mut magnitudes = [_mm256_setzero_si256(); V];
            for v in 0..V {
                let at = ((v * blocks + b) * STEPS + s) * GROUP * STEP;
                // SAFETY: `at + 32 <= w.len()`: block `b < blocks` of group `v < V`.
                weights[v] = unsafe { _mm256_loadu_si256(w.as_ptr().add(at).cast()) };
                magnitudes[v] = _mm256_sign_epi8(weights[v], weights[v]);
            }
            for (i, dots) in dots.iter_mut().enumerate() {
                let at = i * width + b * BLOCK + s * STEP;
                // SAFETY: `at + 4 <= x.len()`: row `i < R`, column within the row.
                let four = unsafe { x.as_ptr().add(at).cast::<i32>().read_unaligned() };
                let activations = _mm256_set1_epi32(four);
                for v in 0..V {
                    let signed = _mm256_sign_epi8(activations, weights[v]);
                    let pairs = _mm256_maddubs_epi16(magnitudes[v], signed);
                    dots[v] = _mm256_add_epi32(dots[v], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (i, totals) in totals.iter_mut().enumerate() {
            let x_scale = _mm256_set1_ps(x_scales[i * blocks + b]);
            for v in 0..V {
                let w_scale = &w_scales[(v * blocks + b) * GROUP..][..GROUP];
                // SAFETY: `w_scale` is `GROUP` (8) f32s.
                let w_scale = unsafe { _mm256_loadu_ps(w_scale.as_ptr()) };
                let scale = _mm256_mul_ps(x_scale, w_scale);
                totals[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[i][v]), scale, totals[v]);
            }
        }
    }
    for (i, totals) in totals.iter().enumerate() {
        for (v, &total) in totals.iter().enumerate() {
            // SAFETY: `sums[i][v]` is `GROUP` (8) f32s.
            unsafe { _mm256_storeu_ps(sums[i][v].as_mut_ptr(), total) }
        }
    }
}
