//! Which stored tensors make each op: the one op-to-tensor map the float weights, the integer
//! weights and the shards all read.

use talaria_engine::ModelConfig;
use talaria_gguf::GgufFile;

use crate::ModelFileError;

/// Where one op's weight is stored: its parts (name, output width), fused side by side, its input
/// width, and the norm gain in front of it — folded in by the float weights, sent along by the
/// integer ones.
pub struct OpSource {
    pub parts: Vec<(String, usize)>,
    pub d_in: usize,
    pub gain: Option<String>,
}

/// The sources of layer `l`'s ops, in [`talaria_engine::BlockOp::ALL`] order.
pub fn block_sources(c: &ModelConfig, l: usize) -> [OpSource; 4] {
    let name = |t: &str| format!("blk.{l}.{t}.weight");
    let op = |parts: &[(&str, usize)], d_in: usize, gain: Option<&str>| OpSource {
        parts: parts.iter().map(|&(t, d)| (name(t), d)).collect(),
        d_in,
        gain: gain.map(name),
    };
    [
        op(
            &[
                ("attn_q", c.d_model),
                ("attn_k", c.kv_dim()),
                ("attn_v", c.kv_dim()),
            ],
            c.d_model,
            Some("attn_norm"),
        ),
        op(&[("attn_output", c.d_model)], c.d_model, None),
        op(
            &[("ffn_gate", c.d_ff), ("ffn_up", c.d_ff)],
            c.d_model,
            Some("ffn_norm"),
        ),
        op(&[("ffn_down", c.d_model)], c.d_ff, None),
    ]
}

/// The LM head's source. Tied embeddings: without `output.weight` the LM head is the token
/// embedding table.
pub fn lm_head_source(f: &GgufFile, c: &ModelConfig) -> OpSource {
    let head = if f.has_tensor("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    OpSource {
        parts: vec![(head.into(), c.vocab)],
        d_in: c.d_model,
        gain: Some("output_norm.weight".into()),
    }
}

/// A norm gain of `len` values.
pub fn load_vector(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelFileError> {
    let (values, dims) = f.dequantize(name)?;
    if dims != [len as u64] {
        return Err(ModelFileError::InvalidModel(format!(
            "tensor {name:?} has dims {dims:?}, expected [{len}]"
        )));
    }
    Ok(values)
}
