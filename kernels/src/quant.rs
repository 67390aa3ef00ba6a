//! Products with block-quantized weights as GGUF stores them, for the unprotected engine's
//! decode: one token's row is read against the Q4_1 / Q8_0 blocks themselves (0.6 and 1.06
//! bytes per weight) instead of f32 copies (4 bytes), as llama.cpp's CPU kernels do.
//!
//! The activations stay f32 (llama.cpp rounds them to 8 bits first): a block's contribution is
//! `d · Σ qᵢxᵢ + m · Σ xᵢ` with the codes `qᵢ` converted to f32 exactly, so the only difference
//! from the dense f32 product is the order of the additions.

use rayon::prelude::*;

/// Values per GGUF Q4_1 / Q8_0 block.
pub const QUANT_BLOCK: usize = 32;

/// A quantized weight whose bytes do not match its shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("quantized weight: {0}")]
pub struct BadQuantWeight(pub String);

/// Consecutive output rows of one block type, each `d_in` values in `d_in / 32` blocks.
#[derive(Debug, Clone)]
enum Part {
    /// Value `i` of a block is `d · q + m`, `q` in `0..16`, two codes per byte (low nibbles are
    /// values 0..16 of the block, high nibbles 16..32).
    Q4_1 {
        rows: usize,
        d: Vec<f32>,
        m: Vec<f32>,
        qs: Vec<u8>,
    },
    /// Value `i` of a block is `d · q`, `q` a signed byte.
    Q8_0 {
        rows: usize,
        d: Vec<f32>,
        qs: Vec<i8>,
    },
}

impl Part {
    fn rows(&self) -> usize {
        match self {
            Part::Q4_1 { rows, .. } | Part::Q8_0 { rows, .. } => *rows,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Part::Q4_1 { d, m, qs, .. } => 4 * (d.len() + m.len()) + qs.len(),
            Part::Q8_0 { d, qs, .. } => 4 * d.len() + qs.len(),
        }
    }
}

/// The block types a [`QuantMatrix`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q4_1,
    Q8_0,
}

impl QuantType {
    /// Bytes of one stored block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_1 => 20,
            QuantType::Q8_0 => 34,
        }
    }
}

