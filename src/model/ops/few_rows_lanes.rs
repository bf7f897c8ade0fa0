//! `few_rows`' kernel from `LANES_FROM` rows: the input rows across the vector lanes.
//!
//! The dot-product kernel keeps one accumulator per (weight row, input row) and loads a
//! vector of each for every FMA pair; from 8 rows its loads and the input rows' traffic
//! (16 rows of a 1024-column chunk are 64 KB, twice L1) held a Qwen3-VL-2B layer at 16 rows
//! to 66–76 GFLOP/s of the two cores' ~175. Here, as in gemm's microkernels, a column of 16
//! input rows is two AVX2 vectors, each weight is broadcast, and 6 weight rows make 12
//! accumulators: 8 loads per 12 FMAs, no reductions. The input rows are
//! packed once per call, transposed in groups of 16; the weights of 6 rows are made f32 (as
//! for the dot kernel) into a per-thread buffer and read from it once per group.

use super::Format;

/// Input rows per packed group: two AVX2 vectors (the kernel also computes for 16-lane
/// vectors, one per group, but `supported` admits AVX2 alone: that form is unmeasured).
pub(super) const GROUP: usize = 16;

/// Weight rows per register tile: 6 of two vectors are 12 accumulators (AVX2 has 16
/// registers). Tiles of 12 where a group is one vector took 8 rows from 11 ms to 16–19 (a
/// 2B layer): 13 loads per 12 FMAs, and 12 rows of weights no longer in L1.
const NR: usize = 6;

/// From this many rows `multiply` takes this kernel: below, the lanes are mostly empty (4
/// rows took 18 ms a 2B layer here, 7–9 with the dot kernel; 8 rows 11 ms here, 19–21 there).
pub(super) const LANES_FROM: usize = 8;

/// Where the kernels run in AVX2's 8 lanes: elsewhere (AVX-512, whose 32 registers the dot
/// kernel fills with 4x4 blocks; other architectures) the dot kernel runs, as measured there.
pub(super) fn supported() -> bool {
    struct Lanes;
    impl pulp::WithSimd for Lanes {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> usize {
            S::F32_LANES
        }
    }
    pulp::Arch::new().dispatch(Lanes) == 8
}

/// Up to this many rows this kernel is ahead of gemm for f32 and bf16-kept weights (and was
/// for Q8_0 expanded to f32, before `q8_0`): a Qwen3-VL-2B layer at 256 rows in 179–194 ms
/// against gemm's 205–234, at 512 all within 3% (`cargo bench --bench few_rows`, AVX2, 2 threads). Past
/// it the packed rows (16 KB per row of 2048) outgrow the caches they are read from once per
/// 6 weight rows.
pub(super) const MAX_ROWS: usize = 256;

/// `x` (`[rows, width]`) as `[groups][width][GROUP]`, the last group padded with zeros.
pub(super) fn pack(x: &[f32], rows: usize, width: usize) -> Vec<f32> {
    let groups = rows.div_ceil(GROUP);
    let mut packed = vec![0f32; groups * width * GROUP];
    for (r, row) in x.chunks_exact(width).enumerate() {
        let group = &mut packed[r / GROUP * width * GROUP..][..width * GROUP];
        for (k, &value) in row.iter().enumerate() {
            group[k * GROUP + r % GROUP] = value;
        }
    }
    packed
}

/// The weight rows of one task times every input row: `out` `[rows, its weight rows]`.
pub(super) struct Tile<'a, F: Format> {
    /// The input rows, `pack`ed (from the arranged rows).
    pub packed: &'a [f32],
    pub rows: usize,
    pub w: &'a [F::Elem],
    pub width: usize,
    pub row_len: usize,
    pub out: &'a mut [f32],
    /// Room for a tile's weight rows as f32.
    pub buffer: &'a mut Vec<f32>,
}

impl<F: Format> pulp::WithSimd for Tile<'_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        self.run(simd)
    }
}

