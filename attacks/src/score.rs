//! Comparing observed (masked) rows with candidate rows: distances and Gaussian likelihoods,
//! in the full space or in the complement of a public basis.

use talaria_kernels::gemm::{matmul_f64, matmul_f64_nt};

use crate::tap::Matrix;

/// Which part of each row an attack compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// The whole row.
    Full,
    /// The part outside the span of the op's public basis: sent unmasked when rank m < d.
    Complement,
}

/// How two rows are compared by the matching attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distance {
    /// Squared Euclidean distance.
    L2,
    /// Squared Euclidean distance of the sorted values: blind to any permutation of the features
    /// (the "Hidden No More" distance).
    Sorted,
}

/// A public mask basis `B` (m × d, orthonormal rows).
#[derive(Debug, Clone)]
pub struct Basis {
    b: Matrix,
}

impl Basis {
    pub fn new(b: Matrix) -> Self {
        Self { b }
    }

    /// m: the dimension of the span.
    pub fn rank(&self) -> usize {
        self.b.rows
    }

    /// Basis vector `i` (a row of `B`).
    pub fn row(&self, i: usize) -> &[f64] {
        self.b.row(i)
    }

    /// Each row's coordinates in the span: `x·Bᵀ`.
    fn coords(&self, x: &Matrix) -> Matrix {
        Matrix {
            rows: x.rows,
            cols: self.b.rows,
            data: matmul_f64_nt(&x.data, &self.b.data, x.rows, x.cols, self.b.rows),
        }
    }

    /// Each row minus its projection on the span.
    pub fn complement(&self, x: &Matrix) -> Matrix {
        let c = self.coords(x);
        let back = matmul_f64(&c.data, &self.b.data, x.rows, self.b.rows, self.b.cols);
        Matrix {
            rows: x.rows,
            cols: x.cols,
            data: x.data.iter().zip(&back).map(|(a, b)| a - b).collect(),
        }
    }
}

