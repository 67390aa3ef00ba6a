use serde::{Deserialize, Serialize};

use crate::{EngineError, ModelConfig, Tokenizer, TokenizerSpec, Transformer};

/// The model material the cloud provisions to an attested CVM: the configuration, the tokenizer
/// and the token embedding table. No block weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvmProvision {
    pub config: ModelConfig,
    pub tokenizer: TokenizerSpec,
    /// `vocab` rows of `d_model` values.
    pub embeddings: Vec<f32>,
}

impl CvmProvision {
    /// Builds the tokenizer and the weight-free half of the model.
    pub fn build(self) -> Result<(Tokenizer, Transformer), EngineError> {
        let tokenizer = Tokenizer::from_spec(&self.tokenizer)?;
        if tokenizer.vocab_size() != self.config.vocab {
            return Err(EngineError::InvalidModel(format!(
                "tokenizer has {} tokens, model {}",
                tokenizer.vocab_size(),
                self.config.vocab
            )));
        }
        let model = Transformer::new(&self.config, self.embeddings)?;
        Ok((tokenizer, model))
    }
}
