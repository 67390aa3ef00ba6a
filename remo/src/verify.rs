//! Freivalds' check of every row the cloud returns.
//!
//! For an op `Y = X̃·W` the CVM holds secret vectors `v_t` (`d_out` long) and `u_t = W·v_t`
//! (`d_in` long), made once per op and pool (a session's, or its agent's) and replaced after any
//! failure. A reply row `ỹ` of a sent row `x̃` passes when `ỹ·v_t = x̃·u_t` for every `t`: the
//! cost is `k·(d_in + d_out)` multiply-adds per row, against `d_in·d_out` for a canary row. The
//! sent side `x̃·u_t` is computed when the call is masked, so nothing of the call is kept.
//!
//! **Integer mode** (`docs/remo.md`, "Verifying every product"): in `Z/2^64` an error `e` whose
//! entries are all multiples of `2^j`, one of them exactly, passes one uniform `v` with
//! probability `2^(j-64)`. The range check after unmasking catches every error with
//! `2^j > 2·B` deterministically (`B < 2^62`: the row's Cauchy–Schwarz bound on `|X·W|`), so a
//! real row passes one vector with probability at most `2^-lz(B) ≤ 1/4`: [`REAL_ROW_VECTORS`]
//! keep every error pattern's chance at most `2^-SOUNDNESS_BITS`. Cover rows have no range check
//! (their products are never made), so they get [`COVER_ROW_VECTORS`]: a high-bit error in one
//! passes no more often than any error in a real row, and the cloud cannot tell cover rows from
//! real ones by cheating on them. Both counts are fixed: the check's time depends on public row
//! counts only, never on the rows' values.
//!
//! **Float modes**: the honest product carries rounding error, so a row passes when
//! `|ỹ·v − x̃·u|` is within the worst-case rounding error of the cloud's GEMM and of the check's
//! own f64 arithmetic ([`FloatCheck::tolerance`]); `v` is Gaussian.

use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use talaria_kernels::{IntWeight, dots_wrapping, int_weight_times};

/// Every error pattern in a call's real rows passes with probability at most `2^-SOUNDNESS_BITS`
/// (integer mode).
pub const SOUNDNESS_BITS: u32 = 20;

/// Vectors of the float modes' check.
pub const FLOAT_VECTORS: usize = 4;

/// Vectors for a real row of the integer mode: its bound is below `2^62`, so each vector lets an
/// error through with probability at most `2^-2`.
pub const REAL_ROW_VECTORS: usize = 10;

/// Vectors for a cover row of the integer mode: no range check, so each vector lets a top-bit
/// error through with probability `1/2`.
pub const COVER_ROW_VECTORS: usize = SOUNDNESS_BITS as usize;

/// Vectors an integer row whose exact product is bounded by `bound` (`|X·W| ≤ bound`) needs:
/// each vector lets an error through with probability at most `2^-lz(bound)`; 10 for the
/// largest bound the encoder allows (just under `2^62`).
pub fn int_vectors_for(bound: u64) -> usize {
    let bits = bound.max(1).leading_zeros().max(1);
    SOUNDNESS_BITS.div_ceil(bits) as usize
}

/// An op's secret check vectors, and whether they were retired after a failure (then every
/// call masked with them fails, even one of another session already in flight).
pub(crate) struct CheckVectors {
    pub kind: CheckKind,
    pub retired: std::sync::atomic::AtomicBool,
}

pub(crate) enum CheckKind {
    Int(IntCheck),
    Float(FloatCheck),
}

