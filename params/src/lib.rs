//! ReMO's public parameters: what the tenant chooses, the agent's attestation binds, the
//! topology file and the CLI write, and the cloud and the attack suite may read. Nothing here is
//! private: the masks, pads and check vectors drawn under these parameters live in
//! `talaria-remo`, which the cloud's binaries cannot link.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use talaria_engine::OpId;

/// A parameter outside its range, or a calibration without an op: which field, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParamsError {
    /// The parameter, as the topology's `[remo]` section and the CLI name it (`scale`, `rank`,
    /// `dummy_rows`, `pad_rows`, `frac_bits`, `calibration`).
    pub field: &'static str,
    pub message: String,
}

impl ParamsError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// The most rows beyond a model's context one masked call may carry (dummy and padding rows):
/// a protocol limit (`talaria_wire::max_call_rows`) the configuration is validated against.
pub const MAX_EXTRA_ROWS: usize = 64;

/// The fewest fractional bits the integer mode may encode a row with; a row that needs fewer to
/// fit is refused rather than sent with almost no precision.
pub const MIN_FRAC_BITS: u32 = 10;
/// The most fractional bits the configuration may ask for.
pub const MAX_FRAC_BITS: u32 = 60;

/// Bits of the float modes' mask grid below the mask's scale: the mask's standard deviation is
/// `2^(GRID_BITS−1)` to `2^GRID_BITS` grid steps (`talaria_remo::grid` draws on it).
pub const GRID_BITS: i32 = 32;

/// The grid step of an op whose mask scale is `scale` (`σ·ρ_op`, positive and finite): a power
/// of two fixed by the public scale alone.
pub fn grid_step(scale: f64) -> f64 {
    2f64.powi(scale.log2().ceil() as i32 - GRID_BITS)
}

/// Arithmetic of each side. The integer mode is the default and the only one whose hiding does
/// not depend on statistics; the float modes are explicit choices that hide only as well as a
/// Gaussian of scale σ·ρ_op does against the strongest attacker (`docs/attacks.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Masks, masked rows, the cloud's GEMM and unmasking all in f32. Statistical hiding only,
    /// and the most drift.
    F32,
    /// The CVM builds `x̃` exactly in f64 and rounds it once to f32; the mask's products are made
    /// in f64. The cloud's GEMM stays f32. Statistical hiding only.
    F64Client,
    /// Everything in f64, the cloud's GEMM included: lossless at any measured scale.
    /// Statistical hiding only.
    F64Gemm,
    /// The integer one-time pad (the default): fixed-point rows plus uniform pads modulo `2^64`,
    /// the cloud's product in wrapping 64-bit integers over the exact integer weight; exact, and
    /// the cloud's view is independent of the data. Full rank only; the scale σ does not apply.
    Int,
}

impl Precision {
    /// Whether the cloud computes in f64.
    pub fn gemm_f64(self) -> bool {
        self == Precision::F64Gemm
    }

    /// Whether `R_pub` is kept in f64.
    pub fn r_pub_f64(self) -> bool {
        matches!(self, Precision::F64Client | Precision::F64Gemm)
    }

    /// Whether this is the integer mode.
    pub fn is_int(self) -> bool {
        self == Precision::Int
    }

    /// Largest relative error a canary row may show before the reply is declared corrupt (the
    /// canaries of rank < d only, where Freivalds' check is impossible).
    pub fn canary_tolerance(self) -> f64 {
        match self {
            Precision::F32 | Precision::F64Client => 1e-4,
            Precision::F64Gemm => 1e-9,
            Precision::Int => 0.0,
        }
    }

    /// The unit roundoff of the cloud's GEMM in a float mode (IEEE f32 or f64; a TF32 GEMM
    /// rounds to 2^-11 and fails the checks).
    pub fn cloud_unit_roundoff(self) -> f64 {
        match self {
            Precision::F64Gemm => f64::EPSILON / 2.0,
            _ => f64::from(f32::EPSILON) / 2.0,
        }
    }

    /// The dummy rows a configuration of this precision gets unless it says otherwise: none in
    /// the integer mode (its pads hide a row alone, and Freivalds' check verifies every row),
    /// [`FLOOR_DUMMY_ROWS`] in the float modes (their shuffle hides a decode row only among
    /// them).
    pub fn default_dummy_rows(self) -> usize {
        if self.is_int() { 0 } else { FLOOR_DUMMY_ROWS }
    }
}

