//! The CVM's side of ReMO for one session: public set-up per op, private mask coefficients
//! drawn from the offline pool (`pool`: the session's own, or one its agent's sessions share), masking with
//! cover rows (dummies and length padding) and a shuffle, and unmasking after Freivalds' check of
//! every row (`verify`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use talaria_engine::{OpId, Rows};
use talaria_wire::{BasisSpec, RPub, SessionId, SetupReply, SetupRequest, Tensor, expand_basis};

mod float;
mod int;

use crate::RemoError;
use crate::fixed::{IntOp, IntProduct};
use crate::grid;
use crate::pool::{
    MaskPair, OfflineClock, OpState, PoolWorker, SharedPools, Wake, cover_masks, make_pairs, nudge,
};
use crate::verify::{
    COVER_ROW_VECTORS, CallCheck, CheckKind, CheckVectors, FLOAT_VECTORS, REAL_ROW_VECTORS,
};
use talaria_params::{PadRows, Precision, RemoConfig};

/// What the CVM knows of an op after set-up: all of it public.
pub(crate) struct OpPublic {
    pub(crate) d_in: usize,
    pub(crate) d_out: usize,
    /// `m × d_in` orthonormal rows, or `None` for the identity basis (`m = d_in`).
    pub(crate) basis: Option<Vec<f64>>,
    pub(crate) m: usize,
    /// `R_pub = M_pub · W`, `m × d_out`, in the precision the mode keeps it (f32 when it is
    /// exact in f32: the identity basis; products are still made in f64 if the mode asks).
    pub(crate) r_pub_f32: Vec<f32>,
    pub(crate) r_pub_f64: Vec<f64>,
    /// The integer mode's weight (then the basis is the identity and `R_pub` is empty).
    pub(crate) int: Option<IntOp>,
}

/// An op's public set-up material (`R_pub` and the basis), shareable between sessions: with
/// the identity basis it is the same for every session, so an agent fetches and holds it once.
#[derive(Clone)]
pub struct PublicOp {
    pub(crate) public: Arc<OpPublic>,
    pub(crate) identity: bool,
}

impl PublicOp {
    /// Whether it was made for the identity basis (and so may be shared between sessions).
    pub fn is_identity(&self) -> bool {
        self.identity
    }

    /// Bytes of `R_pub` (or the integer weight) held.
    pub fn bytes(&self) -> usize {
        self.public.r_pub_f32.len() * 4
            + self.public.r_pub_f64.len() * 8
            + self.public.int.as_ref().map_or(0, |i| i.weight.bytes())
    }
}

/// What the CVM keeps between sending a masked call and receiving its reply.
pub struct Pending {
    op: OpId,
    seq: u64,
    n_real: usize,
    /// Canary rows (rank < d only): pure masks whose products are known.
    n_canary: usize,
    /// `slots[j]`: where logical row `j` (real rows first, then canaries, then cover rows)
    /// sits in the sent batch.
    slots: Vec<usize>,
    /// Products of the masks of the real and canary rows; empty when masking is off.
    products: Products,
    d_out: usize,
    /// Freivalds' check of every sent row (identity basis).
    check: Option<CallCheck>,
    /// The op's state, whose check vectors a failure retires.
    state: Option<Arc<Mutex<OpState>>>,
}

/// What unmasking a call needs besides the reply.
enum Products {
    Float(Vec<Vec<f64>>),
    Int {
        products: Vec<Vec<u64>>,
        /// Fractional bits of each real row.
        frac_bits: Vec<u32>,
        /// Each real row's bound on its exact product (the range check).
        bounds: Vec<u64>,
        shift: u32,
    },
}