/// A `d_in × d_out` projection held as GGUF blocks: output row `j` is the `j`-th stored row of
/// its part (GGUF's `[ne0 = in, ne1 = out]` layout), parts laid side by side (a fused op), and an
/// optional gain on the input (a norm gain the dense copy folds into the weight).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    d_in: usize,
    d_out: usize,
    gain: Option<Vec<f32>>,
    parts: Vec<Part>,
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl QuantMatrix {
    /// An empty projection of `d_in` inputs; [`QuantMatrix::push`] adds its output rows.
    pub fn new(d_in: usize, gain: Option<Vec<f32>>) -> Result<Self, BadQuantWeight> {
        if d_in == 0 || !d_in.is_multiple_of(QUANT_BLOCK) {
            return Err(BadQuantWeight(format!(
                "input width {d_in} is not a positive multiple of {QUANT_BLOCK}"
            )));
        }
        if let Some(g) = &gain
            && g.len() != d_in
        {
            return Err(BadQuantWeight(format!(
                "a gain of {} values for {d_in} inputs",
                g.len()
            )));
        }
        Ok(Self {
            d_in,
            d_out: 0,
            gain,
            parts: Vec::new(),
        })
    }

    /// Appends `rows` output rows stored as `ty` blocks in `bytes` (as a GGUF tensor holds them).
    pub fn push(&mut self, ty: QuantType, rows: usize, bytes: &[u8]) -> Result<(), BadQuantWeight> {
        let nb = self.d_in / QUANT_BLOCK;
        let blocks = rows * nb;
        if bytes.len() != blocks * ty.block_bytes() {
            return Err(BadQuantWeight(format!(
                "{} bytes for {rows} rows of {} {ty:?} values",
                bytes.len(),
                self.d_in
            )));
        }
        let blocks_of = || bytes.chunks_exact(ty.block_bytes());
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        let part = match ty {
            QuantType::Q4_1 => {
                let d: Vec<f32> = blocks_of().map(|b| f16(b, 0)).collect();
                let m: Vec<f32> = blocks_of().map(|b| f16(b, 2)).collect();
                if !finite(&d) || !finite(&m) {
                    return Err(BadQuantWeight("a block scale is not finite".into()));
                }
                let qs = blocks_of().flat_map(|b| b[4..].iter().copied()).collect();
                Part::Q4_1 { rows, d, m, qs }
            }
            QuantType::Q8_0 => {
                let d: Vec<f32> = blocks_of().map(|b| f16(b, 0)).collect();
                if !finite(&d) {
                    return Err(BadQuantWeight("a block scale is not finite".into()));
                }
                let qs = blocks_of()
                    .flat_map(|b| b[2..].iter().map(|&q| q as i8))
                    .collect();
                Part::Q8_0 { rows, d, qs }
            }
        };
        self.d_out += rows;
        self.parts.push(part);
        Ok(())
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(Part::bytes).sum::<usize>()
            + self.gain.as_ref().map_or(0, |g| 4 * g.len())
    }

    /// `x · W` for `rows` row-major rows of `x`, row-major `rows × d_out`. Output rows are
    /// split between rayon's threads; every weight block is read once per call.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, BadQuantWeight> {
        if rows.checked_mul(self.d_in) != Some(x.len()) {
            return Err(BadQuantWeight(format!(
                "{} values are not rows of {}",
                x.len(),
                self.d_in
            )));
        }
        let nb = self.d_in / QUANT_BLOCK;
        // The gain applied once, and each block's input sum (the minimum's factor).
        let x: Vec<f32> = match &self.gain {
            Some(g) => x
                .chunks_exact(self.d_in)
                .flat_map(|r| r.iter().zip(g).map(|(v, g)| v * g))
                .collect(),
            None => x.to_vec(),
        };
        // Each block folded to 8 lanes (lane l: values l, l+8, l+16, l+24): the minimum's
        // factor, summed in the same vector as the codes' products.
        let sums: Vec<f32> = x
            .chunks_exact(QUANT_BLOCK)
            .flat_map(|b| {
                std::array::from_fn::<f32, 8, _>(|l| (b[l] + b[l + 8]) + (b[l + 16] + b[l + 24]))
            })
            .collect();
        // Output-major (`d_out × rows`) while computing, so threads own whole chunks.
        const CHUNK: usize = 64;
        let mut t = vec![0f32; self.d_out * rows];
        let mut j0 = 0;
        for part in &self.parts {
            let n = part.rows();
            t[j0 * rows..(j0 + n) * rows]
                .par_chunks_mut(CHUNK * rows)
                .enumerate()
                .for_each(|(c, out)| {
                    let first = c * CHUNK;
                    for (k, y) in out.chunks_exact_mut(rows).enumerate() {
                        let j = first + k;
                        for (r, y) in y.iter_mut().enumerate() {
                            let xr = &x[r * self.d_in..(r + 1) * self.d_in];
                            let sr = &sums[r * 8 * nb..(r + 1) * 8 * nb];
                            *y = dot_row(part, j, nb, xr, sr);
                        }
                    }
                });
            j0 += n;
        }
        if rows == 1 {
            return Ok(t);
        }
        let mut y = vec![0f32; rows * self.d_out];
        for (j, col) in t.chunks_exact(rows).enumerate() {
            for (r, v) in col.iter().enumerate() {
                y[r * self.d_out + j] = *v;
            }
        }
        Ok(y)
    }
}

/// Row `j` of `part` times `x` (`nb` blocks; `sums` each block folded to 8 lanes).
fn dot_row(part: &Part, j: usize, nb: usize, x: &[f32], sums: &[f32]) -> f32 {
    let blocks = j * nb..(j + 1) * nb;
    match part {
        Part::Q4_1 { d, m, qs, .. } => {
            let qs = &qs[blocks.start * 16..blocks.end * 16];
            let (d, m) = (&d[blocks.clone()], &m[blocks]);
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked); lengths are nb blocks each.
                return unsafe { simd::q4_1(qs, d, m, x, sums) };
            }
            portable::q4_1(qs, d, x) + portable::mins(m, sums)
        }
        Part::Q8_0 { d, qs, .. } => {
            let (qs, d) = (&qs[blocks.start * 32..blocks.end * 32], &d[blocks]);
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: as above.
                return unsafe { simd::q8_0(qs, d, x) };
            }
            portable::q8_0(qs, d, x)
        }
    }
}

