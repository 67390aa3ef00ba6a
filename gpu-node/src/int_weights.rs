//! The integer mode's weights: each projection's exact integer form, built from the stored Q4_1
//! and Q8_0 blocks without rounding. Unlike the float weights, norm gains are not folded in (an
//! f32 gain times an f16 scale is no longer a block scale); each op carries its gain for the CVM
//! to apply.

use talaria_engine::{BlockOp, EngineError, ModelConfig, OpId};
use talaria_gguf::{GgufFile, exact_shift, integer_blocks};
use talaria_kernels::{INT_BLOCK, IntWeight, block_index, code_index, int_matmul};

use crate::NodeError;
use talaria_model_file::{OpSource, block_sources, lm_head_source, load_vector};

/// A stage's projections in integer form (the integer mode's weights).
pub struct IntWeights {
    first_layer: usize,
    /// `blocks[i][k]`: layer `first_layer + i`, op `BlockOp::ALL[k]`.
    blocks: Vec<[IntWeight; 4]>,
    lm_head: Option<IntWeight>,
}

/// One fused op from its stored parts (`[d_in, d_out_k]` each, side by side), at the smallest
/// shift that is exact for every part.
fn fuse(
    f: &GgufFile,
    parts: &[(String, usize)],
    d_in: usize,
    gain: Option<Vec<f32>>,
) -> Result<IntWeight, NodeError> {
    let mut shift = 0;
    let mut d_out = 0;
    for (name, width) in parts {
        let t = f.tensor(name)?;
        NodeError::check_dims(name, &t.dims, d_in, *width)?;
        d_out += width;
        shift = shift.max(exact_shift(name, t.ty, f.tensor_bytes(name)?)?);
    }
    let nb = d_in / INT_BLOCK;
    let mut codes = vec![0u8; d_in * d_out];
    let (mut scales, mut mins) = (vec![0u64; nb * d_out], vec![0u64; nb * d_out]);
    let mut col0 = 0;
    for (name, part_out) in parts {
        let (name, part_out) = (name.as_str(), *part_out);
        let t = f.tensor(name)?;
        let ib = integer_blocks(name, t.ty, f.tensor_bytes(name)?, shift)?;
        // Stored `[out][in]` with blocks along `in`; the product wants tiles of columns, and in
        // them input pairs (`code_index`).
        for o in 0..part_out {
            let col = col0 + o;
            for (i, &q) in ib.codes[o * d_in..(o + 1) * d_in].iter().enumerate() {
                codes[code_index(d_in, d_out, i, col)] = q;
            }
            for b in 0..nb {
                let k = block_index(d_in, d_out, b, col);
                scales[k] = ib.scales[o * nb + b] as u64;
                mins[k] = ib.mins[o * nb + b] as u64;
            }
        }
        col0 += part_out;
    }
    // Held four bits a code where the tensor's codes are (Q4_1), a byte where not (Q8_0).
    let w = IntWeight {
        d_in,
        d_out,
        codes: codes.into(),
        scales: scales.into(),
        mins: mins.into(),
        shift,
        gain,
    };
    w.validate()
        .map_err(|e| NodeError::invalid_model(e.to_string()))?;
    Ok(w)
}

impl IntWeights {
    /// The integer forms of `layers` (and the LM head if `lm_head`).
    pub fn load(
        f: &GgufFile,
        c: &ModelConfig,
        layers: std::ops::Range<usize>,
        lm_head: bool,
    ) -> Result<Self, NodeError> {
        if !c.d_model.is_multiple_of(INT_BLOCK) || !c.d_ff.is_multiple_of(INT_BLOCK) {
            return Err(talaria_model_file::ModelFileError::Unsupported(
                "the integer mode needs widths that are multiples of 32".into(),
            )
            .into());
        }
        let load = |src: &OpSource| -> Result<IntWeight, NodeError> {
            let gain = src
                .gain
                .as_ref()
                .map(|g| load_vector(f, g, src.d_in))
                .transpose()?;
            fuse(f, &src.parts, src.d_in, gain)
        };
        let first_layer = layers.start;
        let mut blocks = Vec::with_capacity(layers.len());
        for l in layers {
            let [qkv, attn_out, gate_up, down] = block_sources(c, l);
            blocks.push([load(&qkv)?, load(&attn_out)?, load(&gate_up)?, load(&down)?]);
        }
        let lm_head = if lm_head {
            Some(load(&lm_head_source(f, c))?)
        } else {
            None
        };
        Ok(Self {
            first_layer,
            blocks,
            lm_head,
        })
    }

    /// The integer weight of `op`.
    pub fn weight(&self, op: OpId) -> Result<&IntWeight, EngineError> {
        let not_held = || EngineError::BadOp {
            op: op.to_string(),
            reason: "not held in integer form by this stage".into(),
        };
        match op {
            OpId::LmHead => self.lm_head.as_ref().ok_or_else(not_held),
            OpId::Block { layer, op: kind } => {
                let k = BlockOp::ALL.iter().position(|&o| o == kind).unwrap_or(0);
                layer
                    .checked_sub(self.first_layer)
                    .and_then(|i| self.blocks.get(i))
                    .map(|b| &b[k])
                    .ok_or_else(not_held)
            }
        }
    }

    /// `x̃ · W_int` modulo `2^64`.
    pub(crate) fn matmul(&self, op: OpId, rows: usize, x: &[u64]) -> Result<Vec<u64>, EngineError> {
        Ok(int_matmul(x, rows, self.weight(op)?))
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .flatten()
            .chain(&self.lm_head)
            .map(IntWeight::bytes)
            .sum()
    }
}
