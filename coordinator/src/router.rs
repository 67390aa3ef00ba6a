//! The coordinator's actors: [`Router`] owns sessions and routes, [`NodeLink`] owns the
//! connection to one gpu-node, [`AgentLink`] owns the connection of one cvm-agent.
//!
//! The router reads only frame headers; tensor payloads pass through undecoded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::prelude::*;
use talaria_engine::OpId;
use talaria_net::TlsMaterial;
use talaria_wire::frame;
use talaria_wire::{ErrorCode, ErrorReply, Request, SessionId};

use talaria_actors::{err_frame, frame_error, metrics, ok_frame};

use crate::admission::AttestedAdmission;

/// Which part of the model serves each op, and which stages (replicas) serve each part: pure,
/// built from the topology.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// `by_layer[l]`: the part of layer `l`.
    by_layer: Vec<usize>,
    lm_head: usize,
    /// Each part's stages (indices into the topology's stages), in topology order.
    parts: Vec<Vec<usize>>,
}

impl RouteTable {
    /// Routes from a validated topology whose stages cover `n_layers`.
    pub fn new(topology: &talaria_topology::Topology, n_layers: usize) -> Option<Self> {
        let parts = topology.parts();
        let part_of = |stage: usize| parts.iter().position(|p| p.contains(&stage));
        let by_layer = (0..n_layers)
            .map(|l| topology.stage_for(Some(l)).and_then(part_of))
            .collect::<Option<Vec<_>>>()?;
        let lm_head = topology.stage_for(None).and_then(part_of)?;
        Some(Self {
            by_layer,
            lm_head,
            parts,
        })
    }

    /// The part that serves `op`, if any.
    pub fn part(&self, op: OpId) -> Option<usize> {
        match op {
            OpId::Block { layer, .. } => self.by_layer.get(layer).copied(),
            OpId::LmHead => Some(self.lm_head),
        }
    }

    /// The stages of `part`.
    pub fn replicas(&self, part: usize) -> &[usize] {
        &self.parts[part]
    }

    /// How many parts the model is cut into.
    pub fn n_parts(&self) -> usize {
        self.parts.len()
    }

    /// For a new session: in each part, the connected replica (`live`) serving the fewest
    /// sessions (`load`), the first on a tie; `None` where a part has no replica connected.
    pub fn choose(&self, live: &[bool], load: &[usize]) -> Result<Vec<usize>, usize> {
        self.parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.iter()
                    .copied()
                    .filter(|&n| live[n])
                    .min_by_key(|&n| load[n])
                    .ok_or(i)
            })
            .collect()
    }

    /// The order in which a request of `part` tries its replicas: `first`, then the others
    /// in topology order.
    pub fn attempts(&self, part: usize, first: usize) -> Vec<usize> {
        std::iter::once(first)
            .chain(self.parts[part].iter().copied().filter(|&n| n != first))
            .collect()
    }
}

/// The largest attestation evidence a `Hello` may carry: an SNP report (1184 bytes) and its
/// certificate chain fit many times over.
pub const MAX_EVIDENCE_BYTES: usize = 64 << 10;

/// Identifies one agent connection.
pub type AgentId = u64;

/// A frame from an agent, to be routed; the result is the answer frame.
#[derive(Message)]
#[rtype(result = "Vec<u8>")]
pub struct Route {
    pub agent: AgentId,
    pub frame: Vec<u8>,
}

/// An agent connection presented this certificate (DER) and proved its key.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentCert(pub AgentId, pub Vec<u8>);

impl Handler<AgentCert> for Router {
    type Result = ();

    fn handle(&mut self, msg: AgentCert, _: &mut Context<Self>) {
        self.certs.insert(msg.0, msg.1);
    }
}

/// The gate of a new agent connection ([`Gate`]), opened by the router when it admits it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentGate(pub AgentId, pub Gate);

impl Handler<AgentGate> for Router {
    type Result = ();

    fn handle(&mut self, msg: AgentGate, _: &mut Context<Self>) {
        self.gates.insert(msg.0, msg.1);
    }
}

/// The largest request frame of a connection not yet admitted: a `Challenge`, or a `Hello`
/// with at most [`MAX_EVIDENCE_BYTES`] of evidence and its names.
pub const UNADMITTED_FRAME: usize = MAX_EVIDENCE_BYTES + (16 << 10);

/// Bytes of unfinished frames a connection not yet admitted may make the coordinator hold (a
/// `Challenge` and a `Hello` at once). QUIC's window bounds what waits unread beyond it
/// (`talaria_net::UNTRUSTED_RECEIVE_WINDOW` until admission).
pub const UNADMITTED_BYTES: usize = 2 * UNADMITTED_FRAME;

