//! The cvm-agent's actors: [`Uplink`] owns the connection to the coordinator, [`Session`] runs
//! one conversation, and [`serve`] answers tenants.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{ErrorReply, Reply, Request, TenantEvent, TenantMessage, TenantRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use talaria_actors::metrics;

use crate::cluster::{AgentConversation, Principal};
use crate::net_loop::NetLoop;

/// A request frame for the coordinator, whose answer may be at most `max_reply` bytes and must
/// come within `deadline`; the result is the answer frame.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, FrameError>")]
pub struct Exchange {
    pub frame: Vec<u8>,
    pub max_reply: usize,
    pub deadline: Duration,
}

/// Builds the agent's `Hello` for a coordinator's nonce (attestation evidence bound to it).
/// Runs on a worker thread: the guest device's ioctl blocks.
pub type HelloFn = Arc<dyn Fn([u8; 32]) -> Result<Request, ErrorReply> + Send + Sync>;

/// Whether the uplink is connected and admitted now, for health checks and metrics.
#[derive(Clone, Default)]
pub struct UplinkHealth(Arc<AtomicBool>);

impl UplinkHealth {
    /// Whether the agent is connected to and admitted by the coordinator.
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
        metrics::AGENT_UPLINK_UP.set(i64::from(up));
    }
}

/// Where and how an agent joins its cluster.
#[derive(Clone)]
pub struct Join {
    pub endpoint: quinn::Endpoint,
    pub tls: talaria_net::TlsMaterial,
    pub coordinator: std::net::SocketAddr,
    pub hello: HelloFn,
    /// Largest answer frame accepted where the request does not bound it (a set-up reply).
    pub max_frame: usize,
}

/// One request on `conn` outside a session (a challenge, a hello): the answer's payload.
async fn ask(
    conn: &quinn::Connection,
    head: &Request,
    max: usize,
    deadline: Duration,
) -> Result<Vec<u8>, ErrorReply> {
    let frame = frame::encode::<_, ()>(head, None).map_err(|e| talaria_actors::frame_error(&e))?;
    let answer = tokio::time::timeout(deadline, talaria_net::request(conn, &frame, max))
        .await
        .map_err(|_| {
            ErrorReply::new(
                "deadline_exceeded",
                "no answer from the coordinator in time",
            )
        })?
        .map_err(|e| talaria_actors::frame_error(&e))?;
    let (reply, payload): (Reply, &[u8]) =
        frame::split(&answer).map_err(|e| talaria_actors::frame_error(&e))?;
    match reply {
        Reply::Ok { .. } => Ok(payload.to_vec()),
        Reply::Err(e) => Err(e),
    }
}

/// Why joining failed.
enum JoinError {
    /// The coordinator could not be reached or dropped the connection: try again.
    Unreachable(String),
    /// The agent could not prove itself, or the coordinator refused it: trying again will
    /// not help at the first join (the agent stops), and is only retried slowly after.
    Refused(ErrorReply),
}

impl Join {
    /// Dials the coordinator, proves the agent to it and returns the connection with the
    /// provision payload it answered.
    async fn run(&self) -> Result<(quinn::Connection, Vec<u8>), JoinError> {
        let deadline = Duration::from_secs(30);
        let conn = self
            .tls
            .connect(&self.endpoint, self.coordinator)
            .await
            .map_err(|e| JoinError::Unreachable(e.to_string()))?;
        let nonce: [u8; 32] = frame::body(
            &ask(&conn, &Request::Challenge, 1024, deadline)
                .await
                .map_err(|e| JoinError::Unreachable(e.to_string()))?,
        )
        .map_err(|e| JoinError::Unreachable(format!("the coordinator's nonce: {e}")))?;
        let hello = self.hello.clone();
        let hello = tokio::task::spawn_blocking(move || hello(nonce))
            .await
            .map_err(|e| JoinError::Refused(ErrorReply::new("internal", e.to_string())))?
            .map_err(JoinError::Refused)?;
        let provision = ask(&conn, &hello, self.max_frame, Duration::from_secs(300))
            .await
            .map_err(|e| {
                if conn.close_reason().is_some() {
                    JoinError::Unreachable(e.to_string())
                } else {
                    JoinError::Refused(e)
                }
            })?;
        Ok((conn, provision))
    }
}

