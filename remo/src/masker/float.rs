//! The float modes' masking: rows plus grid masks of the public scale σ·ρ_op (or, at rank < d,
//! coefficients on the public basis), cover rows and the shuffle.

use super::*;

impl Masker {
    /// The float modes' rows: real rows plus their masks, cover rows pure masks, in slot order.
    /// With the identity basis (`step`: its grid) each value is the exact sum of the row rounded
    /// to the grid and a grid mask, rounded once to f32 where the mode sends f32 (see `grid`);
    /// with a basis, the plain sum. Products are kept for the rows that have them.
    pub(super) fn mask_rows(
        op: OpId,
        precision: Precision,
        pairs: Vec<MaskPair>,
        slots: &[usize],
        x: &Rows,
        step: Option<f64>,
    ) -> Result<(Tensor, Products), RemoError> {
        let (n, total, d_in) = (x.rows(), pairs.len(), x.cols());
        let f64_out = precision.gemm_f64();
        let mut f64_rows = vec![0f64; if f64_out { total * d_in } else { 0 }];
        let mut f32_rows = vec![0f32; if f64_out { 0 } else { total * d_in }];
        let mut products = Vec::with_capacity(total);
        for (j, pair) in pairs.into_iter().enumerate() {
            let MaskPair::Float { mask, product } = pair else {
                return Err(RemoError::Setup(format!(
                    "{op}: a float call drew integer pads"
                )));
            };
            let slot = slots[j];
            let real = (j < n).then(|| x.row(j));
            for i in 0..d_in {
                let v = match (real, step) {
                    (None, _) => mask[i],
                    (Some(r), Some(g)) => grid::masked_value(op, r[i], mask[i], g)?,
                    (Some(r), None) => match precision {
                        // f32 end to end: the f32 sum of the row and the rounded mask.
                        Precision::F32 | Precision::Int => f64::from(r[i] + mask[i] as f32),
                        _ => f64::from(r[i]) + mask[i],
                    },
                };
                if f64_out {
                    f64_rows[slot * d_in + i] = v;
                } else {
                    f32_rows[slot * d_in + i] = v as f32;
                }
            }
            if !product.is_empty() {
                products.push(product);
            }
        }
        let tensor = if f64_out {
            Tensor::F64 {
                rows: total,
                cols: d_in,
                data: f64_rows,
            }
        } else {
            Tensor::F32 {
                rows: total,
                cols: d_in,
                data: f32_rows,
            }
        };
        Ok((tensor, Products::Float(products)))
    }
}
