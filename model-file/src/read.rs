//! What the model file says: hyper-parameters, tokenizer, and the CVM's provision.

use talaria_engine::{CvmProvision, ModelConfig, TokenizerSpec};
use talaria_gguf::{GgufFile, Value};

use crate::ModelFileError;

/// Largest sizes accepted from metadata: bounds allocations on a corrupt file.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 1024;

/// Reads and validates the hyper-parameters of a `llama` model.
pub fn read_config(f: &GgufFile) -> Result<ModelConfig, ModelFileError> {
    let arch = f.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(ModelFileError::Unsupported(format!(
            "architecture {arch:?} (only \"llama\" is implemented)"
        )));
    }
    let dim = |key: &str, max: u64| -> Result<usize, ModelFileError> {
        let v = f.get_u64(&format!("llama.{key}"))?;
        if v == 0 || v > max {
            return Err(ModelFileError::InvalidModel(format!("llama.{key} = {v}")));
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
    if d_model % n_heads != 0 {
        return Err(ModelFileError::InvalidModel(format!(
            "{n_heads} heads do not divide {d_model}"
        )));
    }
    let head_dim = d_model / n_heads;
    if let Ok(rot) = f.get_u64("llama.rope.dimension_count")
        && rot as usize != head_dim
    {
        return Err(ModelFileError::Unsupported(format!(
            "partial RoPE ({rot} of {head_dim} dims)"
        )));
    }
    let config = ModelConfig {
        n_layers,
        d_model,
        n_heads,
        n_kv_heads,
        head_dim,
        d_ff: dim("feed_forward_length", MAX_DIM)?,
        vocab: f.get_array("tokenizer.ggml.tokens")?.len(),
        rope_base: match f.metadata().get("llama.rope.freq_base") {
            Some(_) => f.get_f64("llama.rope.freq_base")? as f32,
            None => 10_000.0,
        },
        norm_eps: f.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        max_seq: dim("context_length", MAX_DIM)?,
    };
    config.validate()?;
    Ok(config)
}

/// Reads the tokenizer description from `tokenizer.ggml.*`.
pub fn read_tokenizer_spec(f: &GgufFile) -> Result<TokenizerSpec, ModelFileError> {
    let id = |key: &str| -> Result<Option<u32>, ModelFileError> {
        match f.metadata().get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| ModelFileError::InvalidModel(format!("{key} = {v:?}"))),
        }
    };
    let token_types = f
        .get_array("tokenizer.ggml.token_type")?
        .iter()
        .map(|v| {
            v.as_i64()
                .and_then(|t| i32::try_from(t).ok())
                .ok_or_else(|| ModelFileError::InvalidModel(format!("token type {v:?}")))
        })
        .collect::<Result<_, _>>()?;
    let strings = |key: &str| -> Result<Vec<String>, ModelFileError> {
        Ok(f.get_string_array(key)?
            .into_iter()
            .map(str::to_string)
            .collect())
    };
    Ok(TokenizerSpec {
        model: f.get_str("tokenizer.ggml.model")?.to_string(),
        pre: f
            .get_str("tokenizer.ggml.pre")
            .unwrap_or("default")
            .to_string(),
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types,
        merges: strings("tokenizer.ggml.merges")?,
        eos: id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| ModelFileError::InvalidModel("no eos token id".into()))?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        add_bos: matches!(
            f.metadata().get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        ),
    })
}

/// The material a CVM is provisioned with: configuration, tokenizer and embedding table.
pub fn read_provision(f: &GgufFile) -> Result<CvmProvision, ModelFileError> {
    let config = read_config(f)?;
    let (embeddings, dims) = f.dequantize("token_embd.weight")?;
    if dims != [config.d_model as u64, config.vocab as u64] {
        return Err(ModelFileError::InvalidModel(format!(
            "token_embd.weight has dims {dims:?}, expected [{}, {}]",
            config.d_model, config.vocab
        )));
    }
    Ok(CvmProvision {
        tokenizer: read_tokenizer_spec(f)?,
        config,
        embeddings,
    })
}
