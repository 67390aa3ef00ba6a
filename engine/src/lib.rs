//! The model engine for `llama`-architecture GGUF models.
//!
//! The forward pass is cut in two along the line ReMO needs: [`Transformer`] is the weight-free
//! half (embedding lookup, gain-free norms, RoPE, attention with the KV cache, SwiGLU, residuals)
//! and [`LinearOps`] is the weight-dependent half (every projection, batched over rows), answered
//! by the gpu-node crate. This crate never reads a model file: the weight-free half is built from
//! a [`CvmProvision`], the material the cloud provisions to an attested CVM.

mod config;
mod error;
mod forward;
mod generate;
mod linear;
pub mod ops;
mod prefix_cache;
mod provision;
mod sampling;
mod tokenizer;

pub use config::ModelConfig;
pub use error::EngineError;
pub use forward::{KvCache, Transformer};
pub use generate::{
    GenerateRequest, Generation, StopReason, cached_ids, first_stop, generate, generate_cached,
    generate_until,
};
pub use linear::{BlockOp, LinearOps, OpId, Rows, op_text};
pub use prefix_cache::{PrefixCache, PrefixStats, Reused};
pub use provision::CvmProvision;
pub use sampling::{Sampler, SamplingParams, argmax};
pub use tokenizer::{
    ChatMessage, DEFAULT_SYSTEM_PROMPT, TextStream, Tokenizer, TokenizerSpec, chat_prompt,
};
