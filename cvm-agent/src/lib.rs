//! The CVM side of Talaria: the weight-free half of the model (tokenizer, norms, RoPE, attention
//! with the KV cache, activations, sampling) whose every weight-dependent projection is sent to
//! the cloud masked with ReMO and unmasked on return.

pub mod claims;
pub mod client;
pub mod cluster;
pub mod manifest;
pub mod net_loop;
pub mod openai;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talaria_engine::{BlockOp, EngineError, LinearOps, ModelConfig, OpId, Rows};
use talaria_params::{Calibration, RemoConfig};
use talaria_remo::{Masker, MaskerStats, PublicOp, RemoError, SharedPools};
pub use talaria_wire::{CloudLink, LinkError};
use talaria_wire::{MaskedCall, SessionId};

/// The calibration of the default model, measured by `talaria calibrate` on
/// `calibration/corpus.txt` and embedded in the binaries.
const DEFAULT_CALIBRATION: &str = include_str!("../../calibration/smollm2-135m.json");

/// The embedded calibration of the default model.
pub fn default_calibration() -> Result<Calibration, serde_json::Error> {
    serde_json::from_str(DEFAULT_CALIBRATION)
}

/// Public set-up material shared by an agent's sessions: with the identity basis, `R_pub` is
/// the same for every session, so it is fetched once and held once. Made with
/// [`PublicCache::with_shared_pools`], it also holds the agent's mask pools
/// ([`SharedPools`]), which those sessions then draw from.
#[derive(Default)]
pub struct PublicCache {
    publics: Mutex<HashMap<OpId, PublicOp>>,
    /// `None`: sessions keep their own pools. `Some(None)`: shared, not made yet.
    pools: Option<Mutex<Option<Arc<SharedPools>>>>,
    /// What full-rank set-up material must hash to (`None`: not checked).
    manifest: Option<Arc<manifest::ModelManifest>>,
}

impl PublicCache {
    /// A cache whose sessions also share their mask pools (the cluster agent's).
    pub fn with_shared_pools() -> Self {
        Self {
            publics: Mutex::default(),
            pools: Some(Mutex::new(None)),
            manifest: None,
        }
    }

    /// This cache, checking every full-rank `R_pub` and integer weight against `manifest`
    /// before it is installed.
    pub fn pinned(mut self, manifest: Arc<manifest::ModelManifest>) -> Self {
        self.manifest = Some(manifest);
        self
    }

    /// The shared pools for sessions of `config`, made by the first one to ask.
    fn pools(&self, config: &RemoConfig) -> Option<Arc<SharedPools>> {
        let mut pools = self
            .pools
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(
            pools
                .get_or_insert_with(|| Arc::new(SharedPools::new(config.clone())))
                .clone(),
        )
    }

    /// Mask pairs ready in the shared pools (0 without them).
    pub fn pool_ready(&self) -> usize {
        self.pools
            .as_ref()
            .and_then(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .map_or(0, |p| p.ready())
    }

    fn get(&self, op: OpId) -> Option<PublicOp> {
        self.publics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&op)
            .cloned()
    }

    fn put(&self, op: OpId, public: PublicOp) {
        self.publics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(op, public);
    }

    /// Bytes of `R_pub` held.
    pub fn bytes(&self) -> usize {
        self.publics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(PublicOp::bytes)
            .sum()
    }
}

/// Everything the CVM side can fail at.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Remo(#[from] RemoError),
    #[error("cloud: {0}")]
    Link(#[from] LinkError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("reply {got} does not answer call {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestMismatch),
}

impl AgentError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            AgentError::Remo(e) => e.error_type(),
            AgentError::Link(e) => e.error_type,
            AgentError::Engine(e) => e.error_type(),
            AgentError::OutOfOrder { .. } => "out_of_order",
            AgentError::Manifest(e) => e.error_type(),
        }
    }
}

impl From<AgentError> for EngineError {
    fn from(e: AgentError) -> Self {
        EngineError::Outsourced {
            error_type: e.error_type(),
            message: e.to_string(),
        }
    }
}

/// Every op of a model, in the order a forward pass calls them.
pub fn all_ops(config: &ModelConfig) -> Vec<OpId> {
    let mut ops: Vec<OpId> = (0..config.n_layers)
        .flat_map(|layer| BlockOp::ALL.map(|op| OpId::Block { layer, op }))
        .collect();
    ops.push(OpId::LmHead);
    ops
}

/// Time spent on each part of the masked calls.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CallTimings {
    /// Masking and unmasking on the critical path.
    pub online_mask_s: f64,
    /// Waiting for the cloud (its GEMM and the link).
    pub cloud_s: f64,
    /// The set-up round trips (R_pub for every op).
    pub setup_s: f64,
}

