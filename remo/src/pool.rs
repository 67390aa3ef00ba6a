//! The offline mask pool: masks (or pads) and their exact products with each op's weight, made
//! ahead of the calls on a background thread, per session or shared by an agent's sessions.
//! Masks depend on no data, so this is where the CVM's heavy work goes off the critical path.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use talaria_engine::OpId;
use talaria_kernels::gemm::{matmul_f32, matmul_f64, matmul_f64_f32, matmul_f64_nt};
use talaria_kernels::int_matmul;
use talaria_params::{Precision, RemoConfig};

use crate::fixed::IntOp;
use crate::grid;
use crate::masker::{OpPublic, PublicOp};
use crate::verify::{
    COVER_ROW_VECTORS, CheckKind, CheckVectors, FLOAT_VECTORS, FloatCheck, IntCheck,
};

/// A mask and its exact product with the op's weight.
pub(crate) enum MaskPair {
    Float {
        mask: Vec<f64>,
        product: Vec<f64>,
    },
    /// A uniform pad and its product modulo `2^64`.
    Int {
        pad: Vec<u64>,
        product: Vec<u64>,
    },
}

/// Draws `count` uniform pads (ChaCha20: the top bits of a padded row are the pad's, so only a
/// cryptographic generator hides them) and their products with the integer weight.
pub(crate) fn int_pairs(int: &IntOp, rng: &mut ChaCha20Rng, count: usize) -> Vec<MaskPair> {
    let (d_in, d_out) = (int.weight.d_in, int.weight.d_out);
    let pads: Vec<u64> = (0..count * d_in).map(|_| rng.random()).collect();
    let products = int_matmul(&pads, count, &int.weight);
    pads.chunks_exact(d_in)
        .zip(products.chunks_exact(d_out))
        .map(|(p, y)| MaskPair::Int {
            pad: p.to_vec(),
            product: y.to_vec(),
        })
        .collect()
}

/// Private per-op state: the coefficient generator and the pool of precomputed pairs.
pub(crate) struct OpState {
    pub(crate) public: Arc<OpPublic>,
    /// σ · ρ_op: constant and public, never derived from a row.
    pub(crate) scale: f64,
    pub(crate) rng: ChaCha20Rng,
    pub(crate) pool: VecDeque<MaskPair>,
    /// Freivalds' secret vectors (identity basis only), made on first use and dropped after a
    /// failed check so that they are never used again.
    pub(crate) check: Option<Arc<CheckVectors>>,
}

impl OpState {
    pub(crate) fn new(public: Arc<OpPublic>, scale: f64, rng: ChaCha20Rng) -> Self {
        Self {
            public,
            scale,
            rng,
            pool: VecDeque::new(),
            check: None,
        }
    }

    /// The op's check vectors, made on its first use (all of them at once, so that when and how
    /// long this takes does not depend on any row), and how many were made now; `None` with an
    /// orthonormal basis, where the CVM does not hold `W`.
    pub(crate) fn vectors(&mut self, precision: Precision) -> (Option<Arc<CheckVectors>>, usize) {
        let public = self.public.clone();
        if public.basis.is_some() {
            return (None, 0);
        }
        if self.check.is_some() {
            return (self.check.clone(), 0);
        }
        let (kind, made) = match &public.int {
            Some(int) => (
                CheckKind::Int(IntCheck::new(&int.weight, &mut self.rng)),
                COVER_ROW_VECTORS,
            ),
            None => {
                let unit = if precision.gemm_f64() {
                    (f64::EPSILON / 2.0, f64::MIN_POSITIVE)
                } else {
                    (
                        precision.cloud_unit_roundoff(),
                        f64::from(f32::MIN_POSITIVE),
                    )
                };
                let (d_in, d_out) = (public.d_in, public.d_out);
                let check = if public.r_pub_f64.is_empty() {
                    FloatCheck::new(&public.r_pub_f32, d_in, d_out, unit, &mut self.rng)
                } else {
                    FloatCheck::new(&public.r_pub_f64, d_in, d_out, unit, &mut self.rng)
                };
                (CheckKind::Float(check), FLOAT_VECTORS)
            }
        };
        self.check = Some(Arc::new(CheckVectors::new(kind)));
        (self.check.clone(), made)
    }
}

