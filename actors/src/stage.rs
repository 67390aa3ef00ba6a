//! The gpu-node's actors: [`LayerStage`] admits requests for its layers, [`GpuShard`] computes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use talaria_engine::OpId;
use talaria_wire::frame::{self};
use talaria_wire::{ErrorReply, MaskedCall, Request, SessionId, SetupRequest};

use crate::{err_frame, frame_error, ok_frame};

/// The weight-dependent work of a stage, implemented by the gpu-node crate. Called on a thread
/// pool, possibly from several threads at once.
pub trait StageCompute: Send + Sync + 'static {
    /// Whether this stage holds the weights of `op`.
    fn owns(&self, op: OpId) -> bool;
    /// `R_pub` for a public basis, encoded as a `SetupReply` payload.
    fn setup(&self, req: &SetupRequest) -> Result<Vec<u8>, ErrorReply>;
    /// `x̃ · W` for a masked call, encoded as a `MaskedReply` payload.
    fn call(&self, call: &MaskedCall) -> Result<Vec<u8>, ErrorReply>;
    /// A session is over (e.g. to flush what a tap recorded for it).
    fn close(&self, _session: SessionId) {}
}

/// Work for a [`GpuShard`]: a `Setup` or `Call` request frame whose header the stage admitted.
/// Its payload (masked rows, up to megabytes) is decoded on the worker thread, not on the
/// event loop.
pub struct Job(pub Vec<u8>);

/// Decodes an admitted request and runs it: the reply payload and the compute time in µs.
fn run_job(compute: &dyn StageCompute, frame: &[u8]) -> Result<(Vec<u8>, u64), ErrorReply> {
    let (head, payload): (Request, &[u8]) = frame::split(frame).map_err(|e| frame_error(&e))?;
    let bad = |what: &str| {
        ErrorReply::new(
            "bad_request",
            format!("payload {what} disagrees with its header"),
        )
    };
    let t0;
    let reply = match head {
        Request::Setup { session, op } => {
            let req: SetupRequest = frame::body(payload).map_err(|e| frame_error(&e))?;
            if req.session != session || req.op != op {
                return Err(bad("session or op"));
            }
            t0 = Instant::now();
            compute.setup(&req)?
        }
        Request::Call { session, op, seq } => {
            let call: MaskedCall = frame::body(payload).map_err(|e| frame_error(&e))?;
            if call.session != session || call.op != op || call.seq != seq {
                return Err(bad("session, op or seq"));
            }
            t0 = Instant::now();
            compute.call(&call)?
        }
        other => {
            return Err(ErrorReply::new(
                "unexpected_request",
                format!("a shard does not run {other:?}"),
            ));
        }
    };
    Ok((reply, t0.elapsed().as_micros() as u64))
}

/// One computation: the encoded reply payload and the compute time in µs.
#[derive(Message)]
#[rtype(result = "Result<(Vec<u8>, u64), ErrorReply>")]
pub struct Compute(pub Job);

/// Owns one device's compute and runs each job on the blocking thread pool, so the event loop
/// only ever moves frames.
pub struct GpuShard {
    compute: Arc<dyn StageCompute>,
}

impl GpuShard {
    /// A shard computing with `compute`.
    pub fn new(compute: Arc<dyn StageCompute>) -> Self {
        Self { compute }
    }
}

impl Actor for GpuShard {
    type Context = Context<Self>;
}

impl Handler<Compute> for GpuShard {
    type Result = ResponseFuture<Result<(Vec<u8>, u64), ErrorReply>>;

    fn handle(&mut self, msg: Compute, _: &mut Context<Self>) -> Self::Result {
        let compute = self.compute.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || run_job(compute.as_ref(), &msg.0.0))
                .await
                .map_err(|e| ErrorReply::new("internal", format!("compute task failed: {e}")))?
        })
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
    sessions: HashMap<SessionId, String>,
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

    fn admit(&self, session: SessionId, op: OpId) -> Result<(), ErrorReply> {
        if !self.sessions.contains_key(&session) {
            return Err(ErrorReply::new(
                "unknown_session",
                format!("stage {}: no session {session}", self.name),
            ));
        }
        if !self.compute.owns(op) {
            return Err(ErrorReply::new(
                "layer_not_owned",
                format!("stage {} does not serve {op}", self.name),
            ));
        }
        Ok(())
    }

    /// Checks a request's header; returns the job to run, or an immediate answer.
    fn check(&mut self, frame: Vec<u8>) -> Result<Result<Job, Vec<u8>>, ErrorReply> {
        let (head, _): (Request, &[u8]) = frame::split(&frame).map_err(|e| frame_error(&e))?;
        match head {
            Request::StageOpen { session, tenant } => {
                tracing::info!(stage = %self.name, session, %tenant, "session opened");
                self.sessions.insert(session, tenant);
                Ok(Err(ok_frame(0, &[])))
            }
            Request::CloseSession { session } => {
                if self.sessions.remove(&session).is_none() {
                    return Err(ErrorReply::new(
                        "unknown_session",
                        format!("stage {}: no session {session}", self.name),
                    ));
                }
                self.compute.close(session);
                tracing::info!(stage = %self.name, session, "session closed");
                Ok(Err(ok_frame(0, &[])))
            }
            Request::Setup { session, op } | Request::Call { session, op, .. } => {
                self.admit(session, op)?;
                Ok(Ok(Job(frame)))
            }
            other => Err(ErrorReply::new(
                "unexpected_request",
                format!("a gpu-node does not serve {other:?}"),
            )),
        }
    }
}

impl Actor for LayerStage {
    type Context = Context<Self>;
}

impl Handler<Serve> for LayerStage {
    type Result = ResponseFuture<Vec<u8>>;

    fn handle(&mut self, msg: Serve, _: &mut Context<Self>) -> Self::Result {
        let name = self.name.clone();
        let refuse = move |e: ErrorReply| {
            tracing::warn!(stage = %name, error_type = %e.error_type, "refused: {}", e.message);
            err_frame(&e)
        };
        match self.check(msg.0) {
            Err(e) => {
                let answer = refuse(e);
                Box::pin(async move { answer })
            }
            Ok(Err(answer)) => Box::pin(async move { answer }),
            Ok(Ok(job)) => {
                let shard = self.shard.clone();
                Box::pin(async move {
                    match shard.send(Compute(job)).await {
                        Ok(Ok((payload, us))) => ok_frame(us, &payload),
                        Ok(Err(e)) => refuse(e),
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
            crate::serve_streams(conn, max_frame, move |frame| {
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
