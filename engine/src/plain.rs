use std::path::Path;

use talaria_gguf::GgufFile;

use crate::{
    EngineError, GenerateRequest, Generation, LinearWeights, ModelConfig, Tokenizer, Transformer,
    generate,
};

/// The unprotected engine: both halves of the model in one process, no masking.
pub struct PlainEngine {
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub weights: LinearWeights,
}

impl PlainEngine {
    /// Loads a GGUF model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Builds the engine from a parsed GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, EngineError> {
        let config = ModelConfig::from_gguf(f)?;
        let tokenizer = Tokenizer::from_gguf(f)?;
        if tokenizer.vocab_size() != config.vocab {
            return Err(EngineError::InvalidModel(format!(
                "tokenizer has {} tokens, model {}",
                tokenizer.vocab_size(),
                config.vocab
            )));
        }
        Ok(Self {
            model: Transformer::from_gguf(f, &config)?,
            weights: LinearWeights::load(f, &config)?,
            tokenizer,
        })
    }

    /// Generates from `req`, calling `on_token` with each new id.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: impl FnMut(u32) -> Result<(), EngineError>,
    ) -> Result<Generation, EngineError> {
        generate(&self.model, &mut self.weights, req, on_token, None)
    }
}
