//! The integer product on AMX's 8-bit tiles from the weight's own byte digits: an experiment
//! measured beside the kernels (`talaria bench-gemm`'s `amx-int8` column), which no product uses
//! (docs/performance.md has the numbers and why). The products use `ring`'s `amx` kernel
//! instead ([`IntKernel::Amx`](crate::ring::IntKernel)), which multiplies the codes on the tiles
//! and keeps each block's `D·T + M·Σx` on the vectors.
//!
//! [`ring::int_matmul`](crate::ring::int_matmul) multiplies by the codes and takes each block's
//! `D·T + M·Σx` in 64-bit lanes; on AMX that per-block step is most of the work (a block is 32
//! inputs, half a tile's depth). Here the weight is made once into signed byte
//! digits instead, `W_int = Σ_m w_m · 2^(8 m) (mod 2^64)` with `w_m ∈ [-128, 127]`, as many as
//! the weight's largest entry needs (four for the fetched model: its entries span 23 to 27
//! bits), and the rows into unsigned byte digits `x = Σ_l x_l · 2^(8 l)`. Then
//!
//! `x · W_int = Σ_{l + m ≤ 7} 2^(8 (l + m)) · (x_l · w_m)  (mod 2^64)`:
//!
//! a tile holds two rows' eight digits (one per tile row), one `tdpbusd` per pair of rows,
//! weight digit, 16 columns and 64 inputs sums every `x_l · w_m` exactly in 32 bits across the
//! input width, and each sum goes to 64 bits once, at its place. The price is memory and
//! traffic: the digits take [`AmxWeight::digits`] bytes per weight, against 1 for the codes,
//! and every step of the tile product loads four fresh tiles.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use rayon::prelude::*;

use crate::ring::IntWeight;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use crate::ring::{INT_BLOCK, amx_granted, block_index, code_index};

/// Inputs per tile step (one 64-byte tile row of 8-bit values).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const STEP: usize = 64;

/// Rows of `x` per tile, and columns of the weight (16 lanes of four inputs' bytes).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const LANES: usize = 16;

/// Bytes of one tile: 16 rows of 64.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const TILE_BYTES: usize = 1024;

/// Steps summed in 32 bits before the sums go to 64 bits: a sum takes one digit product per
/// input, at most `255 · 128` in size, so `255 · 128 · 64 · 1024 < 2^31`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const CHUNK_STEPS: usize = 1024;

/// An integer weight as AMX's right operands: its signed byte digits, made once.
pub struct AmxWeight {
    d_in: usize,
    d_out: usize,
    /// Digits per entry (1 to 8).
    digits: usize,
    /// Tile steps of 64 inputs (the last padded with zeros).
    steps: usize,
    /// Per group of 16 columns, [`weight_tile`]`(steps, s, m)` is a tile whose row `q`, lane
    /// `n`, byte `t` holds digit `m` of `W_int[64 s + 4 q + t][16 g + n]` (zero past the
    /// weight, and for the partner of an odd last digit).
    planes: Lines,
}

/// Bytes on whole 64-byte lines: a tile row split across two lines loads at about half speed
/// (a 2 × 2 tile product step from 16-byte aligned buffers ran 21 ns a product against 9).
pub(crate) struct Lines(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

impl Lines {
    /// `len` zero bytes (`len` a multiple of 64).
    pub(crate) fn zeroed(len: usize) -> Lines {
        assert!(len.is_multiple_of(64), "whole lines");
        Lines(vec![Line([0; 64]); len / 64])
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: a `Line` is 64 bytes (`repr(C)`, no padding), the lines are contiguous.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), 64 * self.0.len()) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), 64 * self.0.len()) }
    }
}

impl std::fmt::Debug for AmxWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AmxWeight({} x {}, {} digits)",
            self.d_in, self.d_out, self.digits
        )
    }
}

/// Where the tile of digit `m` of step `s` lies among a group's: by pairs of digits, then
/// steps, so that the product reads each pair's tiles in one sequential stream (the hardware's
/// prefetchers follow it).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn weight_tile(steps: usize, s: usize, m: usize) -> usize {
    ((m / 2) * steps + s) * 2 + m % 2
}

