//! Public mask bases. A basis is fully described by a [`BasisSpec`]: both sides expand the same
//! spec to the same matrix (bit for bit on one kind of CPU; GEMM kernels of other CPUs may round
//! the last bits differently, far below any unmasking tolerance), so sending the spec (a seed) is
//! enough.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use talaria_kernels::gemm::{matmul_f64, matmul_f64_nt};
// Inner products in eight lanes in a fixed order: every machine expands a seed to the same bits.
use talaria_engine::ops::dot;

/// A public mask basis `M_pub` (`m × d_in`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BasisSpec {
    /// The identity (`m = d_in`): masks are fresh noise vectors and `R_pub = W`. At full rank
    /// any orthonormal basis gives the same isotropic masks, so this is the default.
    Identity,
    /// `m < d_in` orthonormal rows from a ChaCha20 stream seeded with `seed` (Gaussian rows,
    /// then Gram-Schmidt in f64). This is the published setting: **it leaks** — the component of
    /// a row outside the span of `M_pub` travels unmasked.
    Orthonormal { seed: [u8; 32], m: usize },
}

impl BasisSpec {
    /// The rank `m` for an input width `d_in`.
    pub fn rank(&self, d_in: usize) -> usize {
        match self {
            BasisSpec::Identity => d_in,
            BasisSpec::Orthonormal { m, .. } => *m,
        }
    }
}

/// Expands an orthonormal spec to its `m × d_in` row-major rows; `None` for the identity, or if
/// `m` is zero or not below `d_in`.
pub fn expand_basis(spec: &BasisSpec, d_in: usize) -> Option<Vec<f64>> {
    let BasisSpec::Orthonormal { seed, m } = spec else {
        return None;
    };
    let m = *m;
    if m == 0 || m >= d_in {
        return None;
    }
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut rows: Vec<f64> = Vec::with_capacity(m * d_in);
    let mut i = 0;
    while i < m {
        // A block of fresh Gaussian rows, made orthogonal to the accepted rows with two passes
        // of block Gram-Schmidt (two GEMMs each), then to each other with modified
        // Gram-Schmidt (twice, for accuracy). A (practically impossible) dependent draw is
        // dropped and drawn again in the next block.
        let b = BLOCK.min(m - i);
        let mut block: Vec<f64> = (0..b * d_in)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        for _ in 0..2 {
            if i > 0 {
                let u = &rows[..i * d_in];
                let coeffs = matmul_f64_nt(&block, u, b, d_in, i);
                let proj = matmul_f64(&coeffs, u, b, i, d_in);
                block.iter_mut().zip(&proj).for_each(|(x, p)| *x -= p);
            }
        }
        let start = rows.len();
        for v in block.chunks_exact_mut(d_in) {
            for _ in 0..2 {
                for u in rows[start..].chunks_exact(d_in) {
                    let dot = dot(u, v);
                    v.iter_mut().zip(u).for_each(|(x, a)| *x -= dot * a);
                }
            }
            let norm = dot(v, v).sqrt();
            if norm < 1e-8 {
                continue;
            }
            rows.extend(v.iter().map(|x| x / norm));
            i += 1;
        }
    }
    Some(rows)
}

/// Rows orthogonalised together in [`expand_basis`].
const BLOCK: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_across_blocks_is_orthonormal() {
        let (m, d) = (150, 200);
        let spec = BasisSpec::Orthonormal { seed: [3; 32], m };
        let a = expand_basis(&spec, d).unwrap();
        assert_eq!(a.len(), m * d);
        for i in 0..m {
            for j in 0..m {
                let dot: f64 = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "({i},{j}) = {dot}");
            }
        }
    }

    #[test]
    fn expansion_is_orthonormal_and_deterministic() {
        let spec = BasisSpec::Orthonormal {
            seed: [7; 32],
            m: 12,
        };
        let d = 40;
        let a = expand_basis(&spec, d).unwrap();
        assert_eq!(a, expand_basis(&spec, d).unwrap());
        for i in 0..12 {
            for j in 0..12 {
                let dot: f64 = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "({i},{j}) = {dot}");
            }
        }
        let other = BasisSpec::Orthonormal {
            seed: [8; 32],
            m: 12,
        };
        assert_ne!(a, expand_basis(&other, d).unwrap());
        assert!(expand_basis(&BasisSpec::Identity, d).is_none());
        assert!(
            expand_basis(
                &BasisSpec::Orthonormal {
                    seed: [0; 32],
                    m: 40
                },
                d
            )
            .is_none()
        );
    }
}
