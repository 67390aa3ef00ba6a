//! Fixed point for the integer mode: rows are encoded as `X = round(x · γ · 2^f)`, multiplied
//! by the exact integer weight modulo `2^64`, and decoded by `2^-(f + shift)`.
//!
//! The product is exact while it fits in 63 bits. Every row gets its own `f`: the largest, up to
//! the configured one, for which Cauchy–Schwarz proves every output fits,
//! `‖X‖₂ · max_j ‖W_int[:, j]‖₂ < 2^62` (a bit of margin for rounding). `f` never leaves the CVM:
//! the cloud sees only padded residues, whatever `f` was.

use std::collections::HashMap;

use talaria_engine::{EngineError, LinearOps, OpId, Rows};
use talaria_kernels::{IntWeight, int_matmul};

use crate::RemoError;

pub use talaria_params::{MAX_FRAC_BITS, MIN_FRAC_BITS};

/// An integer weight as the CVM uses it: the weight and the bound on its columns.
#[derive(Debug)]
pub struct IntOp {
    pub weight: IntWeight,
    /// `max_j ‖W_int[:, j]‖₂`.
    pub bound: f64,
}

impl IntOp {
    /// Checks a weight received from the cloud and measures its column bound.
    pub fn new(op: OpId, weight: IntWeight, d_in: usize, d_out: usize) -> Result<Self, RemoError> {
        weight
            .validate()
            .map_err(|e| RemoError::Setup(format!("{op}: {e}")))?;
        if (weight.d_in, weight.d_out) != (d_in, d_out) {
            return Err(RemoError::Setup(format!(
                "{op}: integer weight is {} x {}, expected {d_in} x {d_out}",
                weight.d_in, weight.d_out
            )));
        }
        let bound = weight.column_norm_bound();
        Ok(Self { weight, bound })
    }

    /// Encodes row `x` into `out`; returns the fractional bits chosen and the bound
    /// [`product_bound`] on every value of the row's exact product.
    pub fn encode(
        &self,
        op: OpId,
        x: &[f32],
        f_max: u32,
        out: &mut [u64],
    ) -> Result<(u32, u64), RemoError> {
        let gain = self.weight.gain.as_deref();
        let v = |i: usize| f64::from(x[i]) * gain.map_or(1.0, |g| f64::from(g[i]));
        let mut sq = 0f64;
        for i in 0..x.len() {
            let vi = v(i);
            if !vi.is_finite() {
                return Err(RemoError::Overflow {
                    op,
                    reason: "the row is not finite".into(),
                });
            }
            sq += vi * vi;
        }
        let f = frac_bits(sq.sqrt(), x.len(), self.bound, f_max).ok_or_else(|| {
            RemoError::Overflow {
                op,
                reason: format!(
                    "row norm {:.3e} times column bound {:.3e} leaves fewer than {MIN_FRAC_BITS} \
                 fractional bits in 63",
                    sq.sqrt(),
                    self.bound
                ),
            }
        })?;
        // The bound with its rounding margin must stay below 2^62 (Freivalds' check counts on
        // it): one bit fewer where the margin tips it over.
        let mut f = f;
        let mut bound = product_bound(sq.sqrt(), x.len(), self.bound, f);
        while bound >= 1 << 62 {
            if f <= MIN_FRAC_BITS {
                return Err(RemoError::Overflow {
                    op,
                    reason: "the row's product bound does not fit below 2^62".into(),
                });
            }
            f -= 1;
            bound = product_bound(sq.sqrt(), x.len(), self.bound, f);
        }
        let scale = 2f64.powi(f as i32);
        for (i, o) in out.iter_mut().enumerate() {
            *o = (v(i) * scale).round() as i64 as u64;
        }
        Ok((f, bound))
    }

    /// Encodes every row of `x` (`d_in` wide, checked): the residues, each row's fractional
    /// bits and each row's bound on its product.
    pub fn encode_rows(&self, op: OpId, x: &Rows, f_max: u32) -> Result<EncodedRows, RemoError> {
        let d_in = self.weight.d_in;
        if x.cols() != d_in {
            return Err(RemoError::Shape {
                op,
                expected: d_in,
                found: x.cols(),
            });
        }
        let mut enc = vec![0u64; x.rows() * d_in];
        let mut frac_bits = Vec::with_capacity(x.rows());
        let mut bounds = Vec::with_capacity(x.rows());
        for (r, row) in enc.chunks_exact_mut(d_in).enumerate() {
            let (f, b) = self.encode(op, x.row(r), f_max, row)?;
            frac_bits.push(f);
            bounds.push(b);
        }
        Ok(EncodedRows {
            residues: enc,
            frac_bits,
            bounds,
        })
    }
}

/// Rows encoded for the integer mode.
pub struct EncodedRows {
    /// The fixed-point values, row-major, as residues modulo `2^64`.
    pub residues: Vec<u64>,
    /// Each row's fractional bits.
    pub frac_bits: Vec<u32>,
    /// Each row's bound on its exact product ([`product_bound`], below `2^62`).
    pub bounds: Vec<u64>,
}

