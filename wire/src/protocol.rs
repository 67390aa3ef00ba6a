//! The two protocols of a cluster, named by their ALPN strings.
//!
//! - **cloud** (`talaria-cloud/5`): cvm-agent → coordinator → gpu-node. Every request is one
//!   QUIC bidirectional stream carrying one frame whose header is a [`Request`]; the answer is
//!   one frame whose header is a [`Reply`]. The coordinator routes on the header alone, and
//!   forwards masked calls of one op that reach it together for one stage as one
//!   [`Request::Batch`] frame (their frames packed untouched), whose answer packs theirs in the
//!   same order.
//! - **tenant** (`talaria-tenant/3`): tenant → cvm-agent. One stream per generation: a
//!   [`TenantRequest`], answered by a sequence of [`TenantEvent`]s; every frame is padded with
//!   zero bytes to a multiple of its bucket (`frame::encode_padded`), and a frame that is not is
//!   refused: events of [`TENANT_EVENT_BUCKET`] (a `Done` of [`TENANT_DONE_BUCKET`];
//!   `frame::tenant_event`), requests of [`TENANT_REQUEST_BUCKET`].

use serde::{Deserialize, Serialize};
use talaria_engine::{ChatMessage, Generation, OpId, SamplingParams};

use crate::SessionId;

/// ALPN of the cloud protocol, version 5 (version 2: the set-up reply carries
/// `engine::CvmProvision`; version 3: an integer weight's codes are stored in input pairs,
/// `kernels::code_index`; version 4: by tiles of 64 columns, codes, scales and minimums,
/// `kernels::block_index`; version 5: [`Request::Batch`]). A peer of another version fails the
/// handshake instead of reading the weight in another order or a batch it does not know.
pub const ALPN_CLOUD: &[u8] = b"talaria-cloud/5";
/// ALPN of the tenant protocol, version 3 (version 2: `TenantRequest` and `Generation` gained
/// the conversation cache's fields; version 3: events are padded to [`TENANT_EVENT_BUCKET`]).
pub const ALPN_TENANT: &[u8] = b"talaria-tenant/3";

/// Every event frame of the tenant protocol is padded to a multiple of this many bytes, so that
/// the network, which sees each frame's length, does not see the length of each token's text
/// (one event per token). A token event is at most a few dozen bytes.
pub const TENANT_EVENT_BUCKET: usize = 256;

/// The last event of an answer, [`TenantEvent::Done`], carries the whole text and every prompt
/// and answer id: it is padded to a multiple of this (a multiple of [`TENANT_EVENT_BUCKET`]),
/// which holds thousands of tokens' worth, so that its length does not tell the answer's length
/// in bytes or the prompt's in tokens (beyond some 20 000 tokens it shows them in steps of
/// 64 KiB). A failed generation ends with an [`TenantEvent::Error`] of one event bucket.
pub const TENANT_DONE_BUCKET: usize = 64 << 10;

/// The tenant's client pads its requests to a multiple of this many bytes: a request's length
/// would otherwise tell the network the prompt's length in bytes (and, a conversation's history
/// being sent again each turn, the length of every earlier answer).
pub const TENANT_REQUEST_BUCKET: usize = 4096;

impl TenantEvent {
    /// The bucket this event's frame is padded to.
    pub fn bucket(&self) -> usize {
        match self {
            TenantEvent::Done { .. } => TENANT_DONE_BUCKET,
            _ => TENANT_EVENT_BUCKET,
        }
    }
}

/// The routing header of a request on the cloud protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// agent → coordinator, first on a connection: a fresh nonce to bind the agent's
    /// attestation to. Reply payload: `[u8; 32]`.
    Challenge,
    /// agent → coordinator, after `Challenge`: the agent's attestation evidence (a postcard
    /// `talaria_attestation::Evidence`) over the nonce and `key` (the DER of the TLS certificate
    /// it serves its tenant with). Reply payload: [`CvmProvision`](talaria_engine::CvmProvision).
    Hello {
        tenant: String,
        agent: String,
        evidence: Vec<u8>,
        key: Vec<u8>,
    },
    /// agent → coordinator: a new session. Reply payload: its [`SessionId`].
    OpenSession,
    /// agent → coordinator → every stage: the session is over.
    CloseSession { session: SessionId },
    /// coordinator → stage: a session of `tenant` starts.
    StageOpen { session: SessionId, tenant: String },
    /// Payload: [`SetupRequest`](crate::SetupRequest); reply payload: [`SetupReply`](crate::SetupReply).
    Setup { session: SessionId, op: OpId },
    /// Payload: [`MaskedCall`](crate::MaskedCall); reply payload: [`MaskedReply`](crate::MaskedReply).
    Call {
        session: SessionId,
        op: OpId,
        seq: u64,
    },
    /// coordinator → stage: `calls` masked calls in one frame (a stage accepts any sessions and
    /// ops of its own; the coordinator packs calls of one op). Payload: their request frames,
    /// each a `Call` exactly as its agent sent it, packed ([`frame::pack`](crate::frame::pack));
    /// reply payload: their answer frames, packed in the same order. Each call is admitted and
    /// answered on its own, as if it came alone (one that is refused does not touch the others),
    /// but the answers leave together. A stage answers a batch it cannot read at all with one
    /// error, which then answers every call in it. Never an agent's to send: its calls would skip
    /// the coordinator's check that the sessions are its own.
    Batch { calls: u32 },
}