impl Pending {
    /// The call's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Counts of what a session's masker did, for cost reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MaskerStats {
    pub calls: u64,
    pub rows_sent: u64,
    pub dummy_rows: u64,
    pub pool_hits: u64,
    pub pool_misses: u64,
    /// Seconds this session's own pool thread spent making masks and their products (masks
    /// made on the spot are online time; a shared pool's time is the agent's:
    /// [`SharedPools::mask_generation_s`]).
    pub mask_generation_s: f64,
    /// Multiply-adds of mask generation per pair, summed over pairs made.
    pub mask_generation_macs: u64,
    /// Integer mode: rows encoded with fewer fractional bits than configured, to fit 63 bits.
    pub downshifted_rows: u64,
    /// Cover rows added to hide a prefill's length (`pad_rows`).
    pub padding_rows: u64,
    /// Rows verified by Freivalds' check.
    pub checked_rows: u64,
    /// Secret check vectors this session's calls made (the first use of an op, more for a
    /// row with a larger bound, and fresh ones after a failure).
    pub check_vectors_made: u64,
    /// Seconds spent on Freivalds' check (both halves; vector set-up included).
    pub verify_s: f64,
}

/// One session's ReMO state.
pub struct Masker {
    config: RemoConfig,
    session: SessionId,
    rng: ChaCha20Rng,
    ops: HashMap<OpId, Arc<Mutex<OpState>>>,
    worker: Option<PoolWorker>,
    /// The agent's pools, when this session draws from them.
    shared: Option<Arc<SharedPools>>,
    /// The shared pool thread's wake handle, once started.
    shared_wake: Option<Wake>,
    /// The ops whose pairs come from the shared pools.
    shared_ops: HashSet<OpId>,
    seq: u64,
    stats: MaskerStats,
    offline: OfflineClock,
    /// Nanoseconds of Freivalds' check.
    verify_clock: OfflineClock,
    /// The context length, which bounds the padded row count.
    context: Option<usize>,
    /// Whether the session's first pass (the prefill) has reached the LM head.
    prefilled: bool,
    /// A prefill split into passes ([`Masker::prefill_parts`]): the rows every block call of
    /// its passes is padded to, and how many passes are left to reach the LM head.
    passes: Option<(usize, usize)>,
}

impl Masker {
    /// A masker whose private randomness comes from `seed` (tests, reproducible studies) or from
    /// the operating system.
    pub fn new(
        config: RemoConfig,
        session: SessionId,
        seed: Option<[u8; 32]>,
    ) -> Result<Self, RemoError> {
        config.validate()?;
        let seed = seed.unwrap_or_else(|| rand::rng().random());
        Ok(Self {
            config,
            session,
            rng: ChaCha20Rng::from_seed(seed),
            ops: HashMap::new(),
            worker: None,
            shared: None,
            shared_wake: None,
            shared_ops: HashSet::new(),
            seq: 0,
            stats: MaskerStats::default(),
            offline: OfflineClock::default(),
            verify_clock: OfflineClock::default(),
            context: None,
            prefilled: false,
            passes: None,
        })
    }

    /// The session's context length: padded calls never exceed it (and `pad_rows = max` pads
    /// to it).
    pub fn set_context(&mut self, max_seq: usize) {
        self.context = Some(max_seq);
    }

    /// A new sequence starts (a masker reused for another generation): its first pass is padded
    /// even if it has one row.
    pub fn new_sequence(&mut self) {
        self.prefilled = false;
        self.passes = None;
    }

    /// The passes a prefill of `rows` new rows runs as, their real rows in order
    /// ([`RemoConfig::prefill_parts`]); the block calls of the next `parts.len()` passes (up to
    /// their LM head calls) are padded as it says.
    pub fn prefill_parts(&mut self, rows: usize) -> Vec<usize> {
        let (parts, pad) = self
            .config
            .prefill_parts(rows, self.context.unwrap_or(usize::MAX));
        self.passes = pad.map(|c| (c, parts.len()));
        parts
    }

    /// The rows a call of `n` real rows is sent with before dummies: padded to its bucket when
    /// its row count could tell the prompt's length — a call of more than one row, or a block
    /// op of the session's first pass (a one-token prompt). A causal pass's LM head call has
    /// one row whatever the prompt, and so do decode steps.
    fn padded_rows(&mut self, op: OpId, n: usize) -> Result<usize, RemoError> {
        if let Some((rows, left)) = self.passes {
            if op != OpId::LmHead {
                return Ok(rows.max(n));
            }
            self.passes = (left > 1).then_some((rows, left - 1));
            self.prefilled = true;
            return Ok(n);
        }
        let prefill = n > 1 || (!self.prefilled && op != OpId::LmHead);
        if op == OpId::LmHead {
            self.prefilled = true;
        }
        if !prefill || self.config.pad_rows == PadRows::Off {
            return Ok(n);
        }
        let limit = match (self.context, self.config.pad_rows) {
            (Some(c), _) => c,
            (None, PadRows::Max) => {
                return Err(RemoError::Config(
                    "pad_rows = max needs the session's context length".into(),
                ));
            }
            (None, _) => usize::MAX,
        };
        Ok(self.config.pad_rows.bucket(n, limit))
    }

