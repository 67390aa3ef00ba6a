//! The cvm-agent's actors: [`Uplink`] owns the connection to the coordinator, [`Session`] runs
//! one conversation, and [`serve`] answers tenants.

use std::sync::Arc;

use actix::prelude::*;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{ErrorReply, TenantEvent, TenantMessage, TenantRequest};
use tokio::sync::mpsc;

/// A request frame for the coordinator; the result is its answer frame.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, FrameError>")]
pub struct Exchange(pub Vec<u8>);

/// Owns the agent's QUIC connection to the coordinator. Every exchange is its own stream, so
/// sessions never wait for each other on the link.
pub struct Uplink {
    conn: quinn::Connection,
    max_frame: usize,
}

impl Uplink {
    /// An uplink over an established connection.
    pub fn new(conn: quinn::Connection, max_frame: usize) -> Self {
        Self { conn, max_frame }
    }
}

impl Actor for Uplink {
    type Context = Context<Self>;
}

impl Handler<Exchange> for Uplink {
    type Result = ResponseFuture<Result<Vec<u8>, FrameError>>;

    fn handle(&mut self, msg: Exchange, _: &mut Context<Self>) -> Self::Result {
        let (conn, max) = (self.conn.clone(), self.max_frame);
        Box::pin(async move { talaria_wire::net::request(&conn, &msg.0, max).await })
    }
}

/// A blocking handle on the uplink for code running on a worker thread (never on the event
/// loop: it waits for the answer).
#[derive(Clone)]
pub struct BlockingUplink(pub Addr<Uplink>);

impl BlockingUplink {
    /// Sends `frame` and waits for the answer frame.
    pub fn exchange(&self, frame: Vec<u8>) -> Result<Vec<u8>, FrameError> {
        futures::executor::block_on(self.0.send(Exchange(frame)))
            .map_err(|e| FrameError::Connection(format!("uplink: {e}")))?
    }
}

/// One conversation's logic, implemented by the cvm-agent crate. Runs on a worker thread.
pub trait Conversation: Send + 'static {
    /// Runs one generation to its end. `emit` sends an event to the tenant and returns `false`
    /// once the tenant is gone (the generation should then stop).
    fn run(&mut self, req: TenantRequest, emit: &mut dyn FnMut(TenantEvent) -> bool);
}

/// Makes a conversation (opening a session with the cloud). Runs on a worker thread.
pub type ConversationFactory =
    Arc<dyn Fn() -> Result<Box<dyn Conversation>, ErrorReply> + Send + Sync>;

/// Asks a session to generate; events arrive on `events`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Generate {
    pub request: TenantRequest,
    pub events: mpsc::UnboundedSender<TenantEvent>,
}

/// One conversation. Its state (KV cache, ReMO masks, sampler) lives on a worker thread while
/// the generation runs, and is dropped there too: closing the cloud session waits on the
/// uplink, which must never happen on the event loop.
pub struct Session {
    factory: ConversationFactory,
    busy: bool,
}

impl Session {
    /// A session whose conversation `factory` makes when it starts generating.
    pub fn new(factory: ConversationFactory) -> Self {
        Self {
            factory,
            busy: false,
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;
}

impl Handler<Generate> for Session {
    type Result = ();

    fn handle(&mut self, msg: Generate, ctx: &mut Context<Self>) {
        if self.busy {
            let _ = msg.events.send(TenantEvent::Error(ErrorReply::new(
                "session_busy",
                "this session is already generating",
            )));
            return;
        }
        self.busy = true;
        let factory = self.factory.clone();
        let work = tokio::task::spawn_blocking(move || {
            let events = msg.events;
            match factory() {
                Ok(mut conversation) => {
                    conversation.run(msg.request, &mut |event| events.send(event).is_ok())
                }
                Err(e) => {
                    tracing::warn!(error_type = %e.error_type, "session not opened: {}", e.message);
                    let _ = events.send(TenantEvent::Error(e));
                }
            }
        });
        ctx.spawn(work.into_actor(self).map(|_, act, _| act.busy = false));
    }
}

/// Makes attestation evidence over a tenant's nonce (encoded `Evidence`). Runs on a worker
/// thread (the guest device's ioctl blocks).
pub type Attestor = Arc<dyn Fn([u8; 32]) -> Result<Vec<u8>, ErrorReply> + Send + Sync>;

/// Answers tenants on `endpoint`: each stream carries one [`TenantMessage`]: `Attest` gets
/// evidence from `attestor`, `Generate` the generation's events from a [`Session`] of its own.
pub async fn serve(
    endpoint: quinn::Endpoint,
    factory: ConversationFactory,
    attestor: Attestor,
    max_frame: usize,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (factory, attestor) = (factory.clone(), attestor.clone());
        actix_rt::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("tenant handshake failed: {e}");
                    return;
                }
            };
            let peer = conn.remote_address();
            tracing::info!(%peer, "tenant connected");
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (factory, attestor) = (factory.clone(), attestor.clone());
                actix_rt::spawn(async move {
                    let first = match talaria_wire::net::read_frame(&mut recv, max_frame).await {
                        Ok(Some(f)) => frame::body::<TenantMessage>(&f),
                        Ok(None) => return,
                        Err(e) => Err(e),
                    };
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    match first {
                        Ok(TenantMessage::Generate(request)) => {
                            Session::new(factory).start().do_send(Generate {
                                request,
                                events: tx,
                            });
                        }
                        Ok(TenantMessage::Attest { nonce }) => {
                            let event = match tokio::task::spawn_blocking(move || attestor(nonce))
                                .await
                            {
                                Ok(Ok(evidence)) => TenantEvent::Attestation { evidence },
                                Ok(Err(e)) => TenantEvent::Error(e),
                                Err(e) => {
                                    TenantEvent::Error(ErrorReply::new("internal", e.to_string()))
                                }
                            };
                            let _ = tx.send(event);
                            drop(tx);
                        }
                        Err(e) => {
                            tracing::warn!(%peer, error_type = e.error_type(), "bad tenant request: {e}");
                            let _ = tx.send(TenantEvent::Error(crate::frame_error(&e)));
                            drop(tx);
                        }
                    }
                    while let Some(event) = rx.recv().await {
                        let bytes = match frame::encode::<_, ()>(&event, None) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::warn!("encoding an event: {e}");
                                break;
                            }
                        };
                        if talaria_wire::net::write_frame(&mut send, &bytes)
                            .await
                            .is_err()
                        {
                            tracing::info!(%peer, "tenant went away");
                            break;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}