impl Request {
    /// The session a request belongs to, if any.
    pub fn session(&self) -> Option<SessionId> {
        match *self {
            Request::CloseSession { session }
            | Request::StageOpen { session, .. }
            | Request::Setup { session, .. }
            | Request::Call { session, .. } => Some(session),
            Request::Challenge
            | Request::Hello { .. }
            | Request::OpenSession
            | Request::Batch { .. } => None,
        }
    }
}

/// The header of every answer on the cloud protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Served; the payload follows. `compute_us`: time the gpu-node spent computing it.
    Ok { compute_us: u64 },
    /// Not served, and why.
    Err(ErrorReply),
}

/// A typed refusal: a short machine-readable `error_type` and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct ErrorReply {
    pub error_type: String,
    pub message: String,
}

impl ErrorReply {
    /// What kind of refusal this is ([`ErrorCode::CloudError`](crate::ErrorCode) for a name this
    /// build does not know).
    pub fn code(&self) -> crate::ErrorCode {
        crate::ErrorCode::read(&self.error_type)
    }

    /// An error reply of type `error_type`.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
        }
    }
}

/// The prompt of a tenant request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Text, wrapped in the chat template as one user message if `chat`.
    Text { text: String, chat: bool },
    /// Token ids, fed as they are.
    Ids(Vec<u32>),
    /// A conversation, rendered with the model's chat template (a default system message is
    /// added if it has none), the assistant's turn opened.
    Chat(Vec<ChatMessage>),
}

/// What a tenant asks an agent on a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TenantMessage {
    /// Prove what you are: answered by one [`TenantEvent::Attestation`] over `nonce` and the
    /// agent's TLS certificate.
    Attest { nonce: [u8; 32] },
    /// Generate, with one of the tenant's API keys: answered by tokens, then `Done` or
    /// `Error` (`invalid_api_key` without a key the agent accepts).
    Generate {
        request: TenantRequest,
        api_key: String,
    },
}

/// A tenant's generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep generating past the end-of-sequence token.
    pub ignore_eos: bool,
    /// Stop as soon as the text contains one of these; the text ends before it.
    #[serde(default)]
    pub stop: Vec<String>,
    /// The agent reuses a past conversation's cached keys and values only for requests of the
    /// same API key and the same salt (vLLM's `cache_salt`): a fresh salt runs the prompt cold.
    #[serde(default)]
    pub cache_salt: Option<String>,
}

/// Where one generation's time went, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySplit {
    /// The CVM's own work: norms, attention, activations, sampling.
    pub cvm_compute_s: f64,
    /// Masking and unmasking on the critical path.
    pub masking_s: f64,
    /// The gpu-nodes' matrix multiplies, as they report them.
    pub gpu_compute_s: f64,
    /// Waiting for replies minus the gpu compute: QUIC, routing, (de)serialisation.
    pub network_s: f64,
    /// Opening the session: ReMO set-up of every op.
    pub setup_s: f64,
    /// Masked calls made.
    pub calls: u64,
}

/// The answer to a tenant: tokens as they come, then a summary or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TenantEvent {
    /// Attestation evidence (a postcard `talaria_attestation::Evidence`) binding, for the
    /// tenant purpose, the tenant's nonce, the DER of the certificate this connection
    /// presented, and `claims`: the agent's statement of what protects the tenant (JSON
    /// `talaria-agent-claims-1`: the effective ReMO configuration).
    Attestation {
        evidence: Vec<u8>,
        claims: Vec<u8>,
    },
    /// One generated token, with its text when the piece is complete.
    Token {
        id: u32,
        piece: Option<String>,
    },
    /// The generation is over.
    Done {
        generation: Generation,
        /// The generated text, without the stop token.
        text: String,
        latency: LatencySplit,
    },
    Error(ErrorReply),
}
