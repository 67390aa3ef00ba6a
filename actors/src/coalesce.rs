//! Forwarding masked calls to one stage, those of one op that are waiting together packed into
//! one [`Request::Batch`] frame: one stream, one frame to read and one wake-up of the stage for
//! many calls, where each call on its own stream costs the sender and the stage tens of
//! microseconds of CPU. The coordinator forwards through one per stage; `talaria load
//! --synthetic`, which stands in for the coordinator, does the same.
//!
//! Nothing waits to fill a batch: the first call of an op leads one, and goes out with the calls
//! of that op made before its task runs again (one yield of the event loop); a call that comes
//! alone leaves alone, as a plain `Call` frame, at the cost of that one yield. A batch is sent by
//! a task of its own, so a caller that gives up (its deadline) takes no other call with it. Calls
//! of one op from many sessions reach a stage's shard together either way; the shard's batching
//! policy still decides what one GEMM carries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use talaria_engine::OpId;
use talaria_wire::frame::{self, FrameError};
use talaria_wire::{MAX_BATCH_CALLS, MAX_BATCHED_FRAME, Reply, Request};
use tokio::sync::oneshot;

/// A call waiting for its batch's answer.
struct Pending {
    frame: Arc<[u8]>,
    answer: oneshot::Sender<Result<Vec<u8>, FrameError>>,
}

/// What a batch may hold: its request frame must be one the stage reads, and its answer one the
/// sender reads.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// The largest request frame the stage reads (its `max_request_frame`).
    pub request: usize,
    /// The largest answer frame this side reads.
    pub answer: usize,
}

/// A batch's bytes beyond its calls' frames and their length prefixes: its header.
const BATCH_HEADER: usize = 16;

/// The batch of one op being gathered.
struct Gathering {
    /// Which leader opened it (its `Lead` takes this one only).
    id: u64,
    /// The calls that joined the leader.
    joined: Vec<Pending>,
    /// The batch's request frame and answer frame as they stand, at most.
    request_bytes: usize,
    answer_bytes: usize,
}

/// Sends masked calls on one stage connection; clones share it. No task waits on it: the first
/// call of an op leads a batch (gathers, hands it to a task that sends it and answers each call).
#[derive(Clone)]
pub struct Coalescer {
    conn: quinn::Connection,
    limits: BatchLimits,
    gathering: Arc<Mutex<HashMap<OpId, Gathering>>>,
    /// The next gathering's id.
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

/// The leader's hold on the gathering it opened for `op`. Dropped before it took the joined
/// calls (its deadline ran out while it yielded), it closes the gathering still and sends them
/// without its own call.
struct Lead<'a> {
    coalescer: &'a Coalescer,
    op: OpId,
    id: u64,
    taken: bool,
}

impl Lead<'_> {
    /// Closes the gathering (once): the calls that joined it.
    fn take(&mut self) -> Vec<Pending> {
        if self.taken {
            return Vec::new();
        }
        self.taken = true;
        let mut g = self.coalescer.lock();
        match g.get(&self.op) {
            Some(mine) if mine.id == self.id => g.remove(&self.op).map(|g| g.joined),
            _ => None,
        }
        .unwrap_or_default()
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let joined = self.take();
        if joined.is_empty() {
            return;
        }
        // Outside a runtime (never, in a process that serves) the joined calls are dropped,
        // which answers each with an error.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(exchange(
                self.coalescer.conn.clone(),
                self.coalescer.limits.answer,
                joined,
            ));
        }
    }
}

fn closed() -> FrameError {
    FrameError::Connection("the link carrying this call closed".into())
}

/// What a call does with the gathering of its op.
enum Join {
    /// It joined it: its answer comes from the batch.
    Joined(oneshot::Receiver<Result<Vec<u8>, FrameError>>),
    /// There is no room in it: the call goes on its own.
    Alone,
    /// There is none: the call opened one (of this id), and leads it.
    Lead(u64),
}

