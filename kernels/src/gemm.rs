//! Safe wrappers over the `gemm` crate for the row-major products the mask pool needs.

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= 1 << 21 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst (m × n) = a (m × k) · b`, all row-major, where `b`'s element `(kk, j)` is at
/// `kk·b_rs + j·b_cs`.
///
/// # Safety
/// `a` must hold `m·k` elements and `b` every element its strides reach.
unsafe fn product<T: 'static + Copy + Default + From<u8>>(
    a: &[T],
    b: &[T],
    (m, k, n): (usize, usize, usize),
    (b_rs, b_cs): (usize, usize),
) -> Vec<T> {
    let mut out = vec![T::default(); m * n];
    // SAFETY: out holds m rows of n; the caller vouches for a and b.
    unsafe { product_into(&mut out, n, a, b, (m, k, n), (b_rs, b_cs)) };
    out
}

/// As [`product`], into `dst`, whose row `i` starts at `i·dst_rs` (overwritten, not added to).
///
/// # Safety
/// As [`product`]; and `dst` must hold `(m − 1)·dst_rs + n` elements.
unsafe fn product_into<T: 'static + Copy + Default + From<u8>>(
    dst: &mut [T],
    dst_rs: usize,
    a: &[T],
    b: &[T],
    (m, k, n): (usize, usize, usize),
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: dst holds m rows of n at stride dst_rs, a holds m·k (callers check), and b's
    // strides stay inside b (callers check).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::from(0),
            T::from(1),
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

macro_rules! matmul_impl {
    ($name:ident, $name_nt:ident, $t:ty) => {
        /// `a (m × k) · b (k × n)`, all row-major.
        pub fn $name(a: &[$t], b: &[$t], m: usize, k: usize, n: usize) -> Vec<$t> {
            assert_eq!(a.len(), m * k, "lhs shape");
            assert_eq!(b.len(), k * n, "rhs shape");
            // SAFETY: the lengths are checked above; b is k × n row-major.
            unsafe { product(a, b, (m, k, n), (n, 1)) }
        }

        /// `a (m × k) · bᵀ` for `b` (n × k), both row-major: no transposed copy of `b` is made.
        pub fn $name_nt(a: &[$t], b: &[$t], m: usize, k: usize, n: usize) -> Vec<$t> {
            assert_eq!(a.len(), m * k, "lhs shape");
            assert_eq!(b.len(), n * k, "rhs shape");
            // SAFETY: the lengths are checked above; bᵀ's element (kk, j) is b[j·k + kk].
            unsafe { product(a, b, (m, k, n), (1, k)) }
        }
    };
}

matmul_impl!(matmul_f32, matmul_f32_nt, f32);
matmul_impl!(matmul_f64, matmul_f64_nt, f64);

/// `a (m × k, f64) · b (k × n, f32)` in f64, all row-major. `b` is widened a block of columns
/// at a time, so a matrix that is exact in f32 is held once, in f32, at no loss. The block is
/// small enough to stay in cache between its widening and its product (and, for the pool's
/// batches, to run on one thread: gemm's threads cost more than they give at these sizes), and
/// each block's product is written in place in the output. At 16 rows — a pool refill — this
/// runs at 27-40 GFLOP/s on one core of the development machine, against 9-15 for blocks of 512
/// columns multiplied apart and copied.
pub fn matmul_f64_f32(a: &[f64], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    const BLOCK: usize = 64;
    assert_eq!(a.len(), m * k, "lhs shape");
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
        // SAFETY: a is m × k (checked); wide holds k rows of w; out[c0..] holds
        // (m − 1)·n + w elements since c0 + w ≤ n.
        unsafe {
            product_into(&mut out[c0..], n, a, &wide[..k * w], (m, k, w), (w, 1));
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
    fn product_with_a_transposed_rhs_equals_the_product_with_its_transpose() {
        let (m, k, n) = (7, 300, 45);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
        let mut bt = vec![0f64; k * n];
        for j in 0..n {
            for kk in 0..k {
                bt[kk * n + j] = b[j * k + kk];
            }
        }
        let want = super::matmul_f64(&a, &bt, m, k, n);
        let got = super::matmul_f64_nt(&a, &b, m, k, n);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} vs {w}");
        }
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        let bt32: Vec<f32> = bt.iter().map(|&x| x as f32).collect();
        let want = super::matmul_f32(&a32, &bt32, m, k, n);
        let got = super::matmul_f32_nt(&a32, &b32, m, k, n);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
        }
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