/// A bound on `|X·W_int[:, j]|` for every `j`, for a row of f64 norm `norm` (after the gain)
/// encoded with `f` fractional bits: `‖X‖₂ ≤ norm·2^f + √d/2` (each value rounded by at most
/// ½), times the column bound (Cauchy–Schwarz), enlarged by `2^-30` for the f64 rounding of both
/// norms (relative errors of order `d·2^-53`) and rounded up. Below `2^62` for every `f` that
/// [`frac_bits`] chooses.
pub fn product_bound(norm: f64, d: usize, column_bound: f64, f: u32) -> u64 {
    let b = (norm * 2f64.powi(f as i32) + (d as f64).sqrt() / 2.0) * column_bound.max(1.0);
    let b = (b * (1.0 + 2f64.powi(-30))).ceil() + 1.0;
    // `as` saturates: a bound past 2^64 (never chosen) reads as u64::MAX, which fails nothing.
    b as u64
}

/// The largest `f ≤ f_max` with `(norm · 2^f + √d / 2) · bound < 2^62`, if it is at least
/// [`MIN_FRAC_BITS`].
pub fn frac_bits(norm: f64, d: usize, bound: f64, f_max: u32) -> Option<u32> {
    let limit = 2f64.powi(62) / bound.max(1.0) - (d as f64).sqrt() / 2.0;
    if limit <= 0.0 {
        return None;
    }
    let f = if norm == 0.0 {
        f_max
    } else {
        let room = (limit / norm).log2().floor();
        if room < 0.0 {
            return None;
        } else {
            (room as u32).min(f_max)
        }
    };
    (f >= MIN_FRAC_BITS).then_some(f)
}

/// A product in the ring, read back as exact signed integers, with each row's scale.
#[derive(Debug, Clone, PartialEq)]
pub struct IntProduct {
    pub rows: usize,
    pub cols: usize,
    /// `X · W_int`, row-major, exact.
    pub values: Vec<i64>,
    /// Fractional bits of each row's encoding.
    pub frac_bits: Vec<u32>,
    /// The weight's shift.
    pub shift: u32,
}

impl IntProduct {
    /// The real product, `values · 2^-(f + shift)`, rounded once to f32.
    pub fn decode(&self) -> Result<Rows, RemoError> {
        let mut out = Vec::with_capacity(self.values.len());
        for (r, row) in self.values.chunks_exact(self.cols.max(1)).enumerate() {
            let scale = 2f64.powi(-((self.frac_bits[r] + self.shift) as i32));
            out.extend(row.iter().map(|&v| (v as f64 * scale) as f32));
        }
        Ok(Rows::new(self.rows, self.cols, out)?)
    }
}

/// The plain fixed-point engine: the integer mode's arithmetic with no masks, the exactness
/// reference of the masked integer mode.
pub struct FixedPointLinear {
    frac_bits: u32,
    ops: HashMap<OpId, IntOp>,
    /// Rows encoded with fewer fractional bits than asked, to fit.
    pub downshifted_rows: u64,
}

impl FixedPointLinear {
    /// An engine encoding with at most `frac_bits` fractional bits.
    pub fn new(frac_bits: u32) -> Self {
        Self {
            frac_bits,
            ops: HashMap::new(),
            downshifted_rows: 0,
        }
    }

    /// Adds an op's integer weight.
    pub fn install(
        &mut self,
        op: OpId,
        weight: IntWeight,
        d_in: usize,
        d_out: usize,
    ) -> Result<(), RemoError> {
        self.ops.insert(op, IntOp::new(op, weight, d_in, d_out)?);
        Ok(())
    }

    /// `X · W_int` exactly, for the encoding of `x`.
    pub fn product(&mut self, op: OpId, x: &Rows) -> Result<IntProduct, RemoError> {
        let int = self.ops.get(&op).ok_or(RemoError::NotSetUp(op))?;
        let EncodedRows {
            residues: enc,
            frac_bits,
            ..
        } = int.encode_rows(op, x, self.frac_bits)?;
        self.downshifted_rows += frac_bits.iter().filter(|&&f| f < self.frac_bits).count() as u64;
        let values = int_matmul(&enc, x.rows(), &int.weight)
            .into_iter()
            .map(|v| v as i64)
            .collect();
        Ok(IntProduct {
            rows: x.rows(),
            cols: int.weight.d_out,
            values,
            frac_bits,
            shift: int.weight.shift,
        })
    }
}

impl LinearOps for FixedPointLinear {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        self.product(op, x)
            .and_then(|p| p.decode())
            .map_err(|e| EngineError::BadOp {
                op: op.to_string(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frac_bits_shrink_to_fit_and_refuse_below_the_floor() {
        // Plenty of room: the configured f.
        assert_eq!(frac_bits(1.0, 576, 1e6, 32), Some(32));
        // 2^62 / (2^20 · 2^20) = 2^22 of room for a unit norm.
        assert_eq!(frac_bits(1.0, 576, 2f64.powi(40), 32), Some(21));
        assert_eq!(frac_bits(2f64.powi(10), 576, 2f64.powi(40), 32), Some(11));
        assert_eq!(frac_bits(2f64.powi(12), 576, 2f64.powi(40), 32), None);
        assert_eq!(frac_bits(0.0, 576, 1e6, 24), Some(24));
        assert_eq!(frac_bits(1.0, 576, 1e30, 24), None);
    }
}
