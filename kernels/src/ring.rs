//! The integer mode's arithmetic, shared by both sides: the exact integer form of a
//! block-quantized weight and the wrapping 64-bit product with it.
//!
//! A weight of the integer mode is `W_int[i][j] = D[b][j] · q[i][j] + M[b][j]` for input `i` in
//! block `b = i / 32`, with 8-bit codes `q` and per-block integers `D`, `M` (a GGUF block's f16
//! scale and minimum times `2^shift`, exact). Codes below 16 (a Q4_1 tensor's) are held four
//! bits each ([`Codes`]): a one-row product reads its weight from memory once, so its time is
//! the weight's bytes. Every product here is taken modulo `2^64`: the cloud
//! multiplies one-time-padded rows, the CVM multiplies the pads, and the difference is the true
//! product whenever it fits in 63 bits.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// An integer weight whose lengths do not match its shape (a peer may send anything).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("integer weight: {0}")]
pub struct BadIntWeight(pub String);

/// Inputs per block of an integer weight (a GGUF Q4_1 / Q8_0 block).
pub const INT_BLOCK: usize = 32;

/// The exact integer form of one op's weight, `d_in × d_out`, as the cloud holds it and sends it
/// to an attested CVM at set-up (the integer mode's `R_pub`: it is the weight).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntWeight {
    pub d_in: usize,
    pub d_out: usize,
    /// Codes `q[i][j]`, by tiles of 64 columns and in them inputs in pairs (see [`code_index`]).
    pub codes: Codes,
    /// Per block and column (by tiles of 64 columns, see [`block_index`]): the scale times
    /// `2^shift` (two's complement).
    pub scales: BlockInts,
    /// The same for the block minimum (the offset every code of the block carries).
    pub mins: BlockInts,
    /// `W = W_int · 2^-shift` exactly.
    pub shift: u32,
    /// The norm gain in front of this op, which the integer form cannot fold in: the CVM applies
    /// it to the rows before encoding them.
    pub gain: Option<Vec<f32>>,
}

impl IntWeight {
    /// Checks every length against the shape: a peer may send anything.
    pub fn validate(&self) -> Result<(), BadIntWeight> {
        let bad = |what: &str| BadIntWeight(format!("{what} ({} x {})", self.d_in, self.d_out));
        if self.d_in == 0 || !self.d_in.is_multiple_of(INT_BLOCK) {
            return Err(bad("input width is not a positive multiple of 32"));
        }
        let cells = self
            .d_in
            .checked_mul(self.d_out)
            .ok_or_else(|| bad("size overflows"))?;
        let blocks = self.d_in / INT_BLOCK * self.d_out;
        if self.codes.len() != cells {
            return Err(bad(&format!("{} codes", self.codes.len())));
        }
        if self.scales.len() != blocks || self.mins.len() != blocks {
            return Err(bad(&format!(
                "{} scales and {} minimums",
                self.scales.len(),
                self.mins.len()
            )));
        }
        if self.shift > 62 {
            return Err(bad(&format!("shift {}", self.shift)));
        }
        if let Some(g) = &self.gain
            && (g.len() != self.d_in || g.iter().any(|v| !v.is_finite()))
        {
            return Err(bad(&format!("gain of {} values, or not finite", g.len())));
        }
        Ok(())
    }

    /// `W_int[i][j]`.
    pub fn at(&self, i: usize, j: usize) -> i64 {
        let b = block_index(self.d_in, self.d_out, i / INT_BLOCK, j);
        (self.scales.get(b) as i64)
            .wrapping_mul(i64::from(
                self.codes.get(code_index(self.d_in, self.d_out, i, j)),
            ))
            .wrapping_add(self.mins.get(b) as i64)
    }

    /// The largest Euclidean norm of a column of `W_int` (at least 1), which bounds every
    /// product: `|X·W_int[:, j]| ≤ ‖X‖₂ · this`.
    pub fn column_norm_bound(&self) -> f64 {
        let mut sq = vec![0f64; self.d_out];
        let mut buf = [0u8; 2 * TILE];
        let (mut d_buf, mut m_buf) = ([0u64; TILE], [0u64; TILE]);
        // In storage order, tile by tile; each column still sums over `i` in increasing order.
        for (j0, width) in tiles(self.d_out) {
            let sq = &mut sq[j0..j0 + width];
            for b in 0..self.d_in / INT_BLOCK {
                let k = block_index(self.d_in, self.d_out, b, j0);
                let d = self.scales.run(k, width, &mut d_buf);
                let m = self.mins.run(k, width, &mut m_buf);
                for p in 0..PAIRS {
                    let i = b * INT_BLOCK + 2 * p;
                    let k = code_index(self.d_in, self.d_out, i, j0);
                    let codes = self.codes.run(k, 2 * width, &mut buf);
                    for (jj, (s, pair)) in sq.iter_mut().zip(codes.chunks_exact(2)).enumerate() {
                        for &q in pair {
                            let w = (d[jj] as i64)
                                .wrapping_mul(i64::from(q))
                                .wrapping_add(m[jj] as i64)
                                as f64;
                            *s += w * w;
                        }
                    }
                }
            }
        }
        // f64 rounding of the sum is far below the bit of headroom callers keep.
        sq.into_iter().fold(1f64, |m, s| m.max(s.sqrt()))
    }

    /// [`column_norm_bound`](Self::column_norm_bound) by its definition, entry by entry.
    #[cfg(test)]
    fn column_norm_bound_by_entries(&self) -> f64 {
        let mut sq = vec![0f64; self.d_out];
        for i in 0..self.d_in {
            for (j, s) in sq.iter_mut().enumerate() {
                let w = self.at(i, j) as f64;
                *s += w * w;
            }
        }
        sq.into_iter().fold(1f64, |m, s| m.max(s.sqrt()))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.held_bytes() + self.scales.held_bytes() + self.mins.held_bytes()
    }
}

/// An integer weight's codes, in [`code_index`] order: four bits a code when every code is
/// below 16 (a Q4_1 tensor's), else a byte a code. Packed, byte `k` holds the codes at `2k` (low
/// nibble) and `2k + 1` (high nibble), which [`code_index`] makes the two inputs of one pair row
/// and one column: the two halves of one pair-dot lane. On the wire and in digests a byte a code
/// either way, so how a side holds them is its own affair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codes {
    bytes: Vec<u8>,
    len: usize,
    packed: bool,
}

impl Codes {
    /// Holds `codes` (one a byte), packed when every one is below 16.
    pub fn new(codes: Vec<u8>) -> Self {
        if codes.len().is_multiple_of(2) && codes.iter().all(|&q| q < 16) {
            Self {
                bytes: codes.chunks_exact(2).map(|p| p[0] | (p[1] << 4)).collect(),
                len: codes.len(),
                packed: true,
            }
        } else {
            Self {
                len: codes.len(),
                bytes: codes,
                packed: false,
            }
        }
    }

    /// How many codes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether they are held four bits each.
    pub fn packed(&self) -> bool {
        self.packed
    }

    /// The bytes they take in memory.
    pub fn held_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Code `k` (a [`code_index`]).
    pub fn get(&self, k: usize) -> u8 {
        if self.packed {
            (self.bytes[k / 2] >> (4 * (k & 1))) & 15
        } else {
            self.bytes[k]
        }
    }

    /// Codes `k .. k + n`, a byte each: borrowed when held so, else unpacked into `buf`.
    ///
    /// # Panics
    ///
    /// If `k` is odd (a [`code_index`] of an even input is even), `buf` is shorter than `n`, or
    /// the run ends past the codes.
    pub fn run<'a>(&'a self, k: usize, n: usize, buf: &'a mut [u8]) -> &'a [u8] {
        assert!(
            k.is_multiple_of(2),
            "a run of codes starts at an even index"
        );
        if !self.packed {
            return &self.bytes[k..k + n];
        }
        let out = &mut buf[..n];
        for (pair, &b) in out
            .chunks_mut(2)
            .zip(&self.bytes[k / 2..(k + n).div_ceil(2)])
        {
            pair[0] = b & 15;
            if let Some(hi) = pair.get_mut(1) {
                *hi = b >> 4;
            }
        }
        out
    }

    /// All of them, a byte each.
    pub fn unpacked(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.packed {
            let mut all = vec![0u8; self.len];
            self.run(0, self.len, &mut all);
            std::borrow::Cow::Owned(all)
        } else {
            std::borrow::Cow::Borrowed(&self.bytes)
        }
    }

    /// The packed bytes (`None` when held a byte a code).
    fn packed_bytes(&self) -> Option<&[u8]> {
        self.packed.then_some(self.bytes.as_slice())
    }
}

impl From<Vec<u8>> for Codes {
    fn from(codes: Vec<u8>) -> Self {
        Self::new(codes)
    }
}

impl FromIterator<u8> for Codes {
    fn from_iter<I: IntoIterator<Item = u8>>(codes: I) -> Self {
        Self::new(codes.into_iter().collect())
    }
}

impl Serialize for Codes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.unpacked())
    }
}

impl<'de> Deserialize<'de> for Codes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::new(serde_bytes::ByteBuf::deserialize(d)?.into_vec()))
    }
}

/// An integer weight's per-block integers (its scales `D` or its minimums `M`), in
/// [`block_index`] order: 32 bits each when every one fits a signed 32-bit integer (this model's
/// all do), else 64 (two's complement). A one-row product reads them beside the codes, a pair a
/// block and column, so their width is part of its time. On the wire and in digests 64 bits
/// each either way.
#[derive(Debug, Clone)]
pub enum BlockInts {
    /// Each fits an `i32`: held sign-extended from 32 bits.
    Narrow(Vec<i32>),
    /// Held as they are.
    Wide(Vec<u64>),
}