/// How the row count of a prefill call is hidden: it is padded with cover rows (pads, verified
/// like every row) up to a bucket, so the cloud learns the bucket, not the prompt's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PadRows {
    /// No padding: the cloud reads the exact prompt length.
    Off,
    /// The next power of two, and at least this many rows.
    Pow2(usize),
    /// Always the session's context length: the length is hidden completely.
    Max,
}

impl PadRows {
    /// The rows a call of `n` rows is sent with, at most `limit` (the context length) unless
    /// `n` itself is more.
    pub fn bucket(self, n: usize, limit: usize) -> usize {
        let b = match self {
            PadRows::Off => n,
            PadRows::Pow2(min) => n.max(min).checked_next_power_of_two().unwrap_or(limit),
            PadRows::Max => limit,
        };
        b.min(limit).max(n)
    }
}

impl std::str::FromStr for PadRows {
    type Err = String;

    /// `off`, `max`, `pow2` (from 16) or `pow2:MIN`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(PadRows::Off),
            "max" => Ok(PadRows::Max),
            "pow2" => Ok(PadRows::Pow2(DEFAULT_PAD_MIN)),
            _ => {
                let min = s
                    .strip_prefix("pow2:")
                    .and_then(|m| m.parse::<usize>().ok())
                    .filter(|&m| (1..=MAX_PAD_MIN).contains(&m))
                    .ok_or_else(|| format!("{s:?}: expected off, max, pow2 or pow2:MIN"))?;
                Ok(PadRows::Pow2(min))
            }
        }
    }
}

impl std::fmt::Display for PadRows {
    /// The form [`FromStr`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PadRows::Off => f.write_str("off"),
            PadRows::Pow2(m) => write!(f, "pow2:{m}"),
            PadRows::Max => f.write_str("max"),
        }
    }
}

/// The least [`RemoConfig::prefill_chunk`] but 0.
pub const MIN_PREFILL_CHUNK: usize = 16;

/// The least bucket of the default padding (`docs/remo.md`, "Length hiding").
pub const DEFAULT_PAD_MIN: usize = 16;

/// The largest least bucket `pow2:MIN` may ask for.
pub const MAX_PAD_MIN: usize = 1 << 20;

/// Rank of the public mask basis.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rank {
    /// `m = d_in`, identity basis: fresh isotropic noise per row. The default, and the only
    /// setting that hides rows.
    Full,
    /// `m = round(fraction · d_in) < d_in`, orthonormal basis: the published setting, kept for
    /// comparison. **It leaks**: the part of each row outside the basis's span is sent unmasked.
    Fraction(f64),
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// `f32`, `f64-client`, `f64-gemm` or `int`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f64-client" => Ok(Precision::F64Client),
            "f64-gemm" => Ok(Precision::F64Gemm),
            "int" => Ok(Precision::Int),
            _ => Err(format!("{s:?}: expected f32, f64-client, f64-gemm or int")),
        }
    }
}

impl std::fmt::Display for Precision {
    /// The name [`FromStr`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F64Client => "f64-client",
            Precision::F64Gemm => "f64-gemm",
            Precision::Int => "int",
        })
    }
}

impl std::fmt::Display for Rank {
    /// `full` or the fraction, as [`FromStr`](std::str::FromStr) reads them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rank::Full => f.write_str("full"),
            Rank::Fraction(x) => write!(f, "{x}"),
        }
    }
}

impl std::str::FromStr for Rank {
    type Err = String;

    /// `full`, or a fraction in (0, 1).
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "full" {
            return Ok(Rank::Full);
        }
        let f: f64 = s
            .parse()
            .map_err(|_| format!("{s:?} is neither `full` nor a fraction"))?;
        if !(f > 0.0 && f < 1.0) {
            return Err(format!("rank fraction {f} must be in (0, 1)"));
        }
        Ok(Rank::Fraction(f))
    }
}

