//! The tenant's side of the tenant protocol: send a request to a cvm-agent, receive its events.

use std::net::SocketAddr;

use talaria_engine::Generation;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{ErrorReply, LatencySplit, TenantEvent, TenantRequest, TlsMaterial};

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
}

impl ClientError {
    /// A short machine-readable label.
    pub fn error_type(&self) -> &str {
        match self {
            ClientError::Frame(e) => e.error_type(),
            ClientError::Tls(_) => "tls",
            ClientError::Refused(e) => &e.error_type,
            ClientError::NoAnswer => "no_answer",
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

/// Sends `req` to the agent at `addr` and calls `on_token` with each token as it comes.
pub async fn generate(
    tls: &TlsMaterial,
    addr: SocketAddr,
    req: &TenantRequest,
    mut on_token: impl FnMut(u32, Option<&str>),
) -> Result<Answer, ClientError> {
    let endpoint = tls.client(talaria_wire::ALPN_TENANT)?;
    let conn = tls.connect(&endpoint, addr).await?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| FrameError::Connection(e.to_string()))?;
    let bytes = frame::encode::<_, ()>(req, None)?;
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
        }
    };
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    answer
}