/// Whether this process can run the AMX product: AMX-TILE and AMX-INT8 granted by Linux, and
/// the AVX-512 byte permutes that make the rows' digits.
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vbmi") && amx_granted()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Balanced byte digits of `v`: `v = Σ_m d_m · 2^(8 m)`, `d_m ∈ [-128, 127]`, and how many
/// it takes (8 at most: eight are exact modulo 2^64 whatever is left above them).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn signed_digits(v: i64) -> ([i8; 8], usize) {
    let mut v = i128::from(v);
    let mut d = [0i8; 8];
    for (m, d_m) in d.iter_mut().enumerate() {
        let low = ((v + 128) & 255) - 128;
        *d_m = low as i8;
        v = (v - low) >> 8;
        if v == 0 {
            return (d, m + 1);
        }
    }
    (d, 8)
}

impl AmxWeight {
    /// The digits of `w`, or `None` where this process cannot run the AMX product or `w` is
    /// malformed ([`IntWeight::validate`]).
    pub fn new(w: &IntWeight) -> Option<AmxWeight> {
        if !available() || w.validate().is_err() {
            return None;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            Some(Self::make(w))
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            let _ = w;
            None
        }
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn make(w: &IntWeight) -> AmxWeight {
        let (d_in, d_out) = (w.d_in, w.d_out);
        let nb = d_in / INT_BLOCK;
        // The entries of a block and column run from `M` (code 0) to `255 D + M` (code 255):
        // where neither end leaves 64 bits, neither does anything between them, and the digits
        // the ends take are enough for every entry.
        let digits = (0..nb * d_out)
            .into_par_iter()
            .map(|k| {
                let (d, m) = (
                    i128::from(w.scales.get(k) as i64),
                    i128::from(w.mins.get(k) as i64),
                );
                let top = 255 * d + m;
                match i64::try_from(top) {
                    Ok(top) => signed_digits(top).1.max(signed_digits(m as i64).1),
                    Err(_) => 8,
                }
            })
            .max()
            .unwrap_or(1);
        let steps = d_in.div_ceil(STEP);
        let group_bytes = steps * digits.next_multiple_of(2) * TILE_BYTES;
        let mut planes = Lines::zeroed(d_out.div_ceil(LANES) * group_bytes);
        planes
            .bytes_mut()
            .par_chunks_mut(group_bytes)
            .enumerate()
            .for_each(|(g, tiles)| {
                for n in 0..LANES.min(d_out - g * LANES) {
                    let j = g * LANES + n;
                    for b in 0..nb {
                        let k = block_index(d_in, d_out, b, j);
                        let (d, m) = (w.scales.get(k), w.mins.get(k));
                        for i in b * INT_BLOCK..(b + 1) * INT_BLOCK {
                            let q = u64::from(w.codes.get(code_index(d_in, d_out, i, j)));
                            let (ds, _) = signed_digits(d.wrapping_mul(q).wrapping_add(m) as i64);
                            let (s, q, t) = (i / STEP, i % STEP / 4, i % 4);
                            for (dm, &digit) in ds[..digits].iter().enumerate() {
                                tiles
                                    [weight_tile(steps, s, dm) * TILE_BYTES + q * 64 + n * 4 + t] =
                                    digit as u8;
                            }
                        }
                    }
                }
            });
        AmxWeight {
            d_in,
            d_out,
            digits,
            steps,
            planes,
        }
    }

    /// Digits per entry.
    pub fn digits(&self) -> usize {
        self.digits
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.planes.bytes().len()
    }
}

/// `x (rows × d_in) · W_int` modulo `2^64` on AMX, from the weight's digits: the same bits as
/// [`int_matmul`](crate::ring::int_matmul).
///
/// # Panics
///
/// If `x` is not `rows × d_in`.
pub fn amx_matmul(x: &[u64], rows: usize, a: &AmxWeight) -> Vec<u64> {
    assert_eq!(x.len(), rows * a.d_in, "lhs shape");
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // An `AmxWeight` exists only where `available()` held.
        let groups: Vec<Vec<u64>> = {
            let planes = row_digits(x, rows, a);
            (0..a.d_out.div_ceil(LANES))
                .into_par_iter()
                .map(|g| {
                    let mut out = vec![0u64; rows * LANES];
                    // SAFETY: the CPU has AMX, granted, and the features `available` checks.
                    unsafe { group(a, planes.bytes(), rows, g, &mut out) };
                    out
                })
                .collect()
        };
        let mut y = vec![0u64; rows * a.d_out];
        for (g, part) in groups.iter().enumerate() {
            let (j0, width) = (g * LANES, LANES.min(a.d_out - g * LANES));
            for r in 0..rows {
                y[r * a.d_out + j0..][..width].copy_from_slice(&part[r * LANES..][..width]);
            }
        }
        y
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    unreachable!("no AmxWeight off x86-64 Linux")
}

/// The rows' byte digits as AMX's left operands: per pair of rows and step, one tile whose
/// row `8 h + l` holds byte `l` of `x[2 p + h][64 s ..]`; the pairs rounded up to an even
/// number (the kernel takes two at a time), zero past the rows and inputs.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn row_digits(x: &[u64], rows: usize, a: &AmxWeight) -> Lines {
    let d_in = a.d_in;
    let pair_bytes = a.steps * TILE_BYTES;
    let mut planes = Lines::zeroed(rows.div_ceil(4) * 2 * pair_bytes);
    planes
        .bytes_mut()
        .par_chunks_mut(pair_bytes)
        .zip(x.par_chunks(2 * d_in))
        .for_each(|(tiles, two)| {
            let mut bytes = [0u8; 8 * INT_BLOCK];
            for (h, row) in two.chunks_exact(d_in).enumerate() {
                for (b, block) in row.chunks_exact(INT_BLOCK).enumerate() {
                    // SAFETY: `available` checked AVX-512 F, BW and VBMI.
                    unsafe { byte_planes(block.try_into().expect("block"), &mut bytes) };
                    let (s, half) = (b * INT_BLOCK / STEP, b * INT_BLOCK % STEP);
                    for (l, plane) in bytes.chunks_exact(INT_BLOCK).enumerate() {
                        let at = s * TILE_BYTES + (8 * h + l) * 64 + half;
                        tiles[at..at + INT_BLOCK].copy_from_slice(plane);
                    }
                }
            }
        });
    planes
}

