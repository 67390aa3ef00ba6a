//! The error kinds a cloud process (coordinator, gpu-node) answers an agent with. They cross the
//! wire as their names (`ErrorReply::error_type`), so a peer of another version still decodes;
//! the agent reads them back through [`ErrorCode`], and a name it does not know is
//! [`ErrorCode::CloudError`], never a string carried further.

/// One kind of refusal from the cloud side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    UnknownSession,
    LayerNotOwned,
    BadRequest,
    MalformedFrame,
    FrameTooLarge,
    NodeUnavailable,
    NoRoute,
    NotAdmitted,
    AttestationRequired,
    UnexpectedRequest,
    Connection,
    Internal,
    Shape,
    BadOp,
    DeadlineExceeded,
    Overloaded,
    TooManyRows,
    TooManySessions,
    Cancelled,
    /// Any name this build does not know.
    CloudError,
}

impl ErrorCode {
    /// Every code, [`ErrorCode::CloudError`] last.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::UnknownSession,
        ErrorCode::LayerNotOwned,
        ErrorCode::BadRequest,
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::NodeUnavailable,
        ErrorCode::NoRoute,
        ErrorCode::NotAdmitted,
        ErrorCode::AttestationRequired,
        ErrorCode::UnexpectedRequest,
        ErrorCode::Connection,
        ErrorCode::Internal,
        ErrorCode::Shape,
        ErrorCode::BadOp,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Overloaded,
        ErrorCode::TooManyRows,
        ErrorCode::TooManySessions,
        ErrorCode::Cancelled,
        ErrorCode::CloudError,
    ];

    /// The name on the wire, in logs and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::LayerNotOwned => "layer_not_owned",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NodeUnavailable => "node_unavailable",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::NotAdmitted => "not_admitted",
            ErrorCode::AttestationRequired => "attestation_required",
            ErrorCode::UnexpectedRequest => "unexpected_request",
            ErrorCode::Connection => "connection",
            ErrorCode::Internal => "internal",
            ErrorCode::Shape => "shape",
            ErrorCode::BadOp => "bad_op",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TooManyRows => "too_many_rows",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::CloudError => "cloud_error",
        }
    }

    /// The code a name reads as: a name this build does not know is
    /// [`ErrorCode::CloudError`].
    pub fn read(name: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(ErrorCode::CloudError)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_from_its_name_and_strangers_are_cloud_errors() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::read(c.as_str()), c);
        }
        for stranger in ["", "Internal", "internal ", "tenant text", "remo_config"] {
            assert_eq!(ErrorCode::read(stranger), ErrorCode::CloudError);
        }
    }
}