/// The kernels' meaning, for CPUs without AVX2 and FMA.
mod portable {
    /// `Σ_b d[b] · Σ_i q[b][i] · x[32b + i]` over `d.len()` Q4_1 blocks (codes only).
    pub fn q4_1(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
        let blocks = qs.chunks_exact(16).zip(x.chunks_exact(32)).zip(d);
        blocks
            .map(|((q, xb), d)| {
                let s: f32 = (0..16)
                    .map(|i| f32::from(q[i] & 0x0f) * xb[i] + f32::from(q[i] >> 4) * xb[i + 16])
                    .sum();
                d * s
            })
            .sum()
    }

    /// `Σ_b m[b] · Σ_l sums[8b + l]`.
    pub fn mins(m: &[f32], sums: &[f32]) -> f32 {
        m.iter()
            .zip(sums.chunks_exact(8))
            .map(|(m, s)| m * s.iter().sum::<f32>())
            .sum()
    }

    /// `Σ_b d[b] · Σ_i q[b][i] · x[32b + i]` over `d.len()` Q8_0 blocks.
    pub fn q8_0(qs: &[i8], d: &[f32], x: &[f32]) -> f32 {
        let blocks = qs.chunks_exact(32).zip(x.chunks_exact(32)).zip(d);
        blocks
            .map(|((q, xb), d)| {
                d * q
                    .iter()
                    .zip(xb)
                    .map(|(&q, x)| f32::from(q) * x)
                    .sum::<f32>()
            })
            .sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `Σ_b d[b] · Σ_i q[b][i] · x[32b + i] + m[b] · Σ_l sums[8b + l]` over `d.len()` Q4_1
    /// blocks.
    ///
    /// # Safety
    /// AVX2 and FMA; `qs` holds 16 bytes, `m` one value, `x` 32 and `sums` 8 per block of `d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q4_1(qs: &[u8], d: &[f32], m: &[f32], x: &[f32], sums: &[f32]) -> f32 {
        let nb = d.len();
        assert!(qs.len() == nb * 16 && m.len() == nb && x.len() == nb * 32 && sums.len() == nb * 8);
        let low = _mm_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_ps();
        for (b, &db) in d.iter().enumerate() {
            // SAFETY: in bounds by the lengths above.
            unsafe {
                let q = _mm_loadu_si128(qs.as_ptr().add(16 * b) as *const __m128i);
                let xp = x.as_ptr().add(32 * b);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                let mut s = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp));
                s = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp.add(8)), s);
                s = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xp.add(16)), s);
                s = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp.add(24)), s);
                acc = _mm256_fmadd_ps(s, _mm256_set1_ps(db), acc);
                let xs = _mm256_loadu_ps(sums.as_ptr().add(8 * b));
                acc = _mm256_fmadd_ps(xs, _mm256_set1_ps(*m.get_unchecked(b)), acc);
            }
        }
        unsafe { hsum(acc) }
    }

    /// `Σ_b d[b] · Σ_i q[b][i] · x[32b + i]` over `d.len()` Q8_0 blocks.
    ///
    /// # Safety
    /// AVX2 and FMA; `qs` and `x` hold 32 values per block of `d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q8_0(qs: &[i8], d: &[f32], x: &[f32]) -> f32 {
        assert!(qs.len() == d.len() * 32 && x.len() == d.len() * 32);
        let mut acc = _mm256_setzero_ps();
        for (b, &db) in d.iter().enumerate() {
            // SAFETY: in bounds by the lengths above.
            unsafe {
                let qp = qs.as_ptr().add(32 * b);
                let xp = x.as_ptr().add(32 * b);
                let f = |k: usize| {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        qp.add(8 * k) as *const __m128i
                    )))
                };
                let mut s = _mm256_mul_ps(f(0), _mm256_loadu_ps(xp));
                s = _mm256_fmadd_ps(f(1), _mm256_loadu_ps(xp.add(8)), s);
                s = _mm256_fmadd_ps(f(2), _mm256_loadu_ps(xp.add(16)), s);
                s = _mm256_fmadd_ps(f(3), _mm256_loadu_ps(xp.add(24)), s);
                acc = _mm256_fmadd_ps(s, _mm256_set1_ps(db), acc);
            }
        }
        unsafe { hsum(acc) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random GGUF-layout blocks of `ty` for `rows × d_in`, and their dequantized values.
    fn blocks(ty: QuantType, rows: usize, d_in: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (mut bytes, mut dense) = (Vec::new(), Vec::new());
        for _ in 0..rows * d_in / QUANT_BLOCK {
            let d = half::f16::from_f32(rng.random_range(0.001..0.05));
            bytes.extend(d.to_le_bytes());
            let d = d.to_f32();
            match ty {
                QuantType::Q4_1 => {
                    let m = half::f16::from_f32(rng.random_range(-0.3..0.0));
                    bytes.extend(m.to_le_bytes());
                    let m = m.to_f32();
                    let qs: Vec<u8> = (0..16).map(|_| rng.random()).collect();
                    dense.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                    dense.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
                    bytes.extend(qs);
                }
                QuantType::Q8_0 => {
                    let qs: Vec<i8> = (0..32).map(|_| rng.random()).collect();
                    dense.extend(qs.iter().map(|&q| d * f32::from(q)));
                    bytes.extend(qs.iter().map(|&q| q as u8));
                }
            }
        }
        (bytes, dense)
    }

    #[test]
    fn the_block_product_equals_the_dense_product_of_the_dequantized_weight() {
        let (d_in, r1, r2) = (96, 70, 133);
        let (b1, w1) = blocks(QuantType::Q4_1, r1, d_in, 1);
        let (b2, w2) = blocks(QuantType::Q8_0, r2, d_in, 2);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let gain: Vec<f32> = (0..d_in).map(|_| rng.random_range(0.5..2.0)).collect();
        let mut q = QuantMatrix::new(d_in, Some(gain.clone())).unwrap();
        q.push(QuantType::Q4_1, r1, &b1).unwrap();
        q.push(QuantType::Q8_0, r2, &b2).unwrap();
        assert_eq!((q.d_in(), q.d_out()), (d_in, r1 + r2));
        for rows in [1, 3] {
            let x: Vec<f32> = (0..rows * d_in)
                .map(|_| rng.random_range(-4.0..4.0))
                .collect();
            let y = q.matmul(&x, rows).unwrap();
            assert_eq!(y.len(), rows * (r1 + r2));
            for r in 0..rows {
                for (j, w) in w1
                    .chunks_exact(d_in)
                    .chain(w2.chunks_exact(d_in))
                    .enumerate()
                {
                    let want: f64 = (0..d_in)
                        .map(|i| f64::from(x[r * d_in + i] * gain[i]) * f64::from(w[i]))
                        .sum();
                    let got = y[r * (r1 + r2) + j];
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "row {r} out {j}: {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_simd_kernels_compute_the_portable_ones() {
        if !simd::available() {
            eprintln!("no AVX2/FMA here: only the portable kernels run");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let nb = 9;
        let x: Vec<f32> = (0..32 * nb).map(|_| rng.random_range(-1.0..1.0)).collect();
        let d: Vec<f32> = (0..nb).map(|_| rng.random_range(0.001..0.1)).collect();
        let q4: Vec<u8> = (0..16 * nb).map(|_| rng.random()).collect();
        let q8: Vec<i8> = (0..32 * nb).map(|_| rng.random()).collect();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        // SAFETY: the CPU has AVX2 and FMA; the lengths match nb blocks.
        let m: Vec<f32> = (0..nb).map(|_| rng.random_range(-0.2..0.0)).collect();
        let sums: Vec<f32> = (0..8 * nb).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (f4, f8) = unsafe { (simd::q4_1(&q4, &d, &m, &x, &sums), simd::q8_0(&q8, &d, &x)) };
        let p4 = portable::q4_1(&q4, &d, &x) + portable::mins(&m, &sums);
        let p8 = portable::q8_0(&q8, &d, &x);
        assert!(close(f4, p4), "{f4} against {p4}");
        assert!(close(f8, p8), "{f8} against {p8}");
        assert!(
            p4.abs() > 0.1 && p8.abs() > 0.1,
            "a trivial product: {p4} {p8}"
        );
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert!(QuantMatrix::new(33, None).is_err());
        assert!(QuantMatrix::new(64, Some(vec![1.0; 3])).is_err());
        let mut q = QuantMatrix::new(64, None).unwrap();
        assert!(q.push(QuantType::Q4_1, 2, &[0; 79]).is_err());
        assert!(q.push(QuantType::Q8_0, 1, &[0; 68]).is_ok());
        assert!(q.matmul(&[0.0; 63], 1).is_err());
        let mut nan = vec![0u8; 68];
        nan[0..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        assert!(q.push(QuantType::Q8_0, 1, &nan).is_err());
    }
}