/// How long a connection may stay without being admitted before the coordinator closes it.
pub const ADMISSION_WINDOW: Duration = Duration::from_secs(30);

/// The most connections not yet admitted the coordinator keeps at once: a new one beyond them
/// closes the oldest (an agent is admitted a moment after it connects).
pub const MAX_UNADMITTED: usize = 64;

/// What an agent's connection may make the coordinator hold. Before admission: frames of at
/// most [`UNADMITTED_FRAME`] bytes, [`UNADMITTED_BYTES`] of them unfinished at once, so that a
/// peer nobody has admitted — anyone who can reach the port — holds a Hello's worth of memory,
/// not the request limit's (about 100 MB a frame, on each of 256 streams). Once admitted, the
/// request limit, no budget and QUIC's full receive window: the agent is attested code.
#[derive(Clone)]
pub struct Gate {
    intake: talaria_net::Intake,
    /// The connection's place among those waiting for admission ([`MAX_UNADMITTED`],
    /// [`ADMISSION_WINDOW`]); trusted on admission.
    ticket: Arc<talaria_actors::Ticket>,
    admitted_limit: usize,
}

impl Gate {
    /// A closed gate on the connection that holds `ticket`; `admitted_limit` is the request
    /// limit once open.
    pub fn closed(ticket: Arc<talaria_actors::Ticket>, admitted_limit: usize) -> Self {
        let intake = talaria_net::Intake::new(
            UNADMITTED_FRAME.min(admitted_limit),
            talaria_net::FRAME_DEADLINE,
        )
        .with_own_budget(UNADMITTED_BYTES)
        .for_connection();
        Self {
            intake,
            ticket,
            admitted_limit,
        }
    }

    /// Lets the admitted agent send any request of the protocol.
    fn open(&self) {
        self.intake.set_limit(self.admitted_limit);
        self.intake.lift_own_budget();
        self.ticket.trust();
    }
}

/// An agent's connection is gone: close its sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentGone(pub AgentId);

/// Owns the admitted agents, the sessions and which agent owns each, and the route table.
pub struct Router {
    routes: RouteTable,
    /// The model's shapes: what a call's answer can be.
    config: talaria_engine::ModelConfig,
    nodes: Vec<Addr<NodeLink>>,
    admission: Arc<AttestedAdmission>,
    /// The encoded `talaria_engine::CvmProvision` handed to admitted agents.
    provision: Arc<Vec<u8>>,
    agents: HashMap<AgentId, String>,
    /// The nonce issued to each connection that asked, used once.
    challenges: HashMap<AgentId, [u8; 32]>,
    /// The certificate (DER) each agent connection proved it holds the key of.
    certs: HashMap<AgentId, Vec<u8>>,
    /// Each agent connection's gate, opened on admission.
    gates: HashMap<AgentId, Gate>,
    /// Each open session's agent, tenant and stages.
    sessions: HashMap<SessionId, SessionRoute>,
    /// The most open sessions each tenant may hold.
    limits: HashMap<String, usize>,
    /// Whether each stage's link is connected now (its [`NodeLink`] keeps it).
    live: Arc<[AtomicBool]>,
    deadlines: talaria_topology::Deadlines,
}

/// Where one session's requests go.
struct SessionRoute {
    agent: AgentId,
    tenant: String,
    /// Per part, the stage its requests go to first.
    stages: Vec<usize>,
    /// Every stage the session was opened on (told when it closes).
    opened: Vec<usize>,
}

/// Whether an answer says the stage could not be reached or did not answer in time (another
/// replica may serve the request), rather than that the request was refused.
fn unreachable_stage(answer: &[u8]) -> bool {
    matches!(
        frame::split::<talaria_wire::Reply>(answer),
        Ok((talaria_wire::Reply::Err(e), _)) if unreachable(&e)
    )
}

/// Tells `stages` that `session` is over, without waiting for their answers (a stage whose
/// link is down never hears it).
fn tell_closed(
    nodes: &[Addr<NodeLink>],
    session: SessionId,
    stages: impl IntoIterator<Item = usize>,
    deadline: Duration,
) {
    let Ok(close) = frame::encode::<_, ()>(&Request::CloseSession { session }, None) else {
        return;
    };
    let close: Arc<[u8]> = close.into();
    for n in stages {
        nodes[n].do_send(Forward {
            frame: close.clone(),
            deadline,
            batch: None,
        });
    }
}

/// The `StageOpen` frame of `session` of `tenant`: one buffer for every stage told.
fn stage_open(session: SessionId, tenant: &str) -> Result<Arc<[u8]>, ErrorReply> {
    let open = Request::StageOpen {
        session,
        tenant: tenant.to_string(),
    };
    Ok(frame::encode::<_, ()>(&open, None)
        .map_err(|e| frame_error(&e))?
        .into())
}

