use talaria_gguf::GgufFile;

use crate::EngineError;

/// Hyper-parameters of a `llama`-architecture model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab: usize,
    pub rope_base: f32,
    pub norm_eps: f32,
    pub max_seq: usize,
}

/// Largest sizes accepted from metadata: bounds allocations on a corrupt file.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 1024;

impl ModelConfig {
    /// Reads and validates the hyper-parameters of a `llama` model.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, EngineError> {
        let arch = f.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::Unsupported(format!(
                "architecture {arch:?} (only \"llama\" is implemented)"
            )));
        }
        let dim = |key: &str, max: u64| -> Result<usize, EngineError> {
            let v = f.get_u64(&format!("llama.{key}"))?;
            if v == 0 || v > max {
                return Err(EngineError::InvalidModel(format!("llama.{key} = {v}")));
            }
            Ok(v as usize)
        };
        let n_layers = dim("block_count", MAX_LAYERS)?;
        let d_model = dim("embedding_length", MAX_DIM)?;
        let n_heads = dim("attention.head_count", MAX_DIM)?;
        let n_kv_heads = match f.metadata().get("llama.attention.head_count_kv") {
            Some(_) => dim("attention.head_count_kv", MAX_DIM)?,
            None => n_heads,
        };
        let d_ff = dim("feed_forward_length", MAX_DIM)?;
        let max_seq = dim("context_length", MAX_DIM)?;
        let vocab = f.get_string_array("tokenizer.ggml.tokens")?.len();
        let rope_base = match f.metadata().get("llama.rope.freq_base") {
            Some(_) => f.get_f64("llama.rope.freq_base")? as f32,
            None => 10_000.0,
        };
        let norm_eps = f.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32;
        if d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::InvalidModel(format!(
                "{n_heads} heads / {n_kv_heads} kv heads do not divide {d_model}"
            )));
        }
        let head_dim = d_model / n_heads;
        if head_dim % 2 != 0 {
            return Err(EngineError::InvalidModel(format!(
                "odd head dim {head_dim}"
            )));
        }
        if let Ok(rot) = f.get_u64("llama.rope.dimension_count") {
            if rot as usize != head_dim {
                return Err(EngineError::Unsupported(format!(
                    "partial RoPE ({rot} of {head_dim} dims)"
                )));
            }
        }
        if !(rope_base > 0.0 && norm_eps > 0.0) {
            return Err(EngineError::InvalidModel(format!(
                "rope base {rope_base}, eps {norm_eps}"
            )));
        }
        Ok(Self {
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab,
            rope_base,
            norm_eps,
            max_seq,
        })
    }

    /// Width of the key (and of the value) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
