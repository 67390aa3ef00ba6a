//! GGUF v3: a bounds-checked reader, a writer, and dequantizers.
//!
//! The reader never trusts a length it reads: every count and size is checked against the bytes
//! that remain before anything is allocated, so a corrupt or truncated file is an error, never a
//! panic or an abort on a huge allocation.

mod error;
mod quant;
mod reader;
mod value;
mod writer;

pub use error::GgufError;
pub use quant::{
    GgmlType, IntBlocks, dequantize, exact_shift, integer_blocks, quantize_q4_1, quantize_q8_0,
};
pub use reader::{GgufFile, TensorInfo};
pub use value::Value;
pub use writer::{GgufWriter, TensorPayload};

/// The magic number at the start of every GGUF file ("GGUF", little-endian).
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The only GGUF version this crate reads and writes.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the tensor data section when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