    /// The parameters.
    pub fn config(&self) -> &RemoConfig {
        &self.config
    }

    /// What this masker has done so far.
    pub fn stats(&self) -> MaskerStats {
        let mut s = self.stats.clone();
        s.mask_generation_s = self.offline.load(Ordering::Relaxed) as f64 * 1e-9;
        s.verify_s = self.verify_clock.load(Ordering::Relaxed) as f64 * 1e-9;
        s
    }

    /// Multiply-adds to make one mask and its product for an op of this masker.
    fn pair_macs(public: &OpPublic) -> u64 {
        if public.int.is_some() {
            return (public.d_in * public.d_out) as u64;
        }
        let basis = if public.basis.is_some() {
            public.m * public.d_in
        } else {
            0
        };
        (basis + public.m * public.d_out) as u64
    }

    /// The public set-up request for an op of input width `d_in`; `None` when masking is off.
    pub fn setup_request(&mut self, op: OpId, d_in: usize) -> Option<SetupRequest> {
        if !self.config.enabled {
            return None;
        }
        let m = self.config.rank_for(d_in);
        let basis = if m == d_in {
            BasisSpec::Identity
        } else {
            // The basis is public: its seed comes from a stream separate from the coefficients'.
            BasisSpec::Orthonormal {
                seed: self.rng.random(),
                m,
            }
        };
        Some(SetupRequest {
            session: self.session,
            op,
            basis,
            f64: self.config.precision.r_pub_f64(),
            integer: self.config.precision.is_int(),
        })
    }

    /// Installs the cloud's `R_pub` for an op, with the op's calibrated ρ.
    pub fn install(
        &mut self,
        request: &SetupRequest,
        reply: SetupReply,
        d_in: usize,
        d_out: usize,
        rho: f64,
    ) -> Result<(), RemoError> {
        let public = self.public_from_reply(request, reply, d_in, d_out)?;
        self.install_public(request.op, public, rho);
        Ok(())
    }

    /// Checks the cloud's `R_pub` for an op and keeps it as shareable public material.
    pub fn public_from_reply(
        &self,
        request: &SetupRequest,
        reply: SetupReply,
        d_in: usize,
        d_out: usize,
    ) -> Result<PublicOp, RemoError> {
        let op = request.op;
        let m = request.basis.rank(d_in);
        if reply.op != op {
            return Err(RemoError::Setup(format!(
                "{op}: the reply is for {}",
                reply.op
            )));
        }
        let r_pub = match (reply.r_pub, self.config.precision.is_int()) {
            (RPub::Int(w), true) if request.basis == BasisSpec::Identity => {
                return Ok(PublicOp {
                    public: Arc::new(OpPublic {
                        d_in,
                        d_out,
                        basis: None,
                        m: d_in,
                        r_pub_f32: Vec::new(),
                        r_pub_f64: Vec::new(),
                        int: Some(IntOp::new(op, w, d_in, d_out)?),
                    }),
                    identity: true,
                });
            }
            (RPub::Float(t), false) => t,
            (other, _) => {
                return Err(RemoError::Setup(format!(
                    "{op}: the reply carries {} for a {:?} session",
                    match other {
                        RPub::Float(_) => "a float R_pub",
                        RPub::Int(_) => "an integer weight",
                    },
                    self.config.precision
                )));
            }
        };
        r_pub.validate()?;
        if r_pub.shape() != (m, d_out) {
            return Err(RemoError::Setup(format!(
                "{op}: R_pub is {:?}, expected ({m}, {d_out})",
                r_pub.shape()
            )));
        }
        let basis = expand_basis(&request.basis, d_in);
        let (r_pub_f32, r_pub_f64) = match r_pub {
            Tensor::F32 { data, .. } if !self.config.precision.r_pub_f64() => (data, Vec::new()),
            Tensor::F64 { data, .. } if self.config.precision.r_pub_f64() => (Vec::new(), data),
            // With the identity basis R_pub is W itself, exact in f32: it is kept in f32 (half
            // the memory) and widened block by block when the f64 products are made.
            Tensor::F32 { data, .. } if basis.is_none() => (data, Vec::new()),
            other => {
                return Err(RemoError::Setup(format!(
                    "{op}: R_pub arrived in {}",
                    other.precision()
                )));
            }
        };
        Ok(PublicOp {
            public: Arc::new(OpPublic {
                d_in,
                d_out,
                basis,
                m,
                r_pub_f32,
                r_pub_f64,
                int: None,
            }),
            identity: request.basis == BasisSpec::Identity,
        })
    }

