//! The cut between the two halves of the forward pass: every weight-dependent step is a
//! [`LinearOps::linear`] call on a batch of rows; everything else is weight-free.

use serde::{Deserialize, Serialize};

use crate::{EngineError, ModelConfig};

/// A weight-dependent projection inside a decoder block (ordered as a forward pass calls them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BlockOp {
    /// Fused query, key and value projection (attention norm gain folded in).
    Qkv,
    /// Attention output projection.
    AttnOut,
    /// Fused gate and up projection (FFN norm gain folded in).
    GateUp,
    /// FFN down projection.
    Down,
}

impl BlockOp {
    /// All block ops in the order a layer calls them.
    pub const ALL: [BlockOp; 4] = [
        BlockOp::Qkv,
        BlockOp::AttnOut,
        BlockOp::GateUp,
        BlockOp::Down,
    ];

    /// A short name for logs and files.
    pub fn name(self) -> &'static str {
        match self {
            BlockOp::Qkv => "qkv",
            BlockOp::AttnOut => "attn_out",
            BlockOp::GateUp => "gate_up",
            BlockOp::Down => "down",
        }
    }
}

/// Which weight a linear call uses (ordered as a forward pass calls them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OpId {
    /// A projection of decoder block `layer`.
    Block { layer: usize, op: BlockOp },
    /// The output projection to logits (final norm gain folded in).
    LmHead,
}

impl OpId {
    /// Input and output widths of this op for a model.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            OpId::Block { op, .. } => match op {
                BlockOp::Qkv => (c.d_model, c.d_model + 2 * c.kv_dim()),
                BlockOp::AttnOut => (c.d_model, c.d_model),
                BlockOp::GateUp => (c.d_model, 2 * c.d_ff),
                BlockOp::Down => (c.d_ff, c.d_model),
            },
            OpId::LmHead => (c.d_model, c.vocab),
        }
    }
}

/// The one text form of an op, in logs, errors, calibration files, taps and the CLI:
/// `"<layer>.<op>"` (`"3.gate_up"`) or `"lm_head"`. [`FromStr`](std::str::FromStr) reads it back.
impl std::fmt::Display for OpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpId::Block { layer, op } => write!(f, "{layer}.{}", op.name()),
            OpId::LmHead => f.write_str("lm_head"),
        }
    }
}

impl std::str::FromStr for BlockOp {
    type Err = String;

    /// A block op's [`BlockOp::name`].
    fn from_str(s: &str) -> Result<Self, String> {
        BlockOp::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("{s:?}: a block op is one of qkv, attn_out, gate_up, down"))
    }
}

impl std::str::FromStr for OpId {
    type Err = String;

    /// `"<layer>.<op>"` or `"lm_head"`, as [`Display`](std::fmt::Display) writes them.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "lm_head" {
            return Ok(OpId::LmHead);
        }
        let (layer, op) = s
            .split_once('.')
            .ok_or_else(|| format!("{s:?}: expected <layer>.<op> or lm_head"))?;
        let layer = layer
            .parse()
            .map_err(|_| format!("{s:?}: {layer:?} is not a layer number"))?;
        Ok(OpId::Block {
            layer,
            op: op.parse()?,
        })
    }
}

/// A row-major batch of activation rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rows {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Rows {
    /// Wraps `data` as `rows × cols`; the length must match.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, EngineError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(EngineError::BadOp {
                op: "rows".into(),
                reason: format!("{} values cannot be {rows} x {cols}", data.len()),
            });
        }
        Ok(Self { rows, cols, data })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// All values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Consumes the batch, returning its values.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

/// The weight-dependent half of the model, as the weight-free half sees it.
///
/// The plain engine answers directly from the weights; a masked engine answers through ReMO.
pub trait LinearOps {
    /// Computes `x · W_op` for every row of `x`.
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError>;

    /// How a prefill of `rows` new tokens runs: the tokens of each causal pass, in order,
    /// summing to `rows`. One pass unless the implementation splits it (ReMO's
    /// `prefill_chunk`, so that a long prompt does not hold the cloud's workers in one call).
    fn prefill_parts(&mut self, rows: usize) -> Vec<usize> {
        vec![rows]
    }
}

impl<T: LinearOps + ?Sized> LinearOps for &mut T {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        (**self).linear(op, x)
    }

    fn prefill_parts(&mut self, rows: usize) -> Vec<usize> {
        (**self).prefill_parts(rows)
    }
}

#[cfg(test)]
mod op_text_tests {
    use super::*;

    #[test]
    fn every_op_has_one_text_form_that_reads_back() {
        let mut ops: Vec<OpId> = (0..30)
            .flat_map(|layer| BlockOp::ALL.map(|op| OpId::Block { layer, op }))
            .collect();
        ops.push(OpId::LmHead);
        for op in ops {
            assert_eq!(op.to_string().parse::<OpId>(), Ok(op));
        }
        assert_eq!(
            OpId::Block {
                layer: 3,
                op: BlockOp::GateUp
            }
            .to_string(),
            "3.gate_up"
        );
        for bad in [
            "",
            "3",
            "3.",
            ".qkv",
            "x.qkv",
            "3.qkvv",
            "-1.down",
            "lm-head",
            "3.lm_head",
        ] {
            assert!(bad.parse::<OpId>().is_err(), "{bad:?} was read");
        }
    }
}

/// Serde in an op's one text form (`#[serde(with = "talaria_engine::op_text")]`), for files
/// people read (taps, calibrations); the wire keeps the derived binary form.
pub mod op_text {
    use super::OpId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(op: &OpId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(op)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OpId, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
