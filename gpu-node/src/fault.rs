//! Test-only faults: a gpu-node that misbehaves on purpose, so that tests with real processes
//! can show how the rest of the cluster copes. Off unless the environment variable
//! [`FAULT_ENV`] names this very stage, and refused even then unless [`ALLOW_FAULTS_ENV`] is
//! `1` as well (a typo or a stray variable cannot make a node misbehave); a node running with
//! one logs it loudly at start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::{Arrival, StageCompute};
use talaria_engine::OpId;
use talaria_wire::{ErrorReply, MaskedCall, MaskedReply, SessionId, SetupRequest, Tensor, frame};

/// `<stage>:<fault>`, e.g. `stage-1:hang-after-calls=40`.
pub const FAULT_ENV: &str = "TALARIA_TEST_FAULT";

/// Must be `1` for [`FAULT_ENV`] to be obeyed.
pub const ALLOW_FAULTS_ENV: &str = "TALARIA_ALLOW_TEST_FAULTS";

/// What a faulty stage does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Computes every call it receives (its tap records them), but from call `n` on never
    /// answers: its connection stays alive, its worker is stuck. A hung stage. Its calls
    /// always run on the shard's worker, never on the event loop, so that the event loop does
    /// stay alive.
    HangAfterCalls(u64),
    /// The same, except that its calls run where the stage's own would: a lone session's
    /// small calls on the event loop, which then freezes with the product and takes the whole
    /// process with it (its connections go silent). A device that hangs during a lone call.
    FreezeAfterCalls(u64),
    /// Answers every call, but from call `n` on changes one value of each reply (the first
    /// element: `+2^20` in the integer mode, doubled plus one in the float modes). A cloud
    /// returning wrong products.
    CorruptAfterCalls(u64),
}

impl Fault {
    /// The fault [`FAULT_ENV`] asks of stage `stage`, if it names it.
    pub fn from_env(stage: &str) -> Result<Option<Fault>, String> {
        let Ok(value) = std::env::var(FAULT_ENV) else {
            return Ok(None);
        };
        let Some((name, fault)) = value.split_once(':') else {
            return Err(format!("{FAULT_ENV}={value:?}: expected <stage>:<fault>"));
        };
        if name != stage {
            return Ok(None);
        }
        if std::env::var(ALLOW_FAULTS_ENV).as_deref() != Ok("1") {
            return Err(format!(
                "{FAULT_ENV} asks stage {stage} to misbehave, refused: test faults need \
                 {ALLOW_FAULTS_ENV}=1 as well"
            ));
        }
        let count = |n: &str| {
            n.parse::<u64>()
                .map_err(|e| format!("{FAULT_ENV}: {n:?}: {e}"))
        };
        match fault.split_once('=') {
            Some(("hang-after-calls", n)) => Ok(Some(Fault::HangAfterCalls(count(n)?))),
            Some(("freeze-after-calls", n)) => Ok(Some(Fault::FreezeAfterCalls(count(n)?))),
            Some(("corrupt-after-calls", n)) => Ok(Some(Fault::CorruptAfterCalls(count(n)?))),
            _ => Err(format!(
                "{FAULT_ENV}: unknown fault {fault:?} (known: hang-after-calls=N, \
                 freeze-after-calls=N, corrupt-after-calls=N)"
            )),
        }
    }
}

/// An encoded reply with its first value changed.
fn corrupt(bytes: &[u8]) -> Result<Vec<u8>, ErrorReply> {
    let mut reply: MaskedReply =
        frame::body(bytes).map_err(|e| ErrorReply::new("internal", e.to_string()))?;
    match &mut reply.y {
        Tensor::U64 { data, .. } => data[0] = data[0].wrapping_add(1 << 20),
        Tensor::F32 { data, .. } => data[0] = data[0] * 2.0 + 1.0,
        Tensor::F64 { data, .. } => data[0] = data[0] * 2.0 + 1.0,
    }
    tracing::error!("TEST FAULT: corrupting a reply");
    frame::encode::<_, ()>(&reply, None).map_err(|e| ErrorReply::new("internal", e.to_string()))
}

/// A stage's compute with a [`Fault`].
pub struct Faulty {
    inner: Arc<dyn StageCompute>,
    fault: Fault,
    calls: AtomicU64,
}

impl Faulty {
    /// `inner`, doing `fault` wrong.
    pub fn new(inner: Arc<dyn StageCompute>, fault: Fault) -> Self {
        tracing::error!(
            ?fault,
            "TEST FAULT: this gpu-node misbehaves on purpose ({FAULT_ENV})"
        );
        Self {
            inner,
            fault,
            calls: AtomicU64::new(0),
        }
    }
}

impl StageCompute for Faulty {
    fn owns(&self, op: OpId) -> bool {
        self.inner.owns(op)
    }

    fn setup(&self, req: &SetupRequest, seen: Arrival) -> Result<Vec<u8>, ErrorReply> {
        self.inner.setup(req, seen)
    }

    fn call_batch(
        &self,
        calls: &[MaskedCall],
        seen: &[Arrival],
    ) -> Vec<Result<Vec<u8>, ErrorReply>> {
        let before = self.calls.fetch_add(calls.len() as u64, Ordering::Relaxed);
        let answers = self.inner.call_batch(calls, seen);
        match self.fault {
            Fault::HangAfterCalls(n) | Fault::FreezeAfterCalls(n)
                if before + calls.len() as u64 > n =>
            {
                tracing::error!("TEST FAULT: hanging for good");
                loop {
                    std::thread::park();
                }
            }
            Fault::HangAfterCalls(_) | Fault::FreezeAfterCalls(_) => answers,
            Fault::CorruptAfterCalls(n) => answers
                .into_iter()
                .enumerate()
                .map(|(i, a)| match a {
                    Ok(bytes) if before + i as u64 >= n => corrupt(&bytes),
                    other => other,
                })
                .collect(),
        }
    }

    /// [`Fault::HangAfterCalls`] keeps its event loop alive (see there);
    /// [`Fault::FreezeAfterCalls`] is the stage's own choice.
    fn may_run_on_event_loop(&self) -> bool {
        !matches!(self.fault, Fault::HangAfterCalls(_)) && self.inner.may_run_on_event_loop()
    }

    fn out_width(&self, op: OpId) -> Option<usize> {
        self.inner.out_width(op)
    }

    fn open(&self, session: SessionId, tenant: &str) {
        self.inner.open(session, tenant);
    }

    fn close(&self, session: SessionId) {
        self.inner.close(session);
    }
}
