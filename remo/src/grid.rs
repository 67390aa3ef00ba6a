//! The float modes' masks on a power-of-two grid, so that the exact bits of a masked value say
//! nothing about the row beyond the mask's statistical hiding (`docs/remo.md`, "Exact bits").
//!
//! A float mask `fl(s·z)` with a scale `s` that is not a power of two cannot produce every value
//! of the output's grid; when `x + fl(s·z)` is then exact, `y − x'` is a producible mask value on
//! every coordinate for the true row `x' = x` and not for most wrong ones, which recovered every
//! token of the f64 mode at any σ. Here instead, for an op of public scale `s = σ·ρ_op`:
//!
//! - the grid step is `g = 2^(⌈log₂ s⌉ − GRID_BITS)`, a power of two fixed by `s` alone;
//! - the mask is `m = g·Z`, `Z = round((s/g)·z)` with `z` standard normal: an integer-valued
//!   (rounded) Gaussian of standard deviation `s/g ∈ (2^(GRID_BITS−1), 2^GRID_BITS]` grid steps;
//! - the row is rounded to the grid, `x_q = g·round(x/g)`, and `x_q + m = g·(X + Z)` is exact in
//!   f64 (`|X + Z| < 2^53` is checked).
//!
//! Every grid value is then a reachable mask for every candidate row, so the masked value is a
//! draw from `x_q + g·Z` and nothing else: its likelihood under a candidate is the rounded
//! Gaussian's, which is what the statistical attacks measure. The f32 modes send `fl32(x_q + m)`,
//! a function of that exact value, which by the data-processing inequality tells no more.
//!
//! Why `GRID_BITS = 32`: the rounded Gaussian is drawn from rand_distr's ziggurat normal, whose
//! values within |z| ≲ 4.6 are a uniform on a `2^-51` grid times a layer width ≤ 3.911, so
//! spaced at most `2^-49` apart; each integer `Z` there collects `≥ 2^17` grid values per layer,
//! and the relative unevenness between integers is `≲ 2^-17`. Further out the ziggurat's tail is
//! coarser (unevenness `2^-10` at 6σ), and past ~7.8σ some integers are never drawn: a value
//! there can be ruled out by its bits, with probability ~5·10^-15 per coordinate. Integrated over
//! `z`, the information the unevenness carries about a row is ~10^-13 nats per coordinate
//! (an exact emulation of the sampler; docs/remo.md), ~10^-8 nats over a position's 121 views.
//! Rounding the row moves a value by at most `g/2 ≤ s·2^-32`: at σ = 100 that is `ρ_op·2^-25`,
//! under f32's own resolution at the row's scale; values above `s·2^-8` are already multiples of
//! `g` (their f32 spacing is at least `g`) and do not move at all.

use talaria_engine::OpId;

use crate::RemoError;

pub use talaria_params::{GRID_BITS, grid_step};

/// The largest `|X + Z|` in grid steps for which `g·(X + Z)` is exact in f64.
const EXACT: f64 = (1u64 << 53) as f64;

/// A mask coordinate in grid steps: `round((s/g)·z)`, clamped far out in the tail (at 2^12
/// standard deviations, where a normal never reaches) so exactness never depends on luck.
pub fn mask_steps(scale: f64, step: f64, z: f64) -> f64 {
    let limit = 2f64.powi(GRID_BITS + 12);
    // `+ 0.0` turns −0 into +0: a dummy row's −0 would otherwise mark it as a canary (a real
    // row's value there is +0 unless the row's own value is a negative zero).
    ((scale / step) * z).round().clamp(-limit, limit) + 0.0
}

/// `x_q + m` exactly, for a row value `x` and a mask `m = step·Z`: the value the cloud is sent
/// (f64), or from which it is rounded once (f32).
pub fn masked_value(op: OpId, x: f32, mask: f64, step: f64) -> Result<f64, RemoError> {
    let steps = (f64::from(x) / step).round();
    let total = steps + mask / step;
    // Written so that a NaN fails the check too.
    if total.is_nan() || total.abs() >= EXACT {
        return Err(RemoError::Overflow {
            op,
            reason: format!(
                "a value {x:e} is beyond 2^53 grid steps of {step:e} (or not finite): it cannot \
                 be masked exactly"
            ),
        });
    }
    Ok(total * step)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: OpId = OpId::LmHead;

    #[test]
    fn the_grid_is_a_power_of_two_below_the_scale() {
        for s in [0.37, 1.0, 3.0, 100.0, 1234.5] {
            let g = grid_step(s);
            assert_eq!(g.log2().fract(), 0.0, "{g}");
            let sd = s / g;
            assert!(
                sd > 2f64.powi(GRID_BITS - 1) && sd <= 2f64.powi(GRID_BITS),
                "{s}"
            );
        }
    }

    #[test]
    fn masked_values_are_exact_sums_on_the_grid() {
        let s = 100.0 * 0.8;
        let g = grid_step(s);
        for (x, z) in [(0.5f32, 1.3), (-3.25e-7, -2.2), (17.0, 0.0), (0.0, 4.1)] {
            let m = g * mask_steps(s, g, z);
            let y = masked_value(OP, x, m, g).unwrap();
            // The sum is on the grid, and removing the mask leaves the rounded row exactly.
            assert_eq!((y / g).fract(), 0.0);
            let xq = (f64::from(x) / g).round() * g;
            assert_eq!(y - m, xq);
            assert!((xq - f64::from(x)).abs() <= g / 2.0);
        }
    }

    #[test]
    fn a_mask_coordinate_is_never_a_negative_zero() {
        let (s, g) = (80.0, grid_step(80.0));
        let z = -0.3 * g / s;
        assert!(mask_steps(s, g, z).is_sign_positive());
        let y = masked_value(OP, 0.0, g * mask_steps(s, g, z), g).unwrap();
        assert!(y.is_sign_positive());
    }

    #[test]
    fn values_that_cannot_be_exact_are_refused() {
        let g = grid_step(1.0);
        assert!(masked_value(OP, f32::INFINITY, 0.0, g).is_err());
        assert!(masked_value(OP, f32::NAN, 0.0, g).is_err());
        assert!(masked_value(OP, 1e30, 0.0, g).is_err());
    }
}