/// Whether an error says the stage could not be reached or did not answer in time.
fn unreachable(e: &ErrorReply) -> bool {
    matches!(
        e.code(),
        ErrorCode::NodeUnavailable | ErrorCode::Connection | ErrorCode::DeadlineExceeded
    )
}

impl Router {
    /// A router over `nodes` (in topology order, their connection state in `live`); `limits`
    /// caps each tenant's open sessions and names the tenants that may be admitted at all.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        routes: RouteTable,
        config: talaria_engine::ModelConfig,
        nodes: Vec<Addr<NodeLink>>,
        live: Arc<[AtomicBool]>,
        admission: Arc<AttestedAdmission>,
        provision: Arc<Vec<u8>>,
        limits: HashMap<String, usize>,
        deadlines: talaria_topology::Deadlines,
    ) -> Self {
        Self {
            live,
            deadlines,
            limits,
            routes,
            config,
            nodes,
            admission,
            provision,
            agents: HashMap::new(),
            challenges: HashMap::new(),
            certs: HashMap::new(),
            gates: HashMap::new(),
            sessions: HashMap::new(),
        }
    }

    /// Sends `head` to the stages `to`; the first refusal wins.
    fn broadcast(&self, head: &Request, to: &[usize]) -> ResponseFuture<Result<(), ErrorReply>> {
        let frame = frame::encode::<_, ()>(head, None).map_err(|e| frame_error(&e));
        let nodes: Vec<_> = to.iter().map(|&n| self.nodes[n].clone()).collect();
        let deadline = self.deadlines.setup;
        Box::pin(async move {
            let frame: Arc<[u8]> = frame?.into();
            let answers = futures::future::join_all(nodes.iter().map(|n| {
                n.send(Forward {
                    frame: frame.clone(),
                    deadline,
                    batch: None,
                })
            }))
            .await;
            for a in answers {
                let a = a.map_err(|e| ErrorReply::new("internal", format!("node link: {e}")))?;
                let (reply, _): (talaria_wire::Reply, &[u8]) =
                    frame::split(&a).map_err(|e| frame_error(&e))?;
                if let talaria_wire::Reply::Err(e) = reply {
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    /// Opens `session` of `tenant` on one stage of every part: `first[part]` first, then the
    /// part's other replicas in topology order where a stage cannot be reached or does not
    /// answer in time (a dead or frozen stage, still counted connected until its idle timeout,
    /// must not fail new sessions while a replica is live). The stage each part opened on, or
    /// the first refusal.
    fn open_on(
        &self,
        session: SessionId,
        tenant: &str,
        first: &[usize],
    ) -> ResponseFuture<Result<Vec<usize>, ErrorReply>> {
        let frame = stage_open(session, tenant);
        let deadline = self.deadlines.setup;
        let nodes = self.nodes.clone();
        let parts: Vec<Vec<usize>> = first
            .iter()
            .enumerate()
            .map(|(part, &n)| self.routes.attempts(part, n))
            .collect();
        Box::pin(async move {
            let frame = frame?;
            let placed = futures::future::join_all(parts.into_iter().map(|attempts| {
                let (frame, nodes) = (frame.clone(), &nodes);
                async move {
                    // The stages tried that did not answer: they may hold the session anyway
                    // (a late answer, or a stopped process that reads its socket later).
                    let mut tried = Vec::new();
                    let mut last =
                        ErrorReply::new("node_unavailable", "no stage of a part answered");
                    for (i, n) in attempts.into_iter().enumerate() {
                        let answer = match nodes[n]
                            .send(Forward {
                                frame: frame.clone(),
                                deadline,
                                batch: None,
                            })
                            .await
                        {
                            Ok(a) => a,
                            Err(e) => {
                                let e = ErrorReply::new("internal", format!("node link: {e}"));
                                return (Err(e), tried);
                            }
                        };
                        let reply = match frame::split::<talaria_wire::Reply>(&answer) {
                            Ok((reply, _)) => reply,
                            Err(e) => return (Err(frame_error(&e)), tried),
                        };
                        match reply {
                            talaria_wire::Reply::Ok { .. } => {
                                if i > 0 {
                                    metrics::ROUTER_FAILOVERS.inc();
                                    tracing::warn!(
                                        session,
                                        stage = n,
                                        "session opened on a replica"
                                    );
                                }
                                return (Ok(n), tried);
                            }
                            talaria_wire::Reply::Err(e) if unreachable(&e) => {
                                tried.push(n);
                                last = e;
                            }
                            talaria_wire::Reply::Err(e) => return (Err(e), tried),
                        }
                    }
                    (Err(last), tried)
                }
            }))
            .await;
            let (placed, tried): (Vec<Result<usize, ErrorReply>>, Vec<Vec<usize>>) =
                placed.into_iter().unzip();
            // Every stage that may hold the session and will not serve it is told it is over:
            // a session left open there would count as live in its batching, which waits for
            // its calls. If the open failed, that is every stage.
            let mut stale: Vec<usize> = tried.into_iter().flatten().collect();
            if placed.iter().any(Result::is_err) {
                stale.extend(placed.iter().flatten());
            }
            tell_closed(&nodes, session, stale, deadline);
            placed.into_iter().collect()
        })
    }

    fn live(&self) -> Vec<bool> {
        self.live
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect()
    }

    /// A new session id: 64 random bits (rand's thread-local CSPRNG, seeded by the OS), so
    /// nobody can name a session they were not given; never 0 and never one in use.
    fn fresh_session(&self) -> SessionId {
        loop {
            let id: SessionId = rand::random();
            if id != 0 && !self.sessions.contains_key(&id) {
                return id;
            }
        }
    }

    /// Drops a session from the tables (its stages are told by the caller).
    fn forget(&mut self, session: SessionId) {
        self.sessions.remove(&session);
        metrics::ROUTER_SESSIONS.set(self.sessions.len() as i64);
    }

    fn owned(&self, agent: AgentId, session: SessionId) -> Result<&SessionRoute, ErrorReply> {
        match self.sessions.get(&session) {
            Some(route) if route.agent == agent => Ok(route),
            // Another tenant's session reads as unknown: its existence is not disclosed.
            _ => Err(ErrorReply::new(
                "unknown_session",
                format!("no session {session} on this connection"),
            )),
        }
    }

    fn route(
        &mut self,
        agent: AgentId,
        frame: Vec<u8>,
        me: Addr<Router>,
    ) -> Result<ResponseFuture<Vec<u8>>, ErrorReply> {
        let (head, _): (Request, &[u8]) = frame::split(&frame).map_err(|e| frame_error(&e))?;
        if let Request::Challenge = head {
            let nonce: [u8; 32] = rand::random();
            self.challenges.insert(agent, nonce);
            let answer = ok_frame(0, &encoded(&nonce));
            return Ok(Box::pin(async move { answer }));
        }
        if let Request::Hello {
            tenant,
            agent: name,
            evidence,
            key,
        } = &head
        {
            // Evidence is a report and a few certificates: anything much larger is refused
            // before a parser sees it.
            if evidence.len() > MAX_EVIDENCE_BYTES {
                return Err(ErrorReply::new(
                    "attestation_malformed",
                    format!(
                        "evidence of {} bytes (at most {MAX_EVIDENCE_BYTES})",
                        evidence.len()
                    ),
                ));
            }
            // A nonce is good for one Hello: a replayed report meets a fresh one.
            let nonce = self.challenges.remove(&agent).ok_or_else(|| {
                ErrorReply::new("attestation_binding", "ask for a Challenge before Hello")
            })?;
            // Only the topology's tenants have agents (the name is not echoed back: it is
            // the peer's text).
            if !self.limits.contains_key(tenant) {
                return Err(ErrorReply::new(
                    "unknown_tenant",
                    "the topology has no agent for this tenant",
                ));
            }
            // The attested key must be the one this connection proved: a genuine agent's
            // Hello relayed on another connection is not an admission of that connection.
            if self.certs.get(&agent) != Some(key) {
                return Err(ErrorReply::new(
                    "attestation_binding",
                    "the attested key is not the certificate this connection presented",
                ));
            }
            self.admission.admit(tenant, name, evidence, &nonce, key)?;
            tracing::info!(agent, %tenant, name = %name, "agent admitted");
            if let Some(gate) = self.gates.get(&agent) {
                gate.open();
            }
            self.agents.insert(agent, tenant.clone());
            metrics::ROUTER_AGENTS.set(self.agents.len() as i64);
            let answer = ok_frame(0, &self.provision);
            return Ok(Box::pin(async move { answer }));
        }
        let Some(tenant) = self.agents.get(&agent).cloned() else {
            return Err(ErrorReply::new("not_admitted", "say Hello first"));
        };
        match head {
            Request::Challenge | Request::Hello { .. } => unreachable!("handled above"),
            Request::OpenSession => {
                let limit = self
                    .limits
                    .get(&tenant)
                    .copied()
                    .unwrap_or(talaria_topology::DEFAULT_MAX_SESSIONS);
                // Opening is not the hot path: the counts are derived, not kept.
                let open = self
                    .sessions
                    .values()
                    .filter(|r| r.tenant == tenant)
                    .count();
                if open >= limit {
                    return Err(ErrorReply::new(
                        "too_many_sessions",
                        format!("tenant {tenant} already has {limit} open sessions (its limit)"),
                    ));
                }
                let mut load = vec![0; self.nodes.len()];
                for r in self.sessions.values() {
                    for &n in &r.stages {
                        load[n] += 1;
                    }
                }
                let stages = self.routes.choose(&self.live(), &load).map_err(|part| {
                    ErrorReply::new(
                        "node_unavailable",
                        format!("no stage of part {part} is connected"),
                    )
                })?;
                let session = self.fresh_session();
                self.sessions.insert(
                    session,
                    SessionRoute {
                        agent,
                        tenant: tenant.clone(),
                        stages: stages.clone(),
                        opened: stages.clone(),
                    },
                );
                metrics::ROUTER_SESSIONS.set(self.sessions.len() as i64);
                let open = self.open_on(session, &tenant, &stages);
                Ok(Box::pin(async move {
                    match open.await {
                        Ok(placed) => {
                            if placed != stages {
                                // Queued before the answer leaves: the session's first
                                // request finds it placed.
                                me.do_send(Placed {
                                    session,
                                    stages: placed.clone(),
                                });
                            }
                            tracing::info!(session, %tenant, stages = ?placed, "session opened");
                            ok_frame(0, &encoded(&session))
                        }
                        Err(e) => {
                            // The stages refused it: the tenant never gets the id.
                            me.do_send(Forget(session));
                            err_frame(&e)
                        }
                    }
                }))
            }
            Request::CloseSession { session } => {
                let opened = self.owned(agent, session)?.opened.clone();
                self.forget(session);
                let close = self.broadcast(&Request::CloseSession { session }, &opened);
                Ok(Box::pin(async move {
                    match close.await {
                        Ok(()) => ok_frame(0, &[]),
                        Err(e) => err_frame(&e),
                    }
                }))
            }
            Request::Setup { session, op } | Request::Call { session, op, .. } => {
                let route = self.owned(agent, session)?;
                let part = self
                    .routes
                    .part(op)
                    .ok_or_else(|| ErrorReply::new("no_route", format!("no stage serves {op}")))?;
                let attempts: Vec<(usize, Addr<NodeLink>)> = self
                    .routes
                    .attempts(part, route.stages[part])
                    .into_iter()
                    .map(|n| (n, self.nodes[n].clone()))
                    .collect();
                let deadline = match head {
                    Request::Setup { .. } => self.deadlines.setup,
                    _ => self.deadlines.call,
                };
                let batch = talaria_actors::Coalescer::batchable(&head, &frame).map(|op| {
                    (
                        op,
                        talaria_wire::frame::max_answer_of(&self.config, op, frame.len()),
                    )
                });
                let tenant = route.tenant.clone();
                metrics::ROUTER_REQUESTS.inc();
                let t0 = std::time::Instant::now();
                // One buffer for every attempt: a request resent to another replica is the very
                // bytes first sent (a fresh mask of the same rows would give the cloud a second
                // view of them).
                let frame: Arc<[u8]> = frame.into();
                Ok(Box::pin(async move {
                    let mut answer = Vec::new();
                    for (i, (n, node)) in attempts.into_iter().enumerate() {
                        if i > 0 {
                            // The replica may not know the session: open it there first.
                            let reopen = match stage_open(session, &tenant) {
                                Ok(f) => f,
                                Err(e) => return err_frame(&e),
                            };
                            let opened = node
                                .send(Forward {
                                    frame: reopen,
                                    deadline,
                                    batch: None,
                                })
                                .await
                                .map(|a| {
                                    matches!(
                                        frame::split::<talaria_wire::Reply>(&a),
                                        Ok((talaria_wire::Reply::Ok { .. }, _))
                                    )
                                })
                                .unwrap_or(false);
                            if !opened {
                                continue;
                            }
                            metrics::ROUTER_FAILOVERS.inc();
                            tracing::warn!(session, stage = n, "resending a request to a replica");
                            me.do_send(Rebind {
                                session,
                                part,
                                stage: n,
                            });
                        }
                        answer = node
                            .send(Forward {
                                frame: frame.clone(),
                                deadline,
                                batch,
                            })
                            .await
                            .unwrap_or_else(|e| {
                                err_frame(&ErrorReply::new("internal", format!("node link: {e}")))
                            });
                        if !unreachable_stage(&answer) {
                            break;
                        }
                    }
                    metrics::ROUTER_SECONDS.observe(t0.elapsed().as_secs_f64());
                    answer
                }))
            }
            Request::StageOpen { .. } | Request::Batch { .. } => Err(ErrorReply::new(
                "unexpected_request",
                "StageOpen and Batch are the coordinator's to send",
            )),
        }
    }
}

/// A small reply payload (a nonce, a session id): encoding it into a Vec cannot fail.
fn encoded<T: serde::Serialize>(v: &T) -> Vec<u8> {
    frame::encode::<_, ()>(v, None).unwrap_or_default()
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<Route> for Router {
    type Result = ResponseFuture<Vec<u8>>;

    fn handle(&mut self, msg: Route, ctx: &mut Context<Self>) -> Self::Result {
        let agent = msg.agent;
        match self.route(agent, msg.frame, ctx.address()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(agent, error_type = %e.error_type, "refused: {}", e.message);
                metrics::error(&e.error_type);
                let answer = err_frame(&e);
                Box::pin(async move { answer })
            }
        }
    }
}

/// A session's requests of `part` go to `stage` from now on (its first stage failed).
#[derive(Message)]
#[rtype(result = "()")]
struct Rebind {
    session: SessionId,
    part: usize,
    stage: usize,
}

impl Handler<Rebind> for Router {
    type Result = ();

    fn handle(&mut self, msg: Rebind, _: &mut Context<Self>) {
        if let Some(r) = self.sessions.get_mut(&msg.session) {
            r.stages[msg.part] = msg.stage;
            if !r.opened.contains(&msg.stage) {
                r.opened.push(msg.stage);
            }
        }
    }
}

/// A session opened on other stages than first chosen (`stages`, per part): its requests go
/// there, and only those stages are told when it closes.
#[derive(Message)]
#[rtype(result = "()")]
struct Placed {
    session: SessionId,
    stages: Vec<usize>,
}

impl Handler<Placed> for Router {
    type Result = ();

    fn handle(&mut self, msg: Placed, _: &mut Context<Self>) {
        match self.sessions.get_mut(&msg.session) {
            Some(r) => {
                r.opened = msg.stages.clone();
                r.stages = msg.stages;
            }
            // Its agent left while it opened: the stages it opened on are told at once.
            None => tell_closed(&self.nodes, msg.session, msg.stages, self.deadlines.setup),
        }
    }
}

/// A session the stages refused to open: forget it.
#[derive(Message)]
#[rtype(result = "()")]
struct Forget(SessionId);

impl Handler<Forget> for Router {
    type Result = ();

    fn handle(&mut self, msg: Forget, _: &mut Context<Self>) {
        self.forget(msg.0);
    }
}

impl Handler<AgentGone> for Router {
    type Result = ();

    fn handle(&mut self, msg: AgentGone, ctx: &mut Context<Self>) {
        let tenant = self.agents.remove(&msg.0);
        metrics::ROUTER_AGENTS.set(self.agents.len() as i64);
        self.challenges.remove(&msg.0);
        self.certs.remove(&msg.0);
        self.gates.remove(&msg.0);
        let gone: Vec<(SessionId, Vec<usize>)> = self
            .sessions
            .iter()
            .filter(|(_, r)| r.agent == msg.0)
            .map(|(&s, r)| (s, r.opened.clone()))
            .collect();
        tracing::info!(
            agent = msg.0,
            ?tenant,
            sessions = gone.len(),
            "agent disconnected"
        );
        for (session, opened) in gone {
            self.forget(session);
            let close = self.broadcast(&Request::CloseSession { session }, &opened);
            ctx.spawn(
                async move {
                    if let Err(e) = close.await {
                        tracing::warn!(session, "closing: {e}");
                    }
                }
                .into_actor(self),
            );
        }
    }
}

/// A frame for a gpu-node, answered within `deadline`; the result is its answer frame.
#[derive(Message)]
#[rtype(result = "Vec<u8>")]
pub struct Forward {
    pub frame: Arc<[u8]>,
    pub deadline: Duration,
    /// A call that may share a `Batch` frame with other calls of its op waiting for the same
    /// stage ([`talaria_actors::Coalescer::batchable`]): its op and the most its answer can be
    /// (`talaria_wire::frame::max_answer_of`).
    pub batch: Option<(OpId, usize)>,
}

/// Owns the connection to one gpu-node, reconnecting when it drops; keeps `live` true while
/// it is connected.
pub struct NodeLink {
    name: String,
    addr: SocketAddr,
    tls: TlsMaterial,
    endpoint: quinn::Endpoint,
    /// The largest answer read from the stage.
    max_frame: usize,
    /// The largest request the stage reads (what a batch may be).
    max_request: usize,
    conn: Option<quinn::Connection>,
    /// Packs the calls waiting together for this stage into one frame, on `conn`.
    coalescer: Option<talaria_actors::Coalescer>,
    connecting: bool,
    live: Arc<[AtomicBool]>,
    index: usize,
    /// Not dialled again before this: the node failed a deadline.
    cool_until: Option<tokio::time::Instant>,
    /// The current connection's path statistics when last read.
    path_seen: talaria_actors::PathSeen,
}

/// How often a link's QUIC path statistics are read into the metrics.
const PATH_STATS_EVERY: Duration = Duration::from_secs(1);

/// How long a stage that missed a deadline is left alone: new sessions go to its replicas
/// meanwhile (its connection may be alive while its worker is stuck).
const UNRESPONSIVE_COOL_DOWN: Duration = Duration::from_secs(10);

/// The stage missed a deadline: drop its connection and leave it alone for a while.
#[derive(Message)]
#[rtype(result = "()")]
struct Unresponsive;

impl Handler<Unresponsive> for NodeLink {
    type Result = ();

    fn handle(&mut self, _: Unresponsive, _: &mut Context<Self>) {
        self.cool_until = Some(tokio::time::Instant::now() + UNRESPONSIVE_COOL_DOWN);
        self.set_live(false);
        if let Some(conn) = self.forget_conn() {
            // Its watcher redials, after the cool-down.
            conn.close(0u32.into(), b"unresponsive");
        }
    }
}

impl NodeLink {
    /// A link to stage `name` at `addr`, dialled from `endpoint`, reading answers of at most
    /// `max_frame` bytes from a stage that reads requests of at most `max_request`; it is stage
    /// `index` of `live`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        addr: SocketAddr,
        tls: TlsMaterial,
        endpoint: quinn::Endpoint,
        max_frame: usize,
        max_request: usize,
        live: Arc<[AtomicBool]>,
        index: usize,
    ) -> Self {
        Self {
            name,
            addr,
            tls,
            endpoint,
            max_frame,
            max_request,
            conn: None,
            coalescer: None,
            connecting: false,
            live,
            index,
            cool_until: None,
            path_seen: talaria_actors::PathSeen::default(),
        }
    }

    /// Reads the connection's losses and path MTU into the metrics (a fall of the MTU is
    /// logged).
    fn read_path(&mut self) {
        let Some(conn) = &self.conn else { return };
        let delta = self.path_seen.read(conn, &self.name);
        metrics::ROUTER_LINK_LOST
            .with_label_values(&[&self.name])
            .inc_by(delta.lost);
        metrics::ROUTER_LINK_MTU
            .with_label_values(&[&self.name])
            .set(delta.mtu.into());
    }

    /// Drops the connection, counting its last losses first; the MTU gauge reads 0 until the
    /// next one.
    fn forget_conn(&mut self) -> Option<quinn::Connection> {
        self.read_path();
        metrics::ROUTER_LINK_MTU
            .with_label_values(&[&self.name])
            .set(0);
        self.coalescer = None;
        self.conn.take()
    }

    fn set_live(&self, up: bool) {
        if self.live[self.index].swap(up, Ordering::Relaxed) != up {
            let n = self
                .live
                .iter()
                .filter(|l| l.load(Ordering::Relaxed))
                .count();
            metrics::ROUTER_STAGES_UP.set(n as i64);
        }
    }

    fn reconnect(&mut self, ctx: &mut Context<Self>) {
        if self.connecting {
            return;
        }
        self.connecting = true;
        let (tls, endpoint, addr, name) = (
            self.tls.clone(),
            self.endpoint.clone(),
            self.addr,
            self.name.clone(),
        );
        let cool_until = self.cool_until.take();
        let dial = async move {
            if let Some(t) = cool_until {
                tokio::time::sleep_until(t).await;
            }
            let mut wait = Duration::from_millis(50);
            loop {
                match tls.connect(&endpoint, addr).await {
                    Ok(c) => return c,
                    Err(e) => {
                        tracing::debug!(stage = %name, "dialling {addr}: {e}");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                }
            }
        };
        ctx.spawn(dial.into_actor(self).map(|conn, act, ctx| {
            tracing::info!(stage = %act.name, addr = %act.addr, "gpu-node connected");
            act.conn = Some(conn.clone());
            act.coalescer = Some(talaria_actors::Coalescer::new(
                conn.clone(),
                talaria_actors::BatchLimits {
                    request: act.max_request,
                    answer: act.max_frame,
                },
            ));
            act.path_seen = talaria_actors::PathSeen::default();
            act.connecting = false;
            act.set_live(true);
            // Noticed within the idle timeout when the node dies or stops answering.
            ctx.spawn(async move { conn.closed().await }.into_actor(act).map(
                |reason, act, ctx| {
                    tracing::warn!(stage = %act.name, addr = %act.addr, "gpu-node lost: {reason}");
                    act.forget_conn();
                    act.set_live(false);
                    act.reconnect(ctx);
                },
            ));
        }));
    }
}

impl Actor for NodeLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.reconnect(ctx);
        ctx.run_interval(PATH_STATS_EVERY, |act, _| act.read_path());
    }
}

impl Handler<Forward> for NodeLink {
    type Result = ResponseFuture<Vec<u8>>;

    fn handle(&mut self, msg: Forward, ctx: &mut Context<Self>) -> Self::Result {
        let live = self.conn.clone().filter(|c| c.close_reason().is_none());
        let Some(conn) = live else {
            self.forget_conn();
            self.set_live(false);
            self.reconnect(ctx);
            let answer = err_frame(&ErrorReply::new(
                "node_unavailable",
                format!("gpu-node {} ({}) is not connected", self.name, self.addr),
            ));
            return Box::pin(async move { answer });
        };
        let max = self.max_frame;
        let name = self.name.clone();
        let me = ctx.address();
        let coalescer = self.coalescer.clone().zip(msg.batch);
        Box::pin(async move {
            let exchange = async {
                match coalescer {
                    Some((c, (op, bound))) => c.call(msg.frame.clone(), op, bound).await,
                    None => talaria_net::request(&conn, &msg.frame, max).await,
                }
            };
            match tokio::time::timeout(msg.deadline, exchange).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::warn!(stage = %name, error_type = e.error_type(), "forwarding: {e}");
                    err_frame(&frame_error(&e))
                }
                Err(_) => {
                    tracing::warn!(stage = %name, deadline_ms = msg.deadline.as_millis() as u64, "no answer in time");
                    metrics::error("deadline_exceeded");
                    me.do_send(Unresponsive);
                    err_frame(&ErrorReply::new(
                        "deadline_exceeded",
                        format!(
                            "gpu-node {name} did not answer within {} ms",
                            msg.deadline.as_millis()
                        ),
                    ))
                }
            }
        })
    }
}

