//! Forwarding masked calls to one stage, those that are waiting together packed into one
//! [`Request::Batch`] frame: one stream, one frame to read and one wake-up of the stage for
//! many calls, where each call on its own stream costs the sender and the stage tens of
//! microseconds of CPU. The coordinator forwards through one per stage; `talaria load
//! --synthetic`, which stands in for the coordinator, does the same.
//!
//! Nothing waits to fill a batch: the first call leads one, and goes out with the calls made
//! before its task runs again (one yield of the event loop); a call that comes alone leaves
//! alone, as a plain `Call` frame, at the cost of that one yield. Calls of one op from many sessions
//! reach a stage's shard together either way; the shard's batching policy still decides what
//! one GEMM carries.

use std::sync::{Arc, Mutex};

use talaria_wire::frame::{self, FrameError};
use talaria_wire::{MAX_BATCH_CALLS, MAX_BATCHED_FRAME, Reply, Request};
use tokio::sync::oneshot;

/// A call that joined another's batch, and where its answer goes.
struct Pending {
    frame: Arc<[u8]>,
    answer: oneshot::Sender<Result<Vec<u8>, FrameError>>,
}

/// The batch being gathered, if any.
#[derive(Default)]
struct Gathering {
    /// A call (the leader) is gathering: calls made now join its batch.
    open: bool,
    /// The calls that joined, and their frames' bytes.
    joined: Vec<Pending>,
    bytes: usize,
}

/// Sends masked calls on one stage connection; clones share it. No task of its own: the first
/// call of a batch leads it (gathers, sends, hands each joined call its answer).
#[derive(Clone)]
pub struct Coalescer {
    conn: quinn::Connection,
    max_answer: usize,
    gathering: Arc<Mutex<Gathering>>,
}

/// The leader's hold on the gathering it opened. Dropped before it took the joined calls (a
/// deadline ran out while it yielded), it closes the gathering still: they are answered with an
/// error rather than left waiting, and the next call leads.
struct Lead<'a> {
    gathering: &'a Mutex<Gathering>,
    taken: bool,
}

impl Lead<'_> {
    /// Closes the gathering (once): the calls that joined it.
    fn take(&mut self) -> Vec<Pending> {
        if self.taken {
            return Vec::new();
        }
        self.taken = true;
        let mut g = self.gathering.lock().unwrap_or_else(|e| e.into_inner());
        g.open = false;
        g.bytes = 0;
        std::mem::take(&mut g.joined)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // Dropping a joined call's sender answers it with an error.
        drop(self.take());
    }
}

/// What a call does with the gathering it finds.
enum Join {
    /// It joined it: its answer comes from the leader.
    Joined(oneshot::Receiver<Result<Vec<u8>, FrameError>>),
    /// It is full: the call goes on its own.
    Alone,
    /// There is none: the call opened one, and leads it.
    Lead,
}

fn closed() -> FrameError {
    FrameError::Connection("the batch carrying this call was abandoned".into())
}

impl Coalescer {
    /// A coalescer sending on `conn`, reading answers of at most `max_answer` bytes (a
    /// batch's included).
    pub fn new(conn: quinn::Connection, max_answer: usize) -> Self {
        Self {
            conn,
            max_answer,
            gathering: Arc::default(),
        }
    }

    /// Whether a request frame may go in a batch: a masked call, small enough (a decode
    /// step's). Anything else goes on its own stream with [`talaria_net::request`].
    pub fn batchable(head: &Request, frame: &[u8]) -> bool {
        matches!(head, Request::Call { .. }) && frame.len() <= MAX_BATCHED_FRAME
    }

    /// Sends one call frame (see [`Coalescer::batchable`]) and returns its answer frame, as
    /// [`talaria_net::request`] would.
    pub async fn call(&self, frame: Arc<[u8]>) -> Result<Vec<u8>, FrameError> {
        let joined = {
            let mut g = self.gathering.lock().unwrap_or_else(|e| e.into_inner());
            let room =
                g.joined.len() + 1 < MAX_BATCH_CALLS && g.bytes + frame.len() <= MAX_BATCHED_FRAME;
            match (g.open, room) {
                (true, true) => {
                    let (answer, rx) = oneshot::channel();
                    g.bytes += frame.len();
                    g.joined.push(Pending {
                        frame: frame.clone(),
                        answer,
                    });
                    Join::Joined(rx)
                }
                // The batch is full: this call goes alone.
                (true, false) => Join::Alone,
                (false, _) => {
                    g.open = true;
                    Join::Lead
                }
            }
        };
        match joined {
            Join::Joined(rx) => rx.await.map_err(|_| closed())?,
            Join::Alone => talaria_net::request(&self.conn, &frame, self.max_answer).await,
            Join::Lead => self.lead(frame).await,
        }
    }

    /// Leads a batch: lets the calls on their way join (one yield of the event loop), then
    /// sends them with `frame`, alone as a plain `Call` if none did.
    async fn lead(&self, frame: Arc<[u8]>) -> Result<Vec<u8>, FrameError> {
        let mut lead = Lead {
            gathering: &self.gathering,
            taken: false,
        };
        tokio::task::yield_now().await;
        let joined = lead.take();
        if joined.is_empty() {
            return talaria_net::request(&self.conn, &frame, self.max_answer).await;
        }
        let frames: Vec<&[u8]> = std::iter::once(&frame[..])
            .chain(joined.iter().map(|p| &p.frame[..]))
            .collect();
        match batched(&self.conn, self.max_answer, &frames).await {
            Ok(answers) => {
                let mut answers = answers.into_iter();
                let mine = answers.next().ok_or_else(closed)?;
                for (p, a) in joined.into_iter().zip(answers) {
                    let _ = p.answer.send(Ok(a));
                }
                Ok(mine)
            }
            Err(e) => {
                for p in joined {
                    let _ = p.answer.send(Err(e.clone()));
                }
                Err(e)
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
    let payload = frame::pack(frames.iter().copied())?;
    let request = frame::encode_raw(&head, &payload)?;
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
