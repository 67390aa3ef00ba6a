use talaria_engine::EngineError;
use talaria_gguf::GgufError;

/// Why a model file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
}

impl ModelFileError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            ModelFileError::Gguf(_) => "model_file",
            ModelFileError::Engine(e) => e.error_type(),
            ModelFileError::Unsupported(_) => "unsupported_model",
            ModelFileError::InvalidModel(_) => "invalid_model",
        }
    }
}