impl BlockInts {
    /// Holds `values`, narrow when every one fits an `i32`.
    pub fn new(values: Vec<u64>) -> Self {
        // Checked first, so the narrow vector is allocated once at its length.
        if values.iter().all(|&v| i32::try_from(v as i64).is_ok()) {
            BlockInts::Narrow(values.iter().map(|&v| v as i64 as i32).collect())
        } else {
            BlockInts::Wide(values)
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        match self {
            BlockInts::Narrow(v) => v.len(),
            BlockInts::Wide(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes they take in memory.
    pub fn held_bytes(&self) -> usize {
        match self {
            BlockInts::Narrow(v) => 4 * v.len(),
            BlockInts::Wide(v) => 8 * v.len(),
        }
    }

    /// Value `k` (a [`block_index`]), modulo `2^64`.
    pub fn get(&self, k: usize) -> u64 {
        match self {
            BlockInts::Narrow(v) => i64::from(v[k]) as u64,
            BlockInts::Wide(v) => v[k],
        }
    }

    /// Values `k .. k + n`: borrowed when held wide, else widened into `buf`.
    ///
    /// # Panics
    ///
    /// If `buf` is shorter than `n` or the run ends past the values.
    pub fn run<'a>(&'a self, k: usize, n: usize, buf: &'a mut [u64]) -> &'a [u64] {
        match self {
            BlockInts::Wide(v) => &v[k..k + n],
            BlockInts::Narrow(v) => {
                let out = &mut buf[..n];
                for (o, &x) in out.iter_mut().zip(&v[k..k + n]) {
                    *o = i64::from(x) as u64;
                }
                out
            }
        }
    }

    /// Every value, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        (0..self.len()).map(|k| self.get(k))
    }
}

/// Equal when the values are, however each side holds them.
impl PartialEq for BlockInts {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for BlockInts {}

impl From<Vec<u64>> for BlockInts {
    fn from(values: Vec<u64>) -> Self {
        Self::new(values)
    }
}

impl FromIterator<u64> for BlockInts {
    fn from_iter<I: IntoIterator<Item = u64>>(values: I) -> Self {
        Self::new(values.into_iter().collect())
    }
}

impl Serialize for BlockInts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for BlockInts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::new(Vec::<u64>::deserialize(d)?))
    }
}

/// Where code `q[i][j]` sits in [`IntWeight::codes`]: by tiles of [`TILE`] columns, each tile's
/// codes contiguous (one stream from memory per tile, which the product sweeps input by input),
/// and in a tile inputs in pairs, `[d_out / TILE][d_in / 2][TILE][2]` (a ragged last tile as
/// wide as it is), so one 16-bit-pair lane of a vector holds a column's codes for two
/// consecutive inputs (the operand of a pair dot, `vpmaddwd` / `vpdpwssd`).
pub fn code_index(d_in: usize, d_out: usize, i: usize, j: usize) -> usize {
    let (t, jj, width) = tile_of(d_out, j);
    t * TILE * d_in + ((i / 2) * width + jj) * 2 + (i & 1)
}

/// Where the scale and minimum of block `b` (inputs `32 b ..`) and column `j` sit in
/// [`IntWeight::scales`] and [`IntWeight::mins`]: by tiles of [`TILE`] columns as the codes are,
/// `[d_out / TILE][d_in / 32][TILE]`, so a tile's product reads each of them as one stream.
pub fn block_index(d_in: usize, d_out: usize, b: usize, j: usize) -> usize {
    let (t, jj, width) = tile_of(d_out, j);
    t * TILE * (d_in / INT_BLOCK) + b * width + jj
}

/// Column `j`'s tile, its place in the tile, and the tile's width (a ragged last tile is as wide
/// as the columns left).
fn tile_of(d_out: usize, j: usize) -> (usize, usize, usize) {
    let t = j / TILE;
    (t, j % TILE, TILE.min(d_out - t * TILE))
}

/// The tiles of `d_out` columns, in order: each one's first column and width.
fn tiles(d_out: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..d_out)
        .step_by(TILE)
        .map(move |j0| (j0, TILE.min(d_out - j0)))
}

/// Columns per tile of the product: one tile's accumulators stay in vector registers.
const TILE: usize = 64;

/// Inputs per block taken in pairs.
const PAIRS: usize = INT_BLOCK / 2;

/// The bias that makes the 16-bit digits of a 64-bit value signed (see [`digits`]).
const DIGIT_BIAS: u64 = 0x8000_8000_8000_8000;

/// `x` as four signed 16-bit digits: `x = Σ_l d_l · 2^(16 l) (mod 2^64)` with
/// `d_l ∈ [-2^15, 2^15)`. The 16-bit fields of `x + B` (`B` = 2^15 in every field) less 2^15
/// each, and that subtraction on a 16-bit field is a flip of its top bit.
fn digits(x: u64) -> [i16; 4] {
    let y = x.wrapping_add(DIGIT_BIAS) ^ DIGIT_BIAS;
    [
        y as i16,
        (y >> 16) as i16,
        (y >> 32) as i16,
        (y >> 48) as i16,
    ]
}

/// `x (rows × d_in) · W_int` modulo `2^64`, row-major, on every core.
///
/// Per block, `Σ_i x_i (D q_i + M) = D · T + M · Σ_i x_i` with `T = Σ_i x_i q_i`: the block sums
/// of `x` are shared by every column. `T` is taken on the signed 16-bit digits of `x`:
/// `T = Σ_l 2^(16 l) S_l` with `S_l = Σ_i d_l(x_i) q_i`, and `|S_l| < 32 · 2^15 · 2^8 = 2^28`, so
/// every `S_l` is exact in a 32-bit lane. A vector pair dot (`vpdpwssd`, or `vpmaddwd` and an
/// add) takes 32 of those 16 × 16-bit products per instruction, against 8 (AVX-512) or 4 (AVX2)
/// 32 × 32-bit multiplies for the same work on the 32-bit halves of `x`.
pub fn int_matmul(x: &[u64], rows: usize, w: &IntWeight) -> Vec<u64> {
    product(IntKernel::for_rows(rows), x, rows, w)
}

/// [`int_matmul`] on a named kernel (the benchmark compares them side by side).
///
/// # Panics
///
/// If this CPU cannot run `kernel`.
pub fn int_matmul_with(kernel: IntKernel, x: &[u64], rows: usize, w: &IntWeight) -> Vec<u64> {
    assert!(
        IntKernel::available().contains(&kernel),
        "this CPU cannot run the {} kernel",
        kernel.name()
    );
    product(kernel, x, rows, w)
}

/// The product on a kernel the CPU can run.
fn product(kernel: IntKernel, x: &[u64], rows: usize, w: &IntWeight) -> Vec<u64> {
    let (d_in, d_out) = (w.d_in, w.d_out);
    assert_eq!(x.len(), rows * d_in, "lhs shape");
    let nb = d_in / INT_BLOCK;
    // AMX's epilogue is the narrow one: scales and minimums held wide go to the vectors.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let kernel = match (kernel, &w.scales, &w.mins) {
        (IntKernel::Amx, BlockInts::Narrow(_), BlockInts::Narrow(_)) => IntKernel::Amx,
        (IntKernel::Amx, _, _) => IntKernel::Vnni,
        (k, _, _) => k,
    };
    let sums: Vec<u64> = x
        .chunks_exact(INT_BLOCK)
        .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
        .collect();
    // Per row, input pair and digit: the pair's two digits, one 32-bit lane to broadcast (the
    // vector kernels' operand); AMX's is the rows' byte digits instead.
    let mut pairs = Vec::new();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let planes = match kernel {
        // SAFETY: `IntKernel::Amx` is available only with AVX-512 F, BW and VBMI.
        IntKernel::Amx => Some(unsafe { amx_tile::row_planes(x, rows, d_in) }),
        _ => None,
    };
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let planes: Option<crate::amx::Lines> = None;
    if planes.is_none() {
        pairs = vec![0i32; x.len() * 2];
        for (p, out) in x.chunks_exact(2).zip(pairs.chunks_exact_mut(4)) {
            let (a, b) = (digits(p[0]), digits(p[1]));
            for l in 0..4 {
                out[l] = (u32::from(a[l] as u16) | (u32::from(b[l] as u16) << 16)) as i32;
            }
        }
    }
    let operands = Operands {
        x,
        rows,
        w,
        sums: &sums,
        pairs: &pairs,
        planes: planes.as_ref().map_or(&[], |p| p.bytes()),
        nb,
    };
    // Each tile accumulates into a buffer of its own, contiguous, and copies each range of rows
    // into `y` while it is hot: accumulated in place in `y`, a tile's rows lie `d_out` values
    // apart, and at 130 rows the product took 1.5× as long; copied after every tile was done,
    // from cold memory and on one thread, the copy took 10-20 % of a 16- or 130-row product.
    let len = rows
        .checked_mul(d_out)
        .expect("the product's size fits memory");
    let mut y: Vec<u64> = Vec::with_capacity(len);
    let dst = Columns(y.as_mut_ptr());
    tiles(d_out)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each(|(j0, width)| {
            let mut buf = vec![0u64; ROW_CHUNK.min(rows) * width];
            // A tile's rows [`ROW_CHUNK`] at a time, each range's sums in the first-level cache.
            for r0 in (0..rows).step_by(ROW_CHUNK) {
                let r1 = rows.min(r0 + ROW_CHUNK);
                let out = &mut buf[..(r1 - r0) * width];
                out.fill(0);
                // SAFETY: `kernel` is `best()` or was checked against `available()`.
                unsafe { tile(kernel, &operands.rows(r0, r1), j0, width, out) };
                for (r, src) in out.chunks_exact(width).enumerate() {
                    // SAFETY: row `r0 + r`'s columns `j0 .. j0 + width` of `y`, within its
                    // capacity; no other tile writes them.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            dst.at((r0 + r) * d_out + j0),
                            width,
                        )
                    };
                }
            }
        });
    // SAFETY: the tiles cover every column of every row once, so all `rows × d_out` values of
    // the capacity are written (plain integers: nothing to drop).
    unsafe { y.set_len(len) };
    y
}

/// The product's output shared by its tiles, each writing only its own columns.
struct Columns(*mut u64);

// SAFETY: the tiles write disjoint values through it, and the product waits for every tile
// before it reads the output.
unsafe impl Sync for Columns {}

impl Columns {
    /// Where value `k` goes.
    fn at(&self, k: usize) -> *mut u64 {
        self.0.wrapping_add(k)
    }
}

