//! The agent in a cluster: the link to the coordinator, and the conversation a `Session` actor
//! runs.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::session::{BlockingUplink, Gone};
use serde::Serialize;
use serde::de::DeserializeOwned;
use talaria_actors::metrics;
use talaria_engine::{
    ChatMessage, CvmProvision, EngineError, GenerateRequest, KvCache, ModelConfig, PrefixCache,
    Tokenizer, Transformer, cached_ids, chat_prompt, generate_cached,
};
use talaria_params::{Calibration, RemoConfig};
use talaria_topology::Deadlines;
use talaria_wire::frame;
use talaria_wire::{
    CloudLink, ErrorCode, ErrorReply, LatencySplit, LinkError, MaskedCall, MaskedReply, Prompt,
    Reply, Request, SessionId, SetupReply, SetupRequest, TenantEvent, TenantRequest,
};

use crate::manifest::ModelManifest;
use crate::{AgentError, PublicCache, RemoLinear};

/// A cloud's refusal as a link error, its kind read through [`ErrorCode`] (anything else:
/// `cloud_error`).
fn link_error(error_type: &str, message: String) -> LinkError {
    LinkError {
        error_type: ErrorCode::read(error_type).as_str(),
        message,
    }
}

/// The largest answer to a request that carries no tensor (a session id, an empty reply).
const SMALL_REPLY: usize = 4096;

/// One request on the uplink: `head` and `body` out, an answer of at most `max_reply` bytes
/// within `deadline`, its payload decoded as `R`. Returns the gpu compute time the answer
/// reports, in µs.
pub fn exchange<B: Serialize, R: DeserializeOwned>(
    uplink: &BlockingUplink,
    head: &Request,
    body: Option<&B>,
    max_reply: usize,
    deadline: Duration,
) -> Result<(R, u64), LinkError> {
    let frame = frame::encode(head, body).map_err(|e| link_error(e.error_type(), e.to_string()))?;
    let answer = uplink
        .exchange(frame, max_reply, deadline)
        .map_err(|e| link_error(e.error_type(), e.to_string()))?;
    let (reply, payload): (Reply, &[u8]) =
        frame::split(&answer).map_err(|e| link_error(e.error_type(), e.to_string()))?;
    match reply {
        Reply::Ok { compute_us } => {
            let r = frame::body(payload).map_err(|e| link_error(e.error_type(), e.to_string()))?;
            Ok((r, compute_us))
        }
        Reply::Err(e) => Err(link_error(&e.error_type, e.message)),
    }
}

/// How large and how late the answers of a session's requests may be.
#[derive(Clone)]
pub struct LinkBounds {
    pub config: ModelConfig,
    pub deadlines: Deadlines,
    /// Largest set-up answer (the topology's `max_frame_bytes`).
    pub max_frame: usize,
}

impl LinkBounds {
    /// The agent's own deadline for a masked call: the coordinator's, for the first stage and
    /// a replica after it, and a second to spare. A backstop: the coordinator answers first.
    fn call_deadline(&self) -> Duration {
        self.deadlines.call * 2 + Duration::from_secs(1)
    }

    fn setup_deadline(&self) -> Duration {
        self.deadlines.setup + Duration::from_secs(1)
    }
}

/// A session's link through the coordinator to the gpu-node stages. Closes the session when
/// dropped. Stops at the next request once its tenant is gone.
pub struct ClusterLink {
    uplink: BlockingUplink,
    session: SessionId,
    /// Gpu compute time reported by the stages, µs.
    gpu_us: u64,
    bounds: LinkBounds,
    gone: Option<Gone>,
    /// Counted open on the uplink while it lives (how its calls are driven, `net_loop`).
    _open: crate::net_loop::SessionOpen,
}

fn cancelled() -> LinkError {
    LinkError {
        error_type: ErrorCode::Cancelled.as_str(),
        message: "the tenant went away".into(),
    }
}