    /// Draws this session's masks for identity-basis ops from `pools` (the agent's), if they
    /// were made for this session's configuration; call before installing the ops. The sessions
    /// sharing pools must also share their calibration (an op's mask scale is fixed by the
    /// first session that installs it): an agent has one.
    pub fn share_pools(&mut self, pools: Arc<SharedPools>) {
        if pools.config == self.config {
            self.shared = Some(pools);
        }
    }

    /// Installs public material for `op`, possibly shared with other sessions, and draws this
    /// session's private coefficient generator for it (or, with shared pools and the identity
    /// basis, joins the agent's pool for it).
    pub fn install_public(&mut self, op: OpId, public: PublicOp, rho: f64) {
        let scale = self.config.scale * rho;
        if let Some(pools) = self.shared.as_ref().filter(|_| public.identity) {
            let state = pools.state(op, &public, scale);
            self.ops.insert(op, state);
            self.shared_ops.insert(op);
            return;
        }
        let state = OpState::new(
            public.public,
            scale,
            ChaCha20Rng::from_seed(self.rng.random()),
        );
        self.ops.insert(op, Arc::new(Mutex::new(state)));
    }

    /// Makes Freivalds' secret vectors for every installed op that has none yet (what an op's
    /// first call would do), so that no call pays for them; returns how many were made and how
    /// many ops hold them (none with a basis, where the CVM does not hold the weight). With
    /// shared pools they are the agent's, made once for all its sessions.
    pub fn prepare_checks(&mut self) -> (usize, usize) {
        let precision = self.config.precision;
        let (mut made, mut ready) = (0, 0);
        for state in self.ops.values() {
            let (vectors, now) = state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .vectors(precision);
            made += now;
            ready += usize::from(vectors.is_some());
        }
        (made, ready)
    }

    /// Starts filling the pools in the background (a no-op with a pool size of 0).
    pub fn start_pool(&mut self) {
        if !self.config.enabled || self.config.pool == 0 {
            return;
        }
        if let Some(pools) = &self.shared {
            self.shared_wake = pools.start();
        }
        // The ops not in the shared pools (all of them without sharing) get this session's own.
        let ops: Vec<_> = self
            .ops
            .iter()
            .filter(|(op, _)| !self.shared_ops.contains(op))
            .map(|(_, state)| state.clone())
            .collect();
        if !ops.is_empty() && self.worker.is_none() {
            self.worker = Some(PoolWorker::start(
                ops,
                self.config.pool,
                self.config.precision,
                self.offline.clone(),
            ));
        }
    }