/// Every ReMO parameter, with defaults chosen from measurements (see `docs/remo.md`).
///
/// What every mode leaves visible to the cloud, whatever it hides: the number of rows of every
/// call (in the prefill the prompt length's bucket, [`PadRows`]), the number of decode steps
/// (the response's length), the timing of every call, the frame sizes, and which tenant's
/// session a call belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoConfig {
    /// Whether to mask at all; off gives the plaintext split (the attack suite's control).
    pub enabled: bool,
    pub rank: Rank,
    /// σ: the float modes' mask scale in units of the op's calibrated input RMS ρ_op (unused by
    /// the integer mode).
    pub scale: f64,
    pub precision: Precision,
    /// Pure-mask rows added to every call, shuffled with the real ones: cover for a decode row
    /// in the float modes. They do not hide the row count (`dummy_rows` is public); Freivalds'
    /// check verifies them like every row (with rank < d, where it cannot, they are canaries
    /// whose products the CVM knows).
    pub dummy_rows: usize,
    /// Length hiding: prefill calls padded to a bucket of rows.
    #[serde(default = "default_pad_rows")]
    pub pad_rows: PadRows,
    /// Shuffle the rows of every call with a fresh permutation (hides which row is a canary).
    pub shuffle: bool,
    /// Masks precomputed per op, ahead of the calls, on a background thread (0: on the spot).
    pub pool: usize,
    /// The integer mode's fractional bits `f` (the most a row is encoded with; a row whose
    /// product could overflow 63 bits gets fewer).
    #[serde(default = "default_frac_bits")]
    pub frac_bits: u32,
    /// Fairness: a prefill whose padded rows exceed this many runs as passes of this many rows
    /// (a power of two; 0: one pass), so that one tenant's long prompt does not hold a stage's
    /// worker for the whole prompt while others' decode steps wait. The cloud sees as many rows
    /// as in one pass: the bucket's, in calls of exactly this many ([`RemoConfig::prefill_parts`]).
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
}

fn default_pad_rows() -> PadRows {
    RemoConfig::default().pad_rows
}

fn default_frac_bits() -> u32 {
    RemoConfig::default().frac_bits
}

fn default_prefill_chunk() -> usize {
    RemoConfig::default().prefill_chunk
}

/// The default [`RemoConfig::prefill_chunk`]: a pass of this many rows holds a stage's worker
/// for a few milliseconds per call (`docs/serving.md`, "Fairness").
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// The least float-mode σ an agent runs with unless its tenant accepts less: measured against
/// the ideal attacker, σ = 30 leaks 1.2–1.5 bits per token with shuffled rows (every float
/// mode), σ = 100 0.00–0.16; `docs/attacks.md`.
pub const FLOOR_SCALE: f64 = 100.0;

/// The least number of dummy rows of the float modes (the measured setting): what their shuffle
/// hides a one-row decode call among.
pub const FLOOR_DUMMY_ROWS: usize = 2;

impl Default for RemoConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rank: Rank::Full,
            scale: 100.0,
            precision: Precision::Int,
            dummy_rows: 0,
            pad_rows: PadRows::Pow2(DEFAULT_PAD_MIN),
            shuffle: true,
            pool: 32,
            frac_bits: 32,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