/// The eight byte planes of 32 values: `out[32 l + i]` is byte `l` (`2^(8 l)`) of `x[i]`. One
/// byte permute takes 8 values to 8 lanes of one byte each, and two rounds of 64-bit permutes
/// put each plane's four 8-byte pieces together.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) fn byte_planes(x: &[u64; INT_BLOCK], out: &mut [u8; 8 * INT_BLOCK]) {
    use std::arch::x86_64::*;
    // Byte `8 l + c` of the result is byte `l` of value `c`.
    let gather: [u8; 64] = std::array::from_fn(|p| ((p % 8) * 8 + p / 8) as u8);
    // SAFETY: every load reads 64 bytes of `gather` or of `x` (8 values at 8 c, c < 4), every
    // store writes 64 bytes of `out` at 64 k, k < 4.
    unsafe {
        let gather = _mm512_loadu_si512(gather.as_ptr().cast());
        let p: [__m512i; 4] = std::array::from_fn(|c| {
            _mm512_permutexvar_epi8(gather, _mm512_loadu_si512(x.as_ptr().add(8 * c).cast()))
        });
        // Lane l of p[c] is plane l's piece c: pair the pieces of p[0], p[1] and of p[2], p[3],
        // then put the four pieces of each plane side by side, two planes a register.
        let lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
        let hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
        let (a, b) = (
            _mm512_permutex2var_epi64(p[0], lo, p[1]),
            _mm512_permutex2var_epi64(p[0], hi, p[1]),
        );
        let (c, d) = (
            _mm512_permutex2var_epi64(p[2], lo, p[3]),
            _mm512_permutex2var_epi64(p[2], hi, p[3]),
        );
        let first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
        let second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
        let planes = [
            _mm512_permutex2var_epi64(a, first, c),
            _mm512_permutex2var_epi64(a, second, c),
            _mm512_permutex2var_epi64(b, first, d),
            _mm512_permutex2var_epi64(b, second, d),
        ];
        for (k, v) in planes.into_iter().enumerate() {
            _mm512_storeu_si512(out.as_mut_ptr().add(64 * k).cast(), v);
        }
    }
}

/// Palette 1, all eight tiles 16 rows of 64 bytes (here: 0–3 the 32-bit sums, 4–5 two pairs
/// of rows' digits, 6–7 two of the weight's digits).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
static TILES: Line = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    Line(c)
};

/// Loads [`TILES`] into this thread's tile configuration, until the guard is dropped.
///
/// # Safety
///
/// The CPU has AMX-TILE and Linux granted this process the tile state ([`amx_granted`]).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) unsafe fn configure_tiles() -> Tiles {
    // SAFETY: the caller's promise.
    unsafe { load_tiles(&TILES) }
}

