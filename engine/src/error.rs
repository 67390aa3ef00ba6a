/// Everything the engine can fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{op}: input has {found} columns, expected {expected}")]
    Shape {
        op: String,
        expected: usize,
        found: usize,
    },
    #[error("{op}: {reason}")]
    BadOp { op: String, reason: String },
    #[error("context full: {needed} positions needed, the model allows {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("the prompt has {prompt} tokens; the model's context is {max}")]
    ContextLengthExceeded { prompt: usize, max: usize },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("tensor backend: {0}")]
    Backend(String),
    /// A linear call answered by the other side (masked or remote) failed.
    #[error("outsourced linear call: {message}")]
    Outsourced {
        error_type: &'static str,
        message: String,
    },
}

impl EngineError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::Unsupported(_) => "unsupported_model",
            EngineError::InvalidModel(_) => "invalid_model",
            EngineError::Tokenizer(_) => "tokenizer",
            EngineError::TokenOutOfRange { .. } => "token_out_of_range",
            EngineError::Shape { .. } => "shape",
            EngineError::BadOp { .. } => "bad_op",
            EngineError::ContextFull { .. } => "context_full",
            EngineError::ContextLengthExceeded { .. } => "context_length_exceeded",
            EngineError::EmptyPrompt => "empty_prompt",
            EngineError::Sampling(_) => "sampling",
            EngineError::Backend(_) => "backend",
            EngineError::Outsourced { error_type, .. } => error_type,
        }
    }
}
