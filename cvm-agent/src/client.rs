//! The tenant's side of the tenant protocol: send a request to a cvm-agent, receive its events.

use std::net::SocketAddr;

use talaria_attestation::{
    AttestationError, Bound, Evidence, InsecurePolicy, Policy, Purpose, Verified,
};
use talaria_engine::Generation;

use crate::claims::{AgentClaims, BelowFloor, check_floor};
use talaria_net::TlsMaterial;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{ErrorReply, LatencySplit, TenantEvent, TenantMessage, TenantRequest};

/// What can go wrong for a tenant.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Tls(#[from] talaria_net::TlsError),
    #[error("the agent refused: {0}")]
    Refused(ErrorReply),
    #[error("the agent ended the stream without an answer")]
    NoAnswer,
    #[error("the agent is not trusted: {0}")]
    Attestation(#[from] AttestationError),
    #[error("the agent is not trusted: {0}")]
    BelowFloor(#[from] BelowFloor),
    #[error("the agent is not trusted: {0}")]
    Claims(String),
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
            ClientError::BelowFloor(e) => e.error_type(),
            ClientError::Claims(_) => "attestation_claims",
        }
    }
}

/// A finished generation as the agent reports it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub generation: Generation,
    pub text: String,
    pub latency: LatencySplit,
    /// What the agent's attestation established before the prompt was sent.
    pub attested: Attested,
}

/// What a tenant trusts: agents whose report verifies against `policy` (its own expected
/// measurement), or without hardware only if `allow_insecure`; and whose bound ReMO
/// configuration meets the floor, unless `accept_below_floor`.
#[derive(Clone, Default)]
pub struct Trust {
    pub policy: Option<Policy>,
    pub allow_insecure: bool,
    /// The tenant's explicit choice to use an agent below the floor (e.g. the plaintext
    /// control); never the default.
    pub accept_below_floor: bool,
    /// What else the agent's claims must say (checked before any prompt is sent).
    pub expect: Expect,
}

impl Trust {
    /// A development tenant's trust: agents without SEV-SNP hardware are accepted (a local
    /// cluster's), nothing below the floor is, and no further claim is required.
    pub fn development() -> Self {
        Self {
            allow_insecure: true,
            ..Self::default()
        }
    }
}

/// Claims a tenant requires beyond the floor: each `None` is not checked.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The agent serves this tenant.
    pub tenant: Option<String>,
    /// Exactly this ReMO precision (e.g. `int`: the one-time pad, not a float mode that merely
    /// meets the floor).
    pub precision: Option<talaria_params::Precision>,
    /// Exactly these API-key hashes (hex), so that nobody added one.
    pub api_key_sha256: Option<Vec<String>>,
}

impl Expect {
    fn check(&self, claims: &AgentClaims) -> Result<(), ClientError> {
        let refuse = |what: String| Err(ClientError::Claims(what));
        if let Some(t) = self.tenant.as_ref().filter(|t| **t != claims.tenant) {
            return refuse(format!("the agent serves {:?}, not {t:?}", claims.tenant));
        }
        if let Some(p) = self.precision.filter(|p| *p != claims.remo.precision) {
            return refuse(format!(
                "the agent runs precision {}, not {p}",
                claims.remo.precision
            ));
        }
        if let Some(keys) = &self.api_key_sha256 {
            let mut want: Vec<String> = keys.iter().map(|k| k.to_lowercase()).collect();
            want.sort();
            want.dedup();
            if want != claims.api_key_sha256 {
                return refuse(format!(
                    "the agent accepts {} API key(s), not exactly the {} expected",
                    claims.api_key_sha256.len(),
                    want.len()
                ));
            }
        }
        Ok(())
    }
}

/// What a verified attestation established.
#[derive(Debug, Clone)]
pub struct Attested {
    pub verified: Verified,
    /// What the agent runs with, as its report binds it (for insecure evidence: as it says).
    pub claims: AgentClaims,
}

async fn open(
    conn: &quinn::Connection,
    msg: &TenantMessage,
) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| FrameError::Connection(e.to_string()))?;
    let bytes = frame::encode_padded(msg, talaria_wire::TENANT_REQUEST_BUCKET)?;
    talaria_net::write_frame(&mut send, &bytes).await?;
    let _ = send.finish();
    Ok((send, recv))
}

/// Asks the agent on `conn` to attest over a fresh nonce and verifies the answer against `trust`,
/// bound to the certificate this very connection presented and to the agent's claims, which
/// must meet the floor unless the tenant accepted less.
pub async fn attest(conn: &quinn::Connection, trust: &Trust) -> Result<Attested, ClientError> {
    let nonce: [u8; 32] = rand::random();
    let (_send, mut recv) = open(conn, &TenantMessage::Attest { nonce }).await?;
    let f = talaria_net::read_frame(&mut recv, talaria_wire::MAX_TENANT_EVENT)
        .await?
        .ok_or(ClientError::NoAnswer)?;
    let (evidence, claims) = match frame::tenant_event(&f)? {
        TenantEvent::Attestation { evidence, claims } => (evidence, claims),
        TenantEvent::Error(e) => return Err(ClientError::Refused(e)),
        _ => return Err(ClientError::NoAnswer),
    };
    let evidence: Evidence = frame::body(&evidence)?;
    let key = talaria_net::peer_cert_der(conn).unwrap_or_default();
    let bound = Bound {
        purpose: Purpose::Tenant,
        nonce: &nonce,
        key: &key,
        claims: &claims,
    };
    let verified = match &trust.policy {
        Some(p) => talaria_attestation::verify(&evidence, p, &bound)?,
        None => talaria_attestation::verify_without_root(
            &evidence,
            InsecurePolicy {
                allow_insecure: trust.allow_insecure,
            },
        )?,
    };
    let claims = AgentClaims::decode(&claims).map_err(ClientError::Claims)?;
    check_floor(&claims.remo, trust.accept_below_floor)?;
    trust.expect.check(&claims)?;
    Ok(Attested { verified, claims })
}

/// Connects to the agent at `addr` and checks its attestation against `trust`.
pub async fn connect(
    tls: &TlsMaterial,
    addr: SocketAddr,
    trust: &Trust,
) -> Result<(quinn::Endpoint, quinn::Connection, Attested), ClientError> {
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
    api_key: &str,
    mut on_token: impl FnMut(u32, Option<&str>),
) -> Result<Answer, ClientError> {
    let (endpoint, conn, attested) = connect(tls, addr, trust).await?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| FrameError::Connection(e.to_string()))?;
    let bytes = frame::encode_padded(
        &TenantMessage::Generate {
            request: req.clone(),
            api_key: api_key.to_string(),
        },
        talaria_wire::TENANT_REQUEST_BUCKET,
    )?;
    talaria_net::write_frame(&mut send, &bytes).await?;
    let _ = send.finish();
    let answer = loop {
        let Some(f) = talaria_net::read_frame(&mut recv, talaria_wire::MAX_TENANT_EVENT).await?
        else {
            break Err(ClientError::NoAnswer);
        };
        match frame::tenant_event(&f)? {
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
                    attested: attested.clone(),
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