impl ClusterLink {
    /// Opens a new session with the coordinator; its requests stop once `gone` says so.
    pub fn open(
        uplink: BlockingUplink,
        bounds: LinkBounds,
        gone: Option<Gone>,
    ) -> Result<Self, LinkError> {
        if gone.as_ref().is_some_and(|g| g()) {
            return Err(cancelled());
        }
        let open = uplink.session();
        let (session, _) = exchange::<(), SessionId>(
            &uplink,
            &Request::OpenSession,
            None,
            SMALL_REPLY,
            bounds.setup_deadline(),
        )?;
        Ok(Self {
            uplink,
            session,
            gpu_us: 0,
            bounds,
            gone,
            _open: open,
        })
    }

    /// The session's id, assigned by the coordinator.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Gpu compute time of this session's calls so far, in seconds.
    pub fn gpu_seconds(&self) -> f64 {
        self.gpu_us as f64 * 1e-6
    }
}

impl ClusterLink {
    /// One request of this session, counting the gpu compute its answer reports.
    fn send<B: Serialize, R: DeserializeOwned>(
        &mut self,
        head: Request,
        body: &B,
        max_reply: usize,
        deadline: Duration,
    ) -> Result<R, LinkError> {
        if self.gone.as_ref().is_some_and(|g| g()) {
            return Err(cancelled());
        }
        let (reply, us) = exchange(&self.uplink, &head, Some(body), max_reply, deadline)?;
        self.gpu_us += us;
        Ok(reply)
    }
}

impl CloudLink for ClusterLink {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        let head = Request::Setup {
            session: self.session,
            op: req.op,
        };
        let (max, deadline) = (self.bounds.max_frame, self.bounds.setup_deadline());
        self.send(head, req, max, deadline)
    }

    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        let head = Request::Call {
            session: self.session,
            op: call.op,
            seq: call.seq,
        };
        // The answer is read no further than the call implies: rows × d_out values.
        let max = talaria_wire::max_call_reply(&self.bounds.config, call.op, call.x.shape().0);
        let deadline = self.bounds.call_deadline();
        self.send(head, call, max, deadline)
    }
}

impl Drop for ClusterLink {
    fn drop(&mut self) {
        let close = Request::CloseSession {
            session: self.session,
        };
        let deadline = self.bounds.setup_deadline();
        if let Err(e) = exchange::<(), ()>(&self.uplink, &close, None, SMALL_REPLY, deadline) {
            tracing::warn!(session = self.session, "closing the session: {e}");
        }
    }
}

/// Who asks: the SHA-256 of the API key a request came with. What the agent keeps between
/// requests (a conversation's keys and values) is only ever reused by the same principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Principal(pub [u8; 32]);

impl Principal {
    /// The principal of this key's requests that carry `salt`: their own partition of the
    /// conversation cache (SHA-256 of the key's digest and the salt, so any salt fits in 32
    /// bytes).
    pub fn salted(self, salt: Option<&str>) -> Self {
        use sha2::Digest;
        match salt {
            None => self,
            Some(salt) => {
                let mut h = sha2::Sha256::new();
                h.update(b"talaria cache salt\0");
                h.update(self.0);
                h.update(salt.as_bytes());
                Self(h.finalize().into())
            }
        }
    }
}

/// What every session of an agent shares: the provisioned model half, the ReMO parameters, the
/// shared set-up material, the uplink and the conversation cache.
pub struct AgentShared {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub remo: RemoConfig,
    pub calibration: Calibration,
    pub cache: PublicCache,
    pub uplink: BlockingUplink,
    pub bounds: LinkBounds,
    /// The KV caches of past requests, reused per salted principal and paid for per API key,
    /// so that the next turn of a conversation runs only its new tokens.
    pub conversations: Mutex<PrefixCache<Principal, Principal>>,
}

