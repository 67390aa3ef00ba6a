//! [`int_matmul`](super::int_matmul)'s full tiles on AMX's 8-bit tile product, for products of
//! many rows (a prefill's, or a stage's batch of sessions).
//!
//! The vector kernel spends most of a many-row tile on the pair dots `S_l = Σ_i d_l(x_i) q_i`
//! (one `vpdpwssd` per 16-bit digit, 16 columns and input pair) and the rest on each block's
//! `D·T + M·Σx`. Here `tdpbusd` takes the pair dots: one instruction sums a block's 32 inputs for
//! two rows' eight byte digits (16 tile rows) and 16 columns of codes. Each byte-digit sum is
//! below `32 · 255 · 128 < 2^21`, exact in 32 bits; two neighbours make a 16-bit digit's sum,
//! `S_l = C_2l + 2^8 C_2l+1`, and the block ends in the vector kernel's own narrow epilogue
//! ([`vnni_finish_narrow!`]), so both kernels give the same bits.
//!
//! The right operand is signed: codes below 16 (Q4_1) go in as they are; byte codes (Q8_0's,
//! offset by 128) go in less 128, and the block's `T` gets `128 · Σx` back before the epilogue.
//! The codes are reordered into tiles block by block (one tile per 16 columns, used by every
//! pair of rows), so the weight is held once, as the vector kernels hold it.

use std::arch::asm;
use std::arch::x86_64::*;

use super::{
    INT_BLOCK, Operands, PAIR_BLOCK, PAIRS, TILE, VNNI_V, block_index, code_index, split_sum,
};
use crate::amx::{Line, Lines, byte_planes, load_tiles};

/// Column groups of 16 in a tile: one code tile and one sum tile each.
const GROUPS: usize = TILE / 16;

/// Bytes of a block's code tiles: per group 8 rows (four inputs each) of 64 bytes.
const CODE_TILES: usize = GROUPS * 512;

/// Palette 1: tiles 0–1 a block's codes for two groups (8 rows of 64 bytes: 32 inputs by 16
/// columns), tiles 2–3 two pairs of rows' digits (16 rows of 32 bytes), tiles 4–7 the sums (16
/// rows of 16 columns in 32 bits).
static CODES_TILES: Line = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        let (rows, bytes) = match t {
            0..=1 => (8, 64),
            2..=3 => (16, 32),
            _ => (16, 64),
        };
        c[16 + 2 * t] = bytes;
        c[48 + t] = rows;
        t += 1;
    }
    Line(c)
};

/// The rows' byte digits as the tile product's left operands: per pair of rows and block a
/// [`PAIR_BLOCK`], `[pairs][d_in / 32]`, in whole quads of rows (the kernel takes two pairs at a
/// time), zero past the rows.
///
/// # Safety
///
/// The CPU has AVX-512F, BW and VBMI.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(super) fn row_planes(x: &[u64], rows: usize, d_in: usize) -> Lines {
    let nb = d_in / INT_BLOCK;
    let mut planes = Lines::zeroed(rows.div_ceil(4) * 2 * nb * PAIR_BLOCK);
    let bytes = planes.bytes_mut();
    for (r, row) in x.chunks_exact(d_in).enumerate() {
        for (b, block) in row.chunks_exact(INT_BLOCK).enumerate() {
            let at = ((r / 2) * nb + b) * PAIR_BLOCK + (r % 2) * (PAIR_BLOCK / 2);
            let out = (&mut bytes[at..at + PAIR_BLOCK / 2])
                .try_into()
                .expect("half");
            byte_planes(block.try_into().expect("block"), out);
        }
    }
    planes
}

