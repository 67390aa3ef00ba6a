use talaria_engine::EngineError;
use talaria_gguf::GgufError;
use talaria_model_file::ModelFileError;

/// Everything the cloud side can fail at.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The model file cannot serve: corrupt, unsupported, or shaped unlike its configuration.
    #[error(transparent)]
    ModelFile(#[from] ModelFileError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("tap: {0}")]
    Tap(String),
    /// The device a stage's topology names cannot be used on this host.
    #[error("backend: {0}")]
    Backend(String),
    /// The GEMM of a batch failed, for every call in it.
    #[error("batched GEMM: {message}")]
    Batch {
        error_type: &'static str,
        message: String,
    },
}

impl From<GgufError> for NodeError {
    fn from(e: GgufError) -> Self {
        NodeError::ModelFile(e.into())
    }
}

impl NodeError {
    /// A malformed model: a tensor or value unlike what the configuration says.
    pub(crate) fn invalid_model(message: String) -> Self {
        NodeError::ModelFile(ModelFileError::InvalidModel(message))
    }

    /// Checks that tensor `name` is stored as `[d_in, d_out]` (GGUF order), as the op using it
    /// expects.
    pub(crate) fn check_dims(
        name: &str,
        dims: &[u64],
        d_in: usize,
        d_out: usize,
    ) -> Result<(), Self> {
        if dims != [d_in as u64, d_out as u64] {
            return Err(NodeError::invalid_model(format!(
                "tensor {name:?} has dims {dims:?}, expected [{d_in}, {d_out}]"
            )));
        }
        Ok(())
    }

    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            NodeError::ModelFile(e) => e.error_type(),
            NodeError::Engine(e) => e.error_type(),
            NodeError::BadRequest(_) => "bad_request",
            NodeError::Tap(_) => "tap",
            NodeError::Backend(_) => "backend",
            NodeError::Batch { error_type, .. } => error_type,
        }
    }
}