/// `W_int · v` modulo `2^64` for each of `vs` (every one `d_out` long): the `d_in`-long vectors
/// `u` of Freivalds' check, `x̃ · u = (x̃ · W_int) · v`. Per block,
/// `u_i = Σ_j q_ij (D_bj v_j) + Σ_j M_bj v_j`; blocks in parallel, each code row read once for
/// all vectors.
pub fn int_weight_times(w: &IntWeight, vs: &[Vec<u64>]) -> Vec<Vec<u64>> {
    let (d_in, d_out) = (w.d_in, w.d_out);
    assert!(vs.iter().all(|v| v.len() == d_out), "vector length");
    let k = vs.len();
    let blocks: Vec<Vec<u64>> = (0..d_in / INT_BLOCK)
        .into_par_iter()
        .map(|b| {
            // The block's scales and minimums in column order (they lie in one run per tile).
            let (mut scales, mut mins) = (Vec::with_capacity(d_out), Vec::with_capacity(d_out));
            for (j0, width) in tiles(d_out) {
                let k = block_index(d_in, d_out, b, j0);
                scales.extend((k..k + width).map(|k| w.scales.get(k)));
                mins.extend((k..k + width).map(|k| w.mins.get(k)));
            }
            // `D_bj v_j` per vector, each twice (for the pair row's two codes of column `j`), and
            // the block's constant `Σ_j M_bj v_j`.
            let scaled: Vec<Vec<u64>> = vs
                .iter()
                .map(|v| {
                    scales
                        .iter()
                        .zip(v)
                        .flat_map(|(&s, &x)| [s.wrapping_mul(x); 2])
                        .collect()
                })
                .collect();
            let offsets: Vec<u64> = vs
                .iter()
                .map(|v| {
                    mins.iter()
                        .zip(v)
                        .fold(0u64, |a, (&m, &x)| a.wrapping_add(m.wrapping_mul(x)))
                })
                .collect();
            // `[i][t]` for the block's 32 inputs, two inputs (one pair row of codes) at a time.
            let mut out = vec![0u64; INT_BLOCK * k];
            let mut buf = [0u8; 2 * TILE];
            for p in 0..PAIRS {
                let i = b * INT_BLOCK + 2 * p;
                for t in 0..k {
                    let (mut even, mut odd) = (offsets[t], offsets[t]);
                    // The pair row's codes lie in one run per tile of columns.
                    for (j0, width) in tiles(d_out) {
                        let codes =
                            w.codes
                                .run(code_index(d_in, d_out, i, j0), 2 * width, &mut buf);
                        let (e, o) = pair_dot(codes, &scaled[t][2 * j0..2 * (j0 + width)]);
                        (even, odd) = (even.wrapping_add(e), odd.wrapping_add(o));
                    }
                    out[2 * p * k + t] = even;
                    out[(2 * p + 1) * k + t] = odd;
                }
            }
            out
        })
        .collect();
    (0..k)
        .map(|t| {
            blocks
                .iter()
                .flat_map(|blk| (0..INT_BLOCK).map(move |i| blk[i * k + t]))
                .collect()
        })
        .collect()
}

/// `(Σ_j q[2j] s_j, Σ_j q[2j+1] s_j)` modulo `2^64` for a pair row of codes `q` and `s2`, the
/// `s_j` each twice: 16 lane sums, so the compiler vectorizes it.
fn pair_dot(codes: &[u8], s2: &[u64]) -> (u64, u64) {
    const C: usize = 16;
    let mut lanes = [0u64; C];
    let whole = codes.len() / C * C;
    for (q, s) in codes[..whole].chunks_exact(C).zip(s2.chunks_exact(C)) {
        for u in 0..C {
            lanes[u] = lanes[u].wrapping_add(u64::from(q[u]).wrapping_mul(s[u]));
        }
    }
    for (u, (&q, &s)) in codes[whole..].iter().zip(&s2[whole..]).enumerate() {
        lanes[u] = lanes[u].wrapping_add(u64::from(q).wrapping_mul(s));
    }
    lanes.chunks_exact(2).fold((0, 0), |(e, o), l| {
        (e.wrapping_add(l[0]), o.wrapping_add(l[1]))
    })
}

/// The operands every tile of one product shares.
struct Operands<'a> {
    x: &'a [u64],
    rows: usize,
    w: &'a IntWeight,
    /// Per row and block, `Σ_i x_i` of the block.
    sums: &'a [u64],
    /// Per row, input pair and digit `l`: `d_l(x_2p) | d_l(x_2p+1) << 16`, `[rows][d_in/2][4]`
    /// (empty for AMX).
    pairs: &'a [i32],
    /// AMX's operand instead: per pair of rows and block, the rows' byte digits (empty for the
    /// vector kernels).
    planes: &'a [u8],
    nb: usize,
}

impl<'a> Operands<'a> {
    /// The same product restricted to rows `r0..r1`.
    fn rows(&self, r0: usize, r1: usize) -> Operands<'a> {
        let d_in = self.w.d_in;
        Operands {
            x: &self.x[r0 * d_in..r1 * d_in],
            rows: r1 - r0,
            w: self.w,
            sums: &self.sums[r0 * self.nb..r1 * self.nb],
            pairs: self.pairs.get(r0 * d_in * 2..r1 * d_in * 2).unwrap_or(&[]),
            // `r0` is a multiple of 4 (ranges are ROW_CHUNK rows, asserted): whole quads.
            planes: self
                .planes
                .get(r0 / 2 * self.nb * PAIR_BLOCK..)
                .unwrap_or(&[]),
            nb: self.nb,
        }
    }
}

/// Bytes of a pair of rows' byte digits of one block: AMX's left operand, a tile of 16 rows of
/// 32 bytes.
const PAIR_BLOCK: usize = 16 * INT_BLOCK;

/// Rows a tile runs at once. A tile adds each block's products to every row's 64 sums; with all
/// of a 130-row prefill's rows at once those sums (66 KB) left the first-level cache between
/// blocks. 32 rows' (16 KB) stay, and the range widens its tile's codes again, which costs
/// little beside 32 rows' products. `bench-gemm`'s 130-row pass and the one-op
/// microbenchmarks in docs/performance.md measured it; at 16 rows nothing changes.
const ROW_CHUNK: usize = 32;

// The AMX kernel takes rows four at a time, and a range's digits from pair `r0 / 2` on.
const _: () = assert!(ROW_CHUNK.is_multiple_of(4));

/// The kernels of [`int_matmul`]'s full tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntKernel {
    /// 64-bit multiplies, one column at a time.
    Portable,
    /// `vpmaddwd` and an add on 256-bit vectors.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `vpdpwssd` on 512-bit vectors.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// AMX's 8-bit tile product for the digit sums, the VNNI kernel's epilogue on 512-bit
    /// vectors (`amx_tile`); only where the scales and minimums are held 32 bits each (else the
    /// VNNI kernel runs).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Amx,
}

/// Rows from which [`int_matmul`] takes the AMX kernel where it has it: a tile product sums two
/// rows' eight digits whatever the rows, and below four rows the vector kernel is as fast or
/// faster (`talaria bench-gemm --rows 2,3,4,6,8` on a Xeon with AMX: 2 rows 13.5 ms against 11.5,
/// 3 rows 11.8 against 12.5, 4 rows 13.2 against 15.3 a pass).
pub const AMX_MIN_ROWS: usize = 4;

impl IntKernel {
    /// Every kernel this CPU can run, the widest last.
    pub fn available() -> Vec<IntKernel> {
        let mut all = vec![IntKernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                all.push(IntKernel::Avx2);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vnni") {
                all.push(IntKernel::Vnni);
                #[cfg(target_os = "linux")]
                if crate::amx::available() {
                    all.push(IntKernel::Amx);
                }
            }
        }
        all
    }

    /// The kernel [`int_matmul`] runs for `rows` rows: AMX from [`AMX_MIN_ROWS`] where it is
    /// available, else the widest vector kernel.
    pub fn for_rows(rows: usize) -> IntKernel {
        let best = IntKernel::best();
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if best == IntKernel::Amx && rows < AMX_MIN_ROWS {
            return IntKernel::Vnni;
        }
        let _ = rows;
        best
    }

    /// The widest this CPU has: the one [`int_matmul`] runs.
    pub fn best() -> IntKernel {
        static BEST: std::sync::OnceLock<IntKernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *IntKernel::available().last().expect("portable"))
    }

    /// `amx` (`tdpbusd`), `avx512-vnni` (`vpdpwssd`), `avx2` (`vpmaddwd`) or `portable` (64-bit
    /// multiplies).
    pub fn name(self) -> &'static str {
        match self {
            IntKernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            IntKernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            IntKernel::Vnni => "avx512-vnni",
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            IntKernel::Amx => "amx",
        }
    }

    /// The machine's peak for this kernel's inner step, measured: 16 × 16-bit multiply-adds per
    /// second on the calling thread, from independent chains of pair dots that nothing but the
    /// vector unit bounds (`None` for the portable kernel). A 64-bit product by a code is four
    /// of them, one per digit.
    pub fn pair_dot_peak(self) -> Option<f64> {
        const ITERS: usize = 4_000_000;
        if !IntKernel::available().contains(&self) {
            return None;
        }
        let t0 = std::time::Instant::now();
        let macs = match self {
            IntKernel::Portable => return None,
            // SAFETY: `available` listed it (checked above): the CPU has its features.
            #[cfg(target_arch = "x86_64")]
            IntKernel::Avx2 => unsafe { peak_avx2(ITERS) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            IntKernel::Vnni => unsafe { peak_vnni(ITERS) },
            // Its inner step is the tile product ([`amx_int8_peak`]).
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            IntKernel::Amx => return None,
        };
        Some(macs as f64 / t0.elapsed().as_secs_f64())
    }
}

/// Whether this CPU has AMX-TILE and AMX-INT8 (CPUID) and Linux granted this process their
/// tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: it hands it out only to a
/// process that asks).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn amx_granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(ask_for_amx)
}

/// CPUID, then the grant (one system call; the permission holds for the whole process).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn ask_for_amx() -> bool {
    use std::arch::asm;
    use std::arch::x86_64::__cpuid_count;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    if __cpuid_count(7, 0).edx & (3 << 24) != 3 << 24 {
        return false;
    }
    let granted: i64;
    // SAFETY: the arch_prctl system call (158) with a request that only asks for a permission;
    // it clobbers rcx and r11 as every system call does.
    unsafe {
        asm!("syscall", inlateout("rax") 158i64 => granted, in("rdi") ARCH_REQ_XCOMP_PERM,
             in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _,
             options(nostack));
    }
    granted == 0
}

/// No AMX off x86-64 Linux.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub fn amx_granted() -> bool {
    false
}

/// The machine's peak for AMX's int8 tile product (`tdpbusd`), measured on the calling thread:
/// unsigned-by-signed 8-bit multiply-adds per second, from four independent 16 × 16 × 64 tile
/// products; `None` without AMX ([`amx_granted`]) or, never expected, when the sums come out
/// wrong.
/// [`crate::amx`]'s product runs on it: a 64-bit product by a weight is one multiply-add per
/// pair of byte digits whose places sum below 2^64.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn amx_int8_peak() -> Option<f64> {
    use std::arch::asm;
    const ROUNDS: u64 = 1_000_000;
    if !amx_granted() {
        return None;
    }
    // Palette 1; eight tiles of 16 rows of 64 bytes (`amx::configure_tiles`).
    let (ones, twos) = ([1u8; 1024], [2u8; 1024]);
    let mut out = [0i32; 256];
    let t0 = std::time::Instant::now();
    // SAFETY: the CPU has AMX-TILE and AMX-INT8 and the kernel granted the tile state
    // (`amx_granted`); every tile load and store reads or writes 16 rows of 64 bytes
    // of a 1024-byte buffer, and the tiles are released when `_tiles` is dropped.
    let _tiles = unsafe { crate::amx::configure_tiles() };
    unsafe {
        crate::amx::zero_sum_tiles();
        asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) ones.as_ptr(), s = in(reg) 64usize,
             options(nostack));
        asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) twos.as_ptr(), s = in(reg) 64usize,
             options(nostack));
        asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) twos.as_ptr(), s = in(reg) 64usize,
             options(nostack));
        for _ in 0..ROUNDS {
            asm!(
                "tdpbusd tmm0, tmm4, tmm5",
                "tdpbusd tmm1, tmm4, tmm6",
                "tdpbusd tmm2, tmm4, tmm5",
                "tdpbusd tmm3, tmm4, tmm6",
                options(nostack)
            );
        }
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) out.as_mut_ptr(), s = in(reg) 64usize,
             options(nostack));
    }
    let seconds = t0.elapsed().as_secs_f64();
    // Each product adds 64 × (1 · 2) to every element: a wrong sum is no measurement.
    let expected = i32::try_from(ROUNDS * 128).ok()?;
    if out.iter().any(|&v| v != expected) {
        return None;
    }
    Some(ROUNDS as f64 * 4.0 * 16.0 * 16.0 * 64.0 / seconds)
}