/// A block's codes of one tile from code `k0` on (its first pair row, [`code_index`]'s order) as
/// four tiles of the right operand: tile `g`, row `t`, lane `n` holds the codes of inputs
/// `4t .. 4t + 4` of column `16 g + n`, one byte each, signed (byte codes less 128).
#[target_feature(enable = "avx512f,avx512bw")]
fn code_tiles(codes: &super::Codes, k0: usize, out: &mut [Line; CODE_TILES / 64]) {
    let put = |out: &mut [Line; CODE_TILES / 64], g: usize, t: usize, row: __m512i| {
        // SAFETY: line `8 g + t` < 32 of `out`, 64 bytes.
        unsafe { _mm512_storeu_si512(out[8 * g + t].0.as_mut_ptr().cast(), row) }
    };
    match codes.packed_bytes() {
        // A pair row is one byte a column, its inputs the nibbles: widened to 32-bit lanes, each
        // nibble to its own byte, and the two pair rows of four inputs side by side.
        Some(packed) => {
            let rows = &packed[k0 / 2..][..PAIRS * TILE];
            let nibbles = |v: __m512i| {
                _mm512_or_si512(
                    _mm512_and_si512(v, _mm512_set1_epi32(15)),
                    _mm512_slli_epi32::<8>(_mm512_srli_epi32::<4>(v)),
                )
            };
            for t in 0..PAIRS / 2 {
                for g in 0..GROUPS {
                    // SAFETY: `rows` holds 16 pair rows of TILE bytes; these read 16 bytes at
                    // 16 g of pair rows 2 t and 2 t + 1.
                    let (lo, hi) = unsafe {
                        (
                            _mm_loadu_si128(rows[2 * t * TILE + 16 * g..].as_ptr().cast()),
                            _mm_loadu_si128(rows[(2 * t + 1) * TILE + 16 * g..].as_ptr().cast()),
                        )
                    };
                    let (lo, hi) = (
                        nibbles(_mm512_cvtepu8_epi32(lo)),
                        nibbles(_mm512_cvtepu8_epi32(hi)),
                    );
                    put(out, g, t, _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
                }
            }
        }
        // A byte a code: a pair row is two bytes a column.
        None => {
            let rows = &codes.bytes[k0..][..2 * PAIRS * TILE];
            let offset = _mm512_set1_epi32(0x8080_8080_u32 as i32);
            for t in 0..PAIRS / 2 {
                for g in 0..GROUPS {
                    // SAFETY: `rows` holds 16 pair rows of 2 TILE bytes; these read 32 bytes at
                    // 32 g of pair rows 2 t and 2 t + 1.
                    let (lo, hi) = unsafe {
                        (
                            _mm256_loadu_si256(rows[4 * t * TILE + 32 * g..].as_ptr().cast()),
                            _mm256_loadu_si256(rows[(4 * t + 2) * TILE + 32 * g..].as_ptr().cast()),
                        )
                    };
                    let row = _mm512_or_si512(
                        _mm512_cvtepu16_epi32(lo),
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                    );
                    put(out, g, t, _mm512_xor_si512(row, offset));
                }
            }
        }
    }
}

/// The sum tiles of one pair of rows: per group, 16 rows (row `8 h + l`: digit `l` of row `h`)
/// of 16 columns.
#[repr(C, align(64))]
struct Sums([[i32; 256]; GROUPS]);

/// A full tile of [`int_matmul`](super::int_matmul) for every row of `a`, on AMX, where the
/// scales `ds` and minimums `ms` are held 32 bits each; `planes` are the rows' [`row_planes`].
/// `OFFSET` where the codes went in less 128 (byte codes, not packed): then `T = T' + 128 · Σx`.
///
/// # Safety
///
/// The CPU has AMX-TILE and AMX-INT8, Linux granted this process the tile state, and the CPU has
/// AVX-512F, BW, DQ and VNNI ([`super::IntKernel::Amx`] is available).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
pub(super) unsafe fn tile_amx<const OFFSET: bool>(
    a: &Operands,
    planes: &[u8],
    j0: usize,
    out: &mut [u64],
    ds: &[i32],
    ms: &[i32],
) {
    let w = a.w;
    let (d_in, d_out, nb) = (w.d_in, w.d_out, a.nb);
    assert!(planes.len() >= a.rows.div_ceil(4) * 2 * nb * PAIR_BLOCK && out.len() >= a.rows * TILE);
    assert_eq!(
        OFFSET,
        !w.codes.packed(),
        "byte codes go in less 128, packed ones as they are"
    );
    let mut codes = [Line([0; 64]); CODE_TILES / 64];
    // Two quads' sums: quad `q`'s are stored while quad `q - 1`'s are finished.
    let mut sums = [
        [Sums([[0; 256]; GROUPS]), Sums([[0; 256]; GROUPS])],
        [Sums([[0; 256]; GROUPS]), Sums([[0; 256]; GROUPS])],
    ];
    let quads = a.rows.div_ceil(4);
    // SAFETY: the caller's promise; the configuration is valid for palette 1.
    let _tiles = unsafe { load_tiles(&CODES_TILES) };
    for b in 0..nb {
        let k0 = block_index(d_in, d_out, b, j0);
        let (d, m) = (&ds[k0..k0 + TILE], &ms[k0..k0 + TILE]);
        code_tiles(
            &w.codes,
            code_index(d_in, d_out, b * INT_BLOCK, j0),
            &mut codes,
        );
        // Quad `q`'s tile products (two pairs of rows, 2 × 2 blocking: two pairs' digits in
        // tiles 2–3, two groups' codes in 0–1, their four sums in 4–7), then quad `q - 1`'s
        // epilogue. No closures here: the compiler left them out of line, the sums passing
        // through memory.
        for q in 0..=quads {
            // Per half of the tile's groups: quad `q`'s tile products of that half, then the
            // epilogue of one pair of quad `q - 1`, then the half's sums stored. (On the Xeon
            // measured, the tile products and the epilogue take about the sum of their times
            // alone in either order: they hardly overlap.)
            for half in 0..2 {
                let sums_at: [*mut i32; 2] = std::array::from_fn(|pair| {
                    sums[q % 2][pair].0[2 * half..].as_mut_ptr().cast::<i32>()
                });
                if q < quads && half == 0 {
                    let left = planes[(2 * q * nb + b) * PAIR_BLOCK..].as_ptr();
                    let right =
                        planes[((2 * q + 1) * nb + b) * PAIR_BLOCK..][..PAIR_BLOCK].as_ptr();
                    // SAFETY: two tiles of 16 rows of 32 bytes (a PAIR_BLOCK each, the second
                    // pair zero past the rows: `row_planes` makes whole quads); both halves
                    // use them.
                    unsafe {
                        asm!(
                            "tileloadd tmm2, [{left} + {s32}*1]",
                            "tileloadd tmm3, [{right} + {s32}*1]",
                            left = in(reg) left,
                            right = in(reg) right,
                            s32 = in(reg) 32usize,
                            options(nostack)
                        )
                    };
                }
                if q < quads {
                    // SAFETY: two tiles of 8 rows of 64 bytes from `codes` (lines 8 g).
                    unsafe {
                        asm!(
                            "tileloadd tmm0, [{codes} + {s64}*1]",
                            "tileloadd tmm1, [{codes} + {s64}*1 + 512]",
                            "tilezero tmm4",
                            "tilezero tmm5",
                            "tilezero tmm6",
                            "tilezero tmm7",
                            "tdpbusd tmm4, tmm2, tmm0",
                            "tdpbusd tmm5, tmm2, tmm1",
                            "tdpbusd tmm6, tmm3, tmm0",
                            "tdpbusd tmm7, tmm3, tmm1",
                            codes = in(reg) codes[16 * half..].as_ptr(),
                            s64 = in(reg) 64usize,
                            options(nostack)
                        )
                    };
                }
                if q > 0 {
                    let (pair, done) = (half, &sums[(q - 1) % 2][half]);
                    for h in 0..2 {
                        let r = 4 * (q - 1) + 2 * pair + h;
                        if r >= a.rows {
                            break;
                        }
                        let s = a.sums[r * nb + b];
                        // Where the codes went in less 128, `128 · s` split over the epilogue's
                        // three parts: `v = add0 + 2^16 add1 + 2^32 add2`, the first two small.
                        let mut add = [0i32; 4];
                        if OFFSET {
                            let (lo, hi) = split_sum(s.wrapping_mul(128));
                            let low = i64::from(lo as i16);
                            add = [low as i32, ((lo - low) >> 16) as i32, hi, 0];
                        }
                        // 16-bit digit l's sums from byte digits 2 l and 2 l + 1.
                        let mut acc = [[_mm512_setzero_si512(); VNNI_V]; 4];
                        for (l, acc) in acc.iter_mut().enumerate() {
                            let add = _mm512_set1_epi32(add[l]);
                            for (g, acc) in acc.iter_mut().enumerate() {
                                let row = &done.0[g][(8 * h + 2 * l) * 16..][..32];
                                // SAFETY: 16 values at 0 and at 16 of `row`.
                                let (lo, hi) = unsafe {
                                    (
                                        _mm512_loadu_si512(row.as_ptr().cast()),
                                        _mm512_loadu_si512(row[16..].as_ptr().cast()),
                                    )
                                };
                                *acc = _mm512_add_epi32(lo, _mm512_slli_epi32::<8>(hi));
                                if OFFSET {
                                    *acc = _mm512_add_epi32(*acc, add);
                                }
                            }
                        }
                        vnni_finish_narrow!(&acc, d, m, s, &mut out[r * TILE..(r + 1) * TILE]);
                    }
                }
                if q < quads {
                    // SAFETY: four tiles of 16 rows of 64 bytes into the two pairs' sums of
                    // groups 2 half and 2 half + 1 (1024 bytes a group).
                    unsafe {
                        asm!(
                            "tilestored [{first} + {s64}*1], tmm4",
                            "tilestored [{first} + {s64}*1 + 1024], tmm5",
                            "tilestored [{second} + {s64}*1], tmm6",
                            "tilestored [{second} + {s64}*1 + 1024], tmm7",
                            first = in(reg) sums_at[0],
                            second = in(reg) sums_at[1],
                            s64 = in(reg) 64usize,
                            options(nostack)
                        )
                    };
                }
            }
        }
    }
}