    /// Masks `x` for `op`: returns the rows to send and what unmasking needs.
    pub fn mask(&mut self, op: OpId, x: &Rows) -> Result<(Tensor, Pending), RemoError> {
        self.seq += 1;
        self.stats.calls += 1;
        let n = x.rows();
        if !self.config.enabled {
            self.stats.rows_sent += n as u64;
            let tensor = Tensor::F32 {
                rows: n,
                cols: x.cols(),
                data: x.data().to_vec(),
            };
            let pending = Pending {
                op,
                seq: self.seq,
                n_real: n,
                n_canary: 0,
                slots: (0..n).collect(),
                products: Products::Float(Vec::new()),
                d_out: 0,
                check: None,
                state: None,
            };
            return Ok((tensor, pending));
        }
        let state = self.ops.get(&op).ok_or(RemoError::NotSetUp(op))?.clone();
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let (d_in, d_out) = (s.public.d_in, s.public.d_out);
        let (identity, scale) = (s.public.basis.is_none(), s.scale);
        let pair_macs = Self::pair_macs(&s.public);
        if x.cols() != d_in {
            return Err(RemoError::Shape {
                op,
                expected: d_in,
                found: x.cols(),
            });
        }
        // Encode first: a row that cannot be encoded costs no pads.
        let encoded = match &s.public.int {
            Some(int) => {
                let f_max = self.config.frac_bits;
                let crate::fixed::EncodedRows {
                    residues: enc,
                    frac_bits,
                    bounds,
                } = int.encode_rows(op, x, f_max)?;
                self.stats.downshifted_rows +=
                    frac_bits.iter().filter(|&&f| f < f_max).count() as u64;
                Some((enc, frac_bits, bounds, int.weight.shift))
            }
            None => None,
        };
        let padded = self.padded_rows(op, n)?;
        let cover = padded - n + self.config.dummy_rows;
        let total = n + cover;
        let t_check = std::time::Instant::now();
        let (vectors, made) = s.vectors(self.config.precision);
        self.stats.check_vectors_made += made as u64;
        let mut check_ns = t_check.elapsed().as_nanos() as u64;
        // Without Freivalds' check (rank < d) the cover rows are canaries with known products.
        let n_canary = if vectors.is_some() { 0 } else { cover };
        let n_pairs = n + n_canary;
        let mut pairs = Vec::with_capacity(total);
        while pairs.len() < n_pairs {
            match s.pool.pop_front() {
                Some(p) => {
                    pairs.push(p);
                    self.stats.pool_hits += 1;
                }
                None => {
                    let need = n_pairs - pairs.len();
                    self.stats.pool_misses += need as u64;
                    let public = s.public.clone();
                    let scale = s.scale;
                    // Made on the spot, the pairs' time shows in the call's: make the bucket's
                    // worth (`padded` rows, public), not the prompt's, and keep what is left over
                    // for the next calls.
                    let make = need.max(padded.saturating_sub(pairs.len()));
                    let mut made =
                        make_pairs(&public, scale, self.config.precision, &mut s.rng, make);
                    let rest = made.split_off(need);
                    pairs.extend(made);
                    for p in rest.into_iter().rev() {
                        s.pool.push_front(p);
                    }
                }
            }
        }
        let public = s.public.clone();
        // The pool thread refills an op only below half full: waking it any sooner costs a
        // context switch (and a scan of every op's lock) on each call for nothing.
        let refill = s.pool.len() * 2 <= self.config.pool;
        drop(s);
        if refill {
            if let Some(w) = &self.worker {
                nudge(&w.wake);
            }
            if let Some(wake) = &self.shared_wake {
                nudge(wake);
            }
        }
        if vectors.is_some() {
            pairs.extend(cover_masks(&public, scale, &mut self.rng, cover));
        }

        let mut slots: Vec<usize> = (0..total).collect();
        if self.config.shuffle {
            for i in (1..total).rev() {
                let j = self.rng.random_range(0..=i);
                slots.swap(i, j);
            }
        }
        self.stats.rows_sent += total as u64;
        self.stats.dummy_rows += self.config.dummy_rows as u64;
        self.stats.padding_rows += (padded - n) as u64;
        self.stats.mask_generation_macs += pair_macs * n_pairs as u64;
        let (tensor, products) = match encoded {
            Some((enc, frac_bits, bounds, shift)) => {
                Self::pad_rows(op, pairs, &slots, n, &enc, d_in, frac_bits, bounds, shift)?
            }
            None => {
                let step = identity.then(|| grid::grid_step(scale));
                Self::mask_rows(op, self.config.precision, pairs, &slots, x, step)?
            }
        };
        let t_check = std::time::Instant::now();
        let check = vectors.map(|v| Self::sent_side(v, &tensor, &slots[..n]));
        if check.is_some() {
            self.stats.checked_rows += total as u64;
        }
        check_ns += t_check.elapsed().as_nanos() as u64;
        self.verify_clock.fetch_add(check_ns, Ordering::Relaxed);
        let pending = Pending {
            op,
            seq: self.seq,
            n_real: n,
            n_canary,
            slots,
            products,
            d_out,
            check,
            state: Some(state),
        };
        Ok((tensor, pending))
    }

