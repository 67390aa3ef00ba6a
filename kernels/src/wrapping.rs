//! Dot products modulo `2^64` of one vector with several: both halves of the integer mode's
//! Freivalds check (`x̃·u_t` when a call is masked, `ỹ·v_t` when its reply comes back). The
//! vector is read once for every few of the others, and on x86 eight 64-bit lanes multiply at a
//! time (`vpmullq`), or four with AVX2 from three 32-bit multiplies each. Addition and
//! multiplication modulo `2^64` are exact, so every kernel gives the same bits as the definition.

/// The kernels of [`dots_wrapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotKernel {
    /// One 64-bit multiply-add at a time.
    Portable,
    /// Four lanes, each 64-bit product from three 32-bit multiplies (`vpmuludq`).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Eight lanes of `vpmullq`.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl DotKernel {
    /// Every kernel this CPU can run, the widest last.
    pub fn available() -> Vec<DotKernel> {
        let mut all = vec![DotKernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                all.push(DotKernel::Avx2);
            }
            if has!("avx512f") && has!("avx512dq") {
                all.push(DotKernel::Avx512);
            }
        }
        all
    }

    /// The widest this CPU has: the one [`dots_wrapping`] runs.
    pub fn best() -> DotKernel {
        static BEST: std::sync::OnceLock<DotKernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *DotKernel::available().last().expect("portable"))
    }
}

/// `out[t] = Σ_i x[i] · vs[t][i]` modulo `2^64` for every `t < out.len()`.
///
/// # Panics
///
/// If `vs` has fewer than `out.len()` vectors, or one of the first `out.len()` is not as long as
/// `x` (the others are not read).
pub fn dots_wrapping(x: &[u64], vs: &[Vec<u64>], out: &mut [u64]) {
    dots(DotKernel::best(), x, vs, out)
}

/// [`dots_wrapping`] on a named kernel (the tests compare them).
///
/// # Panics
///
/// As [`dots_wrapping`], and if this CPU cannot run `kernel`.
pub fn dots_wrapping_with(kernel: DotKernel, x: &[u64], vs: &[Vec<u64>], out: &mut [u64]) {
    assert!(
        DotKernel::available().contains(&kernel),
        "this CPU cannot run the {kernel:?} dot kernel"
    );
    dots(kernel, x, vs, out)
}

/// [`dots_wrapping_with`] on a kernel this CPU can run.
fn dots(kernel: DotKernel, x: &[u64], vs: &[Vec<u64>], out: &mut [u64]) {
    assert!(
        vs.len() >= out.len(),
        "{} vectors for {} dots",
        vs.len(),
        out.len()
    );
    assert!(
        vs[..out.len()].iter().all(|v| v.len() == x.len()),
        "a vector's length differs from the row's"
    );
    // Groups of four: the row is read once a group, and four accumulators hide the multiply's
    // latency.
    for (group, out) in vs.chunks(GROUP).zip(out.chunks_mut(GROUP)) {
        let group = &group[..out.len()];
        match kernel {
            DotKernel::Portable => portable(x, group, out),
            // SAFETY: the kernel is `best()` or was checked against `available()`, so the CPU
            // has its features; every vector of the group is as long as `x` (asserted above).
            #[cfg(target_arch = "x86_64")]
            DotKernel::Avx2 => unsafe { avx2(x, group, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            DotKernel::Avx512 => unsafe { avx512(x, group, out) },
        }
    }
}

/// Vectors per sweep of the row.
const GROUP: usize = 4;

fn portable(x: &[u64], vs: &[Vec<u64>], out: &mut [u64]) {
    for (o, v) in out.iter_mut().zip(vs) {
        *o = x
            .iter()
            .zip(v)
            .fold(0u64, |s, (&a, &b)| s.wrapping_add(a.wrapping_mul(b)));
    }
}

/// The lanes' sum modulo `2^64`, plus the scalar tail from `from` on.
fn finish(lanes: &[u64], x: &[u64], v: &[u64], from: usize) -> u64 {
    let head = lanes.iter().fold(0u64, |s, &l| s.wrapping_add(l));
    x[from..]
        .iter()
        .zip(&v[from..])
        .fold(head, |s, (&a, &b)| s.wrapping_add(a.wrapping_mul(b)))
}

/// # Safety
///
/// The CPU has AVX-512F and AVX-512DQ; every vector of `vs` is as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn avx512(x: &[u64], vs: &[Vec<u64>], out: &mut [u64]) {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let n = x.len() / L * L;
    let mut acc = [_mm512_setzero_si512(); GROUP];
    for i in (0..n).step_by(L) {
        // SAFETY: `i + L <= n <= x.len()`, and every vector is as long as `x`.
        let a = unsafe { _mm512_loadu_si512(x.as_ptr().add(i).cast()) };
        for (acc, v) in acc.iter_mut().zip(vs) {
            // SAFETY: as above.
            let b = unsafe { _mm512_loadu_si512(v.as_ptr().add(i).cast()) };
            *acc = _mm512_add_epi64(*acc, _mm512_mullo_epi64(a, b));
        }
    }
    for ((o, acc), v) in out.iter_mut().zip(acc).zip(vs) {
        let mut lanes = [0u64; L];
        // SAFETY: `lanes` holds eight u64.
        unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), acc) };
        *o = finish(&lanes, x, v, n);
    }
}

