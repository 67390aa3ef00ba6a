//! The arithmetic both sides share, with no I/O and no protocol: the row-major GEMMs the mask
//! pool, the bases and the attacks multiply with ([`gemm`]), the integer mode's ring
//! ([`ring`]): the exact integer form of a block-quantized weight and the wrapping 64-bit
//! products the cloud (masked rows) and the CVM (pads, Freivalds' vectors) take with it, the
//! dot products modulo `2^64` of Freivalds' check ([`wrapping`]), and
//! the unprotected engine's decode product on the stored blocks themselves ([`quant`]).

pub mod amx;
pub mod gemm;
pub mod quant;
pub mod ring;
pub mod wrapping;

pub use amx::{AmxWeight, amx_matmul};
pub use quant::{BadQuantWeight, QuantMatrix, QuantType};
pub use ring::{
    BadIntWeight, BlockInts, Codes, INT_BLOCK, IntKernel, IntWeight, block_index, code_index,
    int_matmul, int_matmul_with, int_weight_times,
};
pub use wrapping::{DotKernel, dots_wrapping};