/// Loads `config` (a palette-1 tile configuration) into this thread's tile configuration;
/// the guard releases the tiles when dropped, on every way out, a panic's included (a thread
/// holding tile state saves 8 KiB more at each switch).
///
/// # Safety
///
/// The CPU has AMX-TILE, Linux granted this process the tile state ([`amx_granted`]), and
/// `config` is valid for palette 1.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) unsafe fn load_tiles(config: &Line) -> Tiles {
    // SAFETY: the caller's promise.
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
    Tiles(())
}

/// This thread's tiles, configured ([`load_tiles`]); released when dropped.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) struct Tiles(());

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: made only by `load_tiles`, so the CPU has AMX-TILE and the state was
        // granted; `tilerelease` touches nothing else.
        unsafe { std::arch::asm!("tilerelease", options(nostack)) };
    }
}

/// Zeroes tiles 0–3 (the sums).
///
/// # Safety
///
/// The tiles are configured ([`configure_tiles`]).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) unsafe fn zero_sum_tiles() {
    // SAFETY: the caller's promise.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        )
    };
}

/// One group of 16 columns for every row, four rows (two pairs) at a time: per two of the
/// weight's digits `m`, the products of each pair's tile (its rows' eight digits `l`, one per
/// tile row) with each digit's tile sum over every step in tiles 0–3 (2 × 2 blocking: the
/// pairs' tiles in 4–5, the digits' in 6–7). Row `8 h + l` of a sum is `Σ_i x_l · w_m` for row
/// `h` of its pair, exact in 32 bits for up to 65792 inputs (`255 · 128` a product), and goes
/// to its row's 64-bit sum at place `l + m` (nothing from places of 8 and up, which vanish
/// modulo 2^64).
///
/// # Safety
///
/// The CPU has AMX, Linux granted it, and `available` held.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group(a: &AmxWeight, rows_digits: &[u8], rows: usize, g: usize, out: &mut [u64]) {
    use std::arch::asm;
    #[repr(C, align(64))]
    struct Sums([i32; 4 * 256]);
    let (digits, steps) = (a.digits, a.steps);
    let group_bytes = steps * digits.next_multiple_of(2) * TILE_BYTES;
    let weight = &a.planes.bytes()[g * group_bytes..][..group_bytes];
    let mut sums = Sums([0; 4 * 256]);
    // SAFETY: the caller's promise.
    let _tiles = unsafe { configure_tiles() };
    for quad in 0..rows.div_ceil(4) {
        let left = &rows_digits[2 * quad * steps * TILE_BYTES..][..2 * steps * TILE_BYTES];
        let mut acc = [[0u64; LANES]; 4];
        for m0 in (0..digits).step_by(2) {
            for first in (0..steps).step_by(CHUNK_STEPS) {
                // SAFETY: the configuration is loaded.
                unsafe { zero_sum_tiles() };
                for s in first..steps.min(first + CHUNK_STEPS) {
                    let p0 = left[s * TILE_BYTES..].as_ptr();
                    let p1 = left[(steps + s) * TILE_BYTES..].as_ptr();
                    let w0 =
                        weight[weight_tile(steps, s, m0) * TILE_BYTES..][..2 * TILE_BYTES].as_ptr();
                    // SAFETY: every load reads one whole tile of `left` (2 × steps tiles) or of
                    // `weight` (digits m0 and m0 + 1 of step s, side by side).
                    unsafe {
                        asm!(
                            "tileloadd tmm4, [{p0} + {s}*1]",
                            "tileloadd tmm6, [{w0} + {s}*1]",
                            "tdpbusd tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{w0} + {s}*1 + 1024]",
                            "tdpbusd tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{p1} + {s}*1]",
                            "tdpbusd tmm2, tmm5, tmm6",
                            "tdpbusd tmm3, tmm5, tmm7",
                            p0 = in(reg) p0,
                            p1 = in(reg) p1,
                            w0 = in(reg) w0,
                            s = in(reg) 64usize,
                            options(nostack)
                        );
                    }
                }
                // SAFETY: four tiles of 16 rows of 64 bytes at 1024 c within `sums`.
                unsafe {
                    asm!(
                        "tilestored [{p} + {s}*1], tmm0",
                        "tilestored [{p} + {s}*1 + 1024], tmm1",
                        "tilestored [{p} + {s}*1 + 2048], tmm2",
                        "tilestored [{p} + {s}*1 + 3072], tmm3",
                        p = in(reg) sums.0.as_mut_ptr(),
                        s = in(reg) 64usize,
                        options(nostack)
                    )
                };
                // Tile 2 p + t: pair p of the four rows, digit m0 + t.
                for (c, tile) in sums.0.chunks_exact(256).enumerate() {
                    let (pair, m) = (c / 2, m0 + c % 2);
                    if m >= digits {
                        continue;
                    }
                    for h in 0..2 {
                        let acc = &mut acc[2 * pair + h];
                        for l in 0..8 - m {
                            let place = 8 * (l + m) as u32;
                            for (o, &v) in acc.iter_mut().zip(&tile[(8 * h + l) * LANES..][..LANES])
                            {
                                *o = o.wrapping_add((i64::from(v) as u64) << place);
                            }
                        }
                    }
                }
            }
        }
        for (k, acc) in acc.iter().enumerate() {
            let r = 4 * quad + k;
            if r < rows {
                out[r * LANES..(r + 1) * LANES].copy_from_slice(acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{INT_BLOCK, IntKernel, int_matmul, int_matmul_with};
    use rand::{Rng, SeedableRng};

    /// A weight whose entries span about `bits` bits (scales and minimums of that size).
    fn weight(rng: &mut impl Rng, d_in: usize, d_out: usize, bits: u32) -> IntWeight {
        let blocks = d_in / INT_BLOCK * d_out;
        let half = 1i64 << (bits - 9).min(62);
        let span = |rng: &mut dyn rand::RngCore| rng.random_range(-half..half) as u64;
        IntWeight {
            d_in,
            d_out,
            codes: (0..d_in * d_out).map(|_| rng.random()).collect(),
            scales: (0..blocks).map(|_| span(rng)).collect(),
            mins: (0..blocks).map(|_| span(rng)).collect(),
            shift: 18,
            gain: None,
        }
    }

    #[test]
    fn balanced_digits_make_the_value_again_with_as_few_as_it_takes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let cases = [
            0i64,
            1,
            -1,
            127,
            128,
            -128,
            -129,
            32767,
            -32768,
            i64::MAX,
            i64::MIN,
        ];
        for v in cases
            .into_iter()
            .chain((0..2000).map(|_| rng.random::<i64>() >> rng.random_range(0..63)))
        {
            let (d, n) = signed_digits(v);
            let back = d[..n]
                .iter()
                .rev()
                .fold(0i128, |a, &dm| a * 256 + i128::from(dm));
            if n < 8 {
                assert_eq!(back, i128::from(v), "{v}");
                // One digit fewer would not do: n - 1 balanced digits span [-128 R, 127 R],
                // R = (256^(n-1) - 1) / 255.
                let r = ((1i128 << (8 * (n - 1))) - 1) / 255;
                assert!(
                    n == 1 || !(-128 * r..=127 * r).contains(&i128::from(v)),
                    "{v} in {n}"
                );
            } else {
                assert_eq!(back as u64 as i64, v, "{v} modulo 2^64");
            }
        }
        assert_eq!(signed_digits(0).1, 1);
        assert_eq!(signed_digits(127).1, 1);
        assert_eq!(signed_digits(128).1, 2);
        assert_eq!(signed_digits(-128).1, 1);
        assert_eq!(signed_digits(-129).1, 2);
    }

    #[test]
    fn the_amx_product_is_the_product_mod_2_64() {
        if !available() {
            assert!(
                AmxWeight::new(&weight(
                    &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
                    32,
                    16,
                    24
                ))
                .is_none()
            );
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        // Ragged rows (a tile holds 16), a last step of 32 inputs, ragged columns, entries of
        // 24 bits (four digits, as the fetched models) and of 64 (eight), rows of every size.
        for (rows, d_in, d_out, bits, digits) in [
            (1, 64, 16, 24, 3..=4),
            (2, 64, 48, 24, 3..=4),
            (6, 32, 16, 20, 3..=3),
            (17, 96, 40, 20, 3..=3),
            (33, 576, 64, 27, 4..=4),
            (16, 32, 7, 64, 8..=8),
            (0, 64, 32, 24, 3..=4),
            (20, 8224, 16, 64, 8..=8),
        ] {
            let w = weight(&mut rng, d_in, d_out, bits);
            let a = AmxWeight::new(&w).expect("available");
            assert!(
                digits.contains(&a.digits()),
                "{} digits for {bits} bits",
                a.digits()
            );
            let xs: [Vec<u64>; 3] = [
                (0..rows * d_in).map(|_| rng.random()).collect(),
                vec![u64::MAX; rows * d_in],
                (0..rows * d_in)
                    .map(|i| [u64::MAX, 0, 1 << 63, 1][i % 4])
                    .collect(),
            ];
            for x in &xs {
                let want = int_matmul_with(IntKernel::Portable, x, rows, &w);
                assert_eq!(
                    amx_matmul(x, rows, &a),
                    want,
                    "{rows} x {d_in} x {d_out}, {bits} bits"
                );
            }
        }
        // Codes held four bits each (a Q4_1 tensor's) make the same digits.
        let mut w = weight(&mut rng, 96, 40, 24);
        w.codes = w.codes.unpacked().iter().map(|q| q & 15).collect();
        assert!(w.codes.packed());
        let a = AmxWeight::new(&w).expect("available");
        let x: Vec<u64> = (0..3 * 96).map(|_| rng.random()).collect();
        assert_eq!(
            amx_matmul(&x, 3, &a),
            int_matmul_with(IntKernel::Portable, &x, 3, &w)
        );
    }

    #[test]
    fn sums_past_32_bits_go_to_64_bits_in_chunks() {
        // Every entry's eight digits at -128 (`W_int = -128 · Σ_m 2^(8 m)`) against rows of
        // bytes 255: one digit product is -32640, and over 65824 inputs (1029 steps, past a
        // chunk of 1024) a sum of them leaves 32 bits, so the sums must go to 64 bits in
        // chunks.
        if !available() {
            return;
        }
        let (rows, d_in, d_out): (usize, usize, usize) = (4, 65824, 16);
        assert!(d_in.div_ceil(STEP) > CHUNK_STEPS && 32640 * d_in as i64 > i64::from(i32::MAX));
        let blocks = d_in / INT_BLOCK * d_out;
        let w = IntWeight {
            d_in,
            d_out,
            codes: vec![255; d_in * d_out].into(),
            scales: vec![0; blocks].into(),
            mins: vec![0x7f7f_7f7f_7f7f_7f80; blocks].into(),
            shift: 0,
            gain: None,
        };
        let a = AmxWeight::new(&w).expect("available");
        assert_eq!(a.digits(), 8);
        // Every entry's eight digits are -128; the last step's 32 inputs past `d_in` are zero.
        let bytes = a.planes.bytes();
        assert!(bytes.iter().all(|&d| d == 0x80 || d == 0));
        assert_eq!(
            bytes.iter().filter(|&&d| d == 0x80).count(),
            8 * d_in * d_out
        );
        let x = vec![u64::MAX; rows * d_in];
        assert_eq!(amx_matmul(&x, rows, &a), int_matmul(&x, rows, &w));
    }

    #[test]
    fn the_digit_count_covers_both_ends_of_every_block() {
        if !available() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (d_in, d_out) = (64, 16);
        let blocks = d_in / INT_BLOCK * d_out;
        let base = weight(&mut rng, d_in, d_out, 12);
        // The minimum sets the count: the code-255 end is 32 (one digit), the code-0 end
        // 2^29 (four); counting the code-255 end alone would drop three digits of most entries.
        let by_min = IntWeight {
            scales: vec![(-2_105_376i64) as u64; blocks].into(),
            mins: vec![1 << 29; blocks].into(),
            ..base.clone()
        };
        // `255 D + M` leaves 64 bits: eight digits, exact modulo 2^64.
        let wrapping = IntWeight {
            scales: vec![1 << 62; blocks].into(),
            mins: vec![(-1i64 << 62) as u64; blocks].into(),
            ..base.clone()
        };
        for (w, digits) in [(&by_min, 4), (&wrapping, 8)] {
            let a = AmxWeight::new(w).expect("available");
            assert_eq!(a.digits(), digits);
            let x: Vec<u64> = (0..3 * d_in).map(|_| rng.random()).collect();
            assert_eq!(amx_matmul(&x, 3, &a), int_matmul(&x, 3, w));
        }
        // A malformed weight has no digits.
        assert!(AmxWeight::new(&IntWeight { d_in: 48, ..base }).is_none());
    }
}
