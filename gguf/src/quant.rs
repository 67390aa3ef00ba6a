//! Tensor types and their block layouts, with dequantizers for the types our models use.
//!
//! Every known GGML type is listed so that sizes of any file can be validated; dequantizers exist
//! for F32, F16, BF16, Q8_0 and Q4_1. Adding a type means adding its block decoder here.

use half::{bf16, f16};

use crate::GgufError;

/// A GGML tensor type, by its on-disk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
}

impl GgmlType {
    /// The type for an on-disk code, or `None` if the code is unknown.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }

    /// Bytes that `n_elems` elements take, or `None` if `n_elems` is not a whole number of blocks
    /// or the size overflows.
    pub fn bytes_for(self, n_elems: u64) -> Option<u64> {
        if !n_elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n_elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// GGML's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Q8K => "Q8_K",
            Self::BF16 => "BF16",
        }
    }

    /// Whether [`dequantize`] can decode this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_1
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes `bytes` (a whole number of blocks of `ty`) into f32 values, in storage order.
///
/// `name` only labels errors.
pub fn dequantize(name: &str, ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, GgufError> {
    let bad = |reason: String| GgufError::BadTensor {
        tensor: name.to_string(),
        reason,
    };
    let bb = ty.block_bytes() as usize;
    if !bytes.len().is_multiple_of(bb) {
        return Err(bad(format!(
            "{} bytes is not a whole number of {ty} blocks",
            bytes.len()
        )));
    }
    let n = bytes.len() / bb * ty.block_elems() as usize;
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| half_at(c, 0))),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = half_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_1 => {
            for block in bytes.chunks_exact(20) {
                let d = half_at(block, 0);
                let m = half_at(block, 2);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        other => {
            return Err(GgufError::UnsupportedType {
                tensor: name.to_string(),
                ty: other.name().to_string(),
            });
        }
    }
    Ok(out)
}

/// `bits` (an f16) as `mantissa · 2^exponent` with an odd mantissa (or 0), exactly; `None` for
/// infinities and NaNs.
fn f16_exact(bits: u16) -> Option<(i64, i32)> {
    let sign = if bits & 0x8000 != 0 { -1 } else { 1 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = i64::from(bits & 0x03ff);
    let (mut m, mut e) = match exp {
        0x1f => return None,
        0 => (frac, -24),
        _ => (frac | 0x0400, exp - 25),
    };
    if m == 0 {
        return Some((0, 0));
    }
    while m & 1 == 0 {
        m >>= 1;
        e += 1;
    }
    Some((sign * m, e))
}

/// A block-quantized tensor in exact integers: value `i` of block `b` is
/// `(scales[b] · codes[i] + mins[b]) · 2^-shift`, with no rounding anywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct IntBlocks {
    /// One unsigned code per value, in storage order.
    pub codes: Vec<u8>,
    /// Per block of 32 values.
    pub scales: Vec<i64>,
    pub mins: Vec<i64>,
    pub shift: u32,
}

/// The f16 fields of every block of `ty`: (scale, minimum) bits; Q8_0 has no minimum, its
/// codes are made unsigned by an offset of 128 carried by the minimum instead.
fn block_fields(
    name: &str,
    ty: GgmlType,
    bytes: &[u8],
) -> Result<Vec<(u16, Option<u16>)>, GgufError> {
    let bb = ty.block_bytes() as usize;
    if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
        return Err(GgufError::UnsupportedType {
            tensor: name.to_string(),
            ty: format!("{ty} (the integer mode reads Q4_1 and Q8_0)"),
        });
    }
    if !bytes.len().is_multiple_of(bb) {
        return Err(GgufError::BadTensor {
            tensor: name.to_string(),
            reason: format!("{} bytes is not a whole number of {ty} blocks", bytes.len()),
        });
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    Ok(bytes
        .chunks_exact(bb)
        .map(|b| match ty {
            GgmlType::Q4_1 => (u16_at(b, 0), Some(u16_at(b, 2))),
            _ => (u16_at(b, 0), None),
        })
        .collect())
}

/// The smallest `s` for which every block scale and minimum of the tensor times `2^s` is an
/// integer (Q4_1 and Q8_0).
pub fn exact_shift(name: &str, ty: GgmlType, bytes: &[u8]) -> Result<u32, GgufError> {
    let mut shift = 0i32;
    for (d, m) in block_fields(name, ty, bytes)? {
        for bits in std::iter::once(d).chain(m) {
            let (_, e) = f16_exact(bits).ok_or_else(|| GgufError::BadTensor {
                tensor: name.to_string(),
                reason: "a block scale is infinite or NaN".into(),
            })?;
            shift = shift.max(-e);
        }
    }
    Ok(shift as u32)
}

