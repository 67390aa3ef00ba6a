//! What crosses between the CVM side and the cloud side: the ReMO set-up and the masked linear
//! calls, as serde types that postcard encodes, and the frames that carry them (sans I/O: the
//! QUIC connections they travel on are `talaria-net`). Everything here is, by definition, seen by the
//! cloud: no private coefficient, token or plaintext activation has a type in this crate.

mod basis;
pub mod digest;
mod error_code;
pub mod frame;
mod link;
mod protocol;
mod tensor;

pub use basis::{BasisSpec, expand_basis};
pub use error_code::ErrorCode;
pub use frame::{
    DEFAULT_MAX_FRAME, FrameError, MAX_BATCH_CALLS, MAX_BATCHED_FRAME, MAX_TENANT_EVENT,
    MAX_TENANT_MESSAGE, max_call_reply, max_call_rows, max_request_frame,
};
pub use link::{CloudLink, LinkError, Loopback};
pub use protocol::{
    ALPN_CLOUD, ALPN_TENANT, ErrorReply, LatencySplit, Prompt, Reply, Request, TENANT_DONE_BUCKET,
    TENANT_EVENT_BUCKET, TENANT_REQUEST_BUCKET, TenantEvent, TenantMessage, TenantRequest,
};
pub use tensor::{Tensor, WireError};

use serde::{Deserialize, Serialize};
use talaria_engine::OpId;
use talaria_kernels::IntWeight;

/// Identifies a session (one conversation) to the cloud side.
pub type SessionId = u64;

/// Asks the cloud for `R_pub = M_pub · W_op` for the public basis `basis`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetupRequest {
    pub session: SessionId,
    pub op: OpId,
    pub basis: BasisSpec,
    /// Answer in f64 (the f64 precision modes keep `R_pub` in f64).
    pub f64: bool,
    /// Answer with the exact integer form of the weight (the integer mode; identity basis only).
    pub integer: bool,
}

/// The cloud's answer to a [`SetupRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetupReply {
    pub op: OpId,
    pub r_pub: RPub,
}

/// What removes the masks' products: `R_pub = M_pub · W`, or the integer weight itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RPub {
    /// `m × d_out` (for the identity basis, `W` itself in f32).
    Float(Tensor),
    /// The integer mode's weight (identity basis: the pads are uniform residues).
    Int(IntWeight),
}

/// One masked linear call: the cloud returns `x̃ · W_op` for every row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedCall {
    pub session: SessionId,
    /// Per-session call counter, so replies can be matched and replays noticed.
    pub seq: u64,
    pub op: OpId,
    /// Masked rows (`rows × d_in`): real rows and dummy rows, shuffled.
    pub x: Tensor,
}

/// The cloud's answer to a [`MaskedCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedReply {
    pub seq: u64,
    pub y: Tensor,
}
