//! The exactness attack: the exact bits of a masked value, not its size.
//!
//! A masked value is `y = x + m`. If the masks the CVM draws cannot take every value of the
//! grid `y` lives on, then `y − x'` for a candidate row `x'` is sometimes a value no mask can
//! be; for the true row it always is one. Counting, for every token of the vocabulary, on how
//! many coordinates of a layer-0 `qkv` row (a token's gain-free normed embedding: no context
//! needed) `y − x'` is a reachable mask picks the true token wherever the mask family has gaps.
//! Against `fl(σ·ρ·z)` masks added exactly in f64 (the f64-GEMM mode before the grid masks)
//! that is every token at any σ; against the grid masks (`talaria_remo::grid`) every candidate
//! is reachable everywhere and the attack knows nothing, so it falls back to the prior.

use rayon::prelude::*;
use talaria_engine::{BlockOp, OpId};
use talaria_params::Precision;
use talaria_params::grid_step;

use crate::AttackError;
use crate::attack::{Attacker, SessionGuess};
use crate::tap::{MaskFamily, Public, Tap, read_npy};

/// The only op whose input does not depend on the context.
const LAYER0_QKV: OpId = OpId::Block {
    layer: 0,
    op: BlockOp::Qkv,
};

/// Coordinates tested before a candidate that already failed too many is given up on.
const SCREEN: usize = 64;

/// Whether `y` can be the masked value of `x` under the tap's public mask algorithm.
#[derive(Debug, Clone, Copy)]
pub enum Reachable {
    /// No masking: `y` is `x`.
    Plain,
    /// `fl(s·z)` for an f64 `z`, added exactly in f64.
    ScaledF64 { scale: f64 },
    /// Some f32 mask `m` with `fl32(x + m) = y` (an f32 `fl(s·z)` takes every f32 value).
    ScaledF32,
    /// `g·Z` added exactly to the row rounded to the grid `g`.
    GridF64 { step: f64 },
    /// `fl32` of that exact sum.
    GridF32 { step: f64 },
    /// The integer pad: every residue is reachable from every row.
    Pad,
}

impl Reachable {
    /// The predicate for the layer-0 `qkv` op of a tap.
    pub fn for_tap(public: &Public, rho: f64) -> Self {
        let remo = &public.remo;
        let scale = remo.scale * rho;
        let f64_out = remo.precision == Precision::F64Gemm;
        match (remo.enabled, remo.precision, public.masks, f64_out) {
            (false, ..) => Reachable::Plain,
            (true, Precision::Int, ..) => Reachable::Pad,
            (true, _, MaskFamily::ScaledGaussian, true) => Reachable::ScaledF64 { scale },
            (true, _, MaskFamily::ScaledGaussian, false) => Reachable::ScaledF32,
            (true, _, MaskFamily::Grid, true) => Reachable::GridF64 {
                step: grid_step(scale),
            },
            (true, _, MaskFamily::Grid, false) => Reachable::GridF32 {
                step: grid_step(scale),
            },
        }
    }

    /// Whether the observed value `y` can come from the row value `x`.
    pub fn test(self, y: f64, x: f64) -> bool {
        match self {
            Reachable::Plain => y == x,
            Reachable::Pad => true,
            Reachable::ScaledF64 { scale } => {
                // y − x is exact for the true row; fl(s·z) = m for some z iff one of the f64s
                // next to m/s maps to m.
                let m = y - x;
                let z = m / scale;
                [z, z.next_up(), z.next_down()]
                    .into_iter()
                    .any(|z| scale * z == m)
            }
            Reachable::ScaledF32 => {
                let m0 = (y - x) as f32;
                let mut m = m0.next_down().next_down();
                (0..5).any(|_| {
                    let hit = f64::from((x + f64::from(m)) as f32) == y;
                    m = m.next_up();
                    hit
                })
            }
            Reachable::GridF64 { step } => {
                let xq = (x / step).round() * step;
                ((y - xq) / step).fract() == 0.0
            }
            Reachable::GridF32 { step } => {
                let xq = (x / step).round() * step;
                let z0 = ((y - xq) / step).round();
                (-1..=1).any(|k| f64::from((xq + (z0 + f64::from(k)) * step) as f32) == y)
            }
        }
    }

