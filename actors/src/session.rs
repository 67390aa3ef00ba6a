//! The cvm-agent's actors: [`Uplink`] owns the connection to the coordinator, [`Session`] runs
//! one conversation, and [`serve`] answers tenants.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{ErrorReply, TenantEvent, TenantMessage, TenantRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::metrics;

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

/// Asks a session to generate; events arrive on `events`. `slot` is held until it ends.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Generate {
    pub request: TenantRequest,
    pub events: mpsc::UnboundedSender<TenantEvent>,
    /// When the tenant asked (time to first token counts from here, queueing included).
    pub arrived: Instant,
    pub slot: Option<OwnedSemaphorePermit>,
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

/// Counts a gauge up while it lives.
struct Raised(&'static metrics::IntGaugeRef);

impl Raised {
    fn new(gauge: &'static metrics::IntGaugeRef) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Sends `event` to the tenant and records it in the agent's metrics; `false` once the tenant
/// is gone.
fn deliver(
    events: &mpsc::UnboundedSender<TenantEvent>,
    event: TenantEvent,
    arrived: Instant,
    last: &mut Option<Instant>,
) -> bool {
    match &event {
        TenantEvent::Token { .. } => {
            let now = Instant::now();
            match last {
                None => metrics::AGENT_TTFT_SECONDS.observe((now - arrived).as_secs_f64()),
                Some(t) => metrics::AGENT_ITL_SECONDS.observe((now - *t).as_secs_f64()),
            }
            *last = Some(now);
            metrics::AGENT_TOKENS.inc();
        }
        TenantEvent::Done { generation, .. } => {
            metrics::AGENT_PROMPT_TOKENS.inc_by(generation.prompt_ids.len() as u64);
        }
        TenantEvent::Error(e) => metrics::error(&e.error_type),
        TenantEvent::Attestation { .. } => {}
    }
    events.send(event).is_ok()
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
            let _active = Raised::new(&metrics::AGENT_ACTIVE);
            let Generate {
                request,
                events,
                arrived,
                slot,
            } = msg;
            let mut last = None;
            let mut emit = |event| deliver(&events, event, arrived, &mut last);
            match factory() {
                Ok(mut conversation) => conversation.run(request, &mut emit),
                Err(e) => {
                    tracing::warn!(error_type = %e.error_type, "session not opened: {}", e.message);
                    emit(TenantEvent::Error(e));
                }
            }
            drop(slot);
        });
        ctx.spawn(work.into_actor(self).map(|_, act, _| act.busy = false));
    }
}

/// What an agent serves its tenant with: the conversations, and a cap on how many generations
/// run at once (the topology's `max_sessions`); requests beyond it wait in arrival order.
#[derive(Clone)]
pub struct Tenancy {
    factory: ConversationFactory,
    slots: Arc<Semaphore>,
}

impl Tenancy {
    /// At most `max_sessions` generations of `factory`'s conversations at once.
    pub fn new(factory: ConversationFactory, max_sessions: usize) -> Self {
        Self {
            factory,
            slots: Arc::new(Semaphore::new(max_sessions.max(1))),
        }
    }

    /// Starts `request` in a session of its own once a slot is free. Its events arrive on the
    /// receiver; dropping the receiver cancels the generation.
    pub async fn generate(&self, request: TenantRequest) -> mpsc::UnboundedReceiver<TenantEvent> {
        let arrived = Instant::now();
        metrics::AGENT_REQUESTS.inc();
        let slot = {
            let _waiting = Raised::new(&metrics::AGENT_WAITING);
            // The semaphore is never closed.
            self.slots.clone().acquire_owned().await.ok()
        };
        let (events, rx) = mpsc::unbounded_channel();
        Session::new(self.factory.clone())
            .start()
            .do_send(Generate {
                request,
                events,
                arrived,
                slot,
            });
        rx
    }
}

/// Makes attestation evidence over a tenant's nonce: the encoded `Evidence` and the claims it
/// binds. Runs on a worker thread (the guest device's ioctl blocks).
pub type Attestor = Arc<dyn Fn([u8; 32]) -> Result<(Vec<u8>, Vec<u8>), ErrorReply> + Send + Sync>;

/// A stream of one event.
fn only(event: TenantEvent) -> mpsc::UnboundedReceiver<TenantEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(event);
    rx
}

/// Answers tenants on `endpoint`: each stream carries one [`TenantMessage`]: `Attest` gets
/// evidence from `attestor`, `Generate` the generation's events from a [`Session`] of its own.
pub async fn serve(
    endpoint: quinn::Endpoint,
    tenancy: Tenancy,
    attestor: Attestor,
    max_frame: usize,
    api_keys: Arc<Vec<[u8; 32]>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (tenancy, attestor) = (tenancy.clone(), attestor.clone());
        let api_keys = api_keys.clone();
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
                let (tenancy, attestor) = (tenancy.clone(), attestor.clone());
                let api_keys = api_keys.clone();
                actix_rt::spawn(async move {
                    let first = match talaria_wire::net::read_frame(&mut recv, max_frame).await {
                        Ok(Some(f)) => frame::body::<TenantMessage>(&f),
                        Ok(None) => return,
                        Err(e) => Err(e),
                    };
                    let mut rx = match first {
                        Ok(TenantMessage::Generate { request, api_key }) => {
                            if crate::key_accepted(&api_keys, &api_key) {
                                tenancy.generate(request).await
                            } else {
                                tracing::warn!(%peer, error_type = "invalid_api_key", "generation refused");
                                only(TenantEvent::Error(ErrorReply::new(
                                    "invalid_api_key",
                                    "no API key of this agent's tenant",
                                )))
                            }
                        }
                        Ok(TenantMessage::Attest { nonce }) => only(
                            match tokio::task::spawn_blocking(move || attestor(nonce)).await {
                                Ok(Ok((evidence, claims))) => {
                                    TenantEvent::Attestation { evidence, claims }
                                }
                                Ok(Err(e)) => TenantEvent::Error(e),
                                Err(e) => {
                                    TenantEvent::Error(ErrorReply::new("internal", e.to_string()))
                                }
                            },
                        ),
                        Err(e) => {
                            tracing::warn!(%peer, error_type = e.error_type(), "bad tenant request: {e}");
                            only(TenantEvent::Error(crate::frame_error(&e)))
                        }
                    };
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