/// Draws the float modes' mask coefficients: with the identity basis integer multiples of the
/// op's power-of-two grid (see `grid`), so that every value of the grid is a reachable mask;
/// with a basis (rank < d, which leaks anyway) plain Gaussians.
pub(crate) fn float_coeffs(
    public: &OpPublic,
    scale: f64,
    rng: &mut ChaCha20Rng,
    count: usize,
) -> Vec<f64> {
    let step = public.basis.is_none().then(|| grid::grid_step(scale));
    (0..count * public.m)
        .map(|_| {
            let z = Distribution::<f64>::sample(&StandardNormal, &mut *rng);
            match step {
                Some(g) => g * grid::mask_steps(scale, g, z),
                None => scale * z,
            }
        })
        .collect()
}

/// `count` cover rows: masks of the identity basis without their products (Freivalds' check
/// verifies them; their outputs are dropped).
pub(crate) fn cover_masks(
    public: &OpPublic,
    scale: f64,
    rng: &mut ChaCha20Rng,
    count: usize,
) -> Vec<MaskPair> {
    let d_in = public.d_in;
    if public.int.is_some() {
        return (0..count)
            .map(|_| MaskPair::Int {
                pad: (0..d_in).map(|_| rng.random()).collect(),
                product: Vec::new(),
            })
            .collect();
    }
    float_coeffs(public, scale, rng, count)
        .chunks_exact(d_in)
        .map(|m| MaskPair::Float {
            mask: m.to_vec(),
            product: Vec::new(),
        })
        .collect()
}

/// Draws `count` fresh masks with their products, as batched GEMMs.
pub(crate) fn make_pairs(
    public: &OpPublic,
    scale: f64,
    precision: Precision,
    rng: &mut ChaCha20Rng,
    count: usize,
) -> Vec<MaskPair> {
    if let Some(int) = &public.int {
        return int_pairs(int, rng, count);
    }
    let (d_in, d_out, m) = (public.d_in, public.d_out, public.m);
    let coeffs = float_coeffs(public, scale, rng, count);
    let round32 = |v: &mut Vec<f64>| v.iter_mut().for_each(|x| *x = f64::from(*x as f32));
    // The mask actually added, and the coefficients whose product with R_pub removes it.
    let (masks, coeffs) = match (&public.basis, precision) {
        (None, _) => (coeffs.clone(), coeffs),
        (Some(b), Precision::F64Gemm) => (matmul_f64(&coeffs, b, count, m, d_in), coeffs),
        (Some(b), Precision::F32 | Precision::Int) => {
            let mut r = matmul_f64(&coeffs, b, count, m, d_in);
            round32(&mut r);
            (r, coeffs)
        }
        (Some(b), Precision::F64Client) => {
            // The exact coefficients of the rounded mask: project it back onto the basis.
            let mut r = matmul_f64(&coeffs, b, count, m, d_in);
            round32(&mut r);
            let c = matmul_f64_nt(&r, b, count, d_in, m);
            (r, c)
        }
    };
    let products: Vec<f64> = if precision.r_pub_f64() && public.r_pub_f64.is_empty() {
        matmul_f64_f32(&coeffs, &public.r_pub_f32, count, m, d_out)
    } else if precision.r_pub_f64() {
        matmul_f64(&coeffs, &public.r_pub_f64, count, m, d_out)
    } else {
        let c32: Vec<f32> = coeffs.iter().map(|&x| x as f32).collect();
        matmul_f32(&c32, &public.r_pub_f32, count, m, d_out)
            .into_iter()
            .map(f64::from)
            .collect()
    };
    masks
        .chunks_exact(d_in)
        .zip(products.chunks_exact(d_out))
        .map(|(r, p)| MaskPair::Float {
            mask: r.to_vec(),
            product: p.to_vec(),
        })
        .collect()
}

/// Nanoseconds spent drawing masks and multiplying them out (pool or on the spot).
pub(crate) type OfflineClock = Arc<std::sync::atomic::AtomicU64>;

pub(crate) fn timed_pairs(
    clock: &OfflineClock,
    public: &OpPublic,
    scale: f64,
    precision: Precision,
    rng: &mut ChaCha20Rng,
    count: usize,
) -> Vec<MaskPair> {
    let t0 = std::time::Instant::now();
    let pairs = make_pairs(public, scale, precision, rng, count);
    clock.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    pairs
}

/// Wakes a pool worker: a flag and its condition variable.
pub(crate) type Wake = Arc<(Mutex<bool>, Condvar)>;

pub(crate) fn nudge(wake: &Wake) {
    let (lock, cv) = &**wake;
    *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
    cv.notify_one();
}