impl AgentShared {
    /// Builds the weight-free half from the coordinator's provision, checked first against
    /// `manifest` when given (which then also checks every session's full-rank set-up). Past
    /// conversations' caches are kept within `conversation_bytes` per API key.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        provision: CvmProvision,
        remo: RemoConfig,
        calibration: Calibration,
        uplink: BlockingUplink,
        manifest: Option<Arc<ModelManifest>>,
        deadlines: Deadlines,
        max_frame: usize,
        conversation_bytes: usize,
    ) -> Result<Self, AgentError> {
        if let Some(m) = &manifest {
            m.check_provision(&provision)?;
        }
        let config = provision.config.clone();
        let (tokenizer, model) = provision.build()?;
        Ok(Self {
            bounds: LinkBounds {
                config: config.clone(),
                deadlines,
                max_frame,
            },
            config,
            tokenizer,
            model,
            remo,
            calibration,
            cache: match manifest {
                Some(m) => PublicCache::with_shared_pools().pinned(m),
                None => PublicCache::with_shared_pools(),
            },
            uplink,
            conversations: Mutex::new(PrefixCache::new(conversation_bytes)),
        })
    }

    fn conversations(&self) -> std::sync::MutexGuard<'_, PrefixCache<Principal, Principal>> {
        // The cache is consistent between calls: a panic elsewhere leaves nothing half-done.
        self.conversations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cache to run `prompt` of `partition` (a salted principal) with: the partition's
    /// cached conversation that shares the longest prefix with it (taken out, so no two
    /// generations share one), or an empty one.
    pub fn take_conversation(&self, partition: &Principal, prompt: &[u32]) -> KvCache {
        let mut conversations = self.conversations();
        let taken = conversations.take(partition, prompt);
        let bytes = conversations.stats().bytes;
        drop(conversations);
        metrics::AGENT_PREFIX_BYTES.set(bytes as i64);
        let result = if taken.is_some() { "hit" } else { "miss" };
        metrics::AGENT_PREFIX_LOOKUPS
            .with_label_values(&[result])
            .inc();
        match taken {
            Some(r) => {
                metrics::AGENT_PREFIX_REUSED_TOKENS.inc_by(r.reused as u64);
                r.cache
            }
            None => self.model.new_cache(),
        }
    }

    /// Keeps `cache`, whose positions are `ids`, for the next request of `partition`, within
    /// the budget of API key `key`.
    pub fn keep_conversation(
        &self,
        key: Principal,
        partition: Principal,
        ids: Vec<u32>,
        mut cache: KvCache,
    ) {
        // The copy that gives back spare capacity happens outside the lock.
        cache.shrink_to_fit();
        let mut conversations = self.conversations();
        let before = conversations.stats().evictions;
        conversations.put(key, partition, ids, cache);
        let stats = conversations.stats();
        drop(conversations);
        metrics::AGENT_PREFIX_EVICTIONS.inc_by(stats.evictions - before);
        metrics::AGENT_PREFIX_BYTES.set(stats.bytes as i64);
    }

    /// Opens a session with the cloud and sets ReMO up for it; its requests stop once `gone`
    /// says its tenant went away.
    pub fn open(self: &Arc<Self>, gone: Option<Gone>) -> Result<AgentConversation, AgentError> {
        let link = ClusterLink::open(self.uplink.clone(), self.bounds.clone(), gone)?;
        let session = link.session();
        let linear = RemoLinear::connect_shared(
            &self.config,
            self.remo.clone(),
            &self.calibration,
            session,
            None,
            link,
            Some(&self.cache),
        )?;
        Ok(AgentConversation {
            shared: self.clone(),
            linear,
            leftover: None,
        })
    }

    /// Readies the agent before its first tenant: opens a session with the cloud, which sets
    /// every op up (each integer weight or `R_pub` checked against the manifest, kept in the
    /// shared cache, and the shared mask pools started), makes Freivalds' vectors for every op,
    /// and closes it. Without it the first request pays for all of that (about a second of
    /// vectors alone for the fetched model), and a cloud serving other weights is found only
    /// when a tenant asks. On failure the sessions set up as before, each on its own.
    pub fn warm_up(self: &Arc<Self>) -> Result<WarmUp, AgentError> {
        // 0 until it succeeds, so that a failed warm-up shows.
        metrics::AGENT_WARM_UP_SECONDS.set(0.0);
        metrics::AGENT_CHECKED_OPS.set(0);
        let t0 = Instant::now();
        let mut conversation = self.open(None)?;
        let setup_s = conversation.linear.timings().setup_s;
        let (vectors_made, checked_ops) = conversation.linear.prepare_checks();
        // Closes the session with the cloud; what it set up stays in the shared cache.
        drop(conversation);
        let warm = WarmUp {
            seconds: t0.elapsed().as_secs_f64(),
            setup_s,
            vectors_made,
            checked_ops,
        };
        metrics::AGENT_WARM_UP_SECONDS.set(warm.seconds);
        metrics::AGENT_CHECKED_OPS.set(checked_ops as i64);
        Ok(warm)
    }

    /// The token ids of a tenant's prompt.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        prompt_ids(&self.tokenizer, prompt)
    }
}

