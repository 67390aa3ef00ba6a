use talaria_engine::{EngineError, OpId};
use talaria_wire::WireError;

/// What can go wrong while masking or unmasking.
#[derive(Debug, thiserror::Error)]
pub enum RemoError {
    #[error("invalid ReMO configuration: {0}")]
    Config(String),
    #[error("ReMO set-up: {0}")]
    Setup(String),
    #[error("{0}: not set up")]
    NotSetUp(OpId),
    #[error("{op}: input has {found} columns, expected {expected}")]
    Shape {
        op: OpId,
        expected: usize,
        found: usize,
    },
    #[error("{op}: reply has {rows} rows, expected {expected}")]
    ReplyShape {
        op: OpId,
        rows: usize,
        expected: usize,
    },
    #[error("{op}: canary row off by {relative_error:e} (relative): the reply is corrupt")]
    Canary { op: OpId, relative_error: f64 },
    #[error("{op}: {wrong} values of the canary rows differ: the reply is corrupt")]
    IntCanary { op: OpId, wrong: usize },
    #[error("{op}: {reason}: the reply is corrupt")]
    Integrity { op: OpId, reason: String },
    #[error("{op}: cannot encode in fixed point without overflow: {reason}")]
    Overflow { op: OpId, reason: String },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<talaria_params::ParamsError> for RemoError {
    fn from(e: talaria_params::ParamsError) -> Self {
        RemoError::Config(e.message)
    }
}

impl RemoError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            RemoError::Config(_) => "remo_config",
            RemoError::Setup(_) => "remo_setup",
            RemoError::NotSetUp(_) => "remo_not_set_up",
            RemoError::Shape { .. } => "shape",
            RemoError::ReplyShape { .. } => "reply_shape",
            RemoError::Canary { .. }
            | RemoError::IntCanary { .. }
            | RemoError::Integrity { .. } => "integrity",
            RemoError::Overflow { .. } => "fixed_point_overflow",
            RemoError::Wire(_) => "wire",
            RemoError::Engine(e) => e.error_type(),
        }
    }
}
