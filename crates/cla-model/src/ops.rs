//! The numeric building blocks of the CPU decoder: RMSNorm, rotary embeddings, the linear
//! layer (matrix multiply), SiLU and softmax. Each is a few lines that can be read against
//! the Llama reference; [`crate::cpu`] composes them into the CLA decoder.
//!
//! Matrix products go through ndarray's `general_mat_mul`, which uses the `matrixmultiply`
//! crate (a packed, cache-blocked SIMD kernel) when no BLAS is configured; the output
//! columns are split across rayon's threads when a product is big enough to pay for it.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Multiply-adds below which a product runs on one thread: a rayon fork/join costs a few
/// microseconds, about the time of 100k multiply-adds.
const PARALLEL_MIN_WORK: usize = 1 << 17;

/// `x @ w.T` for `x: [n, in]` and an `nn.Linear` weight `w: [out, in]`: `[n, out]`.
pub fn linear(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>) -> Array2<f32> {
    let (n, inp) = x.dim();
    let out = w.nrows();
    debug_assert_eq!(w.ncols(), inp);
    let mut y = Array2::<f32>::zeros((n, out));
    let threads = rayon::current_num_threads();
    if n * inp * out < PARALLEL_MIN_WORK || threads == 1 || out < 2 * threads {
        linear_into(x, w, y.view_mut());
        return y;
    }
    // Split the output columns (= rows of w) into one chunk per thread: each chunk reads
    // a disjoint part of the weights, the dominant memory traffic.
    let chunk = out.div_ceil(threads);
    let pieces: Vec<(ArrayView2<'_, f32>, ArrayViewMut2<'_, f32>)> = w
        .axis_chunks_iter(Axis(0), chunk)
        .zip(y.axis_chunks_iter_mut(Axis(1), chunk))
        .collect();
    pieces
        .into_par_iter()
        .for_each(|(w_part, y_part)| linear_into(x, w_part, y_part));
    y
}

/// `y = x @ w.T` on one thread.
fn linear_into(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>, mut y: ArrayViewMut2<'_, f32>) {
    if x.nrows() <= 2 {
        // Matrix-vector case (decode): a GEMM would repack all of `w` for one row; a dot
        // product per output over contiguous weight rows reads `w` once, in order.
        for (x_row, mut y_row) in x.outer_iter().zip(y.outer_iter_mut()) {
            for (w_row, y_el) in w.outer_iter().zip(y_row.iter_mut()) {
                *y_el = w_row.dot(&x_row);
            }
        }
    } else {
        ndarray::linalg::general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y);
    }
}

/// RMSNorm (Zhang & Sennrich 2019) of every row of `x`: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: ArrayView2<'_, f32>, weight: &[f32], eps: f32) -> Array2<f32> {
    let mut y = x.to_owned();
    for mut row in y.outer_iter_mut() {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
    y
}

/// The SiLU (swish) activation `x * sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Softmax in place over `x`, shifted by the maximum for stability.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Precomputed rotary-embedding angles (Su et al. 2021, RoFormer), Hugging Face
/// "rotate_half" layout: a head vector `x` of size `d` is split into halves `x1 = x[..d/2]`,
/// `x2 = x[d/2..]`, and `rope(x) = x * cos + rotate_half(x) * sin` with
/// `rotate_half(x) = cat(-x2, x1)`; pair `i` turns by `pos * theta^(-2i/d)`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    /// `cos[pos * half + i]`.
    cos: Vec<f32>,
    /// `sin[pos * half + i]`.
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles for positions `0..max_positions` of heads of size `head_dim` (even).
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv_freq {
                // Angles in f64: at position 10^4 an f32 angle would already be off by ~1e-3.
                let a = pos as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates one head vector `x` (length `head_dim`) to position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        let (x1, x2) = x.split_at_mut(h);
        for i in 0..h {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }

    /// Rotates every head of every row: row `r` of `x` (`[n, heads * head_dim]`) holds the
    /// token at position `first_pos + r`.
    pub fn apply_rows(&self, x: &mut Array2<f32>, first_pos: usize) {
        let d = 2 * self.half;
        for (r, mut row) in x.outer_iter_mut().enumerate() {
            let row = row
                .as_slice_mut()
                .expect("rows of an owned array are contiguous");
            for head in row.chunks_exact_mut(d) {
                self.apply(head, first_pos + r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn linear_matches_a_loop_on_both_paths() {
        for n in [1, 2, 3, 40] {
            let x = Array2::from_shape_fn((n, 70), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
            let w = Array2::from_shape_fn((300, 70), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.1);
            let y = linear(x.view(), w.view());
            for i in 0..n {
                for o in 0..300 {
                    let want: f32 = (0..70).map(|k| x[[i, k]] * w[[o, k]]).sum();
                    assert!((y[[i, o]] - want).abs() < 1e-3, "{n} {i} {o}");
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_of_halves() {
        let t = RopeTable::new(4, 3, 10000.0);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        t.apply(&mut x, 0);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        let mut x = [1.0, 0.0, 0.0, 0.0];
        t.apply(&mut x, 1);
        // pair 0 (dims 0 and 2) turns by 1 radian; pair 1 (dims 1 and 3) by 0.01.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_and_softmax() {
        let y = rms_norm(array![[3.0, 4.0]].view(), &[1.0, 2.0], 0.0);
        let s = (12.5f32).sqrt();
        assert!((y[[0, 0]] - 3.0 / s).abs() < 1e-6 && (y[[0, 1]] - 8.0 / s).abs() < 1e-6);
        let mut p = [1.0, 2.0, 3.0];
        softmax_in_place(&mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[2] > p[1]);
    }
}
