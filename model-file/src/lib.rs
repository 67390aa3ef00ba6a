//! What a GGUF model file says to Talaria, read by every process that opens one: the
//! hyper-parameters and the tokenizer ([`read_config`], [`read_tokenizer_spec`]), the material a
//! CVM is provisioned with ([`read_provision`]), which stored tensors make each op
//! ([`block_sources`], [`lm_head_source`]) and the shards a cluster's processes read ([`Part`]).
//!
//! It holds no weights in a tensor library: the coordinator reads its shard through this crate
//! without linking burn, and the gpu-node builds its float and integer weights from the same
//! op-to-tensor map.

mod error;
mod read;
mod shard;
mod sources;

pub use error::ModelFileError;
pub use read::{read_config, read_provision, read_tokenizer_spec};
pub use shard::{Part, SHARD_LAYERS, SHARD_LM_HEAD, SHARD_PART, SHARD_SOURCE_SHA256};
pub use sources::{OpSource, block_sources, lm_head_source, load_vector};