/// No AMX off x86-64 Linux.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub fn amx_int8_peak() -> Option<f64> {
    None
}

/// Independent accumulator chains for the peak: enough to cover the pair dot's latency on every
/// port that runs it.
#[cfg(target_arch = "x86_64")]
const PEAK_CHAINS: usize = 16;

/// Runs `iters` rounds of [`PEAK_CHAINS`] `vpdpwssd`; returns the multiply-adds done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn peak_vnni(iters: usize) -> usize {
    use std::arch::x86_64::*;
    let a = std::hint::black_box(_mm512_set1_epi32(0x0001_0001));
    let b = std::hint::black_box(_mm512_set1_epi32(0x0003_0002));
    let mut acc: [__m512i; PEAK_CHAINS] =
        std::array::from_fn(|v| std::hint::black_box(_mm512_set1_epi32(v as i32)));
    for _ in 0..iters {
        for v in &mut acc {
            *v = _mm512_dpwssd_epi32(*v, a, b);
        }
    }
    std::hint::black_box(acc);
    iters * PEAK_CHAINS * 32
}

/// Runs `iters` rounds of 12 chained `vpmaddwd` (each on the last one's result, so none can be
/// hoisted out of the loop; 12 registers of the 16); returns the multiply-adds done. The add
/// that the kernel pairs with each runs on another port.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn peak_avx2(iters: usize) -> usize {
    use std::arch::x86_64::*;
    const CHAINS: usize = 12;
    let b = std::hint::black_box(_mm256_set1_epi32(0x0003_0002));
    let mut acc: [__m256i; CHAINS] =
        std::array::from_fn(|v| std::hint::black_box(_mm256_set1_epi32(v as i32)));
    for _ in 0..iters {
        for v in &mut acc {
            *v = _mm256_madd_epi16(*v, b);
        }
    }
    std::hint::black_box(acc);
    iters * CHAINS * 16
}