/// Owns the agent's QUIC connection to the coordinator. Every exchange is its own stream, so
/// sessions never wait for each other on the link. When the connection drops (noticed within
/// the idle timeout) it dials again with backoff and is admitted anew; a new admission must
/// provision exactly what the first did. Sessions of the old connection are gone with it: their
/// requests fail with a typed error, new ones are served.
pub struct Uplink {
    join: Join,
    /// The connection once admitted, shared with the workers that make their calls on it
    /// themselves ([`BlockingUplink`]).
    shared: SharedConn,
    /// The runtime the endpoint and its connections live on.
    net: Arc<NetLoop>,
    joining: bool,
    /// The first admission's provision: what every later one must equal.
    provision: Option<Arc<Vec<u8>>>,
    /// Callers of [`Joined`] waiting for the first admission.
    waiting: Vec<oneshot::Sender<Result<Arc<Vec<u8>>, ErrorReply>>>,
    health: UplinkHealth,
    /// Why the agent stays down: its first admission failed for good, or a later one
    /// provisioned something else.
    refused: Option<ErrorReply>,
}

impl Uplink {
    /// An uplink that joins as `join` says once started; `health` follows its state. `join`'s
    /// endpoint lives on `net` (made within [`NetLoop::handle`]), and so does every admission.
    pub fn new(join: Join, health: UplinkHealth, net: Arc<NetLoop>) -> Self {
        Self {
            join,
            shared: SharedConn::default(),
            net,
            joining: false,
            provision: None,
            waiting: Vec::new(),
            health,
            refused: None,
        }
    }

    fn rejoin(&mut self, ctx: &mut Context<Self>) {
        if self.joining || self.refused.is_some() {
            return;
        }
        self.joining = true;
        let join = self.join.clone();
        let first = self.provision.is_none();
        let net = self.net.handle().clone();
        // On the uplink's runtime: the connection and its driver belong there.
        let attempt = async move {
            let mut wait = Duration::from_millis(100);
            loop {
                match join.run().await {
                    Ok(joined) => return Ok(joined),
                    Err(JoinError::Refused(e)) if first => return Err(e),
                    Err(JoinError::Refused(e)) => {
                        tracing::error!("joining the cluster again: {e}");
                        wait = Duration::from_secs(2);
                    }
                    Err(JoinError::Unreachable(e)) => {
                        tracing::warn!(coordinator = %join.coordinator, "joining the cluster: {e}");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        };
        let attempt = async move {
            net.spawn(attempt).await.unwrap_or_else(|e| {
                Err(ErrorReply::new(
                    "internal",
                    format!("joining the cluster stopped: {e}"),
                ))
            })
        };
        ctx.spawn(attempt.into_actor(self).map(|joined, act, ctx| {
            act.joining = false;
            let (conn, provision) = match joined {
                Ok(j) => j,
                Err(e) => {
                    // The first admission failed for good: whoever waits for it stops.
                    act.refused = Some(e.clone());
                    for w in act.waiting.drain(..) {
                        let _ = w.send(Err(e.clone()));
                    }
                    return;
                }
            };
            match &act.provision {
                Some(first) if **first != provision => {
                    // The cloud changed the model under a running agent: its half was built
                    // from the first provision; only a restart (which checks the manifest
                    // again) may take another.
                    let why = "the coordinator provisioned another model than at the agent's start";
                    tracing::error!("{why}: the agent stays down until it is restarted");
                    act.refused = Some(ErrorReply::new("provision_changed", why));
                    conn.close(0u32.into(), b"provision changed");
                    return;
                }
                Some(_) => {
                    metrics::AGENT_RECONNECTS.inc();
                    tracing::info!("admitted again after the uplink dropped");
                }
                None => {
                    let first = Arc::new(provision);
                    for w in act.waiting.drain(..) {
                        let _ = w.send(Ok(first.clone()));
                    }
                    act.provision = Some(first);
                }
            }
            act.shared.set(Some(conn.clone()));
            act.health.set(true);
            actix_rt::spawn(talaria_actors::count_path_losses(
                conn.clone(),
                &metrics::AGENT_LINK_LOST,
                &metrics::AGENT_LINK_BLACK_HOLES,
            ));
            ctx.spawn(async move { conn.closed().await }.into_actor(act).map(
                |reason, act, ctx| {
                    tracing::warn!("uplink to the coordinator lost: {reason}");
                    act.shared.set(None);
                    act.health.set(false);
                    act.rejoin(ctx);
                },
            ));
        }));
    }
}

impl Actor for Uplink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.health.set(false);
        self.rejoin(ctx);
    }
}

/// Waits for the first admission: its provision payload (a `talaria_engine::CvmProvision`).
#[derive(Message)]
#[rtype(result = "Result<Arc<Vec<u8>>, ErrorReply>")]
pub struct Joined;

impl Handler<Joined> for Uplink {
    type Result = ResponseFuture<Result<Arc<Vec<u8>>, ErrorReply>>;

