//! The gpu-node's actors: [`LayerStage`] admits requests for its layers, [`GpuShard`] computes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use actix::prelude::*;
use talaria_engine::OpId;
pub use talaria_topology::Batching;
use talaria_wire::frame::{self};
use talaria_wire::{ErrorReply, MaskedCall, Request, SessionId, SetupRequest};

use tokio::sync::oneshot;

use talaria_actors::{err_frame, frame_error, metrics, ok_frame};

/// The weight-dependent work of a stage, implemented by the gpu-node crate. Computes on the
/// shard's worker thread, or on the stage's event loop for small calls taken at once (see
/// [`GpuShard`]); the event loop otherwise asks it only `owns`, `open` and `close`.
pub trait StageCompute: Send + Sync + 'static {
    /// Whether this stage holds the weights of `op`.
    fn owns(&self, op: OpId) -> bool;
    /// `R_pub` for a public basis, encoded as a `SetupReply` payload.
    fn setup(&self, req: &SetupRequest, seen: Arrival) -> Result<Vec<u8>, ErrorReply>;
    /// `x̃ · W` for each of `calls` (all of one op, from any sessions and tenants), each encoded
    /// as a `MaskedReply` payload, in their order. An implementation should stack their rows
    /// into one matrix multiply. `seen[i]` is how `calls[i]` arrived.
    fn call_batch(
        &self,
        calls: &[MaskedCall],
        seen: &[Arrival],
    ) -> Vec<Result<Vec<u8>, ErrorReply>>;
    /// A session of `tenant` opened here (the coordinator says whose it is).
    fn open(&self, _session: SessionId, _tenant: &str) {}
    /// A session is over (e.g. to flush what a tap recorded for it).
    fn close(&self, _session: SessionId) {}
    /// Whether small calls may be computed on the stage's event loop instead of the shard's
    /// worker (see [`GpuShard`]).
    fn may_run_on_event_loop(&self) -> bool {
        true
    }
    /// The output width of `op`'s weight, if held here: what a call's work is judged by before
    /// it is decoded. `None` keeps its calls on the worker.
    fn out_width(&self, _op: OpId) -> Option<usize> {
        None
    }
}

/// What a stage sees of a request besides its content: when it arrived and how large its frame
/// was. The cloud knows both for every request; a tap records them.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Instant,
    /// The request's own frame length in bytes (header and payload; within a coordinator's
    /// `Batch`, the call's frame, not the batch's; QUIC adds its own packet overhead). `None`
    /// where no frame crossed a wire (the in-process engine).
    pub frame_bytes: Option<usize>,
}

impl Arrival {
    /// A request handed over in process, now.
    pub fn in_process() -> Self {
        Self {
            at: Instant::now(),
            frame_bytes: None,
        }
    }
}

/// Work for a [`GpuShard`]: a `Setup` or `Call` request frame whose header the stage admitted.
/// Its payload (masked rows, up to megabytes) is decoded on a worker thread, not on the event
/// loop.
pub struct Job {
    pub frame: Vec<u8>,
    pub op: OpId,
    pub tenant: Arc<str>,
    /// A set-up (run alone) rather than a masked call (batched with others of its op).
    pub setup: bool,
}

/// What a job answers: the encoded reply payload and the compute time in µs.
pub type JobResult = Result<(Vec<u8>, u64), ErrorReply>;

fn mismatch(what: &str) -> ErrorReply {
    ErrorReply::new(
        "bad_request",
        format!("payload {what} disagrees with its header"),
    )
}

/// Decodes an admitted set-up request and runs it.
fn run_setup(compute: &dyn StageCompute, frame: &[u8], since: Instant) -> JobResult {
    let (head, payload): (Request, &[u8]) = frame::split(frame).map_err(|e| frame_error(&e))?;
    let Request::Setup { session, op } = head else {
        return Err(ErrorReply::new(
            "unexpected_request",
            format!("a shard does not run {head:?} as a set-up"),
        ));
    };
    let req: SetupRequest = frame::body(payload).map_err(|e| frame_error(&e))?;
    if req.session != session || req.op != op {
        return Err(mismatch("session or op"));
    }
    let t0 = Instant::now();
    let seen = Arrival {
        at: since,
        frame_bytes: Some(frame.len()),
    };
    let reply = compute.setup(&req, seen)?;
    Ok((reply, t0.elapsed().as_micros() as u64))
}

/// Decodes an admitted masked call of at most `max_rows` rows.
fn decode_call(frame: &[u8], max_rows: usize) -> Result<MaskedCall, ErrorReply> {
    let (head, payload): (Request, &[u8]) = frame::split(frame).map_err(|e| frame_error(&e))?;
    let Request::Call { session, op, seq } = head else {
        return Err(ErrorReply::new(
            "unexpected_request",
            format!("a shard does not run {head:?} as a call"),
        ));
    };
    let call: MaskedCall = frame::body(payload).map_err(|e| frame_error(&e))?;
    if call.session != session || call.op != op || call.seq != seq {
        return Err(mismatch("session, op or seq"));
    }
    let rows = call.x.shape().0;
    if rows > max_rows {
        return Err(ErrorReply::new(
            "too_many_rows",
            format!(
                "a call carries at most {max_rows} rows (the context and its extra rows), not {rows}"
            ),
        ));
    }
    Ok(call)
}

struct Waiting {
    job: Job,
    since: Instant,
    reply: oneshot::Sender<JobResult>,
}

