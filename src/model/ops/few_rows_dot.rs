//! `few_rows`' kernel for up to 8 rows (every row count where the lanes kernel does not
//! run): per 4 weight rows and chunk of `CHUNK` columns, the weights made f32 once and
//! dotted with a few input rows at a time.

use super::{CHUNK, F32, Format};

/// `out[r][c] = x_r · w_c` for every input row r and weight row c of one task.
pub(super) struct Block<'a, F: Format> {
    pub x: &'a [f32],
    pub w: &'a [F::Elem],
    pub width: usize,
    pub row_len: usize,
    /// `[rows, w rows]`.
    pub out: &'a mut [f32],
    /// Room for 4 weight rows of a chunk as f32.
    pub buffers: &'a mut [f32],
}

impl<F: Format> pulp::WithSimd for Block<'_, F> {
    type Output = ();

    /// One row: each weight row dotted with it in turn (bound by memory). Several: per 4
    /// weight rows and chunk of `CHUNK` columns, the weights are made f32 once (`weights`)
    /// and dotted with every input row, a few rows at a time.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let (width, row_len) = (self.width, self.row_len);
        let rows = self.x.len() / width;
        let columns = self.w.len() / row_len;
        let w = self.w;
        let x = self.x;
        if rows == 1 {
            for (c, out) in self.out.iter_mut().enumerate() {
                *out = F::dot(simd, row(w, c, row_len), x);
            }
            return;
        }
        let out = self.out;
        out.fill(0.0);
        for c in (0..columns).step_by(4) {
            let n = (columns - c).min(4);
            for k0 in (0..width).step_by(CHUNK) {
                let kc = CHUNK.min(width - k0);
                let mut parts = self.buffers.chunks_exact_mut(CHUNK);
                let ws: [&[f32]; 4] = std::array::from_fn(|i| match parts.next() {
                    Some(buffer) if i < n => F::weights(row(w, c + i, row_len), k0, kc, buffer),
                    _ => &[],
                });
                let chunk = Chunk {
                    x,
                    width,
                    k0,
                    kc,
                    columns,
                    c,
                };
                if n == 4 {
                    chunk.rows_times_4(simd, ws, rows, out);
                } else {
                    for (i, w) in ws.iter().enumerate().take(n) {
                        for r in 0..rows {
                            out[r * columns + c + i] += F32::dots::<S, 1, 1>(simd, [w], [chunk.x(r)])[0][0];
                        }
                    }
                }
            }
        }
    }
}

/// One chunk of columns (`k0..k0 + kc`) of the input rows, multiplied into output columns
/// from `c` of `[rows, columns]`.
struct Chunk<'a> {
    x: &'a [f32],
    width: usize,
    k0: usize,
    kc: usize,
    columns: usize,
    c: usize,
}

impl Chunk<'_> {
    #[inline(always)]
    fn x(&self, r: usize) -> &[f32] {
        &self.x[r * self.width + self.k0..r * self.width + self.k0 + self.kc]
    }

    /// Four weight rows with every input row, `X` input rows at a time: 4·X vector
    /// accumulators, which with AVX2's 16 registers leaves room for 3 rows (with 4, the
    /// accumulators spilled to memory and batch 16 ran at 52–74 GFLOP/s of the 2 cores'
    /// ~175), with AVX-512's 32 for 4.
    #[inline(always)]
    fn rows_times_4<S: pulp::Simd>(&self, simd: S, ws: [&[f32]; 4], rows: usize, out: &mut [f32]) {
        let mut r = 0;
        if S::F32_LANES >= 16 {
            while r + 4 <= rows {
                self.add::<S, 4>(simd, ws, r, out);
                r += 4;
            }
        } else {
            while r + 3 <= rows {
                self.add::<S, 3>(simd, ws, r, out);
                r += 3;
            }
        }
        while r + 2 <= rows {
            self.add::<S, 2>(simd, ws, r, out);
            r += 2;
        }
        if r < rows {
            self.add::<S, 1>(simd, ws, r, out);
        }
    }

    #[inline(always)]
    fn add<S: pulp::Simd, const X: usize>(&self, simd: S, ws: [&[f32]; 4], r: usize, out: &mut [f32]) {
        let xs: [&[f32]; X] = std::array::from_fn(|j| self.x(r + j));
        let dots = F32::dots::<S, 4, X>(simd, ws, xs);
        for (i, dots) in dots.iter().enumerate() {
            for (j, &d) in dots.iter().enumerate() {
                out[(r + j) * self.columns + self.c + i] += d;
            }
        }
    }
}

#[inline(always)]
fn row<T>(data: &[T], index: usize, len: usize) -> &[T] {
    &data[index * len..(index + 1) * len]
}

/// Reduces each vector accumulator to its sum.
#[inline(always)]
fn reduce<S: pulp::Simd, const W: usize, const X: usize>(simd: S, sums: [[S::f32s; X]; W]) -> [[f32; X]; W] {
    let mut dots = [[0f32; X]; W];
    for i in 0..W {
        for j in 0..X {
            dots[i][j] = simd.reduce_sum_f32s(sums[i][j]);
        }
    }
    dots
}

/// One vector of every weight row times the same vector of every input row, into `sums`.
#[inline(always)]
fn step<S: pulp::Simd, const W: usize, const X: usize>(
    simd: S,
    sums: &mut [[S::f32s; X]; W],
    w: &[&[S::f32s]; W],
    x: &[&[S::f32s]; X],
    v: usize,
) {
    let mut xv = [simd.splat_f32s(0.0); X];
    for j in 0..X {
        xv[j] = x[j][v];
    }
    for i in 0..W {
        let wv = w[i][v];
        for j in 0..X {
            sums[i][j] = simd.mul_add_f32s(wv, xv[j], sums[i][j]);
        }
    }
}

impl super::F32 {
    /// One vector accumulator per dot product, reduced at the end. Written with pulp's
    /// vector types: the same loops on arrays were left scalar by LLVM (accumulators in
    /// memory). No closures: they would not be inlined into the vectorised caller.
    #[inline(always)]
    fn dots<S: pulp::Simd, const W: usize, const X: usize>(simd: S, w: [&[f32]; W], x: [&[f32]; X]) -> [[f32; X]; W] {
        let mut w_vectors = [&[][..]; W];
        let mut w_tails = [&[][..]; W];
        for i in 0..W {
            (w_vectors[i], w_tails[i]) = S::as_simd_f32s(w[i]);
        }
        let mut x_vectors = [&[][..]; X];
        let mut x_tails = [&[][..]; X];
        for j in 0..X {
            (x_vectors[j], x_tails[j]) = S::as_simd_f32s(x[j]);
        }
        let mut sums = [[simd.splat_f32s(0.0); X]; W];
        // Two vectors per turn: the loop's own instructions (six pointers advanced, a
        // compare) shared by 24 FMAs rather than 12.
        let vectors = w_vectors[0].len();
        let mut v = 0;
        while v + 2 <= vectors {
            step(simd, &mut sums, &w_vectors, &x_vectors, v);
            step(simd, &mut sums, &w_vectors, &x_vectors, v + 1);
            v += 2;
        }
        if v < vectors {
            step(simd, &mut sums, &w_vectors, &x_vectors, v);
        }
        let mut dots = reduce(simd, sums);
        for i in 0..W {
            for j in 0..X {
                for (a, b) in w_tails[i].iter().zip(x_tails[j]) {
                    dots[i][j] = a.mul_add(*b, dots[i][j]);
                }
            }
        }
        dots
    }
}
