use std::path::PathBuf;

/// Everything that can be wrong with a GGUF file or a request made of it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: bad magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported GGUF version {found} (only version 3 is read)")]
    UnsupportedVersion { found: u32 },
    #[error("truncated GGUF: needed {needed} bytes at offset {offset} for {what}, file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("unknown metadata value type {found} for key {key:?}")]
    UnknownValueType { key: String, found: u32 },
    #[error("unknown tensor type {found} for tensor {tensor:?}")]
    UnknownTensorType { tensor: String, found: u32 },
    #[error("tensor {tensor:?}: {reason}")]
    BadTensor { tensor: String, reason: String },
    #[error("invalid UTF-8 in {what}")]
    BadUtf8 { what: String },
    #[error("invalid GGUF: {0}")]
    Invalid(String),
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongValueType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("tensor {0:?} is not in the file")]
    MissingTensor(String),
    #[error("no dequantizer for tensor type {ty} (tensor {tensor:?})")]
    UnsupportedType { tensor: String, ty: String },
}