/// Squared norms of the rows.
fn norms(x: &Matrix) -> Vec<f64> {
    x.data
        .chunks_exact(x.cols.max(1))
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

/// Squared distances between every row of `a` and every row of `b` (`a.rows × b.rows`).
pub fn pairwise(a: &Matrix, b: &Matrix) -> Vec<f64> {
    debug_assert_eq!(a.cols, b.cols);
    let cross = matmul_f64_nt(&a.data, &b.data, a.rows, a.cols, b.rows);
    let (na, nb) = (norms(a), norms(b));
    let mut out = cross;
    for i in 0..a.rows {
        for j in 0..b.rows {
            let v = &mut out[i * b.rows + j];
            *v = (na[i] + nb[j] - 2.0 * *v).max(0.0);
        }
    }
    out
}

/// Each row's values sorted.
pub fn sorted(x: &Matrix) -> Matrix {
    let mut data = x.data.clone();
    for r in data.chunks_exact_mut(x.cols.max(1)) {
        r.sort_by(f64::total_cmp);
    }
    Matrix { data, ..*x }
}

/// Distances of `distance` kind between observed and candidate rows, already in one space.
pub fn distances(obs: &Matrix, cands: &Matrix, distance: Distance) -> Vec<f64> {
    match distance {
        Distance::L2 => pairwise(obs, cands),
        Distance::Sorted => pairwise(&sorted(obs), &sorted(cands)),
    }
}

/// Relative accuracy below which a residual is treated as rounding or simulation error.
const MODEL_ERROR: f64 = 1e-4;

/// Gaussian log-likelihood of every observed row given every candidate (`obs.rows ×
/// cands.rows`), for masks `c·B` with `c` isotropic (B the identity when `basis` is `None`).
///
/// The mask scale is estimated from each row's norm — `ŝ² = ‖x̃_B‖²/m − mean ‖x_B‖²/m` — not
/// taken from the public parameters, so a mask whose scale followed the row would show up here.
/// The part outside the basis's span must match up to rounding (`MODEL_ERROR`), which makes this
/// attack as strong as the projection attack when m < d.
pub fn gaussian(obs: &Matrix, cands: &Matrix, basis: Option<&Basis>) -> Vec<f64> {
    let d = obs.cols as f64;
    let cand_ms = norms(cands).iter().sum::<f64>() / (cands.rows.max(1) as f64 * d);
    let floor = MODEL_ERROR * MODEL_ERROR * cand_ms + 1e-30;
    // Distances in the span, and (below full rank) in its complement; the rows' squared norms in
    // the span.
    let (span, comp, m, obs_span, cand_span_ms) = match basis {
        None => (pairwise(obs, cands), None, d, norms(obs), cand_ms),
        Some(b) => {
            let (os, cs) = (b.coords(obs), b.coords(cands));
            let span = pairwise(&os, &cs);
            let full = pairwise(obs, cands);
            let comp: Vec<f64> = full
                .iter()
                .zip(&span)
                .map(|(f, s)| (f - s).max(0.0))
                .collect();
            let m = b.rank() as f64;
            let cand_span_ms = norms(&cs).iter().sum::<f64>() / (cands.rows.max(1) as f64 * m);
            (span, Some(comp), m, norms(&os), cand_span_ms)
        }
    };
    let k = cands.rows;
    let mut out = vec![0f64; obs.rows * k];
    for r in 0..obs.rows {
        let s2 = (obs_span[r] / m - cand_span_ms).max(floor);
        let norm_s = -0.5 * m * s2.ln();
        let norm_c = -0.5 * (d - m) * floor.ln();
        for j in 0..k {
            let mut ll = norm_s - span[r * k + j] / (2.0 * s2);
            if let Some(c) = &comp {
                ll += norm_c - c[r * k + j] / (2.0 * floor);
            }
            out[r * k + j] = ll;
        }
    }
    out
}

/// `ln Σ exp(v)`.
pub fn log_sum_exp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + v.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// Converts candidate rows from the simulator.
pub fn matrix_f32(rows: usize, cols: usize, data: &[f32]) -> Matrix {
    Matrix {
        rows,
        cols,
        data: data.iter().map(|&v| f64::from(v)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, data: &[f64]) -> Matrix {
        Matrix {
            rows,
            cols,
            data: data.to_vec(),
        }
    }

    #[test]
    fn pairwise_matches_direct_distances() {
        let a = m(2, 3, &[1.0, 2.0, 3.0, -1.0, 0.5, 0.0]);
        let b = m(3, 3, &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 2.0, -1.0, 4.0]);
        let d = pairwise(&a, &b);
        for i in 0..2 {
            for j in 0..3 {
                let direct: f64 = a
                    .row(i)
                    .iter()
                    .zip(b.row(j))
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum();
                assert!((d[i * 3 + j] - direct).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn sorted_distance_ignores_feature_order() {
        let a = m(1, 4, &[3.0, -1.0, 2.0, 0.0]);
        let b = m(1, 4, &[0.0, 2.0, 3.0, -1.0]);
        assert_eq!(distances(&a, &b, Distance::Sorted), vec![0.0]);
        assert!(distances(&a, &b, Distance::L2)[0] > 1.0);
    }

    #[test]
    fn complement_removes_the_span_exactly() {
        // Basis: the first two axes of R^3.
        let basis = Basis::new(m(2, 3, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
        let x = m(1, 3, &[5.0, -7.0, 0.25]);
        assert_eq!(basis.complement(&x).data, vec![0.0, 0.0, 0.25]);
    }

    #[test]
    fn gaussian_prefers_the_true_candidate_and_the_complement_decides_at_low_rank() {
        let basis = Basis::new(m(1, 3, &[1.0, 0.0, 0.0]));
        // Observed: candidate 0 plus a huge mask along the basis.
        let cands = m(2, 3, &[0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        let obs = m(1, 3, &[1e4, 1.0, 0.0]);
        let ll = gaussian(&obs, &cands, Some(&basis));
        assert!(ll[0] > ll[1] + 1e3, "{ll:?}");
        let ll = gaussian(&obs, &cands, None);
        assert!(ll[0] > ll[1], "{ll:?}");
    }
}
