use talaria_engine::EngineError;
use talaria_gguf::GgufError;

/// Everything the cloud side can fail at.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("tap: {0}")]
    Tap(String),
    /// The GEMM of a batch failed, for every call in it.
    #[error("batched GEMM: {message}")]
    Batch {
        error_type: &'static str,
        message: String,
    },
}

impl NodeError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            NodeError::Gguf(_) => "model_file",
            NodeError::Engine(e) => e.error_type(),
            NodeError::Unsupported(_) => "unsupported_model",
            NodeError::InvalidModel(_) => "invalid_model",
            NodeError::BadRequest(_) => "bad_request",
            NodeError::Tap(_) => "tap",
            NodeError::Batch { error_type, .. } => error_type,
        }
    }
}