/// One tile of columns; a ragged last tile runs the portable kernel.
///
/// # Safety
///
/// The CPU runs `kernel` (`IntKernel::available` lists it).
unsafe fn tile(kernel: IntKernel, a: &Operands, j0: usize, width: usize, out: &mut [u64]) {
    match kernel {
        // SAFETY: the caller's promise: the CPU has the features it is compiled for.
        #[cfg(target_arch = "x86_64")]
        IntKernel::Vnni if width == TILE => unsafe { tile_vnni(a, j0, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        IntKernel::Avx2 if width == TILE => unsafe { tile_avx2(a, j0, out) },
        // SAFETY: as above; `product` runs AMX only on scales and minimums held narrow.
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        IntKernel::Amx if width == TILE => match (&a.w.scales, &a.w.mins) {
            (BlockInts::Narrow(d), BlockInts::Narrow(m)) => unsafe {
                if a.w.codes.packed() {
                    amx_tile::tile_amx::<false>(a, a.planes, j0, out, d, m)
                } else {
                    amx_tile::tile_amx::<true>(a, a.planes, j0, out, d, m)
                }
            },
            _ => unreachable!("AMX on scales held wide"),
        },
        _ => tile_portable(a, j0, width, out),
    }
}

/// The product on 64-bit values: a full tile by code pair rows (which the compiler vectorizes),
/// a ragged one by its definition, one column at a time.
fn tile_portable(a: &Operands, j0: usize, width: usize, out: &mut [u64]) {
    if width == TILE {
        return tile_pairs(a, j0, out);
    }
    let w = a.w;
    for r in 0..a.rows {
        for (jj, o) in out[r * width..(r + 1) * width].iter_mut().enumerate() {
            let j = j0 + jj;
            let mut acc = 0u64;
            for b in 0..a.nb {
                let mut t = 0u64;
                for i in b * INT_BLOCK..(b + 1) * INT_BLOCK {
                    let q = u64::from(w.codes.get(code_index(w.d_in, w.d_out, i, j)));
                    t = t.wrapping_add(a.x[r * w.d_in + i].wrapping_mul(q));
                }
                let k = block_index(w.d_in, w.d_out, b, j);
                acc = acc
                    .wrapping_add(w.scales.get(k).wrapping_mul(t))
                    .wrapping_add(w.mins.get(k).wrapping_mul(a.sums[r * a.nb + b]));
            }
            *o = acc;
        }
    }
}

/// A full tile on 64-bit values: per block and row, every pair row of codes adds
/// `x_2p · q_2p,j + x_2p+1 · q_2p+1,j` to 64 column sums.
fn tile_pairs(a: &Operands, j0: usize, out: &mut [u64]) {
    let w = a.w;
    let (d_in, d_out) = (w.d_in, w.d_out);
    let mut buf = [0u8; 2 * TILE];
    let (mut d_buf, mut m_buf) = ([0u64; TILE], [0u64; TILE]);
    for b in 0..a.nb {
        let k0 = block_index(d_in, d_out, b, j0);
        let d = w.scales.run(k0, TILE, &mut d_buf);
        let m = w.mins.run(k0, TILE, &mut m_buf);
        for r in 0..a.rows {
            let xs = &a.x[r * d_in + b * INT_BLOCK..][..INT_BLOCK];
            let mut t = [0u64; TILE];
            for p in 0..PAIRS {
                let k = code_index(d_in, d_out, b * INT_BLOCK + 2 * p, j0);
                let codes = w.codes.run(k, 2 * TILE, &mut buf);
                let (x0, x1) = (xs[2 * p], xs[2 * p + 1]);
                for (t, q) in t.iter_mut().zip(codes.chunks_exact(2)) {
                    *t = t
                        .wrapping_add(x0.wrapping_mul(u64::from(q[0])))
                        .wrapping_add(x1.wrapping_mul(u64::from(q[1])));
                }
            }
            let s = a.sums[r * a.nb + b];
            let o = &mut out[r * TILE..(r + 1) * TILE];
            for (j, o) in o.iter_mut().enumerate() {
                *o = o
                    .wrapping_add(d[j].wrapping_mul(t[j]))
                    .wrapping_add(m[j].wrapping_mul(s));
            }
        }
    }
}

/// Adds `D·T + M·s` of one row and block to the row's 64 column sums `o`, from the four digit
/// sums `acc` (`s` is the row's sum over the block's inputs; `D` and `M` its TILE scales and
/// minimums, as [`Lanes8`]). A macro, so that every instance of [`tile_vnni_on`] has it inline
/// (a call passes the sixteen sums through memory); it runs where AVX-512F and DQ are enabled.
#[cfg(target_arch = "x86_64")]
macro_rules! vnni_finish {
    ($acc:expr, $scales:expr, $mins:expr, $s:expr, $o:expr) => {{
        let (acc, scales, mins, o): (&[[__m512i; VNNI_V]; 4], _, _, &mut [u64]) =
            ($acc, $scales, $mins, $o);
        assert!(scales.len() >= TILE && mins.len() >= TILE && o.len() >= TILE);
        let s = _mm512_set1_epi64($s as i64);
        // `v` picks the same column group in each of the four digits' sums.
        for v in 0..VNNI_V {
            let u = _mm512_add_epi32(acc[2][v], _mm512_slli_epi32::<16>(acc[3][v]));
            let halves = [
                (
                    _mm512_castsi512_si256(acc[0][v]),
                    _mm512_castsi512_si256(acc[1][v]),
                    _mm512_castsi512_si256(u),
                ),
                (
                    _mm512_extracti64x4_epi64::<1>(acc[0][v]),
                    _mm512_extracti64x4_epi64::<1>(acc[1][v]),
                    _mm512_extracti64x4_epi64::<1>(u),
                ),
            ];
            for (h, (s0, s1, u)) in halves.into_iter().enumerate() {
                let t = _mm512_add_epi64(
                    _mm512_add_epi64(
                        _mm512_cvtepi32_epi64(s0),
                        _mm512_slli_epi64::<16>(_mm512_cvtepi32_epi64(s1)),
                    ),
                    _mm512_slli_epi64::<32>(_mm512_cvtepu32_epi64(u)),
                );
                let at = 16 * v + 8 * h;
                // SAFETY: each slice holds TILE values (asserted); these access 8 at `at` <
                // TILE, and the caller runs with AVX-512F.
                unsafe {
                    let d = Lanes8::load8(scales.as_ptr().add(at));
                    let m = Lanes8::load8(mins.as_ptr().add(at));
                    let prev = _mm512_loadu_si512(o.as_ptr().add(at).cast());
                    let sum = _mm512_add_epi64(
                        prev,
                        _mm512_add_epi64(_mm512_mullo_epi64(d, t), _mm512_mullo_epi64(m, s)),
                    );
                    _mm512_storeu_si512(o.as_mut_ptr().add(at).cast(), sum);
                }
            }
        }
    }};
}

/// A block's scales and minimums as the epilogues take them: as held where both are 32 bits
/// each (the epilogues with no 64-bit multiply), else in 64-bit lanes.
#[cfg(target_arch = "x86_64")]
enum BlockPair<'a> {
    Narrow(&'a [i32], &'a [i32]),
    Wide(&'a [u64], &'a [u64]),
}

#[cfg(target_arch = "x86_64")]
impl<'a> BlockPair<'a> {
    /// The TILE scales and minimums of `w` from block index `k0` on; held wide, copied into
    /// the buffers.
    fn of(
        w: &'a IntWeight,
        k0: usize,
        d_buf: &'a mut [u64; TILE],
        m_buf: &'a mut [u64; TILE],
    ) -> Self {
        match (&w.scales, &w.mins) {
            (BlockInts::Narrow(d), BlockInts::Narrow(m)) => {
                BlockPair::Narrow(&d[k0..][..TILE], &m[k0..][..TILE])
            }
            _ => BlockPair::Wide(w.scales.run(k0, TILE, d_buf), w.mins.run(k0, TILE, m_buf)),
        }
    }
}

/// A row's block sum `s` as `s_lo + 2^32 s_hi (mod 2^64)`, `s_lo` its low half as a signed
/// value: the split the narrow epilogues multiply by.
#[cfg(target_arch = "x86_64")]
fn split_sum(s: u64) -> (i64, i32) {
    let s_lo = i64::from(s as u32 as i32);
    (s_lo, (s.wrapping_sub(s_lo as u64) >> 32) as u32 as i32)
}

/// [`vnni_finish!`] where the scales and minimums are held 32 bits each (`&[i32]`): no 64-bit
/// multiply. With `T = S_0 + 2^16 S_1 + 2^32 u` (`u = S_2 + 2^16 S_3 mod 2^32`) and the row's
/// block sum `s = s_lo + 2^32 s_hi` (`s_lo` its low half as a signed value), modulo `2^64`
/// `D·T + M·s = D·S_0 + 2^16·D·S_1 + M·s_lo + 2^32·(D·u + M·s_hi mod 2^32)`: the first three
/// are signed 32 × 32-bit products (`vpmuldq`, on the even 32-bit lanes and then on the odd ones
/// shifted down), the last a 32-bit one on all sixteen (`vpmulld`). The even and odd columns are
/// interleaved back before the sums are added.
#[cfg(target_arch = "x86_64")]
macro_rules! vnni_finish_narrow {
    ($acc:expr, $scales:expr, $mins:expr, $s:expr, $o:expr) => {{
        let (acc, scales, mins, o): (&[[__m512i; VNNI_V]; 4], &[i32], &[i32], &mut [u64]) =
            ($acc, $scales, $mins, $o);
        assert!(scales.len() >= TILE && mins.len() >= TILE && o.len() >= TILE);
        let (s_lo, s_hi) = split_sum($s);
        let (s_lo, s_hi) = (_mm512_set1_epi64(s_lo), _mm512_set1_epi32(s_hi));
        let high = _mm512_set1_epi64(!0xffff_ffff_u64 as i64);
        // Output lanes of the even products and the odd ones: columns 0..8 and 8..16.
        let firsts = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
        let seconds = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
        for v in 0..VNNI_V {
            let at = 16 * v;
            // SAFETY: each slice holds TILE values (asserted); these access 16 at `at` < TILE,
            // and the caller runs with AVX-512F.
            let (d, m) = unsafe {
                (
                    _mm512_loadu_si512(scales.as_ptr().add(at).cast()),
                    _mm512_loadu_si512(mins.as_ptr().add(at).cast()),
                )
            };
            let u = _mm512_add_epi32(acc[2][v], _mm512_slli_epi32::<16>(acc[3][v]));
            let hi = _mm512_add_epi32(_mm512_mullo_epi32(d, u), _mm512_mullo_epi32(m, s_hi));
            let low = |d: __m512i, m: __m512i, s0: __m512i, s1: __m512i| {
                _mm512_add_epi64(
                    _mm512_add_epi64(
                        _mm512_mul_epi32(d, s0),
                        _mm512_slli_epi64::<16>(_mm512_mul_epi32(d, s1)),
                    ),
                    _mm512_mul_epi32(m, s_lo),
                )
            };
            let even =
                _mm512_add_epi64(low(d, m, acc[0][v], acc[1][v]), _mm512_slli_epi64::<32>(hi));
            let odd = _mm512_add_epi64(
                low(
                    _mm512_srli_epi64::<32>(d),
                    _mm512_srli_epi64::<32>(m),
                    _mm512_srli_epi64::<32>(acc[0][v]),
                    _mm512_srli_epi64::<32>(acc[1][v]),
                ),
                _mm512_and_si512(hi, high),
            );
            for (h, lanes) in [firsts, seconds].into_iter().enumerate() {
                let t = _mm512_permutex2var_epi64(even, lanes, odd);
                // SAFETY: as above, 8 values at `at + 8 h` < TILE.
                unsafe {
                    let p = o.as_mut_ptr().add(at + 8 * h);
                    let prev = _mm512_loadu_si512(p.cast());
                    _mm512_storeu_si512(p.cast(), _mm512_add_epi64(prev, t));
                }
            }
        }
    }};
}

/// A full tile with AVX-512 VNNI: per block and row, the four digit sums `S_l` of 64 columns
/// (16 registers of 16 lanes) take one `vpdpwssd` per digit, 16 columns and input pair; the
/// codes of a pair row widen from bytes to 16-bit lanes once for all four digits. Then
/// `T = S_0 + S_1·2^16 + (S_2 + S_3·2^16 mod 2^32)·2^32` in 64-bit lanes, and `D·T + M·Σx`
/// ([`vnni_finish!`]; with no 64-bit multiply where the scales and minimums are held 32 bits
/// each, [`vnni_finish_narrow!`]).
/// One row (a decode call) widens each pair row of codes as it uses it, in registers; more
/// rows widen a block's codes once into an array that every row reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
fn tile_vnni(a: &Operands, j0: usize, out: &mut [u64]) {
    use BlockInts::{Narrow, Wide};
    // One instance for each way the scales and minimums are held.
    match (&a.w.scales, &a.w.mins) {
        (Narrow(d), Narrow(m)) => tile_vnni_on(a, j0, out, d, m),
        (Narrow(d), Wide(m)) => tile_vnni_on(a, j0, out, d, m),
        (Wide(d), Narrow(m)) => tile_vnni_on(a, j0, out, d, m),
        (Wide(d), Wide(m)) => tile_vnni_on(a, j0, out, d, m),
    }
}

/// [`tile_vnni`] on the weight's scales `ds` and minimums `ms` as they are held.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
fn tile_vnni_on<D: Lanes8, M: Lanes8>(
    a: &Operands,
    j0: usize,
    out: &mut [u64],
    ds: &[D],
    ms: &[M],
) {
    use std::arch::x86_64::*;
    let w = a.w;
    let (d_in, d_out) = (w.d_in, w.d_out);
    let (mut d64, mut m64) = ([0u64; TILE], [0u64; TILE]);
    // A block's codes widened to 16-bit lanes once for every row (4 KiB, in L1). Made once for
    // the tile and overwritten block by block, in a plain loop: built per block (`from_fn`), the
    // widening ran in a closure the compiler did not inline (4 % of a stage's samples under the
    // 16-session synthetic load, `perf`).
    let mut wide = [[_mm512_setzero_si512(); VNNI_V]; PAIRS];
    for b in 0..a.nb {
        let k0 = block_index(d_in, d_out, b, j0);
        let (d, m) = (&ds[k0..k0 + TILE], &ms[k0..k0 + TILE]);
        // Where pair row `p` of the block starts in the codes (code_index's order).
        let at = |p: usize| code_index(d_in, d_out, b * INT_BLOCK + 2 * p, j0);
        if a.rows == 1 {
            let px = &a.pairs[b * PAIRS * 4..][..PAIRS * 4];
            let mut acc = [[_mm512_setzero_si512(); VNNI_V]; 4];
            for p in 0..PAIRS {
                // SAFETY: the caller's promise (`tile`): the CPU has the features of this
                // function, which include `vnni_widen`'s.
                let c = unsafe { vnni_widen(&w.codes, at(p)) };
                vnni_pair(&mut acc, &c, &px[p * 4..][..4]);
            }
            match (D::narrow(d), M::narrow(m)) {
                (Some(d), Some(m)) => vnni_finish_narrow!(&acc, d, m, a.sums[b], &mut out[..TILE]),
                _ => vnni_finish!(&acc, d, m, a.sums[b], &mut out[..TILE]),
            }
            continue;
        }
        for (p, c) in wide.iter_mut().enumerate() {
            // SAFETY: as above.
            *c = unsafe { vnni_widen(&w.codes, at(p)) };
        }
        // Held wide, the scales and minimums in 64-bit lanes once for every row, too.
        let pair = BlockPair::of(w, k0, &mut d64, &mut m64);
        for r in 0..a.rows {
            let px = &a.pairs[(r * d_in / 2 + b * PAIRS) * 4..][..PAIRS * 4];
            let mut acc = [[_mm512_setzero_si512(); VNNI_V]; 4];
            for (p, c) in wide.iter().enumerate() {
                vnni_pair(&mut acc, c, &px[p * 4..][..4]);
            }
            let o = &mut out[r * TILE..(r + 1) * TILE];
            let s = a.sums[r * a.nb + b];
            match pair {
                BlockPair::Narrow(d, m) => vnni_finish_narrow!(&acc, d, m, s, o),
                BlockPair::Wide(d, m) => vnni_finish!(&acc, d, m, s, o),
            }
        }
    }
}

/// Registers of 16 columns in a tile.
#[cfg(target_arch = "x86_64")]
const VNNI_V: usize = TILE / 16;

/// One pair row of a tile's codes, from code `k` on (two inputs of TILE columns), widened to
/// 16-bit lanes: each 32-bit lane holds one column's two codes, the even input's low.
///
/// # Safety
///
/// The CPU has AVX-512F and AVX-512BW. (A run past the codes panics; `k` must be even, as a
/// [`code_index`] of an even input is, or the codes are the wrong ones.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn vnni_widen(codes: &Codes, k: usize) -> [std::arch::x86_64::__m512i; VNNI_V] {
    use std::arch::x86_64::*;
    match codes.packed_bytes() {
        // Packed, a pair row is one byte a column, its two codes the nibbles: each widens to a
        // 32-bit lane whose low half is the low nibble and whose high half is the high one.
        Some(packed) => {
            let codes = &packed[k / 2..][..TILE];
            std::array::from_fn(|v| {
                // SAFETY: `codes` holds TILE bytes; this reads 16 of them at 16·v < TILE.
                let q = unsafe { _mm_loadu_si128(codes.as_ptr().add(16 * v).cast()) };
                let q = _mm512_cvtepu8_epi32(q);
                let lo = _mm512_and_si512(q, _mm512_set1_epi32(15));
                _mm512_or_si512(lo, _mm512_slli_epi32::<16>(_mm512_srli_epi32::<4>(q)))
            })
        }
        None => {
            let codes = &codes.bytes[k..][..2 * TILE];
            std::array::from_fn(|v| {
                // SAFETY: `codes` holds 2·TILE bytes; this reads 32 of them at 32·v.
                let q = unsafe { _mm256_loadu_si256(codes.as_ptr().add(32 * v).cast()) };
                _mm512_cvtepu8_epi16(q)
            })
        }
    }
}

/// Adds one pair row's products to the four digit sums; `px` holds the row's digits of the
/// pair's two inputs, one lane (two 16-bit digits) per digit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
fn vnni_pair(
    acc: &mut [[std::arch::x86_64::__m512i; VNNI_V]; 4],
    c: &[std::arch::x86_64::__m512i; VNNI_V],
    px: &[i32],
) {
    use std::arch::x86_64::*;
    for (acc, &x) in acc.iter_mut().zip(px) {
        let xv = _mm512_set1_epi32(x);
        for (acc, &c) in acc.iter_mut().zip(c) {
            *acc = _mm512_dpwssd_epi32(*acc, c, xv);
        }
    }
}

