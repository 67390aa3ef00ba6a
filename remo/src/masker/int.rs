//! The integer mode's masking and unmasking: fixed-point rows plus one-time pads modulo 2^64,
//! padded to the length bucket with cover pads, and the exact product read back after the pads'
//! products are removed and every value's range is checked.

use super::*;

impl Masker {
    /// The integer mode's rows: encoded real rows plus their pads modulo `2^64`, cover rows
    /// pure pads, in slot order.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pad_rows(
        op: OpId,
        pairs: Vec<MaskPair>,
        slots: &[usize],
        n: usize,
        enc: &[u64],
        d_in: usize,
        frac_bits: Vec<u32>,
        bounds: Vec<u64>,
        shift: u32,
    ) -> Result<(Tensor, Products), RemoError> {
        let total = pairs.len();
        let mut rows = vec![0u64; total * d_in];
        let mut products = Vec::with_capacity(total);
        for (j, pair) in pairs.into_iter().enumerate() {
            // An integer session draws only pads (`make_pairs` and `cover_masks` follow the op);
            // anything else would leave a row unpadded, so it is an error, never a fallback.
            let MaskPair::Int { pad, product } = pair else {
                return Err(RemoError::Setup(format!(
                    "{op}: an integer call drew float masks"
                )));
            };
            let dst = &mut rows[slots[j] * d_in..(slots[j] + 1) * d_in];
            if j < n {
                let src = &enc[j * d_in..(j + 1) * d_in];
                for ((d, &v), &p) in dst.iter_mut().zip(src).zip(&pad) {
                    *d = v.wrapping_add(p);
                }
            } else {
                dst.copy_from_slice(&pad);
            }
            if !product.is_empty() {
                products.push(product);
            }
        }
        let tensor = Tensor::U64 {
            rows: total,
            cols: d_in,
            data: rows,
        };
        Ok((
            tensor,
            Products::Int {
                products,
                frac_bits,
                bounds,
                shift,
            },
        ))
    }

    /// The integer mode's unmasking: the exact product `X · W_int` of the encoded real rows,
    /// after Freivalds' check of every row, the canaries' (rank < d) and the range check.
    pub fn unmask_exact(&self, pending: Pending, y: &Tensor) -> Result<IntProduct, RemoError> {
        y.validate()?;
        self.check_reply(&pending, y)?;
        self.verify(&pending, y)?;
        Self::unpad(pending, y)
    }

    /// [`Masker::unmask_exact`] on a reply already checked against its call by Freivalds'
    /// check: the canaries, the subtraction and the range check.
    pub(super) fn unpad(pending: Pending, y: &Tensor) -> Result<IntProduct, RemoError> {
        let op = pending.op;
        let (
            Products::Int {
                products,
                frac_bits,
                bounds,
                shift,
            },
            Tensor::U64 { data, .. },
        ) = (&pending.products, y)
        else {
            return Err(RemoError::Setup(format!("{op}: not an integer-mode call")));
        };
        let d_out = pending.d_out;
        let row = |slot: usize| &data[slot * d_out..(slot + 1) * d_out];
        let canaries = pending.n_real..pending.n_real + pending.n_canary;
        let wrong: usize = canaries
            .map(|j| {
                row(pending.slots[j])
                    .iter()
                    .zip(&products[j])
                    .filter(|(g, e)| g != e)
                    .count()
            })
            .sum();
        if wrong > 0 {
            return Err(RemoError::IntCanary { op, wrong });
        }
        let mut values = Vec::with_capacity(pending.n_real * d_out);
        for (j, p) in products.iter().enumerate().take(pending.n_real) {
            let start = values.len();
            values.extend(
                row(pending.slots[j])
                    .iter()
                    .zip(p)
                    .map(|(&g, &e)| g.wrapping_sub(e) as i64),
            );
            // The exact product is within the row's bound; a value past it is an error in the
            // high bits, which Freivalds' check alone catches only with probability 1/2 or less
            // per vector.
            if values[start..].iter().any(|v| v.unsigned_abs() > bounds[j]) {
                Self::retire_vectors(&pending);
                return Err(RemoError::Integrity {
                    op,
                    reason: format!("a value of real row {j} is outside its bound"),
                });
            }
        }
        let (frac_bits, shift) = (frac_bits.clone(), *shift);
        Ok(IntProduct {
            rows: pending.n_real,
            cols: d_out,
            values,
            frac_bits,
            shift,
        })
    }
}