impl CheckVectors {
    pub fn new(kind: CheckKind) -> Self {
        Self {
            kind,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a failure has retired them.
    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks them as never to be trusted again.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The integer mode's vectors: `v_t` uniform in `(Z/2^64)^d_out`, `u_t = W_int·v_t`.
pub(crate) struct IntCheck {
    pub v: Vec<Vec<u64>>,
    pub u: Vec<Vec<u64>>,
}

impl IntCheck {
    /// [`COVER_ROW_VECTORS`] fresh vectors from `rng` (real rows use the first
    /// [`REAL_ROW_VECTORS`]).
    pub fn new(w: &IntWeight, rng: &mut ChaCha20Rng) -> IntCheck {
        let v: Vec<Vec<u64>> = (0..COVER_ROW_VECTORS)
            .map(|_| (0..w.d_out).map(|_| rng.random()).collect())
            .collect();
        let u = int_weight_times(w, &v);
        IntCheck { v, u }
    }

    /// `x̃·u_t` for the first `k` vectors.
    pub fn sent(&self, x: &[u64], k: usize, out: &mut Vec<u64>) {
        let at = out.len();
        out.resize(at + k, 0);
        dots_wrapping(x, &self.u, &mut out[at..]);
    }

    /// Whether `ỹ·v_t` equals each of `sent` (as many vectors as `sent` has values). Every
    /// product of the row is taken, whether an earlier one failed or not.
    pub fn passes(&self, y: &[u64], sent: &[u64]) -> bool {
        let mut got = [0u64; COVER_ROW_VECTORS];
        let Some(got) = got.get_mut(..sent.len()) else {
            return false;
        };
        dots_wrapping(y, &self.v, got);
        got == sent
    }
}

/// The float modes' vectors: `v_t` Gaussian, `u_t = W·v_t` and `a_t = |W|·|v_t|` in f64.
pub(crate) struct FloatCheck {
    pub v: Vec<Vec<f64>>,
    pub u: Vec<Vec<f64>>,
    pub a: Vec<Vec<f64>>,
    /// The cloud GEMM's unit roundoff, and the least normal of its format (a GEMM that flushes
    /// subnormals to zero errs by up to that much per product).
    pub unit: f64,
    pub tiny: f64,
    /// `Σ_j |v_t[j]|`.
    pub v_abs: Vec<f64>,
    pub d_in: usize,
    pub d_out: usize,
}

/// `γ_n = n·u / (1 − n·u)`: the relative error bound of an n-term dot product.
fn gamma(n: usize, unit: f64) -> f64 {
    let nu = n as f64 * unit;
    nu / (1.0 - nu)
}

impl FloatCheck {
    /// Fresh vectors for the weight `w` (`d_in × d_out`, row-major, exact in f64).
    pub fn new<T: Copy + Into<f64>>(
        w: &[T],
        d_in: usize,
        d_out: usize,
        (unit, tiny): (f64, f64),
        rng: &mut ChaCha20Rng,
    ) -> FloatCheck {
        let v: Vec<Vec<f64>> = (0..FLOAT_VECTORS)
            .map(|_| {
                (0..d_out)
                    .map(|_| Distribution::<f64>::sample(&StandardNormal, &mut *rng))
                    .collect()
            })
            .collect();
        let mut u = vec![vec![0f64; d_in]; FLOAT_VECTORS];
        let mut a = vec![vec![0f64; d_in]; FLOAT_VECTORS];
        for (i, row) in w.chunks_exact(d_out).enumerate().take(d_in) {
            for (t, vt) in v.iter().enumerate() {
                let (mut s, mut m) = (0f64, 0f64);
                for (&wij, &vj) in row.iter().zip(vt) {
                    let p = wij.into() * vj;
                    s += p;
                    m += p.abs();
                }
                u[t][i] = s;
                a[t][i] = m;
            }
        }
        let v_abs = v
            .iter()
            .map(|vt| vt.iter().map(|x| x.abs()).sum())
            .collect();
        FloatCheck {
            v,
            u,
            a,
            unit,
            tiny,
            v_abs,
            d_in,
            d_out,
        }
    }

    /// For a sent row `x̃`: `x̃·u_t` and `|x̃|·a_t` per vector, appended to `out`.
    pub fn sent<T: Copy + Into<f64>>(&self, x: &[T], out: &mut Vec<f64>) {
        for (u, a) in self.u.iter().zip(&self.a) {
            let (mut s, mut m) = (0f64, 0f64);
            for ((&xi, &ui), &ai) in x.iter().zip(u).zip(a) {
                let xi: f64 = xi.into();
                s += xi * ui;
                m += xi.abs() * ai;
            }
            out.push(s);
            out.push(m);
        }
    }

    /// Whether reply row `y` passes, given `sent` as [`FloatCheck::sent`] made it. With
    /// `A = |x̃|·|W|·|v|` and `B = |ỹ|·|v|`, an honest GEMM's `|ỹ·v − x̃·W·v| ≤ γ_{d_in+1}(u_c)·A`
    /// (any summation order, with or without FMA; `2(d_in + 1)·tiny·Σ|v|` more if it flushes
    /// subnormals), and the check's own f64 arithmetic adds at most
    /// `2(γ_{d_out} + γ_{d_in})·A + γ_{d_out}·B`. Every value and the tolerance must be finite: an
    /// infinity would make the tolerance infinite and pass anything.
    pub fn passes<T: Copy + Into<f64>>(&self, y: &[T], sent: &[f64]) -> bool {
        let g64 = |n| gamma(n, f64::EPSILON / 2.0);
        let cloud = gamma(self.d_in + 1, self.unit);
        let flush = 2.0 * (self.d_in + 1) as f64 * self.tiny;
        sent.chunks_exact(2)
            .zip(&self.v)
            .zip(&self.v_abs)
            .all(|((s, v), &v_abs)| {
                let (mut dot, mut b) = (0f64, 0f64);
                for (&yj, &vj) in y.iter().zip(v) {
                    let p = yj.into() * vj;
                    dot += p;
                    b += p.abs();
                }
                let (expect, a) = (s[0], s[1]);
                let tol = ((cloud + 2.0 * (g64(self.d_out) + g64(self.d_in))) * a
                    + g64(self.d_out) * b
                    + flush * v_abs)
                    * (1.0 + 1e-6)
                    + f64::MIN_POSITIVE;
                // A NaN fails the comparison; an infinity anywhere fails `is_finite`.
                dot.is_finite() && tol.is_finite() && (dot - expect).abs() <= tol
            })
    }
}

/// The vectors a call was masked with, and its sent side per row (slot order).
pub(crate) struct CallCheck {
    pub vectors: Arc<CheckVectors>,
    /// Per slot: the integer mode's `k` values of `x̃·u_t`, or the float modes' `2·k` values.
    pub int_sent: Vec<u64>,
    pub float_sent: Vec<f64>,
    /// Values per slot.
    pub stride: usize,
    /// Values of each slot that are checked (the integer mode's real and cover rows differ).
    pub counts: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_counts_meet_the_bound() {
        // A real row's bound is below 2^62: at most 10 vectors; a cover row's is unknown: 20.
        assert_eq!(int_vectors_for((1 << 62) - 1), REAL_ROW_VECTORS);
        assert_eq!(int_vectors_for(u64::MAX), COVER_ROW_VECTORS);
    }

    #[test]
    fn vectors_needed_follow_the_bound() {
        // A bound just under 2^62 leaves 2 bits per vector: 10 vectors.
        assert_eq!(int_vectors_for((1 << 62) - 1), 10);
        assert_eq!(int_vectors_for(1 << 54), 3);
        assert_eq!(int_vectors_for(1 << 43), 1);
        assert_eq!(int_vectors_for(0), 1);
    }
}