/// Owns one cvm-agent's connection: every stream it opens goes to the router under its id.
pub struct AgentLink {
    id: AgentId,
    conn: quinn::Connection,
    router: Addr<Router>,
    gate: Gate,
}

impl AgentLink {
    /// A link for connection `conn`, known to the router as `id`, its frames read through
    /// `gate` (the router opens it on admission).
    pub fn new(id: AgentId, conn: quinn::Connection, router: Addr<Router>, gate: Gate) -> Self {
        Self {
            id,
            conn,
            router,
            gate,
        }
    }
}

impl Actor for AgentLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (id, router) = (self.id, self.router.clone());
        // Sent before any of its frames: the router knows the key before a Hello can arrive.
        if let Some(cert) = talaria_net::peer_cert_der(&self.conn) {
            router.do_send(AgentCert(id, cert));
        }
        router.do_send(AgentGate(id, self.gate.clone()));
        let intake = self.gate.intake.clone();
        let serve = talaria_actors::serve_streams(self.conn.clone(), intake, move |frame| {
            let router = router.clone();
            async move {
                router
                    .send(Route { agent: id, frame })
                    .await
                    .unwrap_or_else(|e| {
                        err_frame(&ErrorReply::new("internal", format!("router: {e}")))
                    })
            }
        });
        ctx.spawn(serve.into_actor(self).map(|(), act, ctx| {
            act.router.do_send(AgentGone(act.id));
            ctx.stop();
        }));
    }
}