    /// On how many coordinates `y − x` is reachable, giving up (with the count so far) once
    /// the first [`SCREEN`] coordinates show fewer than `floor` hits.
    fn count(self, y: &[f64], x: &[f32], floor: usize) -> usize {
        let mut hits = 0;
        for (i, (&yi, &xi)) in y.iter().zip(x).enumerate() {
            if i == SCREEN && hits < floor {
                return hits;
            }
            hits += usize::from(self.test(yi, f64::from(xi)));
        }
        hits
    }
}

/// A row's best token, its margin over the runner-up, and whether a zero row (a dummy) does at
/// least as well.
struct RowVerdict {
    token: u32,
    margin: usize,
    dummy: bool,
}

/// Runs the attack on every session: each layer-0 `qkv` call in order (the prefill, then one per
/// decode pass), every row against every token's layer-0 row.
pub(crate) fn run(att: &mut Attacker, tap: &Tap) -> Result<Vec<SessionGuess>, AttackError> {
    let rho = att.calibration.rho(LAYER0_QKV)?;
    let reach = Reachable::for_tap(&tap.public, rho);
    let d = att.sim.config().d_model;
    let mut out = Vec::new();
    for session in tap.sessions() {
        let mut guess = SessionGuess {
            session: session.id,
            ..SessionGuess::default()
        };
        let calls: Vec<_> = session.calls().filter(|c| c.op == LAYER0_QKV).collect();
        for (p, call) in calls.into_iter().enumerate() {
            let rows = read_npy(&call.file)?;
            if rows.cols != d {
                return Err(AttackError::Format(format!(
                    "{}: width {}, layer 0 qkv is {d} wide",
                    call.file.display(),
                    rows.cols
                )));
            }
            let n_real = tap.public.real_rows(rows.rows);
            let verdicts: Vec<RowVerdict> = (0..rows.rows)
                .map(|r| verdict(att, reach, rows.row(r)))
                .collect();
            let tokens = decide(att, &verdicts, n_real, tap.public.ordered());
            if p == 0 {
                guess.tokens = tokens;
            } else {
                guess.response.extend(tokens);
            }
        }
        out.push(guess);
    }
    Ok(out)
}

/// Scores every token of the vocabulary against one observed row.
fn verdict(att: &Attacker, reach: Reachable, y: &[f64]) -> RowVerdict {
    let table = att.sim.l0_table();
    let d = y.len();
    // A candidate that misses more than a quarter of the screened coordinates is not the row.
    let floor = SCREEN * 3 / 4;
    let (best, second) = table
        .par_chunks_exact(d)
        .enumerate()
        .map(|(t, x)| (reach.count(y, x, floor), t as u32))
        .fold(
            || ((0usize, 0u32), 0usize),
            |(best, second), (c, t)| {
                if c > best.0 {
                    ((c, t), best.0)
                } else {
                    (best, second.max(c))
                }
            },
        )
        .reduce(
            || ((0usize, 0u32), 0usize),
            |(a, a2), (b, b2)| {
                if a.0 >= b.0 {
                    (a, a2.max(b.0).max(b2))
                } else {
                    (b, b2.max(a.0).max(a2))
                }
            },
        );
    let zero = vec![0f32; d];
    RowVerdict {
        token: best.1,
        margin: best.0 - second,
        dummy: reach.count(y, &zero, floor) >= best.0,
    }
}

/// The tokens of a call: rows that single one token out, the most decisive first; the prior's
/// guesses for what the bits do not decide.
fn decide(att: &Attacker, verdicts: &[RowVerdict], n_real: usize, ordered: bool) -> Vec<u32> {
    let per_row: Vec<(u32, f64)> = verdicts
        .iter()
        .map(|v| {
            let confidence = if v.dummy || v.margin == 0 {
                f64::NEG_INFINITY
            } else {
                v.margin as f64
            };
            (v.token, confidence)
        })
        .collect();
    let mut idx: Vec<usize> = (0..per_row.len()).collect();
    if !ordered {
        idx.sort_by(|&a, &b| per_row[b].1.total_cmp(&per_row[a].1));
    }
    let decided: Vec<u32> = idx
        .into_iter()
        .take(n_real)
        .filter(|&r| per_row[r].1.is_finite())
        .map(|r| per_row[r].0)
        .collect();
    let mut tokens = decided;
    let missing = n_real - tokens.len();
    tokens.extend(att.prior.guess(missing));
    tokens
}
