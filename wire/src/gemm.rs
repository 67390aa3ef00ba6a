//! Safe wrappers over the `gemm` crate for the row-major products the mask pool needs.

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= 1 << 21 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

macro_rules! matmul_impl {
    ($name:ident, $t:ty) => {
        /// `a (m × k) · b (k × n)`, all row-major.
        pub fn $name(a: &[$t], b: &[$t], m: usize, k: usize, n: usize) -> Vec<$t> {
            assert_eq!(a.len(), m * k, "lhs shape");
            assert_eq!(b.len(), k * n, "rhs shape");
            let mut out = vec![0 as $t; m * n];
            if m == 0 || n == 0 {
                return out;
            }
            // SAFETY: the slices hold m·k, k·n and m·n elements (checked above), and the strides
            // describe row-major layouts within them.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0 as $t,
                    1 as $t,
                    false,
                    false,
                    false,
                    parallelism(m, n, k),
                );
            }
            out
        }
    };
}

matmul_impl!(matmul_f32, f32);
matmul_impl!(matmul_f64, f64);

/// `a (m × k, f64) · b (k × n, f32)` in f64, all row-major. `b` is widened a block of columns
/// at a time, so a matrix that is exact in f32 is held once, in f32, at no loss.
pub fn matmul_f64_f32(a: &[f64], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    const BLOCK: usize = 512;
    assert_eq!(b.len(), k * n, "rhs shape");
    let mut out = vec![0f64; m * n];
    let mut wide = vec![0f64; k * BLOCK.min(n)];
    for c0 in (0..n).step_by(BLOCK) {
        let w = BLOCK.min(n - c0);
        for (dst, src) in wide.chunks_exact_mut(w).zip(b.chunks_exact(n)) {
            for (d, &s) in dst.iter_mut().zip(&src[c0..c0 + w]) {
                *d = f64::from(s);
            }
        }
        let part = matmul_f64(a, &wide[..k * w], m, k, w);
        for (row, p) in out.chunks_exact_mut(n).zip(part.chunks_exact(w)) {
            row[c0..c0 + w].copy_from_slice(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_product() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(super::matmul_f64(&a, &b, 2, 3, 2), [4.0, 5.0, 10.0, 11.0]);
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        assert_eq!(
            super::matmul_f32(&a32, &b32, 2, 3, 2),
            [4.0, 5.0, 10.0, 11.0]
        );
    }

    #[test]
    fn widened_product_equals_the_f64_product() {
        let (m, k, n) = (3, 5, 1100);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin() * 1e3).collect();
        let b32: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let b64: Vec<f64> = b32.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(
            super::matmul_f64_f32(&a, &b32, m, k, n),
            super::matmul_f64(&a, &b64, m, k, n)
        );
    }
}