/// What [`AgentShared::warm_up`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmUp {
    /// Seconds it took, in all.
    pub seconds: f64,
    /// Seconds of set-up round trips and checks (0 for ops already in the cache).
    pub setup_s: f64,
    /// Freivalds' vectors made.
    pub vectors_made: usize,
    /// Ops that hold them (every op with the identity basis; none with a basis, where the CVM
    /// does not hold the weight).
    pub checked_ops: usize,
}

/// The token ids of a prompt: text is tokenized (in the chat template as one user message if
/// asked), ids are taken as they are.
pub fn prompt_ids(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
    match prompt {
        Prompt::Text { text, chat: false } => tokenizer.encode(text),
        Prompt::Text { text, chat: true } => tokenizer.encode(&chat_prompt(&[ChatMessage {
            role: "user".into(),
            content: text.clone(),
        }])),
        Prompt::Ids(ids) => Ok(ids.clone()),
        Prompt::Chat(messages) => tokenizer.encode(&chat_prompt(messages)),
    }
}

/// One conversation on the agent: its session's masks and link.
pub struct AgentConversation {
    shared: Arc<AgentShared>,
    linear: RemoLinear<ClusterLink>,
    /// What the last generation leaves for the conversation cache, kept once its tenant has
    /// its last event: the API key that pays, the salted principal, the ids and their cache.
    leftover: Option<(Principal, Principal, Vec<u32>, KvCache)>,
}

fn error_reply(e: &EngineError) -> ErrorReply {
    ErrorReply::new(e.error_type(), e.to_string())
}