    fn handle(&mut self, _: Joined, _: &mut Context<Self>) -> Self::Result {
        if let Some(p) = &self.provision {
            let p = p.clone();
            return Box::pin(async move { Ok(p) });
        }
        if let Some(e) = self.refused.clone() {
            return Box::pin(async move { Err(e) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.push(tx);
        Box::pin(async move {
            rx.await
                .map_err(|_| ErrorReply::new("internal", "the uplink stopped"))?
        })
    }
}

impl Handler<Exchange> for Uplink {
    type Result = ResponseFuture<Result<Vec<u8>, FrameError>>;

    fn handle(&mut self, msg: Exchange, ctx: &mut Context<Self>) -> Self::Result {
        let Some(conn) = self.shared.live() else {
            self.rejoin(ctx);
            let why = self.refused.as_ref().map_or_else(
                || "the agent is not connected to the coordinator".to_string(),
                ErrorReply::to_string,
            );
            return Box::pin(async move { Err(FrameError::Connection(why)) });
        };
        Box::pin(async move { exchange_on(&conn, msg).await })
    }
}

/// Answers `msg` on `conn` within its deadline.
async fn exchange_on(conn: &quinn::Connection, msg: Exchange) -> Result<Vec<u8>, FrameError> {
    tokio::time::timeout(
        msg.deadline,
        talaria_net::request(conn, &msg.frame, msg.max_reply),
    )
    .await
    .map_err(|_| {
        FrameError::Connection(format!(
            "no answer from the coordinator within {} ms",
            msg.deadline.as_millis()
        ))
    })?
}

/// The uplink's live connection, as its [`Uplink`] last set it.
#[derive(Clone, Default)]
pub struct SharedConn(Arc<std::sync::Mutex<Option<quinn::Connection>>>);

impl SharedConn {
    fn set(&self, conn: Option<quinn::Connection>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    fn live(&self) -> Option<quinn::Connection> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| c.close_reason().is_none())
    }
}

/// A blocking handle on the uplink for code running on a worker thread (never on the event
/// loop: it waits for the answer). While the uplink is connected, the worker makes its calls
/// itself, driving the uplink's runtime ([`NetLoop::drive`]); otherwise they go through the
/// [`Uplink`] actor, which dials again and answers with a typed error.
#[derive(Clone)]
pub struct BlockingUplink {
    uplink: Addr<Uplink>,
    shared: SharedConn,
    net: Arc<NetLoop>,
}

impl BlockingUplink {
    /// Starts `uplink` (in the current actix system): the blocking handle on it.
    pub fn start(uplink: Uplink) -> Self {
        let (shared, net) = (uplink.shared.clone(), uplink.net.clone());
        Self {
            uplink: uplink.start(),
            shared,
            net,
        }
    }

    /// Counts a session open on the uplink while the guard lives (see [`NetLoop::session`]).
    pub fn session(&self) -> crate::net_loop::SessionOpen {
        self.net.session()
    }

    /// The actor.
    pub fn actor(&self) -> &Addr<Uplink> {
        &self.uplink
    }

    /// Sends `frame` and waits, at most `deadline`, for an answer frame of at most `max_reply`
    /// bytes.
    pub fn exchange(
        &self,
        frame: Vec<u8>,
        max_reply: usize,
        deadline: Duration,
    ) -> Result<Vec<u8>, FrameError> {
        let msg = Exchange {
            frame,
            max_reply,
            deadline,
        };
        if let Some(conn) = self.shared.live() {
            return self.net.drive(async move { exchange_on(&conn, msg).await });
        }
        futures::executor::block_on(self.uplink.send(msg))
            .map_err(|e| FrameError::Connection(format!("uplink: {e}")))?
    }
}

/// Whether the tenant of a generation went away (it then should stop, whatever it waits on).
pub type Gone = Arc<dyn Fn() -> bool + Send + Sync>;

/// Makes a conversation (opening a session with the cloud) whose requests stop once `gone`
/// says its tenant went away. Runs on a worker thread.
pub type ConversationFactory =
    Arc<dyn Fn(Gone) -> Result<AgentConversation, ErrorReply> + Send + Sync>;

/// Asks a session to generate; events arrive on `events`. `slot` is held until it ends.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Generate {
    pub request: TenantRequest,
    /// Who asks (what the agent keeps between requests is kept per principal).
    pub principal: Principal,
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
                principal,
                events,
                arrived,
                slot,
            } = msg;
            if events.is_closed() {
                // Abandoned while it waited for a slot: nothing of it reaches the cloud.
                metrics::AGENT_CANCELLED.inc();
                return;
            }
            let watched = events.clone();
            let gone: Gone = Arc::new(move || watched.is_closed());
            let mut last = None;
            let mut emit = |event| deliver(&events, event, arrived, &mut last);
            match factory(gone) {
                Ok(mut conversation) => conversation.run(request, principal, &mut emit),
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

/// What an agent serves its tenant with: the conversations, a cap on how many generations
/// run at once (the topology's `max_sessions`), and on how many wait for one (`max_waiting`;
/// beyond it a request is refused as `overloaded`); waiting ones go in arrival order.
#[derive(Clone)]
pub struct Tenancy {
    factory: ConversationFactory,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl Tenancy {
    /// At most `max_sessions` generations of `factory`'s conversations at once, and at most
    /// `max_waiting` more waiting.
    pub fn new(factory: ConversationFactory, max_sessions: usize, max_waiting: usize) -> Self {
        Self {
            factory,
            slots: Arc::new(Semaphore::new(max_sessions.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
        }
    }

    /// Starts `principal`'s `request` in a session of its own once a slot is free. Its events
    /// arrive on the receiver; dropping the receiver (or this future, while it waits) cancels
    /// the generation.
    ///
    /// A request that is not admitted (`overloaded`: too many already wait) is an `Err`, counted
    /// in the error metrics here, before anything was sent: the HTTP API answers it with 429
    /// whether or not the request streams.
    pub async fn generate(
        &self,
        request: TenantRequest,
        principal: Principal,
    ) -> Result<mpsc::UnboundedReceiver<TenantEvent>, ErrorReply> {
        let arrived = Instant::now();
        metrics::AGENT_REQUESTS.inc();
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    let e = ErrorReply::new(
                        "overloaded",
                        format!(
                            "{} requests are already waiting for a session (the agent's limit): retry later",
                            self.max_waiting
                        ),
                    );
                    metrics::error(&e.error_type);
                    return Err(e);
                }
                let _waiting = Raised::new(&metrics::AGENT_WAITING);
                let _count = Counted(&self.waiting);
                // Dropped here, before a slot, when the tenant goes while it waits.
                let mut abandoned = Abandoned(true);
                // The semaphore is never closed.
                match self.slots.clone().acquire_owned().await {
                    Ok(slot) => {
                        abandoned.0 = false;
                        slot
                    }
                    Err(_) => {
                        let e = ErrorReply::new("internal", "the session slots are closed");
                        metrics::error(&e.error_type);
                        return Err(e);
                    }
                }
            }
        };
        let (events, rx) = mpsc::unbounded_channel();
        Session::new(self.factory.clone())
            .start()
            .do_send(Generate {
                request,
                principal,
                events,
                arrived,
                slot: Some(slot),
            });
        Ok(rx)
    }
}

/// Counts a request as cancelled when dropped while still `true` (its tenant went away before
/// it was served).
struct Abandoned(bool);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.0 {
            metrics::AGENT_CANCELLED.inc();
        }
    }
}

/// Takes one off a count when dropped (a request that stopped waiting, served or abandoned).
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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

/// The most tenant connections an agent holds at once, handshakes under way included. When
/// they are all taken, a new one lets go of the oldest that has not presented one of the
/// tenant's API keys; with none such, it is refused at the handshake.
pub const MAX_TENANT_CONNECTIONS: usize = 256;

/// How long a tenant connection may stay open without presenting one of the tenant's API keys
/// (in a `Generate`; an `Attest` needs none, and takes a moment).
pub const UNAUTHENTICATED_WINDOW: Duration = Duration::from_secs(30);

/// Attestations one tenant connection may ask for; the next is refused as `overloaded` and the
/// connection closed. A client attests once per connection; an `Attest` needs no key, so
/// without a cap a stranger's streams of them took a core and slowed the tenant's generation
/// 15–47× (`tests/hostile.rs`).
pub const ATTESTS_PER_CONNECTION: usize = 2;

/// Attestations the agent makes at once, across all connections (a report is a serialised call
/// to the security processor); more wait for room, at most [`ATTEST_WAIT`], then are refused
/// as `overloaded`. Tenants' concurrent sessions each attest on a connection of their own.
pub const ATTESTS_AT_ONCE: usize = 4;

/// The longest an attestation waits for room among [`ATTESTS_AT_ONCE`].
pub const ATTEST_WAIT: Duration = Duration::from_secs(10);

/// The longest a tenant's request frame may take to arrive whole, from its stream's opening.
pub const TENANT_FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// Bytes of unfinished request frames one tenant connection may make the agent hold at once
/// (two frames of the largest size).
pub const TENANT_CONNECTION_BYTES: usize = 2 * talaria_wire::MAX_TENANT_MESSAGE;

/// Bytes of unfinished request frames all tenant connections together may make the agent hold.
pub const TENANT_PORT_BYTES: usize = 64 << 20;

/// Answers tenants on `endpoint`: each stream carries one [`TenantMessage`] (at most
/// [`talaria_wire::MAX_TENANT_MESSAGE`] bytes, read within [`TENANT_FRAME_DEADLINE`] and the
/// budgets [`TENANT_CONNECTION_BYTES`] and [`TENANT_PORT_BYTES`]): `Attest` gets evidence from
/// `attestor`, `Generate` the generation's events from a [`Session`] of its own. A tenant whose
/// connection closes stops its generations, queued or running. Anyone who can reach the port
/// can connect, so what a connection may hold before it presents an API key is bounded:
/// [`MAX_TENANT_CONNECTIONS`] and [`UNAUTHENTICATED_WINDOW`].
pub async fn serve(
    endpoint: quinn::Endpoint,
    tenancy: Tenancy,
    attestor: Attestor,
    api_keys: Arc<Vec<[u8; 32]>>,
) {
    let door = talaria_actors::Doorway::counting_trusted(
        "tenant",
        MAX_TENANT_CONNECTIONS,
        UNAUTHENTICATED_WINDOW,
    );
    let port = talaria_net::Intake::new(talaria_wire::MAX_TENANT_MESSAGE, TENANT_FRAME_DEADLINE)
        .with_own_budget(TENANT_CONNECTION_BYTES)
        .with_shared_budget(TENANT_PORT_BYTES);
    let attesting = Arc::new(Semaphore::new(ATTESTS_AT_ONCE));
    while let Some(incoming) = endpoint.accept().await {
        let Some(ticket) = door.knock().map(Arc::new) else {
            tracing::warn!(
                peer = %incoming.remote_address(),
                error_type = "overloaded",
                "tenant connection refused: {MAX_TENANT_CONNECTIONS} open, each with an API key"
            );
            metrics::error("overloaded");
            incoming.refuse();
            continue;
        };
        let (tenancy, attestor) = (tenancy.clone(), attestor.clone());
        let (api_keys, intake) = (api_keys.clone(), port.for_connection());
        let attesting = attesting.clone();
        let held = ticket.clone();
        let task = actix_rt::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("tenant handshake failed: {e}");
                    return;
                }
            };
            if !ticket.connected(&conn) {
                return;
            }
            let peer = conn.remote_address();
            tracing::info!(%peer, "tenant connected");
            let attests = Arc::new(AtomicUsize::new(0));
            while let Ok((send, recv)) = conn.accept_bi().await {
                let tenant = Tenant {
                    attests: attests.clone(),
                    attesting: attesting.clone(),
                    tenancy: tenancy.clone(),
                    attestor: attestor.clone(),
                    api_keys: api_keys.clone(),
                    intake: intake.clone(),
                    ticket: ticket.clone(),
                    conn: conn.clone(),
                };
                let closed = conn.clone();
                actix_rt::spawn(async move {
                    let stream = answer_stream(send, recv, peer, tenant);
                    tokio::select! {
                        () = stream => {}
                        // Dropping the stream's work drops its events' receiver: the
                        // generation sees its tenant gone and stops.
                        _ = closed.closed() => tracing::info!(%peer, "tenant went away"),
                    }
                });
            }
        });
        held.hold(task.abort_handle());
    }
}

