//! Public mask bases. A basis is fully described by a [`BasisSpec`]: both sides expand the same
//! spec to the same matrix, so sending the spec (a seed) is enough.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

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
        let mut v: Vec<f64> = (0..d_in).map(|_| StandardNormal.sample(&mut rng)).collect();
        // Modified Gram-Schmidt, twice for accuracy.
        for _ in 0..2 {
            for j in 0..i {
                let u = &rows[j * d_in..(j + 1) * d_in];
                let dot: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                for (x, a) in v.iter_mut().zip(u) {
                    *x -= dot * a;
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-8 {
            continue; // A (practically impossible) dependent draw: draw again.
        }
        rows.extend(v.iter().map(|x| x / norm));
        i += 1;
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

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