/// The shard's queue, shared by the actor (which pushes) and the worker thread (which takes
/// batches).
struct Queue {
    jobs: Mutex<VecDeque<Waiting>>,
    ready: Condvar,
    /// Live sessions of the stage: how many calls of one op could possibly arrive together.
    sessions: AtomicUsize,
    /// The worker is running a batch (set under the lock when it takes one).
    working: AtomicBool,
    policy: Batching,
    limits: ShardLimits,
}

/// What a shard accepts: rows per call, and jobs waiting at once.
#[derive(Debug, Clone, Copy)]
pub struct ShardLimits {
    /// Most rows in one call (`talaria_wire::max_call_rows` of the model).
    pub max_rows: usize,
    /// Most jobs queued; beyond it a job is refused as `overloaded`.
    pub max_queued: usize,
}

/// Default [`ShardLimits::max_queued`]: far more than the calls of every session a stage
/// serves (each has one in flight), far less than memory allows.
pub const DEFAULT_MAX_QUEUED: usize = 1024;

/// The most multiply-adds the event loop computes itself at once, each request's every 4 bytes
/// counted as an input value (an integer row's 8-byte values count twice): about a millisecond
/// of products here. Sixteen sessions' decode calls of any block op fit, and a lone session's
/// LM-head decode call (1 row × 576 × 49 152, counted twice); sixteen LM-head calls or a
/// prefill of more than 16 rows of `gate_up` do not.
const INLINE_MAX_WORK: u64 = 64 << 20;

impl Queue {
    /// Whether the event loop may run `jobs` itself, at once: nothing is queued, the worker is
    /// idle, and its batching policy would take exactly these jobs as its next batch right away
    /// (calls of one op, and every live session's call among them, or a full batch, or no wait
    /// configured; no set-up), whose work is small ([`INLINE_MAX_WORK`]). Handing them to the
    /// worker and back would cost two cross-thread wake-ups, each of tens of microseconds on a
    /// VM, against a decode product of about a hundred. Only the event loop queues jobs, so
    /// while it computes nothing can start beside it.
    fn lone(&self, jobs: &[Waiting], compute: &dyn StageCompute) -> bool {
        if jobs.is_empty()
            || !compute.may_run_on_event_loop()
            || !self.lock().is_empty()
            || self.working.load(Ordering::Acquire)
        {
            return false;
        }
        let work = jobs.iter().try_fold(0u64, |sum, w| {
            let values = (w.job.frame.len() / 4) as u64;
            sum.checked_add(values.checked_mul(compute.out_width(w.job.op)? as u64)?)
        });
        if work.is_none_or(|w| w > INLINE_MAX_WORK) {
            return false;
        }
        let view: Vec<Queued<'_>> = jobs.iter().map(Queued::of).collect();
        let all = Next::Batch((0..jobs.len()).collect());
        next(
            &view,
            self.sessions.load(Ordering::Relaxed),
            &self.policy,
            Instant::now(),
        ) == all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues each of `ws` while there is room (one wake-up of the worker for all), and gives
    /// back those that did not fit.
    fn push(&self, ws: Vec<Waiting>) -> Vec<Waiting> {
        let mut jobs = self.lock();
        let mut full = Vec::new();
        for w in ws {
            if jobs.len() >= self.limits.max_queued {
                full.push(w);
            } else {
                jobs.push_back(w);
            }
        }
        metrics::STAGE_QUEUE_DEPTH.set(jobs.len() as i64);
        self.ready.notify_one();
        full
    }

    /// The next batch, as [`next`] decides it; blocks while it says to wait.
    fn next_batch(&self) -> Vec<Waiting> {
        let mut jobs = self.lock();
        loop {
            let now = Instant::now();
            let view: Vec<Queued<'_>> = jobs.iter().map(Queued::of).collect();
            let decision = next(
                &view,
                self.sessions.load(Ordering::Relaxed),
                &self.policy,
                now,
            );
            drop(view);
            match decision {
                Next::Idle => jobs = self.ready.wait(jobs).unwrap_or_else(|e| e.into_inner()),
                Next::WaitUntil(deadline) => {
                    jobs = self
                        .ready
                        .wait_timeout(jobs, deadline.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Next::Setup(i) => {
                    self.working.store(true, Ordering::Release);
                    let setup = jobs.remove(i).expect("a position in the queue");
                    metrics::STAGE_QUEUE_DEPTH.set(jobs.len() as i64);
                    return vec![setup];
                }
                Next::Batch(take) => {
                    self.working.store(true, Ordering::Release);
                    let mut take = take.into_iter().peekable();
                    let mut batch = Vec::new();
                    let mut rest = VecDeque::with_capacity(jobs.len());
                    for (i, w) in jobs.drain(..).enumerate() {
                        if take.next_if_eq(&i).is_some() {
                            batch.push(w);
                        } else {
                            rest.push_back(w);
                        }
                    }
                    *jobs = rest;
                    metrics::STAGE_QUEUE_DEPTH.set(jobs.len() as i64);
                    return batch;
                }
            }
        }
    }
}

/// A queued job as the batching policy sees it.
#[derive(Debug, Clone, Copy)]
struct Queued<'a> {
    op: OpId,
    tenant: &'a str,
    setup: bool,
    since: Instant,
}

impl<'a> Queued<'a> {
    fn of(w: &'a Waiting) -> Self {
        Self {
            op: w.job.op,
            tenant: &w.job.tenant,
            setup: w.job.setup,
            since: w.since,
        }
    }
}

/// What a shard's worker does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    /// Nothing is queued: wait for a job.
    Idle,
    /// Run the set-up at this position of the queue, alone.
    Setup(usize),
    /// Wait until then, or until a job arrives, for more calls of the one op queued.
    WaitUntil(Instant),
    /// Run the calls at these positions (increasing; all of one op) as one batch.
    Batch(Vec<usize>),
}

/// The batching policy, a pure function of the queue (in arrival order), the stage's live
/// sessions and the time. Set-ups go first, alone. Otherwise the calls of the earliest op (in
/// forward-pass order) among those queued: their sessions are the laggards, served at once
/// while others wait ahead, so sessions fall into step and later GEMMs serve all of them. When
/// every queued call is of one op, it waits (at most `max_wait` from the oldest's arrival)
/// while some live session has no call queued and may be about to send one of the same op. At
/// most `max_calls` calls, each tenant limited to its fair share when several compete; the rest
/// stay queued in arrival order.
fn next(queued: &[Queued<'_>], live: usize, policy: &Batching, now: Instant) -> Next {
    if queued.is_empty() {
        return Next::Idle;
    }
    if let Some(i) = queued.iter().position(|q| q.setup) {
        return Next::Setup(i);
    }
    let op = queued.iter().map(|q| q.op).min().expect("not empty");
    let group: Vec<&Queued<'_>> = queued.iter().filter(|q| q.op == op).collect();
    let oldest = group.iter().map(|q| q.since).min().expect("not empty");
    let deadline = oldest + policy.max_wait;
    // Serve at once when other ops wait behind this one, when the batch is full, or when every
    // live session has its call in it: a session has one call in flight at a time, so nothing
    // more can arrive.
    let serve =
        group.len() < queued.len() || group.len() >= live.min(policy.max_calls) || now >= deadline;
    if !serve {
        return Next::WaitUntil(deadline);
    }
    let share = policy
        .max_calls
        .div_ceil(distinct_tenants(group.iter().map(|q| q.tenant)))
        .max(1);
    let mut taken: HashMap<&str, usize> = HashMap::new();
    let mut take = Vec::new();
    for (i, q) in queued.iter().enumerate() {
        if q.op != op || take.len() >= policy.max_calls {
            continue;
        }
        let n = taken.entry(q.tenant).or_default();
        if *n < share {
            *n += 1;
            take.push(i);
        }
    }
    Next::Batch(take)
}

/// How many distinct tenants there are among `tenants`.
fn distinct_tenants<'a>(tenants: impl Iterator<Item = &'a str>) -> usize {
    let mut tenants: Vec<&str> = tenants.collect();
    tenants.sort_unstable();
    tenants.dedup();
    tenants.len()
}

/// Runs `f`, turning a panic into a typed error for the jobs it served: the worker runs inside a
/// rayon pool, where an unwinding panic would abort the process and with it every session.
fn unpanicked<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, ErrorReply> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
        tracing::error!(
            what,
            "the stage's compute panicked: its jobs are answered with an error"
        );
        metrics::error("internal");
        ErrorReply::new("internal", format!("the stage's {what} failed"))
    })
}

