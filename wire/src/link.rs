use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{MaskedCall, MaskedReply, SetupReply, SetupRequest};

/// A failure of the link to the cloud, or of the cloud itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct LinkError {
    /// A short machine-readable label.
    pub error_type: &'static str,
    pub message: String,
}

/// How the CVM side reaches the cloud side. It carries only wire messages.
pub trait CloudLink {
    /// Asks for `R_pub` of one op.
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError>;
    /// Sends one masked call.
    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError>;
}

/// An in-process link that encodes every message with postcard and decodes it on the other
/// side, exactly as the network will carry it.
pub struct Loopback<L>(pub L);

fn through_wire<T: Serialize + DeserializeOwned>(msg: &T) -> Result<T, LinkError> {
    let bytes = postcard::to_allocvec(msg).map_err(|e| LinkError {
        error_type: "encode",
        message: e.to_string(),
    })?;
    postcard::from_bytes(&bytes).map_err(|e| LinkError {
        error_type: "decode",
        message: e.to_string(),
    })
}

impl<L: CloudLink> CloudLink for Loopback<L> {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        through_wire(&self.0.setup(&through_wire(req)?)?)
    }

    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        through_wire(&self.0.call(&through_wire(call)?)?)
    }
}