/// What a tenant connection's streams are answered with.
struct Tenant {
    tenancy: Tenancy,
    attestor: Attestor,
    api_keys: Arc<Vec<[u8; 32]>>,
    /// The connection's bounds on reading requests.
    intake: talaria_net::Intake,
    /// The connection's place on the port, trusted once it presents one of the tenant's API
    /// keys.
    ticket: Arc<talaria_actors::Ticket>,
    conn: quinn::Connection,
    /// Attestations this connection asked for.
    attests: Arc<AtomicUsize>,
    /// Room for attestations across the port ([`ATTESTS_AT_ONCE`]).
    attesting: Arc<Semaphore>,
}

/// Answers one tenant stream.
async fn answer_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: std::net::SocketAddr,
    tenant: Tenant,
) {
    let Tenant {
        tenancy,
        attestor,
        api_keys,
        intake,
        ticket,
        conn,
        attests,
        attesting,
    } = tenant;
    let mut close_after = false;
    let first = match talaria_net::read_frame_in(&mut recv, &intake).await {
        // Padded by the tenant's client: one that stopped padding is refused, as its requests'
        // lengths would tell the network its prompts'.
        Ok(Some(f)) => frame::body_padded::<TenantMessage>(&f, talaria_wire::TENANT_REQUEST_BUCKET),
        Ok(None) => return,
        Err(e) => Err(e),
    };
    let mut rx = match first {
        Ok(TenantMessage::Generate { request, api_key }) => {
            if let Some(digest) = talaria_actors::accepted_key(&api_keys, &api_key) {
                ticket.trust();
                tenancy
                    .generate(request, Principal(digest))
                    .await
                    .unwrap_or_else(|e| only(TenantEvent::Error(e)))
            } else {
                tracing::warn!(%peer, error_type = "invalid_api_key", "generation refused");
                only(TenantEvent::Error(ErrorReply::new(
                    "invalid_api_key",
                    "no API key of this agent's tenant",
                )))
            }
        }
        Ok(TenantMessage::Attest { nonce }) => {
            let refuse = |why: &str| {
                tracing::warn!(%peer, error_type = "overloaded", "attestation refused: {why}");
                metrics::error("overloaded");
                only(TenantEvent::Error(ErrorReply::new("overloaded", why)))
            };
            if attests.fetch_add(1, Ordering::AcqRel) >= ATTESTS_PER_CONNECTION {
                close_after = true;
                refuse("too many attestations on one connection")
            } else if let Ok(Ok(_permit)) =
                tokio::time::timeout(ATTEST_WAIT, attesting.acquire_owned()).await
            {
                only(
                    match tokio::task::spawn_blocking(move || attestor(nonce)).await {
                        Ok(Ok((evidence, claims))) => TenantEvent::Attestation { evidence, claims },
                        Ok(Err(e)) => TenantEvent::Error(e),
                        Err(e) => TenantEvent::Error(ErrorReply::new("internal", e.to_string())),
                    },
                )
            } else {
                refuse("too many attestations at once")
            }
        }
        Err(e) => {
            tracing::warn!(%peer, error_type = e.error_type(), "bad tenant request: {e}");
            let _ = recv.stop(0u32.into());
            only(TenantEvent::Error(talaria_actors::frame_error(&e)))
        }
    };
    while let Some(event) = rx.recv().await {
        let bytes = match frame::encode_padded(&event, event.bucket()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("encoding an event: {e}");
                break;
            }
        };
        if talaria_net::write_frame(&mut send, &bytes).await.is_err() {
            tracing::info!(%peer, "tenant went away");
            break;
        }
    }
    let _ = send.finish();
    if close_after {
        // The refusal first, then the connection: its asker must pay a handshake again.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        conn.close(0u32.into(), b"too many attestations");
    }
}
