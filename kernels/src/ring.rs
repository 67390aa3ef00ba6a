//! The integer mode's arithmetic, shared by both sides: the exact integer form of a
//! block-quantized weight and the wrapping 64-bit product with it.
//!
//! A weight of the integer mode is `W_int[i][j] = D[b][j] · q[i][j] + M[b][j]` for input `i` in
//! block `b = i / 32`, with 8-bit codes `q` and per-block integers `D`, `M` (a GGUF block's f16
//! scale and minimum times `2^shift`, exact). Every product here is taken modulo `2^64`: the cloud
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
    /// Codes, row-major `[d_in][d_out]`.
    #[serde(with = "serde_bytes")]
    pub codes: Vec<u8>,
    /// Per block and column, row-major `[d_in / 32][d_out]`: the scale times `2^shift`
    /// (two's complement).
    pub scales: Vec<u64>,
    /// The same for the block minimum (the offset every code of the block carries).
    pub mins: Vec<u64>,
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
        let b = (i / INT_BLOCK) * self.d_out + j;
        (self.scales[b] as i64)
            .wrapping_mul(i64::from(self.codes[i * self.d_out + j]))
            .wrapping_add(self.mins[b] as i64)
    }

    /// The largest Euclidean norm of a column of `W_int` (at least 1), which bounds every
    /// product: `|X·W_int[:, j]| ≤ ‖X‖₂ · this`.
    pub fn column_norm_bound(&self) -> f64 {
        let mut sq = vec![0f64; self.d_out];
        for i in 0..self.d_in {
            for (j, s) in sq.iter_mut().enumerate() {
                let w = self.at(i, j) as f64;
                *s += w * w;
            }
        }
        // f64 rounding of the sum is far below the bit of headroom callers keep.
        sq.into_iter().fold(1f64, |m, s| m.max(s.sqrt()))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 8 * (self.scales.len() + self.mins.len())
    }
}

/// Columns per tile of the product: one tile's accumulators stay in vector registers.
const TILE: usize = 64;

