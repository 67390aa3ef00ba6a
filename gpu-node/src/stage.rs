//! The executor as a cluster stage: what the `LayerStage` and `GpuShard` actors call.

use crate::runtime::{Arrival, StageCompute};
use talaria_engine::OpId;
use talaria_wire::{ErrorReply, MaskedCall, SessionId, SetupRequest, frame};

use crate::{CloudExecutor, NodeError};

fn reply_err(e: NodeError) -> ErrorReply {
    tracing::warn!(error_type = e.error_type(), "{e}");
    ErrorReply::new(e.error_type(), e.to_string())
}

fn encode<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, ErrorReply> {
    frame::encode::<_, ()>(msg, None).map_err(|e| ErrorReply::new(e.error_type(), e.to_string()))
}

impl StageCompute for CloudExecutor {
    fn owns(&self, op: OpId) -> bool {
        self.holds(op)
    }

    fn setup(&self, req: &SetupRequest, seen: Arrival) -> Result<Vec<u8>, ErrorReply> {
        encode(&self.setup_arrived(req, seen).map_err(reply_err)?)
    }

    fn call_batch(
        &self,
        calls: &[MaskedCall],
        seen: &[Arrival],
    ) -> Vec<Result<Vec<u8>, ErrorReply>> {
        self.call_batch_arrived(calls, seen)
            .into_iter()
            .map(|r| encode(&r.map_err(reply_err)?))
            .collect()
    }

    fn out_width(&self, op: OpId) -> Option<usize> {
        self.holds(op).then(|| op.shape(self.weights().config()).1)
    }

    fn open(&self, session: SessionId, tenant: &str) {
        self.record_open(session, tenant);
        // The index is current at every session's start and end: a session that never closes
        // here (its calls moved to a replica) is still in it by the next one's start.
        if let Err(e) = self.finish_tap() {
            tracing::warn!("tap index not written: {e}");
        }
    }

    fn close(&self, _session: SessionId) {
        // A gpu-node is stopped by a signal: keep the tap's index current at every session end.
        if let Err(e) = self.finish_tap() {
            tracing::warn!("tap index not written: {e}");
        }
    }
}