    /// The sent half of Freivalds' check for every row of `tensor`: `x̃·u_t` (and in the float
    /// modes `|x̃|·a_t`). In the integer mode the rows at `real` get [`REAL_ROW_VECTORS`], the
    /// cover rows [`COVER_ROW_VECTORS`]; the values sit at a stride of the larger.
    fn sent_side(vectors: Arc<CheckVectors>, tensor: &Tensor, real: &[usize]) -> CallCheck {
        let (rows, cols) = tensor.shape();
        let (mut int_sent, mut float_sent) = (Vec::new(), Vec::new());
        let mut counts = vec![0u8; rows];
        let stride = match (&vectors.kind, tensor) {
            (CheckKind::Int(c), Tensor::U64 { data, .. }) => {
                counts.iter_mut().for_each(|k| *k = COVER_ROW_VECTORS as u8);
                real.iter()
                    .for_each(|&slot| counts[slot] = REAL_ROW_VECTORS as u8);
                int_sent.reserve(rows * COVER_ROW_VECTORS);
                for (x, &k) in data.chunks_exact(cols).zip(&counts) {
                    c.sent(x, k as usize, &mut int_sent);
                    int_sent.resize(int_sent.len() + COVER_ROW_VECTORS - k as usize, 0);
                }
                COVER_ROW_VECTORS
            }
            (CheckKind::Float(c), Tensor::F32 { data, .. }) => {
                data.chunks_exact(cols)
                    .for_each(|x| c.sent(x, &mut float_sent));
                counts.iter_mut().for_each(|k| *k = 2 * FLOAT_VECTORS as u8);
                2 * FLOAT_VECTORS
            }
            (CheckKind::Float(c), Tensor::F64 { data, .. }) => {
                data.chunks_exact(cols)
                    .for_each(|x| c.sent(x, &mut float_sent));
                counts.iter_mut().for_each(|k| *k = 2 * FLOAT_VECTORS as u8);
                2 * FLOAT_VECTORS
            }
            // The precision of the tensor is the mode's, and so are the vectors: never reached,
            // and a check with no values fails every row rather than pass it.
            _ => 0,
        };
        CallCheck {
            vectors,
            int_sent,
            float_sent,
            stride,
            counts,
        }
    }