impl Coalescer {
    /// A coalescer sending on `conn`, making batches within `limits`.
    pub fn new(conn: quinn::Connection, limits: BatchLimits) -> Self {
        Self {
            conn,
            limits,
            gathering: Arc::default(),
            next_id: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OpId, Gathering>> {
        self.gathering.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The op of a request frame that may go in a batch: a masked call of at most
    /// [`MAX_BATCHED_FRAME`] bytes (a decode step's, a short prefill's). Anything else goes on
    /// its own stream with [`talaria_net::request`].
    pub fn batchable(head: &Request, frame: &[u8]) -> Option<OpId> {
        match head {
            Request::Call { op, .. } if frame.len() <= MAX_BATCHED_FRAME => Some(*op),
            _ => None,
        }
    }

    /// Sends one call frame of `op` (see [`Coalescer::batchable`]) whose answer is at most
    /// `answer_bound` bytes (`talaria_wire::frame::max_answer_of`), and returns its answer
    /// frame, as [`talaria_net::request`] would.
    pub async fn call(
        &self,
        frame: Arc<[u8]>,
        op: OpId,
        answer_bound: usize,
    ) -> Result<Vec<u8>, FrameError> {
        let request = frame.len().saturating_add(4);
        let answer = answer_bound.saturating_add(4);
        let joined = {
            let mut g = self.lock();
            match g.get_mut(&op) {
                Some(g) => {
                    let room = g.joined.len() + 1 < MAX_BATCH_CALLS
                        && g.request_bytes.saturating_add(request)
                            <= MAX_BATCHED_FRAME.min(self.limits.request)
                        && g.answer_bytes.saturating_add(answer) <= self.limits.answer;
                    if room {
                        let (tx, rx) = oneshot::channel();
                        g.request_bytes += request;
                        g.answer_bytes += answer;
                        g.joined.push(Pending {
                            frame: frame.clone(),
                            answer: tx,
                        });
                        Join::Joined(rx)
                    } else {
                        Join::Alone
                    }
                }
                None => {
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    g.insert(
                        op,
                        Gathering {
                            id,
                            joined: Vec::new(),
                            request_bytes: BATCH_HEADER.saturating_add(request),
                            answer_bytes: BATCH_HEADER.saturating_add(answer),
                        },
                    );
                    Join::Lead(id)
                }
            }
        };
        match joined {
            Join::Joined(rx) => rx.await.map_err(|_| closed())?,
            Join::Alone => talaria_net::request(&self.conn, &frame, self.limits.answer).await,
            Join::Lead(id) => self.lead(frame, op, id).await,
        }
    }

    /// Leads the batch `id` of `op`: lets the calls on their way join (one yield of the event loop),
    /// then sends them with `frame`, alone as a plain `Call` if none did.
    async fn lead(&self, frame: Arc<[u8]>, op: OpId, id: u64) -> Result<Vec<u8>, FrameError> {
        let mut lead = Lead {
            coalescer: self,
            op,
            id,
            taken: false,
        };
        tokio::task::yield_now().await;
        let joined = lead.take();
        if joined.is_empty() {
            return talaria_net::request(&self.conn, &frame, self.limits.answer).await;
        }
        let (answer, rx) = oneshot::channel();
        let mut batch = Vec::with_capacity(joined.len() + 1);
        batch.push(Pending { frame, answer });
        batch.extend(joined);
        tokio::spawn(exchange(self.conn.clone(), self.limits.answer, batch));
        rx.await.map_err(|_| closed())?
    }
}

/// Sends `batch` (one call alone, more as a `Batch`) and answers each of its calls.
async fn exchange(conn: quinn::Connection, max_answer: usize, batch: Vec<Pending>) {
    if let [one] = &batch[..] {
        let answer = talaria_net::request(&conn, &one.frame, max_answer).await;
        if let Some(p) = batch.into_iter().next() {
            let _ = p.answer.send(answer);
        }
        return;
    }
    let frames: Vec<&[u8]> = batch.iter().map(|p| &p.frame[..]).collect();
    match batched(&conn, max_answer, &frames).await {
        Ok(answers) => {
            for (p, a) in batch.into_iter().zip(answers) {
                let _ = p.answer.send(Ok(a));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.answer.send(Err(e.clone()));
            }
        }
    }
}

/// One `Batch` request: every call's answer frame, in order. A batch the stage refused as a
/// whole answers each call with that refusal.
async fn batched(
    conn: &quinn::Connection,
    max_answer: usize,
    frames: &[&[u8]],
) -> Result<Vec<Vec<u8>>, FrameError> {
    let head = Request::Batch {
        calls: frames.len() as u32,
    };
    let request = frame::encode_packed(&head, frames.iter().copied())?;
    let answer = talaria_net::request(conn, &request, max_answer).await?;
    let (reply, payload): (Reply, &[u8]) = frame::split(&answer)?;
    match reply {
        Reply::Ok { .. } => Ok(frame::unpack(payload, frames.len())?
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect()),
        Reply::Err(_) => Ok(vec![answer.clone(); frames.len()]),
    }
}