/// Runs batches from `queue` for the life of the process.
fn work(queue: Arc<Queue>, compute: Arc<dyn StageCompute>) {
    loop {
        let batch = queue.next_batch();
        let _ = run_batch(compute.as_ref(), batch, queue.limits.max_rows);
        queue.working.store(false, Ordering::Release);
    }
}

/// Runs one batch (a set-up alone, or calls of one op) and answers each of its jobs; returns
/// how many masked calls it computed (those that decoded).
fn run_batch(compute: &dyn StageCompute, batch: Vec<Waiting>, max_rows: usize) -> usize {
    let started = Instant::now();
    for w in &batch {
        metrics::STAGE_QUEUE_SECONDS.observe((started - w.since).as_secs_f64());
    }
    if batch[0].job.setup {
        let w = batch.into_iter().next().expect("one job");
        let answer =
            unpanicked("set-up", || run_setup(compute, &w.job.frame, w.since)).and_then(|a| a);
        let _ = w.reply.send(answer);
        return 0;
    }
    // Decode every call; one that fails is answered alone, the others still run.
    let mut calls = Vec::with_capacity(batch.len());
    let mut seen = Vec::with_capacity(batch.len());
    let mut owners = Vec::with_capacity(batch.len());
    for w in batch {
        match decode_call(&w.job.frame, max_rows) {
            Ok(call) => {
                calls.push(call);
                seen.push(Arrival {
                    at: w.since,
                    frame_bytes: Some(w.job.frame.len()),
                });
                owners.push(w);
            }
            Err(e) => {
                let _ = w.reply.send(Err(e));
            }
        }
    }
    if calls.is_empty() {
        return 0;
    }
    let tenants = distinct_tenants(owners.iter().map(|w| &*w.job.tenant));
    let rows: usize = calls.iter().map(|c| c.x.shape().0).sum();
    let t0 = Instant::now();
    let mut replies = match unpanicked("batch", || compute.call_batch(&calls, &seen)) {
        Ok(replies) => replies,
        Err(e) => vec![Err(e); owners.len()],
    };
    let elapsed = t0.elapsed();
    metrics::STAGE_BATCH_CALLS.observe(calls.len() as f64);
    metrics::STAGE_BATCH_TENANTS.observe(tenants as f64);
    metrics::STAGE_BATCH_ROWS.observe(rows as f64);
    metrics::STAGE_COMPUTE_SECONDS.observe(elapsed.as_secs_f64());
    metrics::STAGE_CALLS.inc_by(calls.len() as u64);
    metrics::STAGE_ROWS.inc_by(rows as u64);
    if replies.len() != owners.len() {
        replies = vec![
            Err(ErrorReply::new(
                "internal",
                "the batch's answers do not match its calls",
            ));
            owners.len()
        ];
    }
    let us = elapsed.as_micros() as u64;
    // Answers go back to the call they answer, by position: each owner's reply channel
    // leads to its own session's stream only.
    let computed = owners.len();
    for (w, reply) in owners.into_iter().zip(replies) {
        let _ = w.reply.send(reply.map(|payload| (payload, us)));
    }
    computed
}