/// Accepts cvm-agent connections on `endpoint`, one [`AgentLink`] each. At most
/// [`MAX_UNADMITTED`] of them wait for admission at once, handshakes under way included: one
/// more lets the oldest go. One not admitted within [`ADMISSION_WINDOW`] is closed.
pub async fn serve(endpoint: quinn::Endpoint, router: Addr<Router>, max_frame: usize) {
    let door = talaria_actors::Doorway::new("agent", MAX_UNADMITTED, ADMISSION_WINDOW);
    let mut next: AgentId = 1;
    while let Some(incoming) = endpoint.accept().await {
        // Admitted agents do not count: there is always a place.
        let Some(ticket) = door.knock().map(Arc::new) else {
            incoming.refuse();
            continue;
        };
        let id = next;
        next += 1;
        let (router, held) = (router.clone(), ticket.clone());
        let task = actix_rt::spawn(async move {
            match incoming.await {
                Ok(conn) => {
                    if !ticket.connected(&conn) {
                        return;
                    }
                    tracing::info!(agent = id, peer = %conn.remote_address(), "agent connected");
                    AgentLink::new(id, conn, router, Gate::closed(ticket, max_frame)).start();
                }
                Err(e) => tracing::warn!("agent handshake failed: {e}"),
            }
        });
        held.hold(task.abort_handle());
    }
}
