//! The cloud's executor: answers ReMO set-up requests and masked linear calls from the weights.
//! It sees exactly what the wire carries — masked rows and public bases — and can record all of
//! it with a [`Tap`](crate::Tap).

use std::sync::Mutex;

use talaria_engine::{OpId, Rows};
use talaria_wire::{
    BasisSpec, CloudLink, LinkError, MaskedCall, MaskedReply, SetupReply, SetupRequest, Tensor,
    expand_basis,
};

use crate::{LinearWeights, NodeError, Tap};

/// Serves masked linear calls from a stage's weights.
///
/// Its methods take `&self`: calls of many sessions may run at once on a thread pool.
pub struct CloudExecutor {
    weights: LinearWeights,
    tap: Option<Mutex<Tap>>,
}

impl CloudExecutor {
    /// An executor over `weights`, recording into `tap` if given.
    pub fn new(weights: LinearWeights, tap: Option<Tap>) -> Self {
        Self {
            weights,
            tap: tap.map(Mutex::new),
        }
    }

    fn tap(&self, record: impl FnOnce(&mut Tap) -> Result<(), NodeError>) -> Result<(), NodeError> {
        match &self.tap {
            Some(t) => record(&mut t.lock().unwrap_or_else(|e| e.into_inner())),
            None => Ok(()),
        }
    }

    /// Whether this executor holds the weights of `op`.
    pub fn holds(&self, op: OpId) -> bool {
        self.weights.holds(op)
    }

    /// The weights served.
    pub fn weights(&self) -> &LinearWeights {
        &self.weights
    }

    /// Computes `R_pub = M_pub · W_op` for the requested public basis.
    ///
    /// For the identity basis `R_pub` is the weight itself, exact in f32: it is sent in f32
    /// whatever precision was asked for, and widened by the receiver (half the bytes).
    pub fn setup(&self, req: &SetupRequest) -> Result<SetupReply, NodeError> {
        let (d_in, d_out) = req.op.shape(self.weights.config());
        self.tap(|t| t.record_setup(req, d_in))?;
        let r_pub = match &req.basis {
            BasisSpec::Identity => Tensor::F32 {
                rows: d_in,
                cols: d_out,
                data: self.weights.dense(req.op)?,
            },
            spec @ BasisSpec::Orthonormal { m, .. } => {
                let basis = expand_basis(spec, d_in).ok_or_else(|| {
                    NodeError::BadRequest(format!("{}: basis rank {m} for width {d_in}", req.op))
                })?;
                let r = self.weights.linear_f64(req.op, *m, &basis)?;
                if req.f64 {
                    Tensor::F64 {
                        rows: *m,
                        cols: d_out,
                        data: r,
                    }
                } else {
                    Tensor::F32 {
                        rows: *m,
                        cols: d_out,
                        data: r.iter().map(|&v| v as f32).collect(),
                    }
                }
            }
        };
        Ok(SetupReply { op: req.op, r_pub })
    }

    /// Answers one masked call: `x̃ · W_op` in the precision the call came in.
    pub fn call(&self, call: &MaskedCall) -> Result<MaskedReply, NodeError> {
        call.x
            .validate()
            .map_err(|e| NodeError::BadRequest(format!("{}: {e}", call.op)))?;
        self.tap(|t| t.record_call(call))?;
        let (rows, cols) = call.x.shape();
        let y = match &call.x {
            Tensor::F32 { data, .. } => {
                let x = Rows::new(rows, cols, data.clone())?;
                let y = self.weights.matmul(call.op, &x)?;
                let (rows, cols) = (y.rows(), y.cols());
                Tensor::F32 {
                    rows,
                    cols,
                    data: y.into_data(),
                }
            }
            Tensor::F64 { data, .. } => {
                let (_, d_out) = call.op.shape(self.weights.config());
                Tensor::F64 {
                    rows,
                    cols: d_out,
                    data: self.weights.linear_f64(call.op, rows, data)?,
                }
            }
        };
        Ok(MaskedReply { seq: call.seq, y })
    }

    /// Writes the tap's index, if recording.
    pub fn finish_tap(&self) -> Result<(), NodeError> {
        self.tap(|t| t.finish())
    }
}

fn link_err(e: NodeError) -> LinkError {
    tracing::warn!(error_type = e.error_type(), "cloud call failed: {e}");
    LinkError {
        error_type: e.error_type(),
        message: e.to_string(),
    }
}

impl CloudLink for CloudExecutor {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        CloudExecutor::setup(self, req).map_err(link_err)
    }

    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        CloudExecutor::call(self, call).map_err(link_err)
    }
}