/// A block integer as a [`BlockInts`] holds it, read eight at a time into 64-bit lanes.
#[cfg(target_arch = "x86_64")]
trait Lanes8: Copy {
    /// The eight values from `p` on, in 64-bit lanes (two's complement).
    ///
    /// # Safety
    ///
    /// `p` may be read for eight values, and the CPU has AVX-512F.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m512i;

    /// The values as `i32`, where they are held so.
    fn narrow(values: &[Self]) -> Option<&[i32]>;
}

#[cfg(target_arch = "x86_64")]
impl Lanes8 for i32 {
    #[inline(always)]
    unsafe fn load8(p: *const i32) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise.
        unsafe { _mm512_cvtepi32_epi64(_mm256_loadu_si256(p.cast())) }
    }

    fn narrow(values: &[i32]) -> Option<&[i32]> {
        Some(values)
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes8 for u64 {
    #[inline(always)]
    unsafe fn load8(p: *const u64) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    fn narrow(_: &[u64]) -> Option<&[i32]> {
        None
    }
}

/// A full tile with AVX2: as [`tile_vnni`], 16 columns at a time (8 registers of digit sums),
/// `vpmaddwd` and an add per digit, 8 columns and input pair; then `D·T + M·Σx`: with the
/// scales and minimums held 32 bits each on vectors ([`avx2_finish_narrow`]), else `T` in
/// 64-bit lanes and 64-bit products column by column ([`avx2_finish`]: AVX2 has no 64-bit
/// vector multiply). One row widens each pair row of codes in registers as it uses it, as
/// [`tile_vnni`] does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn tile_avx2(a: &Operands, j0: usize, out: &mut [u64]) {
    use std::arch::x86_64::*;
    let w = a.w;
    let (d_in, d_out) = (w.d_in, w.d_out);
    let (mut d_buf, mut m_buf) = ([0u64; TILE], [0u64; TILE]);
    // A block's codes widened to 16-bit lanes once for every row (4 KiB, in L1): per column
    // group of 16 and pair row, two registers of 8 columns. Made once for the tile and
    // overwritten block by block, as in `tile_vnni_on`.
    let mut wide = [[[_mm256_setzero_si256(); 2]; PAIRS]; TILE / G2];
    for b in 0..a.nb {
        let k0 = block_index(d_in, d_out, b, j0);
        // Where pair row `p` of column group `g` starts in the codes (code_index's order).
        let at = |g: usize, p: usize| code_index(d_in, d_out, b * INT_BLOCK + 2 * p, j0 + G2 * g);
        let pair = BlockPair::of(w, k0, &mut d_buf, &mut m_buf);
        // Adds a column group's `D·T + M·s` to its sums `o`.
        let finish = |g: usize, acc: &[[__m256i; 2]; 4], s: u64, o: &mut [u64]| match pair {
            BlockPair::Narrow(d, m) => {
                avx2_finish_narrow(acc, &d[G2 * g..][..G2], &m[G2 * g..][..G2], s, o)
            }
            BlockPair::Wide(d, m) => avx2_finish(acc, &d[G2 * g..][..G2], &m[G2 * g..][..G2], s, o),
        };
        if a.rows == 1 {
            let px = &a.pairs[b * PAIRS * 4..][..PAIRS * 4];
            for g in 0..TILE / G2 {
                let mut acc = [[_mm256_setzero_si256(); 2]; 4];
                for p in 0..PAIRS {
                    // SAFETY: the CPU has AVX2, as `tile_avx2`'s caller promised.
                    let c = unsafe { avx2_widen(&w.codes, at(g, p)) };
                    avx2_pair(&mut acc, &c, &px[p * 4..][..4]);
                }
                finish(g, &acc, a.sums[b], &mut out[G2 * g..][..G2]);
            }
            continue;
        }
        for (g, wide) in wide.iter_mut().enumerate() {
            for (p, c) in wide.iter_mut().enumerate() {
                // SAFETY: as above.
                *c = unsafe { avx2_widen(&w.codes, at(g, p)) };
            }
        }
        for r in 0..a.rows {
            let px = &a.pairs[(r * d_in / 2 + b * PAIRS) * 4..][..PAIRS * 4];
            for (g, wide) in wide.iter().enumerate() {
                let mut acc = [[_mm256_setzero_si256(); 2]; 4];
                for (p, c) in wide.iter().enumerate() {
                    avx2_pair(&mut acc, c, &px[p * 4..][..4]);
                }
                let o = &mut out[r * TILE + G2 * g..][..G2];
                finish(g, &acc, a.sums[r * a.nb + b], o);
            }
        }
    }
}

/// Columns per group of the AVX2 tile.
#[cfg(target_arch = "x86_64")]
const G2: usize = 16;

/// One pair row of a column group's codes, from code `k` on (two inputs of G2 columns), widened
/// to 16-bit lanes as [`vnni_widen`] does: two registers of 8 columns.
///
/// # Safety
///
/// The CPU has AVX2. (A run past the codes panics; `k` must be even, as for [`vnni_widen`].)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_widen(codes: &Codes, k: usize) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::*;
    match codes.packed_bytes() {
        // Packed: a byte a column, its nibbles the two halves of a 32-bit lane.
        Some(packed) => {
            let codes = &packed[k / 2..][..G2];
            std::array::from_fn(|v| {
                // SAFETY: `codes` holds G2 bytes; this reads 8 at 8·v < G2.
                let q = unsafe { _mm_loadl_epi64(codes.as_ptr().add(8 * v).cast()) };
                let q = _mm256_cvtepu8_epi32(q);
                let lo = _mm256_and_si256(q, _mm256_set1_epi32(15));
                _mm256_or_si256(lo, _mm256_slli_epi32::<16>(_mm256_srli_epi32::<4>(q)))
            })
        }
        None => {
            let codes = &codes.bytes[k..][..2 * G2];
            std::array::from_fn(|v| {
                // SAFETY: `codes` holds 2·G2 bytes; this reads 16 at 16·v < 2·G2.
                let q = unsafe { _mm_loadu_si128(codes.as_ptr().add(16 * v).cast()) };
                _mm256_cvtepu8_epi16(q)
            })
        }
    }
}

/// Adds one pair row's products to a column group's four digit sums (`px` as in
/// [`vnni_pair`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn avx2_pair(
    acc: &mut [[std::arch::x86_64::__m256i; 2]; 4],
    c: &[std::arch::x86_64::__m256i; 2],
    px: &[i32],
) {
    use std::arch::x86_64::*;
    for (acc, &x) in acc.iter_mut().zip(px) {
        let xv = _mm256_set1_epi32(x);
        for (acc, &c) in acc.iter_mut().zip(c) {
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(c, xv));
        }
    }
}

/// Adds `D·T + M·s` of one row and block to a column group's G2 sums `o`: `T` in 64-bit lanes,
/// then the 64-bit products column by column (AVX2 has no 64-bit vector multiply).
// `v` picks the same column group in each of the four digits' sums.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn avx2_finish(
    acc: &[[std::arch::x86_64::__m256i; 2]; 4],
    d: &[u64],
    m: &[u64],
    s: u64,
    o: &mut [u64],
) {
    use std::arch::x86_64::*;
    let mut t = [0u64; G2];
    for v in 0..2 {
        let u = _mm256_add_epi32(acc[2][v], _mm256_slli_epi32::<16>(acc[3][v]));
        let halves = [
            (
                _mm256_castsi256_si128(acc[0][v]),
                _mm256_castsi256_si128(acc[1][v]),
                _mm256_castsi256_si128(u),
            ),
            (
                _mm256_extracti128_si256::<1>(acc[0][v]),
                _mm256_extracti128_si256::<1>(acc[1][v]),
                _mm256_extracti128_si256::<1>(u),
            ),
        ];
        for (h, (s0, s1, u)) in halves.into_iter().enumerate() {
            let tv = _mm256_add_epi64(
                _mm256_add_epi64(
                    _mm256_cvtepi32_epi64(s0),
                    _mm256_slli_epi64::<16>(_mm256_cvtepi32_epi64(s1)),
                ),
                _mm256_slli_epi64::<32>(_mm256_cvtepu32_epi64(u)),
            );
            // SAFETY: `t` holds G2 values; this writes 4 at 8·v + 4·h < G2.
            unsafe { _mm256_storeu_si256(t.as_mut_ptr().add(8 * v + 4 * h).cast(), tv) };
        }
    }
    for (j, o) in o.iter_mut().enumerate().take(G2) {
        *o = o
            .wrapping_add(d[j].wrapping_mul(t[j]))
            .wrapping_add(m[j].wrapping_mul(s));
    }
}

