//! The tenant's side of the tenant protocol: send a request to a cvm-agent, receive its events.

use std::net::SocketAddr;

use talaria_attestation::{AttestationError, Evidence, InsecurePolicy, Policy, Verified};
use talaria_engine::Generation;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{
    ErrorReply, LatencySplit, TenantEvent, TenantMessage, TenantRequest, TlsMaterial,
};

/// What can go wrong for a tenant.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Tls(#[from] talaria_wire::TlsError),
    #[error("the agent refused: {0}")]
    Refused(ErrorReply),
    #[error("the agent ended the stream without an answer")]
    NoAnswer,
    #[error("the agent is not trusted: {0}")]
    Attestation(#[from] AttestationError),
}

impl ClientError {
    /// A short machine-readable label.
    pub fn error_type(&self) -> &str {
        match self {
            ClientError::Frame(e) => e.error_type(),
            ClientError::Tls(_) => "tls",
            ClientError::Refused(e) => &e.error_type,
            ClientError::NoAnswer => "no_answer",
            ClientError::Attestation(e) => e.error_type(),
        }
    }
}

/// A finished generation as the agent reports it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub generation: Generation,
    pub text: String,
    pub latency: LatencySplit,
}

/// What a tenant trusts: agents whose report verifies against `policy` (its own expected
/// measurement), or without hardware only if `allow_insecure`.
#[derive(Clone, Default)]
pub struct Trust {
    pub policy: Option<Policy>,
    pub allow_insecure: bool,
}

async fn open(
    conn: &quinn::Connection,
    msg: &TenantMessage,
) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| FrameError::Connection(e.to_string()))?;
    let bytes = frame::encode::<_, ()>(msg, None)?;
    talaria_wire::net::write_frame(&mut send, &bytes).await?;
    let _ = send.finish();
    Ok((send, recv))
}

/// Asks the agent on `conn` to attest over a fresh nonce and verifies the answer against `trust`,
/// bound to the certificate this very connection presented.
pub async fn attest(conn: &quinn::Connection, trust: &Trust) -> Result<Verified, ClientError> {
    let nonce: [u8; 32] = rand::random();
    let (_send, mut recv) = open(conn, &TenantMessage::Attest { nonce }).await?;
    let f = talaria_wire::net::read_frame(&mut recv, talaria_wire::DEFAULT_MAX_FRAME)
        .await?
        .ok_or(ClientError::NoAnswer)?;
    let evidence = match frame::body::<TenantEvent>(&f)? {
        TenantEvent::Attestation { evidence } => evidence,
        TenantEvent::Error(e) => return Err(ClientError::Refused(e)),
        _ => return Err(ClientError::NoAnswer),
    };
    let evidence: Evidence = frame::body(&evidence)?;
    let key = talaria_wire::net::peer_cert_der(conn).unwrap_or_default();
    let verified = match &trust.policy {
        Some(p) => talaria_attestation::verify(&evidence, p, &nonce, &key)?,
        None => talaria_attestation::verify_without_root(
            &evidence,
            InsecurePolicy {
                allow_insecure: trust.allow_insecure,
            },
        )?,
    };
    Ok(verified)
}

/// Connects to the agent at `addr` and checks its attestation against `trust`.
pub async fn connect(
    tls: &TlsMaterial,
    addr: SocketAddr,
    trust: &Trust,
) -> Result<(quinn::Endpoint, quinn::Connection, Verified), ClientError> {
    let endpoint = tls.client(talaria_wire::ALPN_TENANT)?;
    let conn = tls.connect(&endpoint, addr).await?;
    let verified = attest(&conn, trust).await?;
    Ok((endpoint, conn, verified))
}

/// Verifies the agent at `addr` against `trust`, then sends `req` and calls `on_token` with
/// each token as it comes. Nothing of the prompt leaves before the agent is verified.
pub async fn generate(
    tls: &TlsMaterial,
    addr: SocketAddr,
    trust: &Trust,
    req: &TenantRequest,
    mut on_token: impl FnMut(u32, Option<&str>),
) -> Result<Answer, ClientError> {
    let (endpoint, conn, _) = connect(tls, addr, trust).await?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| FrameError::Connection(e.to_string()))?;
    let bytes = frame::encode::<_, ()>(&TenantMessage::Generate(req.clone()), None)?;
    talaria_wire::net::write_frame(&mut send, &bytes).await?;
    let _ = send.finish();
    let answer = loop {
        let Some(f) =
            talaria_wire::net::read_frame(&mut recv, talaria_wire::DEFAULT_MAX_FRAME).await?
        else {
            break Err(ClientError::NoAnswer);
        };
        match frame::body::<TenantEvent>(&f)? {
            TenantEvent::Token { id, piece } => on_token(id, piece.as_deref()),
            TenantEvent::Done {
                generation,
                text,
                latency,
            } => {
                break Ok(Answer {
                    generation,
                    text,
                    latency,
                });
            }
            TenantEvent::Error(e) => break Err(ClientError::Refused(e)),
            TenantEvent::Attestation { .. } => break Err(ClientError::NoAnswer),
        }
    };
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    answer
}
