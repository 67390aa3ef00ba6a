//! The cloud's executor: answers ReMO set-up requests and masked linear calls from the weights.
//! It sees exactly what the wire carries — masked rows and public bases — and can record all of
//! it with a [`Tap`](crate::Tap).

use std::sync::Mutex;

use crate::runtime::Arrival;
use talaria_engine::{OpId, Rows};
use talaria_wire::{
    BasisSpec, CloudLink, LinkError, MaskedCall, MaskedReply, RPub, SetupReply, SetupRequest,
    Tensor, expand_basis,
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
        self.setup_arrived(req, Arrival::in_process())
    }

    /// [`setup`](Self::setup) for a request that arrived as `seen` says (what a tap records).
    pub fn setup_arrived(
        &self,
        req: &SetupRequest,
        seen: Arrival,
    ) -> Result<SetupReply, NodeError> {
        let (d_in, d_out) = req.op.shape(self.weights.config());
        if req.integer {
            // The integer mode's pads are uniform residues: no basis, and the CVM removes their
            // products with the integer weight itself.
            if req.basis != BasisSpec::Identity {
                return Err(NodeError::BadRequest(format!(
                    "{}: the integer mode takes the identity basis only",
                    req.op
                )));
            }
            self.tap(|t| t.record_setup(req, d_in, None, seen))?;
            let w = self.weights.int_weight(req.op)?.clone();
            return Ok(SetupReply {
                op: req.op,
                r_pub: RPub::Int(w),
            });
        }
        let basis = match &req.basis {
            BasisSpec::Identity => None,
            spec @ BasisSpec::Orthonormal { m, .. } => {
                Some(expand_basis(spec, d_in).ok_or_else(|| {
                    NodeError::BadRequest(format!("{}: basis rank {m} for width {d_in}", req.op))
                })?)
            }
        };
        self.tap(|t| t.record_setup(req, d_in, basis.as_deref(), seen))?;
        let r_pub = match (&req.basis, basis) {
            (BasisSpec::Identity, _) | (_, None) => Tensor::F32 {
                rows: d_in,
                cols: d_out,
                data: self.weights.dense(req.op)?,
            },
            (BasisSpec::Orthonormal { m, .. }, Some(basis)) => {
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
        Ok(SetupReply {
            op: req.op,
            r_pub: RPub::Float(r_pub),
        })
    }

    /// Answers one masked call: `x̃ · W_op` in the precision the call came in.
    pub fn call(&self, call: &MaskedCall) -> Result<MaskedReply, NodeError> {
        self.call_batch(std::slice::from_ref(call))
            .pop()
            .expect("one answer per call")
    }

    /// Answers masked calls of one op — any sessions, any tenants — with one GEMM per
    /// precision over their stacked rows, and splits the product back, in order. Every row is
    /// masked, so stacking them reveals nothing to anyone; a call that is malformed is
    /// answered with its own error and leaves the others alone.
    pub fn call_batch(&self, calls: &[MaskedCall]) -> Vec<Result<MaskedReply, NodeError>> {
        let seen = vec![Arrival::in_process(); calls.len()];
        self.call_batch_arrived(calls, &seen)
    }

    /// [`call_batch`](Self::call_batch) for calls that arrived as `seen` says, one each.
    pub fn call_batch_arrived(
        &self,
        calls: &[MaskedCall],
        seen: &[Arrival],
    ) -> Vec<Result<MaskedReply, NodeError>> {
        let mut answers: Vec<Option<Result<MaskedReply, NodeError>>> =
            calls.iter().map(|_| None).collect();
        let (mut f32s, mut f64s, mut u64s) = (Vec::new(), Vec::new(), Vec::new());
        for (i, call) in calls.iter().enumerate() {
            let arrival = seen.get(i).copied().unwrap_or_else(Arrival::in_process);
            let checked = self.check_call(call, calls[0].op, arrival);
            match (checked, &call.x) {
                (Err(e), _) => answers[i] = Some(Err(e)),
                (Ok(()), Tensor::F32 { .. }) => f32s.push(i),
                (Ok(()), Tensor::F64 { .. }) => f64s.push(i),
                (Ok(()), Tensor::U64 { .. }) => u64s.push(i),
            }
        }
        if let Some(op) = calls.first().map(|c| c.op) {
            let (d_in, d_out) = op.shape(self.weights.config());
            if !f32s.is_empty() {
                let (rows, x) = stack(calls, &f32s, d_in, |t| match t {
                    Tensor::F32 { data, .. } => Some(data),
                    _ => None,
                });
                let y = Rows::new(rows, d_in, x)
                    .and_then(|x| self.weights.matmul(op, &x))
                    .map(|y| y.into_data());
                split(calls, &f32s, d_out, y, &mut answers, |data, rows| {
                    Tensor::F32 {
                        rows,
                        cols: d_out,
                        data,
                    }
                });
            }
            if !f64s.is_empty() {
                let (rows, x) = stack(calls, &f64s, d_in, |t| match t {
                    Tensor::F64 { data, .. } => Some(data),
                    _ => None,
                });
                let y = self.weights.linear_f64(op, rows, &x);
                split(calls, &f64s, d_out, y, &mut answers, |data, rows| {
                    Tensor::F64 {
                        rows,
                        cols: d_out,
                        data,
                    }
                });
            }
            if !u64s.is_empty() {
                let (rows, x) = stack(calls, &u64s, d_in, |t| match t {
                    Tensor::U64 { data, .. } => Some(data),
                    _ => None,
                });
                let y = self.weights.int_matmul(op, rows, &x);
                split(calls, &u64s, d_out, y, &mut answers, |data, rows| {
                    Tensor::U64 {
                        rows,
                        cols: d_out,
                        data,
                    }
                });
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every call answered"))
            .collect()
    }

    /// Checks one call of a batch of `op` and records it on the tap.
    fn check_call(&self, call: &MaskedCall, op: OpId, seen: Arrival) -> Result<(), NodeError> {
        if call.op != op {
            return Err(NodeError::BadRequest(format!(
                "{} in a batch of {op}",
                call.op
            )));
        }
        call.x
            .validate()
            .map_err(|e| NodeError::BadRequest(format!("{}: {e}", call.op)))?;
        // `validate` checked the length against the shape; this checks the shape against the op.
        let (rows, cols) = call.x.shape();
        self.weights.check_input(op, rows, cols, rows * cols)?;
        self.tap(|t| t.record_call(call, seen))
    }

    /// Records that a session of `tenant` opened (the cluster's stages know whose it is).
    pub fn record_open(&self, session: u64, tenant: &str) {
        if let Err(e) = self.tap(|t| {
            t.record_open(session, tenant);
            Ok(())
        }) {
            tracing::warn!("tap: {e}");
        }
    }

    /// Writes the tap's index, if recording.
    pub fn finish_tap(&self) -> Result<(), NodeError> {
        self.tap(|t| t.finish())
    }
}

/// The rows of the calls `group` indexes (all `d_in` wide, of the precision `data` reads),
/// stacked in order: their count and values.
fn stack<E: Copy>(
    calls: &[MaskedCall],
    group: &[usize],
    d_in: usize,
    data: impl Fn(&Tensor) -> Option<&Vec<E>>,
) -> (usize, Vec<E>) {
    let rows = group.iter().map(|&i| calls[i].x.shape().0).sum();
    let mut x = Vec::with_capacity(rows * d_in);
    for values in group.iter().filter_map(|&i| data(&calls[i].x)) {
        x.extend_from_slice(values);
    }
    (rows, x)
}

/// Splits a stacked product `y` (`d_out` wide) back into the answers of the calls `group`
/// indexes, in order; an error of the GEMM answers each of them.
fn split<E: Copy>(
    calls: &[MaskedCall],
    group: &[usize],
    d_out: usize,
    y: Result<Vec<E>, talaria_engine::EngineError>,
    answers: &mut [Option<Result<MaskedReply, NodeError>>],
    tensor: impl Fn(Vec<E>, usize) -> Tensor,
) {
    match y {
        Ok(y) => {
            let mut at = 0;
            for &i in group {
                let rows = calls[i].x.shape().0;
                let part = y[at * d_out..(at + rows) * d_out].to_vec();
                at += rows;
                answers[i] = Some(Ok(MaskedReply {
                    seq: calls[i].seq,
                    y: tensor(part, rows),
                }));
            }
        }
        Err(e) => {
            for &i in group {
                answers[i] = Some(Err(NodeError::Batch {
                    error_type: e.error_type(),
                    message: e.to_string(),
                }));
            }
        }
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
