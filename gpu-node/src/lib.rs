//! The cloud side of Talaria: it reads its shard of the model file (`talaria-model-file`), holds the block weights (norm gains folded
//! in) and answers linear calls. It extracts the material a CVM may be provisioned with, and
//! offers the unprotected [`PlainEngine`] as the baseline every masked engine is compared with.

mod cloud;
mod error;
mod fault;
mod int_weights;
mod plain;
mod stage;
mod tap;
mod weights;

pub use cloud::CloudExecutor;
pub use error::NodeError;
pub use fault::{ALLOW_FAULTS_ENV, FAULT_ENV, Fault, Faulty};
pub use int_weights::IntWeights;
pub use plain::PlainEngine;
pub use tap::{NpyData, Tap, write_npy};
pub use weights::{CpuBackend, LinearWeights};

/// A file-name-safe name of an op: `l03-down`, `lm_head`.
pub(crate) fn tap_op_name(op: talaria_engine::OpId) -> String {
    match op {
        talaria_engine::OpId::Block { layer, op } => format!("l{layer:02}-{}", op.name()),
        talaria_engine::OpId::LmHead => "lm_head".into(),
    }
}