/// The exact integer form of a Q4_1 or Q8_0 tensor at `shift` (at least its [`exact_shift`]).
pub fn integer_blocks(
    name: &str,
    ty: GgmlType,
    bytes: &[u8],
    shift: u32,
) -> Result<IntBlocks, GgufError> {
    let fields = block_fields(name, ty, bytes)?;
    let bad = |reason: &str| GgufError::BadTensor {
        tensor: name.to_string(),
        reason: reason.into(),
    };
    // value · 2^shift as an integer; the exponent after shifting is at most 15 + 62.
    let int = |bits: u16| -> Result<i64, GgufError> {
        let (m, e) = f16_exact(bits).ok_or_else(|| bad("a block scale is infinite or NaN"))?;
        let e = e + shift as i32;
        if e < 0 {
            return Err(bad("a block scale is not an integer at this shift"));
        }
        m.checked_shl(e as u32)
            .filter(|v| v >> e == m)
            .ok_or_else(|| bad("a block scale overflows 64 bits at this shift"))
    };
    let mut out = IntBlocks {
        codes: Vec::with_capacity(fields.len() * 32),
        scales: Vec::with_capacity(fields.len()),
        mins: Vec::with_capacity(fields.len()),
        shift,
    };
    let bb = ty.block_bytes() as usize;
    for (block, (d, m)) in bytes.chunks_exact(bb).zip(fields) {
        let d = int(d)?;
        match (ty, m) {
            (GgmlType::Q4_1, Some(m)) => {
                let qs = &block[4..];
                out.codes.extend(qs.iter().map(|&q| q & 0x0f));
                out.codes.extend(qs.iter().map(|&q| q >> 4));
                out.mins.push(int(m)?);
            }
            _ => {
                // d·q = d·(q + 128) − 128·d, with q + 128 in 0..=255.
                out.codes
                    .extend(block[2..].iter().map(|&q| (q as i8 as i16 + 128) as u8));
                out.mins.push(
                    d.checked_mul(-128)
                        .ok_or_else(|| bad("a block scale overflows"))?,
                );
            }
        }
        out.scales.push(d);
    }
    Ok(out)
}

/// Quantizes to Q8_0 the way GGML does (scale = max|x| / 127, round to nearest).
///
/// `values.len()` must be a multiple of 32.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let d = amax / 127.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| (x * inv).round() as i8 as u8));
    }
    out
}

/// Quantizes to Q4_1 the way GGML does (min and scale per block of 32, 4-bit codes).
///
/// `values.len()` must be a multiple of 32.
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for block in values.chunks(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let code = |x: f32| (((x - min) * inv + 0.5) as u8).min(15);
        for j in 0..16 {
            out.push(code(block[j]) | (code(block[j + 16]) << 4));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the f16 fields and codes of a block the slow way and rebuilds each value in f64.
    fn exact_values(ty: GgmlType, bytes: &[u8]) -> Vec<f64> {
        let h = |b: &[u8], i: usize| f64::from(f16::from_le_bytes([b[i], b[i + 1]]).to_f32());
        let mut out = Vec::new();
        for b in bytes.chunks_exact(ty.block_bytes() as usize) {
            match ty {
                GgmlType::Q4_1 => {
                    out.extend(
                        b[4..]
                            .iter()
                            .map(|&q| h(b, 0) * f64::from(q & 15) + h(b, 2)),
                    );
                    out.extend(
                        b[4..]
                            .iter()
                            .map(|&q| h(b, 0) * f64::from(q >> 4) + h(b, 2)),
                    );
                }
                _ => out.extend(b[2..].iter().map(|&q| h(b, 0) * f64::from(q as i8))),
            }
        }
        out
    }

    #[test]
    fn integer_blocks_are_the_values_exactly_at_the_smallest_shift() {
        let values: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
        for (ty, bytes) in [
            (GgmlType::Q4_1, quantize_q4_1(&values)),
            (GgmlType::Q8_0, quantize_q8_0(&values)),
        ] {
            let s = exact_shift("t", ty, &bytes).unwrap();
            let ib = integer_blocks("t", ty, &bytes, s).unwrap();
            let scale = 2f64.powi(-(s as i32));
            for (i, want) in exact_values(ty, &bytes).into_iter().enumerate() {
                let b = i / 32;
                let int = ib.scales[b] * i64::from(ib.codes[i]) + ib.mins[b];
                assert_eq!(int as f64 * scale, want, "{ty} value {i}");
            }
            assert!(s > 0, "these scales are fractions");
            assert!(
                integer_blocks("t", ty, &bytes, s - 1).is_err(),
                "{ty}: {s} is not the smallest"
            );
            assert!(integer_blocks("t", ty, &bytes, s + 3).is_ok());
        }
    }

    #[test]
    fn special_scales_and_other_types_are_refused() {
        let mut bytes = quantize_q8_0(&[1.0; 32]);
        bytes[..2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        assert!(exact_shift("t", GgmlType::Q8_0, &bytes).is_err());
        assert!(exact_shift("t", GgmlType::F32, &[0; 8]).is_err());
        assert!(exact_shift("t", GgmlType::Q4_1, &[0; 7]).is_err());
        assert_eq!(f16_exact(f16::from_f32(0.75).to_bits()), Some((3, -2)));
        assert_eq!(f16_exact(f16::from_f32(-6.0).to_bits()), Some((-3, 1)));
        assert_eq!(f16_exact(1), Some((1, -24)));
    }
}