/// [`avx2_finish`] where the scales and minimums are held 32 bits each: the products as in
/// [`vnni_finish_narrow!`], `vpmuldq` on the even and the odd 32-bit lanes and `vpmulld` on all
/// eight, with no scalar 64-bit multiply.
// `v` picks the same column group in each of the four digits' sums.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn avx2_finish_narrow(
    acc: &[[std::arch::x86_64::__m256i; 2]; 4],
    d: &[i32],
    m: &[i32],
    s: u64,
    o: &mut [u64],
) {
    use std::arch::x86_64::*;
    assert!(d.len() >= G2 && m.len() >= G2 && o.len() >= G2);
    let (s_lo, s_hi) = split_sum(s);
    let (s_lo, s_hi) = (_mm256_set1_epi64x(s_lo), _mm256_set1_epi32(s_hi));
    let high = _mm256_set1_epi64x(!0xffff_ffff_u64 as i64);
    let low = |d: __m256i, m: __m256i, s0: __m256i, s1: __m256i| {
        _mm256_add_epi64(
            _mm256_add_epi64(
                _mm256_mul_epi32(d, s0),
                _mm256_slli_epi64::<16>(_mm256_mul_epi32(d, s1)),
            ),
            _mm256_mul_epi32(m, s_lo),
        )
    };
    for v in 0..2 {
        let at = 8 * v;
        // SAFETY: each slice holds G2 values (asserted); these access 8 at `at` < G2, and the
        // caller runs with AVX2.
        let (dv, mv) = unsafe {
            (
                _mm256_loadu_si256(d.as_ptr().add(at).cast()),
                _mm256_loadu_si256(m.as_ptr().add(at).cast()),
            )
        };
        let u = _mm256_add_epi32(acc[2][v], _mm256_slli_epi32::<16>(acc[3][v]));
        let hi = _mm256_add_epi32(_mm256_mullo_epi32(dv, u), _mm256_mullo_epi32(mv, s_hi));
        let even = _mm256_add_epi64(
            low(dv, mv, acc[0][v], acc[1][v]),
            _mm256_slli_epi64::<32>(hi),
        );
        let odd = _mm256_add_epi64(
            low(
                _mm256_srli_epi64::<32>(dv),
                _mm256_srli_epi64::<32>(mv),
                _mm256_srli_epi64::<32>(acc[0][v]),
                _mm256_srli_epi64::<32>(acc[1][v]),
            ),
            _mm256_and_si256(hi, high),
        );
        // Columns 0, 1, 4, 5 and 2, 3, 6, 7 of the eight; then in order.
        let (a, b) = (
            _mm256_unpacklo_epi64(even, odd),
            _mm256_unpackhi_epi64(even, odd),
        );
        let halves = [
            _mm256_permute2x128_si256::<0x20>(a, b),
            _mm256_permute2x128_si256::<0x31>(a, b),
        ];
        for (h, t) in halves.into_iter().enumerate() {
            // SAFETY: as above, 4 values at `at + 4 h` < G2.
            unsafe {
                let p = o.as_mut_ptr().add(at + 4 * h);
                let prev = _mm256_loadu_si256(p.cast());
                _mm256_storeu_si256(p.cast(), _mm256_add_epi64(prev, t));
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx_tile;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_weight(rng: &mut impl Rng, d_in: usize, d_out: usize) -> IntWeight {
        random_weight_of(rng, d_in, d_out, u8::MAX)
    }

    /// A random weight whose codes are at most `max_code` (15: held four bits a code).
    fn random_weight_of(rng: &mut impl Rng, d_in: usize, d_out: usize, max_code: u8) -> IntWeight {
        let blocks = d_in / INT_BLOCK * d_out;
        IntWeight {
            d_in,
            d_out,
            codes: (0..d_in * d_out)
                .map(|_| rng.random_range(0..=max_code))
                .collect(),
            scales: (0..blocks)
                .map(|_| rng.random_range(-1i64 << 40..1 << 40) as u64)
                .collect(),
            mins: (0..blocks).map(|_| rng.random::<u64>()).collect(),
            shift: 18,
            gain: None,
        }
    }

    #[test]
    fn the_layout_puts_every_code_and_every_block_integer_in_a_slot_of_its_own() {
        // The kernels, `at` and the reference all read through these two functions, so a slot
        // shared by two entries would pass every product test; count the slots instead.
        for (d_in, d_out) in [(32, 7), (96, 70), (96, 130), (64, 64), (32, 1)] {
            let mut codes = vec![0u8; d_in * d_out];
            let mut blocks = vec![0u8; d_in / INT_BLOCK * d_out];
            for j in 0..d_out {
                for i in 0..d_in {
                    codes[code_index(d_in, d_out, i, j)] += 1;
                }
                for b in 0..d_in / INT_BLOCK {
                    blocks[block_index(d_in, d_out, b, j)] += 1;
                }
            }
            assert!(codes.iter().all(|&n| n == 1), "codes of {d_in} x {d_out}");
            assert!(blocks.iter().all(|&n| n == 1), "blocks of {d_in} x {d_out}");
        }
    }

    #[test]
    fn the_column_bound_in_storage_order_is_the_bound_by_its_definition() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // A ragged last tile (70 = 64 + 6 columns), and a bound set by the last column.
        let mut w = random_weight(&mut rng, 96, 70);
        let last: Vec<usize> = (0..3).map(|b| block_index(96, 70, b, 69)).collect();
        w.scales = (0..w.scales.len())
            .map(|k| match last.contains(&k) {
                true => 1 << 30,
                false => (w.scales.get(k) as i64 >> 20) as u64,
            })
            .collect();
        w.mins = w.mins.iter().map(|m| (m as i64 >> 44) as u64).collect();
        let (fast, slow) = (w.column_norm_bound(), w.column_norm_bound_by_entries());
        assert_eq!(fast.to_bits(), slow.to_bits(), "{fast} against {slow}");
        assert!(fast > (96f64).sqrt() * 2f64.powi(30) * 0.5);
        // A product's shape, over every tile, with codes a byte and four bits each.
        for max_code in [u8::MAX, 15] {
            let big = random_weight_of(&mut rng, 576, 3072, max_code);
            let (f, s) = (big.column_norm_bound(), big.column_norm_bound_by_entries());
            assert_eq!(f.to_bits(), s.to_bits());
        }
    }

    #[test]
    fn the_weight_times_a_vector_is_the_transpose_of_the_product() {
        // (x · W) · v = x · (W · v) mod 2^64 for every x and v: Freivalds' identity.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for max_code in [u8::MAX, 15] {
            weight_times_vector_case(&mut rng, max_code);
        }
    }

    fn weight_times_vector_case(rng: &mut impl Rng, max_code: u8) {
        let w = random_weight_of(rng, 96, 70, max_code);
        assert_eq!(w.codes.packed(), max_code < 16);
        let vs: Vec<Vec<u64>> = (0..3)
            .map(|_| (0..70).map(|_| rng.random()).collect())
            .collect();
        let us = int_weight_times(&w, &vs);
        let x: Vec<u64> = (0..2 * 96).map(|_| rng.random()).collect();
        let y = int_matmul(&x, 2, &w);
        let dot = |a: &[u64], b: &[u64]| {
            a.iter()
                .zip(b)
                .fold(0u64, |s, (&p, &q)| s.wrapping_add(p.wrapping_mul(q)))
        };
        for (v, u) in vs.iter().zip(&us) {
            for r in 0..2 {
                assert_eq!(
                    dot(&y[r * 70..(r + 1) * 70], v),
                    dot(&x[r * 96..(r + 1) * 96], u)
                );
            }
        }
        // And u is W · v by definition.
        for (i, &got) in us[1].iter().enumerate() {
            let want = (0..70).fold(0u64, |s, j| {
                s.wrapping_add((w.at(i, j) as u64).wrapping_mul(vs[1][j]))
            });
            assert_eq!(got, want);
        }
    }

    /// The product by definition, in 128-bit arithmetic, reduced mod 2^64 at the end.
    fn naive(x: &[u64], rows: usize, w: &IntWeight) -> Vec<u64> {
        let mut y = vec![0u64; rows * w.d_out];
        for r in 0..rows {
            for j in 0..w.d_out {
                let mut acc = 0u128;
                for i in 0..w.d_in {
                    acc = acc.wrapping_add(
                        u128::from(x[r * w.d_in + i]).wrapping_mul(w.at(i, j) as u64 as u128),
                    );
                }
                y[r * w.d_out + j] = acc as u64;
            }
        }
        y
    }

    #[test]
    fn the_tiled_product_is_the_product_mod_2_64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Full tiles, a ragged last tile, one row and several, and more rows than a tile runs
        // at once (`ROW_CHUNK`: two whole ranges and a ragged one).
        for (rows, d_in, d_out, max_code) in [
            (2 * ROW_CHUNK + 6, 96, 130, u8::MAX),
            (2 * ROW_CHUNK + 6, 64, 128, 15),
            (1, 64, 128, u8::MAX),
            (3, 96, 130, u8::MAX),
            (5, 32, 7, u8::MAX),
            (0, 32, 64, u8::MAX),
            (1, 64, 128, 15),
            (3, 96, 130, 15),
            (5, 32, 7, 15),
        ] {
            let w = random_weight_of(&mut rng, d_in, d_out, max_code);
            let x: Vec<u64> = (0..rows * d_in).map(|_| rng.random()).collect();
            assert_eq!(
                int_matmul(&x, rows, &w),
                naive(&x, rows, &w),
                "{rows} x {d_in} x {d_out}"
            );
        }
    }

    #[test]
    fn codes_below_16_are_held_four_bits_each_and_travel_a_byte_each() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let small: Vec<u8> = (0..96 * 70).map(|_| rng.random_range(0..16)).collect();
        let mut large = small.clone();
        large[4321] = 16;
        for (codes, packed) in [(small, true), (large, false), (vec![3; 7], false)] {
            let held = Codes::new(codes.clone());
            assert_eq!(held.packed(), packed);
            assert_eq!(held.len(), codes.len());
            assert_eq!(
                held.held_bytes(),
                codes.len().div_ceil(1 + usize::from(packed))
            );
            assert_eq!(&*held.unpacked(), &codes[..]);
            for (k, &q) in codes.iter().enumerate() {
                assert_eq!(held.get(k), q, "code {k}");
            }
            let mut buf = [0u8; 2 * TILE];
            for k in (0..codes.len().saturating_sub(2 * TILE)).step_by(2 * TILE + 2) {
                assert_eq!(held.run(k, 2 * TILE, &mut buf), &codes[k..k + 2 * TILE]);
            }
            // On the wire a byte a code either way: what a byte-a-code field made, and back.
            let wire = postcard::to_allocvec(&held).unwrap();
            #[derive(Serialize)]
            struct Plain<'a>(#[serde(with = "serde_bytes")] &'a [u8]);
            assert_eq!(wire, postcard::to_allocvec(&Plain(&codes)).unwrap());
            assert_eq!(postcard::from_bytes::<Codes>(&wire).unwrap(), held);
        }
    }

    #[test]
    fn block_integers_that_fit_32_bits_are_held_so_and_travel_64_bits_each() {
        let fits = [0, 1, i32::MAX as u64, i32::MIN as i64 as u64, u64::MAX];
        let wide = [i32::MAX as u64 + 1, (i32::MIN as i64 - 1) as u64, 1 << 63];
        let narrow = BlockInts::new(fits.to_vec());
        assert!(matches!(narrow, BlockInts::Narrow(_)));
        assert_eq!(narrow.held_bytes(), 4 * fits.len());
        // Equal by value, however held.
        assert_eq!(narrow, BlockInts::Wide(fits.to_vec()));
        assert_ne!(narrow, BlockInts::Wide(fits[1..].to_vec()));
        for &w in &wide {
            let mut values = fits.to_vec();
            values.push(w);
            let held = BlockInts::new(values.clone());
            assert!(matches!(held, BlockInts::Wide(_)), "{w:#x}");
            assert_eq!(held.iter().collect::<Vec<_>>(), values);
        }
        let mut buf = [0u64; 8];
        for (k, &v) in fits.iter().enumerate() {
            assert_eq!(narrow.get(k), v, "value {k}");
        }
        assert_eq!(narrow.run(1, 3, &mut buf), &fits[1..4]);
        // On the wire 64 bits each either way: what a `Vec<u64>` made, and back.
        for held in [narrow, BlockInts::new(wide.to_vec())] {
            let values: Vec<u64> = held.iter().collect();
            let wire = postcard::to_allocvec(&held).unwrap();
            assert_eq!(wire, postcard::to_allocvec(&values).unwrap());
            assert_eq!(postcard::from_bytes::<BlockInts>(&wire).unwrap(), held);
        }
    }

    #[test]
    fn four_signed_digits_make_the_value_again() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let extremes = [
            0,
            1,
            u64::MAX,
            1 << 63,
            0x7fff_7fff_7fff_7fff,
            0x7fff_7fff_7fff_8000,
        ];
        for x in extremes.into_iter().chain((0..1000).map(|_| rng.random())) {
            let d = digits(x);
            let back = (0..4).fold(0u64, |a, l| {
                a.wrapping_add((i64::from(d[l]) as u64) << (16 * l))
            });
            assert_eq!(back, x, "{x:#x}");
        }
        // The two extremes: every digit at -2^15, every digit at 2^15 - 1.
        assert_eq!(digits(0x7fff_7fff_7fff_8000), [i16::MIN; 4]);
        assert_eq!(digits(0x7fff_7fff_7fff_7fff), [i16::MAX; 4]);
    }

    #[test]
    fn where_the_host_grants_amx_its_checked_tile_product_outruns_the_vector_kernels() {
        // Where the host grants AMX, the tile product's sums are right and the machine's integer
        // peak lies above what the vector kernels reach, per multiply-add; elsewhere no peak.
        if amx_granted() {
            let amx = amx_int8_peak().expect("the tile product's sums are right");
            // The widest vector kernel's (the AMX kernel has no pair-dot peak of its own).
            let vector = IntKernel::available()
                .into_iter()
                .filter_map(IntKernel::pair_dot_peak)
                .fold(0.0, f64::max);
            assert!(vector > 0.0, "a host with AMX has vector kernels");
            assert!(amx > vector, "amx {amx:e} against {vector:e}");
        } else {
            assert_eq!(amx_int8_peak(), None);
        }
    }

    /// Every kernel this CPU has, against the definition: random values, and the extremes of
    /// the digit sums (every digit of every input at -2^15 or 2^15 - 1 against codes of 255),
    /// of the codes and of the scales and minimums (64 bits, and 32 bits held narrow).
    #[test]
    fn every_kernel_is_the_product_mod_2_64_at_the_extremes() {
        let kernels = IntKernel::available();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // One row (each kernel's decode path) with one block and with several, a ragged tile.
        for (rows, d_in, d_out) in [
            (1, 32, 64),
            (1, 96, 130),
            (2, 64, 128),
            (3, 96, 130),
            (17, 64, 128),
            (ROW_CHUNK + 1, 64, 128),
            (0, 32, 64),
        ] {
            let random = random_weight(&mut rng, d_in, d_out);
            let saturated = IntWeight {
                codes: vec![255; d_in * d_out].into(),
                scales: vec![u64::MAX; random.scales.len()].into(),
                mins: vec![1 << 63; random.mins.len()].into(),
                ..random.clone()
            };
            // The same two with codes held four bits each (a Q4_1 tensor's).
            let random4 = random_weight_of(&mut rng, d_in, d_out, 15);
            let saturated4 = IntWeight {
                codes: vec![15; d_in * d_out].into(),
                ..saturated.clone()
            };
            assert!(random4.codes.packed() && saturated4.codes.packed());
            assert!(!random.codes.packed() && !saturated.codes.packed());
            // Block integers that fit 32 bits (held narrow, as this model's are), random and at
            // the ends of that range (random scales and minimums up to 2^30 in size).
            let narrowed = |w: &IntWeight| IntWeight {
                scales: w.scales.iter().map(|s| (s as i64 >> 10) as u64).collect(),
                mins: w.mins.iter().map(|m| (m as i64 >> 33) as u64).collect(),
                ..w.clone()
            };
            let (narrow, narrow4) = (narrowed(&random), narrowed(&random4));
            let narrow_ends = IntWeight {
                scales: vec![i32::MIN as i64 as u64; random.scales.len()].into(),
                mins: vec![i32::MAX as u64; random.mins.len()].into(),
                ..saturated4.clone()
            };
            // The other ends, with the largest byte codes (the largest digit sums).
            let narrow_ends_flipped = IntWeight {
                scales: vec![i32::MAX as u64; random.scales.len()].into(),
                mins: vec![i32::MIN as i64 as u64; random.mins.len()].into(),
                ..saturated.clone()
            };
            for w in [&narrow, &narrow4, &narrow_ends, &narrow_ends_flipped] {
                assert!(matches!(w.scales, BlockInts::Narrow(_)));
                assert!(matches!(w.mins, BlockInts::Narrow(_)));
            }
            // Each held one way and the other the other way (each pairing is a kernel instance).
            let wide_narrow = IntWeight {
                mins: narrow.mins.clone(),
                ..random.clone()
            };
            let wide_narrow_ends = IntWeight {
                scales: vec![1 << 63; random.scales.len()].into(),
                mins: vec![i32::MIN as i64 as u64; random.mins.len()].into(),
                ..random4.clone()
            };
            for w in [&wide_narrow, &wide_narrow_ends] {
                assert!(matches!(w.scales, BlockInts::Wide(_)));
                assert!(matches!(w.mins, BlockInts::Narrow(_)));
            }
            // `u64::MAX` is -1: narrow scales, wide minimums.
            assert!(matches!(saturated.scales, BlockInts::Narrow(_)));
            assert!(matches!(saturated.mins, BlockInts::Wide(_)));
            assert!(matches!(random.scales, BlockInts::Wide(_)));
            assert!(matches!(random.mins, BlockInts::Wide(_)));
            let xs: [Vec<u64>; 4] = [
                (0..rows * d_in).map(|_| rng.random()).collect(),
                vec![0x7fff_7fff_7fff_8000; rows * d_in],
                vec![0x7fff_7fff_7fff_7fff; rows * d_in],
                (0..rows * d_in)
                    .map(|i| [u64::MAX, 0, 1 << 63, 1][i % 4])
                    .collect(),
            ];
            for w in [
                &random,
                &saturated,
                &random4,
                &saturated4,
                &narrow,
                &narrow4,
                &narrow_ends,
                &narrow_ends_flipped,
                &wide_narrow,
                &wide_narrow_ends,
            ] {
                for x in &xs {
                    let want = naive(x, rows, w);
                    for &k in &kernels {
                        assert_eq!(
                            int_matmul_with(k, x, rows, w),
                            want,
                            "{} on {rows} x {d_in} x {d_out}",
                            k.name()
                        );
                    }
                }
            }
        }
    }

    /// The AMX kernel (where the host grants it) over whole and ragged ranges of rows, through
    /// [`int_matmul`] too, on byte codes at their ends (0: every code -128 on the tiles, 255) and
    /// on four-bit ones, with block sums whose `128 · s` lands on the edges of its split.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn the_amx_kernel_is_the_product_over_ranges_of_rows_and_at_its_offsets_edges() {
        if !IntKernel::available().contains(&IntKernel::Amx) {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
        for rows in [AMX_MIN_ROWS, 7, ROW_CHUNK + 3, 2 * ROW_CHUNK + 6] {
            for (d_in, d_out) in [(32, 64), (96, 200)] {
                let blocks = d_in / INT_BLOCK * d_out;
                let narrow = |rng: &mut rand_chacha::ChaCha8Rng| -> BlockInts {
                    (0..blocks)
                        .map(|_| rng.random::<i32>() as i64 as u64)
                        .collect()
                };
                let mut ends: Vec<u8> = (0..d_in * d_out)
                    .map(|_| [0u8, 255, 127, 128][rng.random_range(0..4)])
                    .collect();
                ends[0] = 16;
                let mut zeros = vec![0u8; d_in * d_out];
                zeros[1] = 16;
                let weight = |codes: Vec<u8>, scales: BlockInts, mins: BlockInts| IntWeight {
                    d_in,
                    d_out,
                    codes: codes.into(),
                    scales,
                    mins,
                    shift: 18,
                    gain: None,
                };
                let low = vec![i32::MIN as i64 as u64; blocks];
                let ws = [
                    weight(ends, narrow(&mut rng), narrow(&mut rng)),
                    weight(zeros, low.clone().into(), low.into()),
                    weight(
                        (0..d_in * d_out).map(|_| rng.random_range(0..16)).collect(),
                        narrow(&mut rng),
                        narrow(&mut rng),
                    ),
                ];
                assert!(!ws[0].codes.packed() && !ws[1].codes.packed() && ws[2].codes.packed());
                // One value a block, so `128 · s` has the low half 2^31, 0x7fff_ff80 (its
                // second part 2^15) or 0xffff_8000.
                let sums = |t: u64| -> Vec<u64> {
                    (0..rows * d_in)
                        .map(|i| if i % INT_BLOCK == 0 { t } else { 0 })
                        .collect()
                };
                let xs = [
                    (0..rows * d_in).map(|_| rng.random()).collect(),
                    vec![u64::MAX; rows * d_in],
                    sums(0x0100_0000),
                    sums(0x00ff_ffff),
                    sums(0x01ff_ff00),
                ];
                for w in &ws {
                    for x in &xs {
                        let want = naive(x, rows, w);
                        assert_eq!(
                            int_matmul_with(IntKernel::Amx, x, rows, w),
                            want,
                            "amx, {rows} x {d_in} x {d_out}"
                        );
                        assert_eq!(int_matmul(x, rows, w), want, "int_matmul, {rows} rows");
                    }
                }
            }
        }
    }

    #[test]
    fn padded_rows_unmask_to_the_exact_signed_product() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let w = random_weight(&mut rng, 64, 64);
        let w = IntWeight {
            scales: w.scales.iter().map(|s| (s as i64 >> 30) as u64).collect(),
            mins: w.mins.iter().map(|m| (m as i64 >> 40) as u64).collect(),
            ..w
        };
        let x: Vec<i64> = (0..64)
            .map(|_| rng.random_range(-1i64 << 20..1 << 20))
            .collect();
        let pad: Vec<u64> = (0..64).map(|_| rng.random()).collect();
        let masked: Vec<u64> = x
            .iter()
            .zip(&pad)
            .map(|(&v, &p)| (v as u64).wrapping_add(p))
            .collect();
        let y = int_matmul(&masked, 1, &w);
        let r = int_matmul(&pad, 1, &w);
        for j in 0..64 {
            let exact: i128 = (0..64)
                .map(|i| i128::from(x[i]) * i128::from(w.at(i, j)))
                .sum();
            assert_eq!(y[j].wrapping_sub(r[j]) as i64 as i128, exact);
        }
    }

    #[test]
    fn malformed_weights_are_refused() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let good = random_weight(&mut rng, 64, 8);
        assert!(good.validate().is_ok());
        for bad in [
            IntWeight {
                d_in: 48,
                ..good.clone()
            },
            IntWeight {
                codes: vec![0; 3].into(),
                ..good.clone()
            },
            IntWeight {
                mins: Vec::new().into(),
                ..good.clone()
            },
            IntWeight {
                shift: 70,
                ..good.clone()
            },
            IntWeight {
                gain: Some(vec![f32::NAN; 64]),
                ..good.clone()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
