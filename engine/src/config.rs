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

impl ModelConfig {
    /// Checks that the shapes are consistent: the configuration may come from a file or a peer.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidModel(m));
        if [
            self.n_layers,
            self.d_model,
            self.n_heads,
            self.n_kv_heads,
            self.d_ff,
            self.vocab,
            self.max_seq,
        ]
        .contains(&0)
        {
            return bad(format!("a zero dimension in {self:?}"));
        }
        if self.d_model != self.n_heads * self.head_dim
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "{} heads of {} / {} kv heads do not make {}",
                self.n_heads, self.head_dim, self.n_kv_heads, self.d_model
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("odd head dim {}", self.head_dim));
        }
        if !(self.rope_base > 0.0 && self.norm_eps > 0.0) {
            return bad(format!(
                "rope base {}, eps {}",
                self.rope_base, self.norm_eps
            ));
        }
        Ok(())
    }

    /// Width of the key (and of the value) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