/// Owns one device's compute: a queue of admitted jobs that a worker thread takes in batches,
/// so the event loop moves frames while products run. The exception ([`Queue::lone`]): calls
/// that the worker's batching policy would take at once as they are (one op; every live
/// session's call among them, or a full batch), of at most [`INLINE_MAX_WORK`] multiply-adds,
/// arriving while nothing is queued and the worker is idle, are computed by the event loop
/// itself, on a pool whose first thread is its own ([`InlinePool`]), and answered without a
/// hand-off: two cross-thread wake-ups saved a frame (cluster decode about +12 %, sixteen
/// synthetic sessions about +9 %; docs/performance.md). QUIC's acknowledgements, keep-alives
/// and other sessions' frames wait for the product meanwhile, about a millisecond at most
/// here. A stuck product freezes the whole process rather than the worker alone, which the
/// cluster treats like any silent stage: its connections time out and a replica takes over.
pub struct GpuShard {
    queue: Arc<Queue>,
    /// The threads the worker's products run on, the worker itself one of them.
    threads: rayon::ThreadPool,
    compute: Arc<dyn StageCompute>,
    /// The pool a lone call runs on, the event loop's own thread one of its threads.
    inline: InlinePool,
}

/// [`GpuShard`]'s pool for lone calls ([`InlinePool::get`]), built on the event loop's first one.
enum InlinePool {
    Unbuilt,
    Ready(rayon::ThreadPool),
    Unavailable,
}

impl GpuShard {
    /// A shard computing with `compute`, batching as `policy` says, accepting what `limits`
    /// allow.
    pub fn new(
        compute: Arc<dyn StageCompute>,
        policy: Batching,
        limits: ShardLimits,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            sessions: AtomicUsize::new(0),
            working: AtomicBool::new(false),
            policy,
            limits,
        });
        // The worker is a thread of the pool its products run on: a product's first part runs
        // on it at once and the other threads take the rest, so a call wakes no thread to hand
        // the product over and none to hand it back (a thread outside the pool waits on a
        // latch for the pool's threads). A decode call is a one-row product whose compute is a
        // few hundred microseconds, where each such wake-up costs about a tenth of a
        // millisecond on a busy host.
        // As many threads as the global pool (one per core, or RAYON_NUM_THREADS).
        let threads = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("gpu-shard-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let q = queue.clone();
        let c = compute.clone();
        threads.spawn(move || work(q, c));
        Ok(Self {
            queue,
            threads,
            compute,
            inline: InlinePool::Unbuilt,
        })
    }
}

impl InlinePool {
    /// The pool a lone call runs on: `threads` threads (the worker's pool's count), the event
    /// loop's own thread the first of them, so a product started there (`install`) runs at once
    /// on the event loop and its other threads take their share. Built on the event loop's
    /// first lone call; that thread stays a member of this pool for the life of the process
    /// (rayon cannot undo it), so any rayon call made on the event loop outside `install` runs
    /// there too. If the pool cannot be built, every call goes to the worker.
    fn get(&mut self, threads: usize) -> Option<&rayon::ThreadPool> {
        if matches!(self, InlinePool::Unbuilt) {
            *self = match rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("gpu-loop-{i}"))
                .use_current_thread()
                .build()
            {
                Ok(pool) => InlinePool::Ready(pool),
                Err(e) => {
                    tracing::warn!(
                        "no pool for the event loop, every call goes to the worker: {e}"
                    );
                    InlinePool::Unavailable
                }
            };
        }
        match self {
            InlinePool::Ready(pool) => Some(pool),
            _ => None,
        }
    }
}

impl Actor for GpuShard {
    type Context = Context<Self>;
}

/// Admitted jobs (one, or a batch frame's calls); each answered, in order, when its GEMM has
/// run.
#[derive(Message)]
#[rtype(result = "Vec<JobResult>")]
pub struct Compute(pub Vec<Job>);

impl Handler<Compute> for GpuShard {
    type Result = ResponseFuture<Vec<JobResult>>;

