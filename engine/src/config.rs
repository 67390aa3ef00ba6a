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

/// The largest dimension a model may have (2^24): far beyond any served here, small enough
/// that products of two never overflow.
pub const MAX_DIMENSION: usize = 1 << 24;

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
        // Every product of two dimensions (a weight's size, a KV row) must fit: a peer's
        // configuration could otherwise wrap one around to pass the checks below.
        let widest = [
            self.n_layers,
            self.d_model,
            self.n_heads,
            self.head_dim,
            self.d_ff,
            self.vocab,
            self.max_seq,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        if widest > MAX_DIMENSION {
            return bad(format!(
                "a dimension of {widest} exceeds {MAX_DIMENSION} in {self:?}"
            ));
        }
        if self.n_heads.checked_mul(self.head_dim) != Some(self.d_model)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelConfig {
        ModelConfig {
            n_layers: 30,
            d_model: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            d_ff: 1536,
            vocab: 49152,
            rope_base: 100000.0,
            norm_eps: 1e-5,
            max_seq: 8192,
        }
    }

    #[test]
    fn a_wrapping_head_product_or_a_huge_dimension_is_refused() {
        assert!(smollm().validate().is_ok());
        // 2^63 · 2 wraps to 0 in release arithmetic; with d_model 0 refused already, wrap to
        // a real width instead: heads · head_dim ≡ 576 (mod 2^64).
        let wrapped = ModelConfig {
            n_heads: 2,
            head_dim: (1usize << 63) + 288,
            ..smollm()
        };
        assert!(wrapped.validate().is_err());
        let huge = ModelConfig {
            max_seq: MAX_DIMENSION + 1,
            ..smollm()
        };
        assert!(huge.validate().is_err());
    }
}