/// # Safety
///
/// The CPU has AVX2; every vector of `vs` is as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2(x: &[u64], vs: &[Vec<u64>], out: &mut [u64]) {
    use std::arch::x86_64::*;
    const L: usize = 4;
    let n = x.len() / L * L;
    let mut acc = [_mm256_setzero_si256(); GROUP];
    for i in (0..n).step_by(L) {
        // SAFETY: `i + L <= n <= x.len()`, and every vector is as long as `x`.
        let a = unsafe { _mm256_loadu_si256(x.as_ptr().add(i).cast()) };
        let a_hi = _mm256_srli_epi64::<32>(a);
        for (acc, v) in acc.iter_mut().zip(vs) {
            // SAFETY: as above.
            let b = unsafe { _mm256_loadu_si256(v.as_ptr().add(i).cast()) };
            // a·b mod 2^64 = a_lo·b_lo + 2^32·(a_lo·b_hi + a_hi·b_lo).
            let low = _mm256_mul_epu32(a, b);
            let cross = _mm256_add_epi64(
                _mm256_mul_epu32(a, _mm256_srli_epi64::<32>(b)),
                _mm256_mul_epu32(a_hi, b),
            );
            *acc = _mm256_add_epi64(*acc, _mm256_add_epi64(low, _mm256_slli_epi64::<32>(cross)));
        }
    }
    for ((o, acc), v) in out.iter_mut().zip(acc).zip(vs) {
        let mut lanes = [0u64; L];
        // SAFETY: `lanes` holds four u64.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
        *o = finish(&lanes, x, v, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn by_definition(x: &[u64], v: &[u64]) -> u64 {
        let mut s = 0u128;
        for (&a, &b) in x.iter().zip(v) {
            s = s.wrapping_add(u128::from(a) * u128::from(b));
        }
        s as u64
    }

    #[test]
    fn every_kernel_gives_the_dots_by_definition() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let kernels = DotKernel::available();
        // Lengths around the lane counts and the model's widths; counts around the group size
        // (the check uses 10 and 20 vectors).
        for len in [0usize, 1, 3, 4, 7, 8, 9, 17, 64, 576, 1001] {
            for count in [0usize, 1, 3, 4, 5, 10, 20] {
                let x: Vec<u64> = (0..len).map(|_| rng.random()).collect();
                let vs: Vec<Vec<u64>> = (0..count + 2)
                    .map(|_| (0..len).map(|_| rng.random()).collect())
                    .collect();
                let want: Vec<u64> = vs[..count].iter().map(|v| by_definition(&x, v)).collect();
                for &k in &kernels {
                    let mut got = vec![0u64; count];
                    dots_wrapping_with(k, &x, &vs, &mut got);
                    assert_eq!(got, want, "{k:?}, length {len}, {count} vectors");
                }
            }
        }
    }

    #[test]
    fn extreme_values_wrap_as_the_ring_does() {
        let x = vec![u64::MAX; 19];
        let vs = vec![
            vec![u64::MAX; 19],
            vec![1u64 << 63; 19],
            vec![0x1_0000_0001; 19],
        ];
        let want: Vec<u64> = vs.iter().map(|v| by_definition(&x, v)).collect();
        for k in DotKernel::available() {
            let mut got = vec![0u64; 3];
            dots_wrapping_with(k, &x, &vs, &mut got);
            assert_eq!(got, want, "{k:?}");
        }
    }

    #[test]
    #[should_panic(expected = "length differs")]
    fn a_short_vector_is_refused() {
        dots_wrapping(&[1, 2, 3], &[vec![1, 2]], &mut [0]);
    }
}