impl<F: Format> Tile<'_, F> {
    /// `NR` weight rows at a time, made f32 once and multiplied with every group of rows.
    #[inline(always)]
    fn run<S: pulp::Simd>(self, simd: S) {
        let (width, row_len, rows) = (self.width, self.row_len, self.rows);
        let columns = self.w.len() / row_len;
        self.buffer.resize(NR * width, 0.0);
        for c in (0..columns).step_by(NR) {
            let n = NR.min(columns - c);
            let mut parts = self.buffer.chunks_exact_mut(width);
            let mut ws: [&[f32]; NR] = [&[]; NR];
            for (i, part) in ws.iter_mut().enumerate().take(n) {
                let weights = &self.w[(c + i) * row_len..(c + i + 1) * row_len];
                *part = F::row_f32(weights, width, parts.next().expect("NR rows of room"));
            }
            // Rows past the tile's last are computed from its first and not stored.
            for i in n..NR {
                ws[i] = ws[0];
            }
            for g in 0..rows.div_ceil(GROUP) {
                let packed = &self.packed[g * width * GROUP..(g + 1) * width * GROUP];
                let live = (rows - g * GROUP).min(GROUP);
                let store = Store {
                    out: &mut *self.out,
                    columns,
                    c,
                    n,
                    first: g * GROUP,
                    live,
                };
                // A group of at most one vector's rows: one vector per column.
                match live <= S::F32_LANES {
                    true => store.write::<S, 1>(group::<S, 1>(simd, &ws, packed)),
                    false => store.write::<S, 2>(group::<S, 2>(simd, &ws, packed)),
                }
            }
        }
    }
}

/// A tile's `NR` weight rows' products with one group's rows: `[NR][V]` vectors, lane `l` of
/// vector `v` the input row `v * lanes + l` of the group.
#[inline(always)]
fn group<S: pulp::Simd, const V: usize>(simd: S, ws: &[&[f32]; NR], packed: &[f32]) -> [[S::f32s; V]; NR] {
    let width = ws[0].len();
    let zero = simd.splat_f32s(0.0);
    let mut sums = [[zero; V]; NR];
    let (vectors, _) = S::as_simd_f32s(packed);
    // A group's column: GROUP / lanes vectors, of which the first V hold its rows.
    let per_column = GROUP / S::F32_LANES;
    for (k, column) in vectors.chunks_exact(per_column).take(width).enumerate() {
        let mut x = [zero; V];
        x.copy_from_slice(&column[..V]);
        for (j, w) in ws.iter().enumerate() {
            // SAFETY: every row of `ws` is `width` long and `k < width`.
            let b = simd.splat_f32s(unsafe { *w.get_unchecked(k) });
            for v in 0..V {
                sums[j][v] = simd.mul_add_f32s(x[v], b, sums[j][v]);
            }
        }
    }
    sums
}

/// Where a group's products go: `out` `[rows, columns]`, columns `c..c + n`, rows
/// `first..first + live`.
struct Store<'a> {
    out: &'a mut [f32],
    columns: usize,
    c: usize,
    n: usize,
    first: usize,
    live: usize,
}

impl Store<'_> {
    #[inline(always)]
    fn write<S: pulp::Simd, const V: usize>(self, sums: [[S::f32s; V]; NR]) {
        let mut lanes = [0f32; GROUP];
        for (j, sums) in sums.iter().enumerate().take(self.n) {
            for (v, &sum) in sums.iter().enumerate() {
                let (vectors, _) = S::as_mut_simd_f32s(&mut lanes);
                vectors[0] = sum;
                for (l, &value) in lanes.iter().enumerate().take(S::F32_LANES) {
                    let r = v * S::F32_LANES + l;
                    if r < self.live {
                        self.out[(self.first + r) * self.columns + self.c + j] = value;
                    }
                }
            }
        }
    }
}
