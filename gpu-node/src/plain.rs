use std::path::Path;

use talaria_gguf::GgufFile;

use talaria_engine::{EngineError, GenerateRequest, Generation, Tokenizer, Transformer, generate};

use crate::{LinearWeights, NodeError, read_provision};

/// The unprotected engine: both halves of the model in one process, no masking.
pub struct PlainEngine {
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub weights: LinearWeights,
}

impl PlainEngine {
    /// Loads a GGUF model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, NodeError> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Builds the engine from a parsed GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, NodeError> {
        let provision = read_provision(f)?;
        let weights = LinearWeights::load(f, &provision.config)?;
        let (tokenizer, model) = provision.build()?;
        Ok(Self {
            tokenizer,
            model,
            weights,
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