    /// Removes the masks from the cloud's reply, after checking every row of it (Freivalds'
    /// check, the canaries with rank < d, and the integer mode's range check).
    pub fn unmask(&self, pending: Pending, y: &Tensor) -> Result<Rows, RemoError> {
        y.validate()?;
        let op = pending.op;
        let total = pending.slots.len();
        if !self.config.enabled {
            let (rows, cols) = y.shape();
            if rows != total {
                return Err(RemoError::ReplyShape {
                    op,
                    rows,
                    expected: total,
                });
            }
            let data = match y {
                Tensor::F32 { data, .. } => data.clone(),
                other => other.to_f64().into_iter().map(|v| v as f32).collect(),
            };
            return Ok(Rows::new(rows, cols, data)?);
        }
        self.check_reply(&pending, y)?;
        self.verify(&pending, y)?;
        let products = match &pending.products {
            Products::Float(p) => p,
            Products::Int { .. } => return Self::unpad(pending, y)?.decode(),
        };
        let d_out = pending.d_out;
        let precision = self.config.precision;
        // A row of a float call's reply, widened to f64 when it is read (only the real and
        // canary rows are). `check_reply` already refused another precision; a residue tensor
        // here is refused again rather than trusted to be impossible.
        let span = |slot: usize| slot * d_out..(slot + 1) * d_out;
        let row: Box<dyn Fn(usize) -> Vec<f64> + '_> = match y {
            Tensor::F32 { data, .. } => {
                Box::new(move |slot| data[span(slot)].iter().map(|&v| f64::from(v)).collect())
            }
            Tensor::F64 { data, .. } => Box::new(move |slot| data[span(slot)].to_vec()),
            Tensor::U64 { .. } => {
                return Err(talaria_wire::WireError::WrongPrecision {
                    expected: "f32 or f64",
                    found: "u64",
                }
                .into());
            }
        };
        // Canaries (rank < d) first: a reply that fails one is not used at all.
        let tol = precision.canary_tolerance();
        let canaries = pending.n_real..pending.n_real + pending.n_canary;
        for (&slot, expected) in pending.slots[canaries.clone()]
            .iter()
            .zip(&products[canaries])
        {
            let got = row(slot);
            let scale = expected.iter().fold(1f64, |a, v| a.max(v.abs()));
            let err = got
                .iter()
                .zip(expected)
                .fold(0f64, |a, (g, e)| a.max((g - e).abs()));
            // Written so that a NaN error fails the check too.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            let corrupt = !(err <= tol * scale);
            if corrupt {
                return Err(RemoError::Canary {
                    op,
                    relative_error: err / scale,
                });
            }
        }
        let mut out = Vec::with_capacity(pending.n_real * d_out);
        for (&slot, p) in pending.slots.iter().zip(products).take(pending.n_real) {
            let got = row(slot);
            match precision {
                Precision::F32 => {
                    out.extend(got.iter().zip(p).map(|(&g, &e)| g as f32 - e as f32));
                }
                _ => out.extend(got.iter().zip(p).map(|(g, e)| (g - e) as f32)),
            }
        }
        Ok(Rows::new(pending.n_real, d_out, out)?)
    }

    /// Freivalds' check of every row of the reply: `ỹ·v_t = x̃·u_t` (within the rounding
    /// bound in the float modes). A failure retires the op's vectors.
    fn verify(&self, pending: &Pending, y: &Tensor) -> Result<(), RemoError> {
        let Some(check) = &pending.check else {
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        let d_out = pending.d_out;
        let stride = check.stride;
        // Vectors retired by a failure (of this session or another sharing them) vouch for
        // nothing: a call masked with them before the failure fails too.
        let retired = check.vectors.is_retired();
        let failed = (0..pending.slots.len()).find(|&slot| {
            let k = usize::from(check.counts[slot]);
            let ok = match (&check.vectors.kind, y) {
                (CheckKind::Int(c), Tensor::U64 { data, .. }) => c.passes(
                    &data[slot * d_out..][..d_out],
                    &check.int_sent[slot * stride..][..k],
                ),
                (CheckKind::Float(c), Tensor::F32 { data, .. }) => c.passes(
                    &data[slot * d_out..][..d_out],
                    &check.float_sent[slot * stride..][..k],
                ),
                (CheckKind::Float(c), Tensor::F64 { data, .. }) => c.passes(
                    &data[slot * d_out..][..d_out],
                    &check.float_sent[slot * stride..][..k],
                ),
                _ => false,
            };
            // An empty check (stride 0) never passes a row.
            retired || !ok || stride == 0 || k == 0
        });
        self.verify_clock
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match failed {
            None => Ok(()),
            Some(slot) => {
                Self::retire_vectors(pending);
                Err(RemoError::Integrity {
                    op: pending.op,
                    reason: format!("row {slot} of the reply fails Freivalds' check"),
                })
            }
        }
    }

    /// Retires the call's check vectors after a failure — every call masked with them fails
    /// from now on, in any session — and drops them from the op, unless already replaced.
    fn retire_vectors(pending: &Pending) {
        if let Some(check) = &pending.check {
            check.vectors.retire();
        }
        if let (Some(state), Some(check)) = (&pending.state, &pending.check) {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            if s.check
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &check.vectors))
            {
                s.check = None;
            }
        }
    }

    /// Checks a reply's shape and precision against its call.
    fn check_reply(&self, pending: &Pending, y: &Tensor) -> Result<(), RemoError> {
        let total = pending.slots.len();
        if y.shape() != (total, pending.d_out) {
            return Err(RemoError::ReplyShape {
                op: pending.op,
                rows: y.shape().0,
                expected: total,
            });
        }
        let want = match self.config.precision {
            Precision::Int => "u64",
            Precision::F64Gemm => "f64",
            Precision::F32 | Precision::F64Client => "f32",
        };
        if y.precision() != want {
            return Err(talaria_wire::WireError::WrongPrecision {
                expected: want,
                found: y.precision(),
            }
            .into());
        }
        Ok(())
    }
}