/// Fills every op's pool on a background thread, so the critical path pays only an add and a
/// subtract per element.
pub(crate) struct PoolWorker {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) wake: Wake,
    pub(crate) handle: Option<JoinHandle<()>>,
    /// How many ops it fills.
    pub(crate) ops: usize,
}

impl PoolWorker {
    pub(crate) fn start(
        ops: Vec<Arc<Mutex<OpState>>>,
        target: usize,
        precision: Precision,
        clock: OfflineClock,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let wake: Wake = Arc::new((Mutex::new(false), Condvar::new()));
        let n_ops = ops.len();
        let (stop2, wake2) = (stop.clone(), wake.clone());
        let handle = std::thread::Builder::new()
            .name("remo-pool".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let mut worked = false;
                    for op in &ops {
                        // Draw coefficients under the lock, multiply outside it.
                        let (public, scale, mut rng, need) = {
                            let mut s = op.lock().unwrap_or_else(|e| e.into_inner());
                            // Refill only below half full, to the top: batches of at least
                            // target/2 pairs amortise reading R_pub over many masks.
                            if s.pool.len() * 2 > target {
                                continue;
                            }
                            let need = target - s.pool.len();
                            let fork = ChaCha20Rng::from_seed(s.rng.random());
                            (s.public.clone(), s.scale, fork, need)
                        };
                        let pairs = timed_pairs(&clock, &public, scale, precision, &mut rng, need);
                        op.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .pool
                            .extend(pairs);
                        worked = true;
                        if stop2.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    if !worked {
                        let (lock, cv) = &*wake2;
                        let mut woken = lock.lock().unwrap_or_else(|e| e.into_inner());
                        if !*woken {
                            woken = cv
                                .wait_timeout(woken, Duration::from_millis(50))
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                        *woken = false;
                    }
                }
            })
            .ok();
        Self {
            stop,
            wake,
            handle,
            ops: n_ops,
        }
    }
}

impl Drop for PoolWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        nudge(&self.wake);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The mask pools of every session of one agent. A mask pair depends only on the op's public
/// weight and the configuration — with the identity basis (the default) and in the integer mode
/// that is the same for every session — so the sessions can draw from one pool per op, filled
/// by one thread: nothing is left over when a session ends, a new session finds masks ready,
/// and an agent with many sessions runs one pool thread instead of one each. Each pair is still
/// taken by exactly one call (under the op's lock), from a generator seeded by the operating
/// system. Sessions with an orthonormal basis (rank < d) keep pools of their own.
pub struct SharedPools {
    pub(crate) config: RemoConfig,
    pub(crate) ops: Mutex<HashMap<OpId, Arc<Mutex<OpState>>>>,
    pub(crate) worker: Mutex<Option<PoolWorker>>,
    pub(crate) clock: OfflineClock,
}

impl SharedPools {
    /// Pools for sessions of `config` (sessions of another configuration do not share them).
    pub fn new(config: RemoConfig) -> Self {
        Self {
            config,
            ops: Mutex::new(HashMap::new()),
            worker: Mutex::new(None),
            clock: OfflineClock::default(),
        }
    }

    /// Mask pairs ready in the pools, over all ops.
    pub fn ready(&self) -> usize {
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).pool.len())
            .sum()
    }

    /// Seconds the shared pool thread has spent making masks and their products.
    pub fn mask_generation_s(&self) -> f64 {
        self.clock.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// The op's shared state, made on first use with `public` and a fresh generator.
    pub(crate) fn state(&self, op: OpId, public: &PublicOp, scale: f64) -> Arc<Mutex<OpState>> {
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op)
            .or_insert_with(|| {
                Arc::new(Mutex::new(OpState::new(
                    public.public.clone(),
                    scale,
                    ChaCha20Rng::from_seed(rand::rng().random()),
                )))
            })
            .clone()
    }

    /// Starts (or, when ops were added since, restarts) the pool thread; its wake handle.
    pub(crate) fn start(&self) -> Option<Wake> {
        let ops: Vec<_> = self
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if self.config.pool == 0 || ops.is_empty() {
            return None;
        }
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if worker.as_ref().is_none_or(|w| w.ops < ops.len()) {
            // Dropping the old worker joins it first.
            *worker = None;
            *worker = Some(PoolWorker::start(
                ops,
                self.config.pool,
                self.config.precision,
                self.clock.clone(),
            ));
        }
        worker.as_ref().map(|w| w.wake.clone())
    }
}