/// `x (rows × d_in) · W_int` modulo `2^64`, row-major, on every core.
///
/// Per block, `Σ_i x_i (D q_i + M) = D · Σ_i x_i q_i + M · Σ_i x_i`: the inner sums multiply
/// 64-bit values by 8-bit codes, the block sums of `x` are shared by every column.
pub fn int_matmul(x: &[u64], rows: usize, w: &IntWeight) -> Vec<u64> {
    let (d_in, d_out) = (w.d_in, w.d_out);
    assert_eq!(x.len(), rows * d_in, "lhs shape");
    let nb = d_in / INT_BLOCK;
    let sums: Vec<u64> = x
        .chunks_exact(INT_BLOCK)
        .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
        .collect();
    let operands = Operands {
        x,
        rows,
        w,
        sums: &sums,
        nb,
    };
    let tiles: Vec<usize> = (0..d_out).step_by(TILE).collect();
    let parts: Vec<Vec<u64>> = tiles
        .par_iter()
        .map(|&j0| {
            let width = TILE.min(d_out - j0);
            let mut out = vec![0u64; rows * width];
            tile(&operands, j0, width, &mut out);
            out
        })
        .collect();
    let mut y = vec![0u64; rows * d_out];
    for (&j0, part) in tiles.iter().zip(&parts) {
        let width = TILE.min(d_out - j0);
        for (r, src) in part.chunks_exact(width).enumerate() {
            y[r * d_out + j0..r * d_out + j0 + width].copy_from_slice(src);
        }
    }
    y
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
            let scales = &w.scales[b * d_out..(b + 1) * d_out];
            let mins = &w.mins[b * d_out..(b + 1) * d_out];
            // `D_bj v_j` per vector, and the block's constant `Σ_j M_bj v_j`.
            let scaled: Vec<Vec<u64>> = vs
                .iter()
                .map(|v| {
                    scales
                        .iter()
                        .zip(v)
                        .map(|(&s, &x)| s.wrapping_mul(x))
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
            // `[i][t]` for the block's 32 inputs.
            let mut out = vec![0u64; INT_BLOCK * k];
            for i in 0..INT_BLOCK {
                let codes = &w.codes[(b * INT_BLOCK + i) * d_out..][..d_out];
                for t in 0..k {
                    let dot = codes.iter().zip(&scaled[t]).fold(0u64, |a, (&q, &s)| {
                        a.wrapping_add(s.wrapping_mul(u64::from(q)))
                    });
                    out[i * k + t] = dot.wrapping_add(offsets[t]);
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

/// The operands every tile of one product shares.
struct Operands<'a> {
    x: &'a [u64],
    rows: usize,
    w: &'a IntWeight,
    /// Per row and block, `Σ_i x_i` of the block.
    sums: &'a [u64],
    nb: usize,
}

/// One tile of columns, compiled for the widest vector unit the CPU has.
fn tile(a: &Operands, j0: usize, width: usize, out: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            return unsafe { tile_avx512(a, j0, width, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { tile_avx2(a, j0, width, out) };
        }
    }
    tile_portable(a, j0, width, out)
}

/// The portable tile, compiled again with the named target features enabled.
macro_rules! tile_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $name(a: &Operands, j0: usize, width: usize, out: &mut [u64]) {
            tile_portable(a, j0, width, out)
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn tile_avx512(a: &Operands, j0: usize, width: usize, out: &mut [u64]) {
    if width == TILE {
        tile_fixed_avx512(a, j0, out)
    } else {
        tile_portable(a, j0, width, out)
    }
}
tile_for!(tile_avx2, "avx2");

#[inline(always)]
fn tile_portable(a: &Operands, j0: usize, width: usize, out: &mut [u64]) {
    if width == TILE {
        return tile_fixed::<TILE>(a, j0, out);
    }
    let w = a.w;
    for r in 0..a.rows {
        for (jj, o) in out[r * width..(r + 1) * width].iter_mut().enumerate() {
            let j = j0 + jj;
            let mut acc = 0u64;
            for b in 0..a.nb {
                let mut t = 0u64;
                for i in b * INT_BLOCK..(b + 1) * INT_BLOCK {
                    let q = u64::from(w.codes[i * w.d_out + j]);
                    t = t.wrapping_add(a.x[r * w.d_in + i].wrapping_mul(q));
                }
                let k = b * w.d_out + j;
                acc = acc
                    .wrapping_add(w.scales[k].wrapping_mul(t))
                    .wrapping_add(w.mins[k].wrapping_mul(a.sums[r * a.nb + b]));
            }
            *o = acc;
        }
    }
}

/// A full tile of `N` columns: the code rows of a block stay in L1 while every row uses them.
#[inline(always)]
fn tile_fixed<const N: usize>(a: &Operands, j0: usize, out: &mut [u64]) {
    let Operands {
        x,
        rows,
        w,
        sums,
        nb,
    } = *a;
    let (d_in, d_out) = (w.d_in, w.d_out);
    for b in 0..nb {
        let scales: &[u64; N] = w.scales[b * d_out + j0..][..N].try_into().expect("tile");
        let mins: &[u64; N] = w.mins[b * d_out + j0..][..N].try_into().expect("tile");
        for r in 0..rows {
            let mut t = [0u64; N];
            let xs = &x[r * d_in + b * INT_BLOCK..][..INT_BLOCK];
            for (i, &xi) in xs.iter().enumerate() {
                let q: &[u8; N] = w.codes[(b * INT_BLOCK + i) * d_out + j0..][..N]
                    .try_into()
                    .expect("tile");
                for j in 0..N {
                    t[j] = t[j].wrapping_add(xi.wrapping_mul(u64::from(q[j])));
                }
            }
            let s = sums[r * nb + b];
            let o: &mut [u64; N] = (&mut out[r * N..(r + 1) * N]).try_into().expect("tile");
            for j in 0..N {
                o[j] = o[j]
                    .wrapping_add(scales[j].wrapping_mul(t[j]))
                    .wrapping_add(mins[j].wrapping_mul(s));
            }
        }
    }
}

/// The full tile with AVX-512 intrinsics: `x·q = lo·q + (hi·q) << 32 (mod 2^64)` with the 32-bit
/// halves of `x`, so every product is one `vpmuludq` (32 × 32 → 64 bits) instead of a 64-bit
/// `vpmullq` (three µops); 64 columns of `lo` and `hi` sums stay in 16 registers through a block.
/// Neither sum can wrap: 32 terms below 2^40 each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn tile_fixed_avx512(a: &Operands, j0: usize, out: &mut [u64]) {
    use std::arch::x86_64::*;
    const V: usize = TILE / 8;
    let w = a.w;
    let (d_in, d_out) = (w.d_in, w.d_out);
    for b in 0..a.nb {
        let k0 = b * d_out + j0;
        let scales = &w.scales[k0..k0 + TILE];
        let mins = &w.mins[k0..k0 + TILE];
        for r in 0..a.rows {
            let xs = &a.x[r * d_in + b * INT_BLOCK..][..INT_BLOCK];
            let mut lo = [_mm512_setzero_si512(); V];
            let mut hi = [_mm512_setzero_si512(); V];
            for (i, &xi) in xs.iter().enumerate() {
                let q = &w.codes[(b * INT_BLOCK + i) * d_out + j0..][..TILE];
                // `vpmuludq` reads the low 32 bits of each lane: `xi` itself is its low half.
                let x_lo = _mm512_set1_epi64(xi as i64);
                let x_hi = _mm512_set1_epi64((xi >> 32) as i64);
                for v in 0..V {
                    // SAFETY: `q` holds TILE bytes; this reads 8 of them at offset 8·v < TILE.
                    let q8 = unsafe { _mm_loadl_epi64(q.as_ptr().add(8 * v).cast()) };
                    let qv = _mm512_cvtepu8_epi64(q8);
                    lo[v] = _mm512_add_epi64(lo[v], _mm512_mul_epu32(x_lo, qv));
                    hi[v] = _mm512_add_epi64(hi[v], _mm512_mul_epu32(x_hi, qv));
                }
            }
            let s = _mm512_set1_epi64(a.sums[r * a.nb + b] as i64);
            let o = &mut out[r * TILE..(r + 1) * TILE];
            for v in 0..V {
                let t = _mm512_add_epi64(lo[v], _mm512_slli_epi64::<32>(hi[v]));
                // SAFETY: each slice holds TILE values; these access 8 at offset 8·v < TILE.
                unsafe {
                    let d = _mm512_loadu_si512(scales.as_ptr().add(8 * v).cast());
                    let m = _mm512_loadu_si512(mins.as_ptr().add(8 * v).cast());
                    let prev = _mm512_loadu_si512(o.as_ptr().add(8 * v).cast());
                    let sum = _mm512_add_epi64(
                        prev,
                        _mm512_add_epi64(_mm512_mullo_epi64(d, t), _mm512_mullo_epi64(m, s)),
                    );
                    _mm512_storeu_si512(o.as_mut_ptr().add(8 * v).cast(), sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_weight(rng: &mut impl Rng, d_in: usize, d_out: usize) -> IntWeight {
        let blocks = d_in / INT_BLOCK * d_out;
        IntWeight {
            d_in,
            d_out,
            codes: (0..d_in * d_out).map(|_| rng.random()).collect(),
            scales: (0..blocks)
                .map(|_| rng.random_range(-1i64 << 40..1 << 40) as u64)
                .collect(),
            mins: (0..blocks).map(|_| rng.random::<u64>()).collect(),
            shift: 18,
            gain: None,
        }
    }

    #[test]
    fn the_weight_times_a_vector_is_the_transpose_of_the_product() {
        // (x · W) · v = x · (W · v) mod 2^64 for every x and v: Freivalds' identity.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let w = random_weight(&mut rng, 96, 70);
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
        // Full tiles, a ragged last tile, one row and several.
        for (rows, d_in, d_out) in [(1, 64, 128), (3, 96, 130), (5, 32, 7), (0, 32, 64)] {
            let w = random_weight(&mut rng, d_in, d_out);
            let x: Vec<u64> = (0..rows * d_in).map(|_| rng.random()).collect();
            assert_eq!(
                int_matmul(&x, rows, &w),
                naive(&x, rows, &w),
                "{rows} x {d_in} x {d_out}"
            );
        }
    }

    #[test]
    fn padded_rows_unmask_to_the_exact_signed_product() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let w = random_weight(&mut rng, 64, 64);
        let w = IntWeight {
            scales: w.scales.iter().map(|&s| (s as i64 >> 30) as u64).collect(),
            mins: w.mins.iter().map(|&m| (m as i64 >> 40) as u64).collect(),
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
                codes: vec![0; 3],
                ..good.clone()
            },
            IntWeight {
                mins: vec![],
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
