use std::path::Path;

use talaria_gguf::GgufFile;

use talaria_engine::{EngineError, GenerateRequest, Generation, Tokenizer, Transformer, generate};

use crate::{LinearWeights, NodeError, PlainLinear, QuantWeights};
use talaria_model_file::read_provision;

/// The unprotected engine: both halves of the model in one process, no masking.
///
/// It generates as an unprotected server would: decode steps read the stored blocks
/// ([`QuantWeights`], on a CPU placement when every projection is Q4_1 or Q8_0), prefill runs
/// the dense f32 GEMM. `weights` alone (dense f32, gains folded in) is the reference other
/// engines' products are compared with.
pub struct PlainEngine {
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub weights: LinearWeights,
    /// The decode weights; `None` on a GPU or for other block types (decode then runs dense).
    pub quant: Option<QuantWeights>,
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
        let quant = match placement {
            talaria_topology::Backend::Cpu => match QuantWeights::load(f, &provision.config) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::info!(reason = %e, "plain decode runs on the dense weights");
                    None
                }
            },
            _ => None,
        };
        let (tokenizer, model) = provision.build()?;
        Ok(Self {
            tokenizer,
            model,
            weights,
            quant,
        })
    }

    /// The linear ops a generation uses: blocks for decode rows, dense for prefill.
    pub fn linear(&self) -> PlainLinear<'_> {
        PlainLinear {
            dense: &self.weights,
            quant: self.quant.as_ref(),
        }
    }

    /// Generates from `req`, calling `on_token` with each new id.
    ///
    /// The generation runs on one of rayon's threads, so each product's parallel part starts
    /// without a cross-thread wake-up of this one (about a hundred products a token).
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: impl FnMut(u32) -> Result<(), EngineError> + Send,
    ) -> Result<Generation, EngineError> {
        let this = &*self;
        rayon::scope(move |_| generate(&this.model, &mut this.linear(), req, on_token, None))
    }
}