    fn handle(&mut self, msg: Compute, _: &mut Context<Self>) -> Self::Result {
        let since = Instant::now();
        let (waiting, answers): (Vec<Waiting>, Vec<_>) = msg
            .0
            .into_iter()
            .map(|job| {
                let (reply, rx) = oneshot::channel();
                (Waiting { job, since, reply }, rx)
            })
            .unzip();
        let on_loop = self.queue.lone(&waiting, self.compute.as_ref());
        let accepted =
            if on_loop && let Some(pool) = self.inline.get(self.threads.current_num_threads()) {
                if pool.current_num_threads() > 1 {
                    // Wakes the pool's other threads now, as for the worker below.
                    pool.spawn(|| {});
                }
                let (compute, max_rows) = (self.compute.as_ref(), self.queue.limits.max_rows);
                let computed = pool.install(|| run_batch(compute, waiting, max_rows));
                metrics::STAGE_EVENT_LOOP_CALLS.inc_by(computed as u64);
                answers.len()
            } else {
                // The queue fills in order under one lock: the jobs refused are the last ones.
                let accepted = answers.len() - self.queue.push(waiting).len();
                if accepted > 0 {
                    // Wakes the pool's idle threads now, with the worker, rather than when the
                    // product starts: a sleeping thread takes tens of microseconds to wake on a VM,
                    // about as long as a one-row product, which its first thread then runs alone.
                    // Woken, a rayon thread looks for work a while before it sleeps again.
                    self.threads.spawn(|| {});
                }
                accepted
            };
        let max = self.queue.limits.max_queued;
        Box::pin(async move {
            let mut out = Vec::with_capacity(answers.len());
            for (i, rx) in answers.into_iter().enumerate() {
                out.push(if i < accepted {
                    rx.await.unwrap_or_else(|_| {
                        Err(ErrorReply::new("internal", "the shard's worker stopped"))
                    })
                } else {
                    Err(ErrorReply::new(
                        "overloaded",
                        format!("the stage has {max} jobs waiting (its limit): try again"),
                    ))
                });
            }
            out
        })
    }
}

/// The stage's live-session count, for the shard's batching.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sessions(pub usize);

impl Handler<Sessions> for GpuShard {
    type Result = ();

    fn handle(&mut self, msg: Sessions, _: &mut Context<Self>) {
        self.queue.sessions.store(msg.0, Ordering::Relaxed);
        metrics::STAGE_SESSIONS.set(msg.0 as i64);
    }
}

/// A request frame for a stage; the result is the answer frame.
#[derive(Message)]
#[rtype(result = "Vec<u8>")]
pub struct Serve(pub Vec<u8>);

/// Owns a stage's view of the sessions and checks every request before it reaches the shard:
/// known session, an op of its own layers, a payload that agrees with its header.
pub struct LayerStage {
    name: String,
    compute: Arc<dyn StageCompute>,
    shard: Addr<GpuShard>,
    /// Live sessions and their tenants.
    sessions: HashMap<SessionId, Arc<str>>,
}

impl LayerStage {
    /// A stage named `name` computing on `shard`.
    pub fn new(name: String, compute: Arc<dyn StageCompute>, shard: Addr<GpuShard>) -> Self {
        Self {
            name,
            compute,
            shard,
            sessions: HashMap::new(),
        }
    }

    /// The tenant of `session`, if it is live here and `op` is this stage's.
    fn admit(&self, session: SessionId, op: OpId) -> Result<Arc<str>, ErrorReply> {
        let Some(tenant) = self.sessions.get(&session) else {
            return Err(ErrorReply::new(
                "unknown_session",
                format!("stage {}: no session {session}", self.name),
            ));
        };
        if !self.compute.owns(op) {
            return Err(ErrorReply::new(
                "layer_not_owned",
                format!("stage {} does not serve {op}", self.name),
            ));
        }
        Ok(tenant.clone())
    }

    fn sessions_changed(&self) {
        self.shard.do_send(Sessions(self.sessions.len()));
    }

    /// Checks a request's header: the job to run, an immediate answer, or why it is refused.
    fn check(&mut self, frame: Vec<u8>) -> Result<Admitted, ErrorReply> {
        let (head, payload): (Request, &[u8]) =
            frame::split(&frame).map_err(|e| frame_error(&e))?;
        let payload_at = frame.len() - payload.len();
        match head {
            Request::StageOpen { session, tenant } => {
                tracing::info!(stage = %self.name, session, %tenant, "session opened");
                self.compute.open(session, &tenant);
                self.sessions.insert(session, tenant.into());
                self.sessions_changed();
                Ok(Admitted::Answered(ok_frame(0, &[])))
            }
            Request::CloseSession { session } => {
                if self.sessions.remove(&session).is_none() {
                    return Err(ErrorReply::new(
                        "unknown_session",
                        format!("stage {}: no session {session}", self.name),
                    ));
                }
                self.sessions_changed();
                self.compute.close(session);
                tracing::info!(stage = %self.name, session, "session closed");
                Ok(Admitted::Answered(ok_frame(0, &[])))
            }
            Request::Setup { session, op } => {
                Ok(Admitted::Run(self.job(session, op, true, frame)?))
            }
            Request::Call { session, op, .. } => {
                Ok(Admitted::Run(self.job(session, op, false, frame)?))
            }
            Request::Batch { calls } => Ok(Admitted::Batch {
                calls,
                frame,
                payload_at,
            }),
            other => Err(ErrorReply::new(
                "unexpected_request",
                format!("a gpu-node does not serve {other:?}"),
            )),
        }
    }
}

/// What a stage does with a request whose header it admitted.
enum Admitted {
    /// Run it on the shard (a set-up or a masked call of an admitted session).
    Run(Job),
    /// Answered at once (a session opened or closed): the encoded answer frame.
    Answered(Vec<u8>),
    /// A coordinator's batch of `calls` calls, each admitted on its own
    /// ([`LayerStage::serve_batch`]); its packed calls start at `payload_at`.
    Batch {
        calls: u32,
        frame: Vec<u8>,
        payload_at: usize,
    },
}