impl RemoConfig {
    /// Checks every parameter.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(ParamsError::new(
                "scale",
                format!("scale {} must be positive", self.scale),
            ));
        }
        if let Rank::Fraction(f) = self.rank
            && !(f > 0.0 && f < 1.0)
        {
            return Err(ParamsError::new(
                "rank",
                format!("rank fraction {f} must be in (0, 1); use full rank otherwise"),
            ));
        }
        if self.dummy_rows > MAX_EXTRA_ROWS {
            return Err(ParamsError::new(
                "dummy_rows",
                format!(
                    "dummy_rows {} is more than a call may carry beyond the context ({})",
                    self.dummy_rows, MAX_EXTRA_ROWS
                ),
            ));
        }
        if let PadRows::Pow2(min) = self.pad_rows
            && !(1..=MAX_PAD_MIN).contains(&min)
        {
            return Err(ParamsError::new(
                "pad_rows",
                format!("pad_rows pow2:{min}: the least bucket must be 1..={MAX_PAD_MIN}"),
            ));
        }
        if self.prefill_chunk != 0
            && !(self.prefill_chunk.is_power_of_two() && self.prefill_chunk >= MIN_PREFILL_CHUNK)
        {
            return Err(ParamsError::new(
                "prefill_chunk",
                format!(
                    "prefill_chunk {}: a power of two, at least {MIN_PREFILL_CHUNK} (0: one pass)",
                    self.prefill_chunk
                ),
            ));
        }
        if self.precision.is_int() {
            if self.rank != Rank::Full {
                return Err(ParamsError::new(
                    "rank",
                    "the integer mode is full rank only (its pads are uniform residues)",
                ));
            }
            if !(MIN_FRAC_BITS..=MAX_FRAC_BITS).contains(&self.frac_bits) {
                return Err(ParamsError::new(
                    "frac_bits",
                    format!(
                        "frac_bits {} must be in {}..={}",
                        self.frac_bits, MIN_FRAC_BITS, MAX_FRAC_BITS
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Why this configuration is below the floor an agent runs with unless its tenant accepts
    /// less (`docs/remo.md`, "The floor"); empty at or above it. The floor is what the attack
    /// suite measures as hiding: masking on at full rank, and in a float mode σ ≥
    /// [`FLOOR_SCALE`] with shuffled rows. The integer mode meets it whatever σ says (it has no
    /// σ).
    pub fn below_floor(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.enabled {
            why.push("masking is off: the cloud sees every activation".to_string());
            return why;
        }
        if self.pad_rows == PadRows::Off {
            why.push("prefill rows are not padded: the cloud reads every prompt's length".into());
        }
        if let Rank::Fraction(f) = self.rank {
            why.push(format!(
                "rank {f} < d leaves the complement of the basis unmasked"
            ));
        }
        if !self.precision.is_int() {
            if self.scale < FLOOR_SCALE {
                why.push(format!(
                    "σ = {} is below the floor {FLOOR_SCALE} of the float modes",
                    self.scale
                ));
            }
            if !self.shuffle {
                why.push("the float modes' rows are not shuffled".to_string());
            }
            if self.dummy_rows < FLOOR_DUMMY_ROWS {
                // A one-row decode call is then "shuffled" among itself: its row's position
                // is known, as without the shuffle.
                why.push(format!(
                    "{} dummy rows: the float modes' shuffle hides a decode row only among at \
                     least {FLOOR_DUMMY_ROWS}",
                    self.dummy_rows
                ));
            }
        }
        why
    }

    /// How a prefill of `rows` new rows runs, in a session of context `context`: the real rows
    /// of each pass, in order, and the rows each pass's calls are padded to (`None`: one pass,
    /// padded to its [`PadRows`] bucket as usual).
    ///
    /// A prefill whose bucket `P` exceeds [`prefill_chunk`](Self::prefill_chunk) `C` runs as
    /// `⌈P / C⌉` passes, every call of each padded to exactly `C` rows, the real rows spread as
    /// evenly as they go (a prefill within the least `pow2` bucket is one pass). What the cloud can count — the passes, the rows of each call, their
    /// total — is a function of `P` alone, which one pass shows anyway. Under `pad_rows =
    /// "max"` a prefill is not split: `P` is the context whatever the prompt, and a pass with
    /// no real row has nothing to run. Under `off` the cloud reads the length anyway: the
    /// passes are `C` rows but the last.
    pub fn prefill_parts(&self, rows: usize, context: usize) -> (Vec<usize>, Option<usize>) {
        let c = self.prefill_chunk;
        let one = (vec![rows], None);
        if c == 0 || rows <= 1 || !self.enabled {
            return one;
        }
        match self.pad_rows {
            PadRows::Max => one,
            PadRows::Off if rows > c => {
                let mut parts = vec![c; rows / c];
                if !rows.is_multiple_of(c) {
                    parts.push(rows % c);
                }
                (parts, None)
            }
            PadRows::Off => one,
            PadRows::Pow2(min) => {
                let padded = self.pad_rows.bucket(rows, context);
                // Above the least bucket, `padded` is the next power of two or the context
                // (a power of two or not), so more than half of it is real rows: every pass
                // has more than C/2. The least bucket can be mostly padding: it is one pass.
                if padded <= c.max(min) {
                    return one;
                }
                let passes = padded.div_ceil(c);
                let (each, extra) = (rows / passes, rows % passes);
                let parts = (0..passes).map(|i| each + usize::from(i < extra)).collect();
                (parts, Some(c))
            }
        }
    }

    /// The basis rank for an op of input width `d_in`.
    pub fn rank_for(&self, d_in: usize) -> usize {
        match self.rank {
            Rank::Full => d_in,
            Rank::Fraction(f) => ((f * d_in as f64).round() as usize).clamp(1, d_in - 1),
        }
    }
}

/// ρ_op per op: a high quantile of the op's input RMS on public text, measured once per model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Which quantile of the row RMS was taken.
    pub quantile: f64,
    /// What text it was measured on.
    pub corpus: String,
    /// ρ by op, keyed by the op's one text form (`OpId`'s `Display`: `"<layer>.<op>"` or
    /// `"lm_head"`).
    pub rho: BTreeMap<String, f64>,
}

impl Calibration {
    /// ρ of an op; every op of the model must be calibrated.
    pub fn rho(&self, op: OpId) -> Result<f64, ParamsError> {
        let key = op.to_string();
        match self.rho.get(&key) {
            Some(&r) if r.is_finite() && r > 0.0 => Ok(r),
            Some(&r) => Err(ParamsError::new(
                "calibration",
                format!("calibration of {key} is {r}"),
            )),
            None => Err(ParamsError::new(
                "calibration",
                format!("no calibration for {key}"),
            )),
        }
    }
}

#[cfg(test)]
mod floor_tests {
    use super::*;

    #[test]
    fn the_default_meets_the_floor_and_each_weakening_is_named() {
        let d = RemoConfig::default();
        assert!(d.below_floor().is_empty());
        // The integer mode has no σ, and its pads hide every row alone: a small σ or no dummy
        // rows is not a weakening there (no dummy rows is its default).
        for weaker in [
            RemoConfig {
                scale: 1.0,
                ..d.clone()
            },
            RemoConfig {
                dummy_rows: 0,
                ..d.clone()
            },
        ] {
            assert!(weaker.below_floor().is_empty());
        }
        let float = RemoConfig {
            precision: Precision::F64Gemm,
            dummy_rows: Precision::F64Gemm.default_dummy_rows(),
            ..d.clone()
        };
        assert!(float.below_floor().is_empty());
        let cases = [
            (
                RemoConfig {
                    enabled: false,
                    ..d.clone()
                },
                "masking is off",
            ),
            (
                RemoConfig {
                    scale: 30.0,
                    ..float.clone()
                },
                "σ = 30",
            ),
            (
                RemoConfig {
                    pad_rows: PadRows::Off,
                    ..d.clone()
                },
                "not padded",
            ),
            (
                RemoConfig {
                    shuffle: false,
                    ..float.clone()
                },
                "not shuffled",
            ),
            (
                RemoConfig {
                    dummy_rows: 0,
                    ..float.clone()
                },
                "0 dummy rows",
            ),
            (
                RemoConfig {
                    rank: Rank::Fraction(0.5),
                    ..float.clone()
                },
                "rank 0.5",
            ),
        ];
        for (config, why) in cases {
            let reasons = config.below_floor();
            assert!(reasons.iter().any(|r| r.contains(why)), "{reasons:?}");
        }
    }
}

#[cfg(test)]
mod prefill_parts_tests {
    use super::*;

    /// What the cloud counts of a prefill split into passes: how many, and the rows each
    /// call is padded to.
    fn seen(c: &RemoConfig, rows: usize, context: usize) -> (usize, Option<usize>) {
        let (parts, pad) = c.prefill_parts(rows, context);
        assert_eq!(parts.iter().sum::<usize>(), rows, "{rows} rows");
        assert!(parts.iter().all(|&p| p > 0 && pad.is_none_or(|c| p <= c)));
        (parts.len(), pad)
    }

    #[test]
    fn passes_depend_on_the_bucket_alone() {
        for (pad_rows, chunk, context) in [
            (PadRows::Pow2(16), 256, 8192),
            (PadRows::Pow2(16), 16, 8192),
            (PadRows::Pow2(1024), 256, 8192),
            (PadRows::Pow2(16), 256, 3000),
        ] {
            let c = RemoConfig {
                pad_rows,
                prefill_chunk: chunk,
                ..Default::default()
            };
            c.validate().unwrap();
            let mut by_bucket = BTreeMap::new();
            for rows in 1..=context {
                let view = seen(&c, rows, context);
                let bucket = pad_rows.bucket(rows, context);
                assert_eq!(
                    *by_bucket.entry(bucket).or_insert(view),
                    view,
                    "{pad_rows} chunk {chunk}: {rows} rows"
                );
                if let (n, Some(pad)) = view {
                    assert!(n * pad >= bucket && (n - 1) * pad < bucket, "{rows} rows");
                }
            }
            assert!(by_bucket.values().any(|v| v.0 > 1), "some prefill is split");
        }
    }

    #[test]
    fn max_and_zero_are_one_pass_and_off_splits_the_exact_length() {
        for c in [
            RemoConfig {
                pad_rows: PadRows::Max,
                ..Default::default()
            },
            RemoConfig {
                prefill_chunk: 0,
                ..Default::default()
            },
        ] {
            assert_eq!(c.prefill_parts(5000, 8192), (vec![5000], None));
        }
        let off = RemoConfig {
            pad_rows: PadRows::Off,
            ..Default::default()
        };
        assert_eq!(off.prefill_parts(600, 8192), (vec![256, 256, 88], None));
        for bad in [3, 100, 8] {
            let c = RemoConfig {
                prefill_chunk: bad,
                ..Default::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "prefill_chunk");
        }
    }
}