impl AgentConversation {
    fn generate(
        &mut self,
        req: TenantRequest,
        principal: Principal,
        emit: &mut dyn FnMut(TenantEvent) -> bool,
    ) -> Result<TenantEvent, EngineError> {
        let shared = &self.shared;
        let key = principal;
        let partition = principal.salted(req.cache_salt.as_deref());
        let prompt_ids = shared.prompt_ids(&req.prompt)?;
        // An empty prompt or one beyond the context fails in the generation, before any call.
        let mut cache = if prompt_ids.is_empty() {
            shared.model.new_cache()
        } else {
            shared.take_conversation(&partition, &prompt_ids)
        };
        // The ids chosen so far: with the prompt, they name the positions the cache holds.
        let mut chosen = Vec::new();
        let request = GenerateRequest {
            prompt_ids,
            max_tokens: req.max_tokens,
            sampling: req.sampling,
            stop_ids: if req.ignore_eos {
                vec![]
            } else {
                vec![shared.tokenizer.eos()]
            },
        };
        let before = self.linear.timings().clone();
        let stats_before = self.linear.stats();
        let gpu_before = self.linear.link_mut().gpu_seconds();
        let t0 = Instant::now();
        let mut stream = shared.tokenizer.decode_stream();
        // The text so far, to find stop sequences in (only kept when there are any).
        let mut text = String::new();
        let generation = generate_cached(
            &shared.model,
            &mut self.linear,
            &request,
            &mut cache,
            |id| {
                chosen.push(id);
                let piece = if request.stop_ids.contains(&id) {
                    None
                } else {
                    stream.step(id)?
                };
                let stop = match (&piece, req.stop.is_empty()) {
                    (Some(p), false) => {
                        text.push_str(p);
                        talaria_engine::first_stop(&req.stop, &text).is_some()
                    }
                    _ => false,
                };
                if !emit(TenantEvent::Token { id, piece }) {
                    return Err(EngineError::Outsourced {
                        error_type: "cancelled",
                        message: "the tenant went away".into(),
                    });
                }
                Ok(if stop {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            },
            None,
        );
        // Where this generation's mask pairs came from, failed or not: a pool that keeps
        // running dry is the agent's CPU falling behind its sessions.
        let stats = self.linear.stats();
        metrics::AGENT_MASK_PAIRS
            .with_label_values(&["pool"])
            .inc_by(stats.pool_hits - stats_before.pool_hits);
        metrics::AGENT_CHECK_VECTORS_MADE
            .inc_by(stats.check_vectors_made - stats_before.check_vectors_made);
        metrics::AGENT_MASK_PAIRS
            .with_label_values(&["on_the_spot"])
            .inc_by(stats.pool_misses - stats_before.pool_misses);
        metrics::AGENT_MASK_POOL_READY.set(shared.cache.pool_ready() as i64);
        // Whatever happened, the cache holds exactly the positions that ran (a failed pass is
        // rolled back) and each came from verified products: it is kept, after the tenant's
        // last event, so that a stopped or failed turn does not cost the conversation its history.
        if !request.prompt_ids.is_empty() {
            let ids = cached_ids(&request.prompt_ids, &chosen, cache.len());
            self.leftover = Some((key, partition, ids, cache));
        }
        let generation = generation?;
        let wall = t0.elapsed().as_secs_f64();
        let after = self.linear.timings().clone();
        let gpu = self.linear.link_mut().gpu_seconds() - gpu_before;
        let masking = after.online_mask_s - before.online_mask_s;
        let cloud = after.cloud_s - before.cloud_s;
        let text = generation.text(&shared.tokenizer, &req.stop)?;
        Ok(TenantEvent::Done {
            latency: LatencySplit {
                cvm_compute_s: (wall - masking - cloud).max(0.0),
                masking_s: masking,
                gpu_compute_s: gpu,
                network_s: (cloud - gpu).max(0.0),
                setup_s: after.setup_s,
                calls: self.linear.stats().calls,
            },
            generation,
            text,
        })
    }
}

impl AgentConversation {
    /// Runs one generation of `principal` to its end, on a worker thread. `emit` sends an
    /// event to the tenant and returns `false` once the tenant is gone (the generation then
    /// stops).
    pub fn run(
        &mut self,
        req: TenantRequest,
        principal: Principal,
        emit: &mut dyn FnMut(TenantEvent) -> bool,
    ) {
        let session = self.linear.link_mut().session();
        let last = self.last_event(req, principal, emit, session);
        if let Some(last) = last {
            emit(last);
        }
        if let Some((key, partition, ids, cache)) = self.leftover.take() {
            self.shared.keep_conversation(key, partition, ids, cache);
        }
    }

    /// Runs the generation; the event that ends it for the tenant (none when it went away).
    fn last_event(
        &mut self,
        req: TenantRequest,
        principal: Principal,
        emit: &mut dyn FnMut(TenantEvent) -> bool,
        session: SessionId,
    ) -> Option<TenantEvent> {
        Some(match self.generate(req, principal, emit) {
            Ok(done) => done,
            Err(e) if e.error_type() == "cancelled" => {
                metrics::AGENT_CANCELLED.inc();
                tracing::info!(session, "generation stopped: its tenant went away");
                return None;
            }
            Err(e) => {
                if e.error_type() == "integrity" {
                    metrics::AGENT_INTEGRITY_FAILURES.inc();
                    tracing::error!(
                        session,
                        "the cloud returned a product that fails verification: session aborted"
                    );
                }
                tracing::warn!(
                    session,
                    error_type = e.error_type(),
                    // The message may carry the tenant's values (a sampling parameter, a token
                    // id): it goes to the tenant only.
                    "generation failed"
                );
                TenantEvent::Error(error_reply(&e))
            }
        })
    }
}