/// The answer frame refusing a request with `e`, logged and counted for stage `stage`.
fn refused(stage: &str, e: &ErrorReply) -> Vec<u8> {
    tracing::warn!(stage, error_type = %e.error_type, "refused: {}", e.message);
    metrics::error(&e.error_type);
    err_frame(e)
}

impl Actor for LayerStage {
    type Context = Context<Self>;
}

impl LayerStage {
    /// Checks one call of a batch frame: a `Call` of a live session, for this stage.
    fn check_call(&self, frame: &[u8]) -> Result<Job, ErrorReply> {
        let (head, _): (Request, &[u8]) = frame::split(frame).map_err(|e| frame_error(&e))?;
        let Request::Call { session, op, .. } = head else {
            return Err(ErrorReply::new(
                "unexpected_request",
                "a batch carries masked calls only",
            ));
        };
        self.job(session, op, false, frame.to_vec())
    }

    /// The job of an admitted set-up or call of `session` for `op` ([`admit`](Self::admit)).
    fn job(
        &self,
        session: SessionId,
        op: OpId,
        setup: bool,
        frame: Vec<u8>,
    ) -> Result<Job, ErrorReply> {
        Ok(Job {
            tenant: self.admit(session, op)?,
            op,
            setup,
            frame,
        })
    }

    /// Serves a batch frame's `calls` packed calls (its payload): each call admitted and
    /// answered on its own, the answers packed in the calls' order.
    fn serve_batch(&self, calls: u32, packed: &[u8]) -> ResponseFuture<Vec<u8>> {
        let name = self.name.clone();
        let refuse = move |e: &ErrorReply| refused(&name, e);
        let parts = match frame::unpack(packed, calls as usize) {
            Ok(p) => p,
            Err(e) => {
                let answer = refuse(&frame_error(&e));
                return Box::pin(async move { answer });
            }
        };
        // Each call's answer, or its place among the jobs run.
        let mut answers: Vec<Option<Vec<u8>>> = Vec::with_capacity(parts.len());
        let mut jobs = Vec::new();
        for part in parts {
            match self.check_call(part) {
                Ok(job) => {
                    jobs.push(job);
                    answers.push(None);
                }
                Err(e) => answers.push(Some(refuse(&e))),
            }
        }
        let shard = self.shard.clone();
        let n_jobs = jobs.len();
        if n_jobs > 0 {
            metrics::STAGE_FRAME_CALLS.observe(n_jobs as f64);
        }
        Box::pin(async move {
            let mut results = if jobs.is_empty() {
                Vec::new()
            } else {
                shard.send(Compute(jobs)).await.unwrap_or_else(|e| {
                    vec![Err(ErrorReply::new("internal", format!("shard: {e}"))); n_jobs]
                })
            }
            .into_iter();
            let answers: Vec<Vec<u8>> = answers
                .into_iter()
                .map(|a| {
                    a.unwrap_or_else(|| match results.next() {
                        Some(Ok((payload, us))) => ok_frame(us, &payload),
                        Some(Err(e)) => refuse(&e),
                        None => refuse(&ErrorReply::new(
                            "internal",
                            "a batch's call went unanswered",
                        )),
                    })
                })
                .collect();
            let head = talaria_wire::Reply::Ok { compute_us: 0 };
            frame::encode_packed(&head, answers.iter().map(Vec::as_slice))
                .unwrap_or_else(|e| refuse(&frame_error(&e)))
        })
    }
}

impl Handler<Serve> for LayerStage {
    type Result = ResponseFuture<Vec<u8>>;

    fn handle(&mut self, msg: Serve, _: &mut Context<Self>) -> Self::Result {
        let name = self.name.clone();
        let refuse = move |e: ErrorReply| refused(&name, &e);
        match self.check(msg.0) {
            Err(e) => {
                let answer = refuse(e);
                Box::pin(async move { answer })
            }
            Ok(Admitted::Answered(answer)) => Box::pin(async move { answer }),
            Ok(Admitted::Batch {
                calls,
                frame,
                payload_at,
            }) => self.serve_batch(calls, &frame[payload_at..]),
            Ok(Admitted::Run(job)) => {
                if !job.setup {
                    metrics::STAGE_FRAME_CALLS.observe(1.0);
                }
                let shard = self.shard.clone();
                Box::pin(async move {
                    let result = shard.send(Compute(vec![job])).await.map(|mut r| r.pop());
                    match result {
                        Ok(Some(Ok((payload, us)))) => ok_frame(us, &payload),
                        Ok(Some(Err(e))) => refuse(e),
                        Ok(None) => refuse(ErrorReply::new("internal", "the shard gave no answer")),
                        Err(e) => refuse(ErrorReply::new("internal", format!("shard: {e}"))),
                    }
                })
            }
        }
    }
}

