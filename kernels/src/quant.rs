//! Products with block-quantized weights as GGUF stores them, for the unprotected engine's
//! decode: one token's row is read against the Q4_1 / Q8_0 blocks themselves (their codes and
//! f32 scales: 0.75 and 1.13 bytes per weight) instead of f32 copies (4 bytes), as llama.cpp's
//! CPU kernels do.
//!
//! A block's contribution is `d · Σ qᵢxᵢ + m · Σ xᵢ`. The activations are rounded per block of
//! 32 to 16-bit integers at the block's own scale (`max |x| / 32767`; llama.cpp rounds them to 8
//! bits), so `Σ qᵢxᵢ` is an exact integer sum (`vpmaddwd`), and `Σ xᵢ` stays f32. The rounding
//! moves each product by at most `2^-16` of its block's largest input times the weight: 1/256
//! of llama.cpp's 8-bit rounding, and below what changes a greedy answer on the goldens.

use rayon::prelude::*;

use crate::INT_BLOCK;

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
        if d_in == 0 || !d_in.is_multiple_of(INT_BLOCK) {
            return Err(BadQuantWeight(format!(
                "input width {d_in} is not a positive multiple of {INT_BLOCK}"
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
        let nb = self.d_in / INT_BLOCK;
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
        let nb = self.d_in / INT_BLOCK;
        // The gain applied once, then every row prepared for the blocks.
        let x: Vec<f32> = match &self.gain {
            Some(g) => x
                .chunks_exact(self.d_in)
                .flat_map(|r| r.iter().zip(g).map(|(v, g)| v * g))
                .collect(),
            None => x.to_vec(),
        };
        let p = Prepared::new(&x);
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
                            *y = dot_row(part, j, &p.row(r, nb));
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

/// Input rows as the kernels read them: per block of 32, the values as 16-bit integers at the
/// block's scale, the scale, and the values' f32 sum (the minimum's factor).
struct Prepared {
    q: Vec<i16>,
    scale: Vec<f32>,
    sums: Vec<f32>,
}

/// The sum of a block's 32 values, in eight lanes added pairwise.
fn sum32(b: &[f32]) -> f32 {
    let l: [f32; 8] = std::array::from_fn(|l| (b[l] + b[l + 8]) + (b[l + 16] + b[l + 24]));
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// One row of [`Prepared`], `nb` blocks.
struct Row<'a> {
    q: &'a [i16],
    scale: &'a [f32],
    sums: &'a [f32],
}

impl Prepared {
    /// `x`: whole blocks of 32 values.
    fn new(x: &[f32]) -> Self {
        let n = x.len() / INT_BLOCK;
        let mut p = Prepared {
            q: Vec::with_capacity(x.len()),
            scale: Vec::with_capacity(n),
            sums: Vec::with_capacity(n),
        };
        for b in x.chunks_exact(INT_BLOCK) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (scale, inv) = if amax > 0.0 && amax.is_finite() {
                (amax / 32767.0, 32767.0 / amax)
            } else {
                (0.0, 0.0)
            };
            p.q.extend(
                b.iter()
                    .map(|v| (v * inv).round().clamp(-32767.0, 32767.0) as i16),
            );
            p.scale.push(scale);
            p.sums.push(sum32(b));
        }
        p
    }

    fn row(&self, r: usize, nb: usize) -> Row<'_> {
        Row {
            q: &self.q[r * nb * 32..(r + 1) * nb * 32],
            scale: &self.scale[r * nb..(r + 1) * nb],
            sums: &self.sums[r * nb..(r + 1) * nb],
        }
    }
}

/// Row `j` of `part` times the prepared row `x`.
fn dot_row(part: &Part, j: usize, x: &Row<'_>) -> f32 {
    let nb = x.scale.len();
    let blocks = j * nb..(j + 1) * nb;
    match part {
        Part::Q4_1 { d, m, qs, .. } => {
            let qs = &qs[blocks.start * 16..blocks.end * 16];
            let (d, m) = (&d[blocks.clone()], &m[blocks]);
            #[cfg(target_arch = "x86_64")]
            if simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked); the kernel checks the lengths.
                return unsafe { simd::q4_1(qs, d, m, x) };
            }
            portable::q4_1(qs, d, m, x)
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
    use super::Row;

    /// `Σ_b d[b] · scale[b] · Σ_i q[b][i] · x.q[32b + i] + m[b] · x.sums[b]` over Q4_1 blocks.
    pub fn q4_1(qs: &[u8], d: &[f32], m: &[f32], x: &Row<'_>) -> f32 {
        assert!(qs.len() == 16 * d.len() && m.len() == d.len() && x.scale.len() == d.len());
        let mut acc = 0f32;
        for (b, q) in qs.chunks_exact(16).enumerate() {
            let xq = &x.q[32 * b..32 * b + 32];
            let s: i32 = (0..16)
                .map(|i| {
                    i32::from(q[i] & 0x0f) * i32::from(xq[i])
                        + i32::from(q[i] >> 4) * i32::from(xq[i + 16])
                })
                .sum();
            acc += d[b] * x.scale[b] * s as f32 + m[b] * x.sums[b];
        }
        acc
    }

    /// `Σ_b d[b] · scale[b] · Σ_i q[b][i] · x.q[32b + i]` over Q8_0 blocks.
    pub fn q8_0(qs: &[i8], d: &[f32], x: &Row<'_>) -> f32 {
        assert!(qs.len() == 32 * d.len() && x.scale.len() == d.len());
        let mut acc = 0f32;
        for (b, q) in qs.chunks_exact(32).enumerate() {
            let xq = &x.q[32 * b..32 * b + 32];
            let s: i32 = q
                .iter()
                .zip(xq)
                .map(|(&q, &v)| i32::from(q) * i32::from(v))
                .sum();
            acc += d[b] * x.scale[b] * s as f32;
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::Row;
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

    /// [`super::portable::q4_1`].
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q4_1(qs: &[u8], d: &[f32], m: &[f32], x: &Row<'_>) -> f32 {
        let nb = d.len();
        assert!(qs.len() == nb * 16 && m.len() == nb && x.scale.len() == nb);
        assert!(x.q.len() == nb * 32 && x.sums.len() == nb);
        let low = _mm_set1_epi8(0x0f);
        // Block b's codes times its inputs, as 8 f32 lanes.
        let block = |b: usize| {
            // SAFETY: b < nb, in bounds by the lengths above.
            unsafe {
                let q = _mm_loadu_si128(qs.as_ptr().add(16 * b) as *const __m128i);
                let xp = x.q.as_ptr().add(32 * b) as *const __m256i;
                let lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, low));
                let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), low));
                let p = _mm256_add_epi32(
                    _mm256_madd_epi16(lo, _mm256_loadu_si256(xp)),
                    _mm256_madd_epi16(hi, _mm256_loadu_si256(xp.add(1))),
                );
                let f = *d.get_unchecked(b) * *x.scale.get_unchecked(b);
                (_mm256_cvtepi32_ps(p), _mm256_set1_ps(f))
            }
        };
        // SAFETY: AVX2 and FMA, as this function.
        unsafe { blocks(nb, block) + dot(m, x.sums) }
    }

    /// `Σ_b p_b · f_b` over the `nb` blocks, where `block(b)` gives block `b`'s products as 8
    /// lanes and its factor (broadcast). Two accumulators (even and odd blocks): one chain of
    /// dependent adds would wait on the add's latency every block.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blocks(nb: usize, block: impl Fn(usize) -> (__m256, __m256)) -> f32 {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut b = 0;
        while b + 2 <= nb {
            let (p0, f0) = block(b);
            let (p1, f1) = block(b + 1);
            acc0 = _mm256_fmadd_ps(p0, f0, acc0);
            acc1 = _mm256_fmadd_ps(p1, f1, acc1);
            b += 2;
        }
        if b < nb {
            let (p0, f0) = block(b);
            acc0 = _mm256_fmadd_ps(p0, f0, acc0);
        }
        // SAFETY: as this function.
        unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
    }

    /// `Σ a[i] · b[i]` over the shorter length.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let va = _mm256_loadu_ps(a.as_ptr().add(i));
                acc = _mm256_fmadd_ps(va, _mm256_loadu_ps(b.as_ptr().add(i)), acc);
            }
            i += 8;
        }
        let rest: f32 = a[i..n].iter().zip(&b[i..n]).map(|(a, b)| a * b).sum();
        // SAFETY: as this function.
        unsafe { hsum(acc) + rest }
    }

    /// [`super::portable::q8_0`].
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q8_0(qs: &[i8], d: &[f32], x: &Row<'_>) -> f32 {
        let nb = d.len();
        assert!(qs.len() == nb * 32 && x.scale.len() == nb && x.q.len() == nb * 32);
        let block = |b: usize| {
            // SAFETY: b < nb, in bounds by the lengths above.
            unsafe {
                let q = _mm256_loadu_si256(qs.as_ptr().add(32 * b) as *const __m256i);
                let xp = x.q.as_ptr().add(32 * b) as *const __m256i;
                let q0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                let q1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
                let p = _mm256_add_epi32(
                    _mm256_madd_epi16(q0, _mm256_loadu_si256(xp)),
                    _mm256_madd_epi16(q1, _mm256_loadu_si256(xp.add(1))),
                );
                let f = *d.get_unchecked(b) * *x.scale.get_unchecked(b);
                (_mm256_cvtepi32_ps(p), _mm256_set1_ps(f))
            }
        };
        // SAFETY: as this function.
        unsafe { blocks(nb, block) }
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
        for _ in 0..rows * d_in / INT_BLOCK {
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
                    let terms =
                        (0..d_in).map(|i| f64::from(x[r * d_in + i] * gain[i]) * f64::from(w[i]));
                    let want: f64 = terms.clone().sum();
                    let size: f64 = terms.map(f64::abs).sum();
                    let got = f64::from(y[r * (r1 + r2) + j]);
                    // 16-bit inputs: each product within 2^-16 of its block's largest.
                    assert!(
                        (got - want).abs() <= 1e-4 * size,
                        "row {r} out {j}: {got} against {want} (of {size})"
                    );
                }
            }
        }
        // A zero row and an exact one: small integers times Q8_0 codes with d = 1 are exact.
        let mut one = QuantMatrix::new(32, None).unwrap();
        let mut block = half::f16::from_f32(1.0).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        one.push(QuantType::Q8_0, 1, &block).unwrap();
        assert_eq!(one.matmul(&[0.0; 32], 1).unwrap(), [0.0]);
        let x: Vec<f32> = (0..32).map(|i| (i % 5) as f32).collect();
        let want: f32 = (0..32).map(|i| (i % 5) as f32 * (i as f32 - 16.0)).sum();
        let got = one.matmul(&x, 1).unwrap()[0];
        assert!((got - want).abs() <= 1e-3, "{got} against {want}");
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
        let p = Prepared::new(&x);
        let row = p.row(0, nb);
        let d: Vec<f32> = (0..nb).map(|_| rng.random_range(0.001..0.1)).collect();
        let m: Vec<f32> = (0..nb).map(|_| rng.random_range(-0.2..0.0)).collect();
        let q4: Vec<u8> = (0..16 * nb).map(|_| rng.random()).collect();
        let q8: Vec<i8> = (0..32 * nb).map(|_| rng.random()).collect();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        // SAFETY: the CPU has AVX2 and FMA.
        let (f4, f8) = unsafe { (simd::q4_1(&q4, &d, &m, &row), simd::q8_0(&q8, &d, &row)) };
        let p4 = portable::q4_1(&q4, &d, &m, &row);
        let p8 = portable::q8_0(&q8, &d, &row);
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
