use std::path::Path;

use talaria_gguf::GgufFile;

use talaria_engine::{EngineError, GenerateRequest, Generation, Tokenizer, Transformer, generate};

use crate::{LinearWeights, NodeError};
use talaria_model_file::read_provision;

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

    /// Loads a GGUF model file with its weights on `placement`'s device.
    pub fn load_on(
        path: impl AsRef<Path>,
        placement: talaria_topology::Backend,
    ) -> Result<Self, NodeError> {
        Self::from_gguf_on(&GgufFile::open(path)?, placement)
    }

    /// Builds the engine from a parsed GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, NodeError> {
        Self::from_gguf_on(f, talaria_topology::Backend::Cpu)
    }

    fn from_gguf_on(f: &GgufFile, placement: talaria_topology::Backend) -> Result<Self, NodeError> {
        let provision = read_provision(f)?;
        let layers = 0..=provision.config.n_layers.saturating_sub(1);
        let weights = LinearWeights::load_on(f, &provision.config, layers, true, placement)?;
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
