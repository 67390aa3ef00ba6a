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
}
