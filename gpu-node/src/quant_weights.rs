//! The plain engine's decode weights: every projection as its stored GGUF blocks
//! ([`QuantMatrix`]), read by one token's row the way llama.cpp's CPU kernels read them.
//! Prefill (many rows) keeps the dense f32 GEMM, which is faster there.

use talaria_engine::{BlockOp, EngineError, LinearOps, ModelConfig, OpId, Rows};
use talaria_gguf::{GgmlType, GgufFile};
use talaria_kernels::{QuantMatrix, QuantType};
use talaria_model_file::{OpSource, block_sources, lm_head_source, load_vector};

use crate::{LinearWeights, NodeError};

/// Calls of at most this many rows read the blocks; larger ones use the dense GEMM.
pub const QUANT_MAX_ROWS: usize = 4;

/// Every projection of a model as stored blocks, in forward order.
pub struct QuantWeights {
    ops: std::collections::BTreeMap<OpId, QuantMatrix>,
}

/// Why a model's projections cannot be read as blocks (a type other than Q4_1 / Q8_0).
fn unsupported(name: &str, ty: GgmlType) -> NodeError {
    NodeError::invalid_model(format!(
        "tensor {name:?} is {}: the quantized decode reads Q4_1 and Q8_0",
        ty.name()
    ))
}

fn load_op(f: &GgufFile, s: &OpSource) -> Result<QuantMatrix, NodeError> {
    let gain = s
        .gain
        .as_ref()
        .map(|g| load_vector(f, g, s.d_in))
        .transpose()?;
    let bad = |e: talaria_kernels::BadQuantWeight| NodeError::invalid_model(e.to_string());
    let mut m = QuantMatrix::new(s.d_in, gain).map_err(bad)?;
    for (name, d_out) in &s.parts {
        let t = f.tensor(name)?;
        NodeError::check_dims(name, &t.dims, s.d_in, *d_out)?;
        let ty = match t.ty {
            GgmlType::Q4_1 => QuantType::Q4_1,
            GgmlType::Q8_0 => QuantType::Q8_0,
            other => return Err(unsupported(name, other)),
        };
        m.push(ty, *d_out, f.tensor_bytes(name)?).map_err(bad)?;
    }
    Ok(m)
}

impl QuantWeights {
    /// Every projection of the model and the LM head, as stored blocks.
    pub fn load(f: &GgufFile, c: &ModelConfig) -> Result<Self, NodeError> {
        let mut ops = std::collections::BTreeMap::new();
        for layer in 0..c.n_layers {
            for (op, s) in BlockOp::ALL.into_iter().zip(block_sources(c, layer)) {
                ops.insert(OpId::Block { layer, op }, load_op(f, &s)?);
            }
        }
        ops.insert(OpId::LmHead, load_op(f, &lm_head_source(f, c))?);
        Ok(Self { ops })
    }

    /// `x · W_op`; `x`'s shape is checked by the caller ([`LinearWeights::check_input`]).
    fn matmul(&self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        let m = self.ops.get(&op).ok_or_else(|| EngineError::BadOp {
            op: op.to_string(),
            reason: "not held".into(),
        })?;
        let y = m
            .matmul(x.data(), x.rows())
            .map_err(|e| EngineError::BadOp {
                op: op.to_string(),
                reason: e.to_string(),
            })?;
        Rows::new(x.rows(), m.d_out(), y)
    }
}

/// The plain engine's linear ops: decode rows read the blocks, prefill runs the dense GEMM.
pub struct PlainLinear<'a> {
    pub dense: &'a LinearWeights,
    pub quant: Option<&'a QuantWeights>,
}

impl LinearOps for PlainLinear<'_> {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        match self.quant {
            Some(q) if x.rows() <= QUANT_MAX_ROWS => {
                self.dense
                    .check_input(op, x.rows(), x.cols(), x.data().len())?;
                q.matmul(op, x)
            }
            _ => self.dense.matmul(op, x),
        }
    }
}