/// Serves a stage on `endpoint` until it closes: every connection, every stream.
pub async fn serve(endpoint: quinn::Endpoint, stage: Addr<LayerStage>, max_frame: usize) {
    while let Some(incoming) = endpoint.accept().await {
        let stage = stage.clone();
        actix_rt::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("handshake failed: {e}");
                    return;
                }
            };
            tracing::info!(peer = %conn.remote_address(), "connected");
            actix_rt::spawn(talaria_actors::count_path_losses(
                conn.clone(),
                &metrics::STAGE_LINK_LOST,
                &metrics::STAGE_LINK_BLACK_HOLES,
            ));
            let intake = talaria_net::Intake::new(max_frame, talaria_net::FRAME_DEADLINE);
            talaria_actors::serve_streams(conn, intake, move |frame| {
                let stage = stage.clone();
                async move {
                    stage.send(Serve(frame)).await.unwrap_or_else(|e| {
                        err_frame(&ErrorReply::new("internal", format!("stage: {e}")))
                    })
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use talaria_engine::BlockOp;

    use super::*;

    fn op(layer: usize) -> OpId {
        OpId::Block {
            layer,
            op: BlockOp::Qkv,
        }
    }

    fn queue(sessions: usize, max_calls: usize, max_wait: Duration) -> Queue {
        Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            sessions: AtomicUsize::new(sessions),
            working: AtomicBool::new(false),
            policy: Batching {
                max_calls,
                max_wait,
            },
            limits: ShardLimits {
                max_rows: 16,
                max_queued: 8,
            },
        }
    }

    /// Queues a job; its tag (in the frame) tells the batches apart.
    fn push(q: &Queue, tag: u8, op: OpId, tenant: &str, setup: bool) {
        let (reply, _) = oneshot::channel();
        assert!(
            q.push(vec![Waiting {
                job: Job {
                    frame: vec![tag],
                    op,
                    tenant: tenant.into(),
                    setup,
                },
                since: Instant::now(),
                reply,
            }])
            .is_empty(),
            "queue full"
        );
    }

    fn tags(batch: &[Waiting]) -> Vec<u8> {
        batch.iter().map(|w| w.job.frame[0]).collect()
    }

    #[test]
    fn a_panicking_computation_is_a_typed_error_not_an_abort() {
        assert_eq!(unpanicked("batch", || 7).ok(), Some(7));
        let e = unpanicked("batch", || -> u32 { panic!("a broken kernel") })
            .expect_err("the panic is caught");
        assert_eq!(e.error_type, "internal");
        // Caught inside a rayon pool's thread too, where an escaping panic would abort.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let e = pool.install(|| unpanicked("set-up", || -> u32 { panic!("again") }));
        assert!(e.is_err());
    }

    /// The policy alone, without a thread or a clock: every rule of [`next`] in turn.
    #[test]
    fn the_batching_policy_is_a_pure_decision() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let q = |op: OpId, tenant: &'static str, setup: bool, at: u64| Queued {
            op,
            tenant,
            setup,
            since: ms(at),
        };
        let policy = Batching {
            max_calls: 4,
            max_wait: Duration::from_millis(10),
        };
        assert_eq!(next(&[], 3, &policy, t0), Next::Idle);
        // A set-up anywhere goes first, alone.
        let queue = [q(op(2), "a", false, 0), q(op(9), "b", true, 1)];
        assert_eq!(next(&queue, 3, &policy, ms(1)), Next::Setup(1));
        // The earliest op goes first, at once, while a later one waits behind it.
        let queue = [
            q(op(5), "a", false, 0),
            q(op(2), "b", false, 1),
            q(op(5), "c", false, 2),
        ];
        assert_eq!(next(&queue, 3, &policy, ms(2)), Next::Batch(vec![1]));
        // One op queued, a live session missing: wait until the oldest call's deadline...
        let queue = [q(op(5), "a", false, 3), q(op(5), "c", false, 4)];
        assert_eq!(next(&queue, 3, &policy, ms(5)), Next::WaitUntil(ms(13)));
        // ...and no longer.
        assert_eq!(next(&queue, 3, &policy, ms(13)), Next::Batch(vec![0, 1]));
        // Every live session's call is queued: nothing more can come, so no wait.
        assert_eq!(next(&queue, 2, &policy, ms(5)), Next::Batch(vec![0, 1]));
        // A lone session never waits.
        assert_eq!(next(&queue[..1], 1, &policy, ms(3)), Next::Batch(vec![0]));
        // A full batch: at most max_calls, each tenant its fair share, in arrival order.
        let queue: Vec<Queued<'_>> = ["g", "g", "g", "g", "g", "g", "s", "s"]
            .into_iter()
            .enumerate()
            .map(|(i, t)| q(op(1), t, false, i as u64))
            .collect();
        assert_eq!(
            next(&queue, 16, &policy, ms(8)),
            Next::Batch(vec![0, 1, 6, 7])
        );
        // One tenant alone fills the batch up to max_calls.
        assert_eq!(
            next(&queue[..6], 16, &policy, ms(8)),
            Next::Batch(vec![0, 1, 2, 3])
        );
    }

    #[test]
    fn a_full_queue_refuses_and_a_served_one_accepts_again() {
        let q = queue(1, 8, Duration::ZERO);
        for tag in 0..8 {
            push(&q, tag, op(0), "a", false);
        }
        let (reply, _) = oneshot::channel();
        let extra = Waiting {
            job: Job {
                frame: vec![99],
                op: op(0),
                tenant: "a".into(),
                setup: false,
            },
            since: Instant::now(),
            reply,
        };
        let extra = q.push(vec![extra]);
        assert_eq!(extra.len(), 1, "the ninth job is refused");
        assert_eq!(q.next_batch().len(), 8);
        assert!(q.push(extra).is_empty());
    }

    /// A compute that allows the event loop or not, and gives every op this width or none.
    struct Nothing(bool, Option<usize>);

    impl StageCompute for Nothing {
        fn owns(&self, _: OpId) -> bool {
            true
        }
        fn setup(&self, _: &SetupRequest, _: Arrival) -> Result<Vec<u8>, ErrorReply> {
            unreachable!()
        }
        fn call_batch(&self, _: &[MaskedCall], _: &[Arrival]) -> Vec<Result<Vec<u8>, ErrorReply>> {
            unreachable!()
        }
        fn may_run_on_event_loop(&self) -> bool {
            self.0
        }
        fn out_width(&self, _: OpId) -> Option<usize> {
            self.1
        }
    }

    /// Every op's output width to `yes` below: a request of `LIMIT` bytes is the most work
    /// the event loop takes.
    const WIDTH: usize = 1024;
    const LIMIT: usize = (INLINE_MAX_WORK as usize) * 4 / WIDTH;

    #[test]
    fn only_small_calls_that_the_policy_would_take_at_once_run_on_the_event_loop() {
        let job = |bytes: usize, layer: usize, setup: bool| Waiting {
            job: Job {
                frame: vec![0; bytes],
                op: op(layer),
                tenant: "a".into(),
                setup,
            },
            since: Instant::now(),
            reply: oneshot::channel().0,
        };
        let q = queue(1, 8, Duration::from_millis(10));
        let yes = Nothing(true, Some(WIDTH));
        assert!(q.lone(&[job(4096, 0, false)], &yes));
        assert!(q.lone(&[job(LIMIT, 0, false)], &yes));
        // Not a set-up, not too much work, not a compute that asks for its worker or cannot
        // judge the work.
        assert!(!q.lone(&[job(4096, 0, true)], &yes));
        assert!(!q.lone(&[job(LIMIT + 4, 0, false)], &yes));
        let half = LIMIT / 2 + 4;
        assert!(!q.lone(&[job(half, 0, false), job(half, 0, false)], &yes));
        assert!(!q.lone(&[job(4096, 0, false)], &Nothing(false, Some(WIDTH))));
        assert!(!q.lone(&[job(4096, 0, false)], &Nothing(true, None)));
        // Several calls: of one op, every live session's, at most a batch.
        q.sessions.store(3, Ordering::Relaxed);
        let three: Vec<Waiting> = (0..3).map(|_| job(4096, 2, false)).collect();
        assert!(q.lone(&three, &yes));
        assert!(
            !q.lone(&three[..2], &yes),
            "a live session may still send one"
        );
        let mixed = [job(8, 2, false), job(8, 3, false), job(8, 2, false)];
        assert!(!q.lone(&mixed, &yes), "two ops");
        q.sessions.store(9, Ordering::Relaxed);
        let nine: Vec<Waiting> = (0..9).map(|_| job(8, 2, false)).collect();
        assert!(!q.lone(&nine, &yes), "more than max_calls");
        // Not beside a queued job or a worker running a batch.
        q.sessions.store(1, Ordering::Relaxed);
        push(&q, 1, op(0), "a", false);
        assert!(!q.lone(&[job(4096, 0, false)], &yes));
        assert_eq!(tags(&q.next_batch()), [1]);
        assert!(!q.lone(&[job(4096, 0, false)], &yes), "the worker is busy");
        q.working.store(false, Ordering::Release);
        assert!(q.lone(&[job(4096, 0, false)], &yes));
    }

    #[test]
    fn set_ups_go_first_and_alone() {
        let q = queue(2, 8, Duration::ZERO);
        push(&q, 1, op(3), "a", false);
        push(&q, 2, op(3), "b", true);
        assert_eq!(tags(&q.next_batch()), [2]);
        assert_eq!(tags(&q.next_batch()), [1]);
    }

    #[test]
    fn the_session_behind_goes_first_and_calls_of_one_op_go_together() {
        let q = queue(3, 8, Duration::from_secs(10));
        push(&q, 1, op(5), "a", false);
        push(&q, 2, op(2), "b", false);
        push(&q, 3, op(5), "c", false);
        let t0 = Instant::now();
        // Layer 2 is behind layer 5: served at once, alone, while layer 5 waits.
        assert_eq!(tags(&q.next_batch()), [2]);
        // The session behind catches up; with every live session's call queued, the three go
        // in one batch, without waiting.
        push(&q, 4, op(5), "b", false);
        assert_eq!(tags(&q.next_batch()), [1, 3, 4]);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_lone_session_never_waits() {
        let q = queue(1, 8, Duration::from_secs(10));
        push(&q, 1, op(0), "a", false);
        let t0 = Instant::now();
        assert_eq!(tags(&q.next_batch()), [1]);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_batch_waits_a_bounded_time_for_sessions_that_may_join() {
        let wait = Duration::from_millis(50);
        let q = queue(4, 8, wait);
        push(&q, 1, op(0), "a", false);
        let t0 = Instant::now();
        assert_eq!(tags(&q.next_batch()), [1]);
        assert!(t0.elapsed() >= wait - Duration::from_millis(5));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn each_tenant_gets_a_fair_share_of_a_full_batch() {
        let q = queue(16, 4, Duration::ZERO);
        for tag in 1..=6 {
            push(&q, tag, op(1), "greedy", false);
        }
        push(&q, 7, op(1), "small", false);
        push(&q, 8, op(1), "small", false);
        // Four calls at most, two tenants: two each, in arrival order.
        assert_eq!(tags(&q.next_batch()), [1, 2, 7, 8]);
        assert_eq!(tags(&q.next_batch()), [3, 4, 5, 6]);
    }
}
