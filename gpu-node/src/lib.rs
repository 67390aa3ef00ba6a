//! The cloud side of Talaria: it reads the model file, holds the block weights (norm gains folded
//! in) and answers linear calls. It extracts the material a CVM may be provisioned with, and
//! offers the unprotected [`PlainEngine`] as the baseline every masked engine is compared with.

mod error;
mod model_file;
mod plain;
mod weights;

pub use error::NodeError;
pub use model_file::{read_config, read_provision, read_tokenizer_spec};
pub use plain::PlainEngine;
pub use weights::{CpuBackend, LinearWeights};