/// [`LinearOps`] through ReMO: mask, send, check canaries, unmask.
pub struct RemoLinear<L: CloudLink> {
    masker: Masker,
    link: L,
    session: SessionId,
    timings: CallTimings,
}

impl<L: CloudLink> RemoLinear<L> {
    /// Sets up every op of the model with the cloud and starts the mask pool.
    pub fn connect(
        config: &ModelConfig,
        remo: RemoConfig,
        calibration: &Calibration,
        session: SessionId,
        seed: Option<[u8; 32]>,
        link: L,
    ) -> Result<Self, AgentError> {
        Self::connect_shared(config, remo, calibration, session, seed, link, None)
    }

    /// As [`RemoLinear::connect`], taking identity-basis set-ups from `cache` (and adding the
    /// ones it lacks), so that sessions of one agent share them. The cache must only ever be
    /// used with one ReMO precision.
    pub fn connect_shared(
        config: &ModelConfig,
        remo: RemoConfig,
        calibration: &Calibration,
        session: SessionId,
        seed: Option<[u8; 32]>,
        mut link: L,
        cache: Option<&PublicCache>,
    ) -> Result<Self, AgentError> {
        let t0 = Instant::now();
        let pools = cache.and_then(|c| c.pools(&remo));
        let mut masker = Masker::new(remo, session, seed)?;
        masker.set_context(config.max_seq);
        if let Some(pools) = pools {
            masker.share_pools(pools);
        }
        for op in all_ops(config) {
            let (d_in, d_out) = op.shape(config);
            let rho = calibration.rho(op).map_err(RemoError::from)?;
            if let Some(public) = cache.and_then(|c| c.get(op)) {
                masker.install_public(op, public, rho);
                continue;
            }
            if let Some(req) = masker.setup_request(op, d_in) {
                let reply = link.setup(&req)?;
                // The cloud's weights are checked before anything of them is used.
                if let Some(m) = cache
                    .and_then(|c| c.manifest.as_deref())
                    .filter(|_| req.basis == talaria_wire::BasisSpec::Identity)
                {
                    m.check_setup(op, &reply)?;
                }
                let public = masker.public_from_reply(&req, reply, d_in, d_out)?;
                if let Some(c) = cache.filter(|_| public.is_identity()) {
                    c.put(op, public.clone());
                }
                masker.install_public(op, public, rho);
            }
        }
        masker.start_pool();
        let timings = CallTimings {
            setup_s: t0.elapsed().as_secs_f64(),
            ..Default::default()
        };
        Ok(Self {
            masker,
            link,
            session,
            timings,
        })
    }

    /// Makes Freivalds' vectors for every op now (see [`Masker::prepare_checks`]); returns
    /// how many were made and how many ops hold them.
    pub fn prepare_checks(&mut self) -> (usize, usize) {
        self.masker.prepare_checks()
    }

    /// A new sequence starts on this session (the in-process engines reuse one for several
    /// generations): its first pass is padded whatever its length.
    pub fn new_sequence(&mut self) {
        self.masker.new_sequence();
    }

    /// What the masker did so far.
    pub fn stats(&self) -> MaskerStats {
        self.masker.stats()
    }

    /// Where the time went so far.
    pub fn timings(&self) -> &CallTimings {
        &self.timings
    }

    /// The link, e.g. to finish a tap.
    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// Ends the session (its mask pool stops) and hands the link back for another.
    pub fn into_link(self) -> L {
        self.link
    }

    fn call(&mut self, op: OpId, x: &Rows) -> Result<Rows, AgentError> {
        let t0 = Instant::now();
        let (masked, pending) = self.masker.mask(op, x)?;
        let call = MaskedCall {
            session: self.session,
            seq: pending.seq(),
            op,
            x: masked,
        };
        let t1 = Instant::now();
        let reply = self.link.call(&call)?;
        let t2 = Instant::now();
        if reply.seq != call.seq {
            return Err(AgentError::OutOfOrder {
                expected: call.seq,
                got: reply.seq,
            });
        }
        let y = self.masker.unmask(pending, &reply.y)?;
        let secs = |d: Duration| d.as_secs_f64();
        self.timings.online_mask_s += secs(t1 - t0) + secs(t2.elapsed());
        self.timings.cloud_s += secs(t2 - t1);
        Ok(y)
    }
}

impl<L: CloudLink> LinearOps for RemoLinear<L> {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        self.call(op, x).map_err(|e| {
            tracing::warn!(
                error_type = e.error_type(),
                "masked call for {op} failed: {e}"
            );
            e.into()
        })
    }

    fn prefill_parts(&mut self, rows: usize) -> Vec<usize> {
        self.masker.prefill_parts(rows)
    }
}
