//! The cloud side of Talaria: it reads its shard of the model file (`talaria-model-file`), holds the block weights (norm gains folded
//! in) and answers linear calls. It extracts the material a CVM may be provisioned with, and
//! offers the unprotected [`PlainEngine`] as the baseline every masked engine is compared with.

mod cloud;
mod error;
mod fault;
mod int_weights;
mod plain;
mod quant_weights;
pub mod runtime;
mod stage;
mod tap;
mod weights;

pub use cloud::CloudExecutor;
pub use error::NodeError;
pub use fault::{ALLOW_FAULTS_ENV, FAULT_ENV, Fault, Faulty};
pub use int_weights::IntWeights;
pub use plain::PlainEngine;
pub use quant_weights::{PlainLinear, QUANT_MAX_ROWS, QuantWeights};
pub use tap::{NpyData, TAP_FORMAT, Tap, TapBasis, TapDtype, TapEvent, TapIndex, write_npy};
pub use weights::{CpuBackend, LinearWeights};
