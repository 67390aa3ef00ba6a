//! Property tests of ReMO against an honest (or tampering) in-test cloud: a weight matrix and the
//! public algorithm, nothing else.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use talaria_engine::{BlockOp, OpId, Rows};
use talaria_params::{PadRows, Precision, Rank, RemoConfig};
use talaria_remo::{Masker, RemoError, SharedPools};
use talaria_wire::{RPub, SetupReply, SetupRequest, Tensor, expand_basis};

const OP: OpId = OpId::Block {
    layer: 3,
    op: BlockOp::Down,
};

/// The cloud: holds W (`d_in × d_out`, row-major) and answers set-up and calls.
struct Cloud {
    w: Vec<f64>,
    d_in: usize,
    d_out: usize,
}

impl Cloud {
    fn random(d_in: usize, d_out: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // f32-representable weights, as a dequantized model's are.
        let w = (0..d_in * d_out)
            .map(|_| f64::from(rng.random::<f32>() - 0.5))
            .collect();
        Self { w, d_in, d_out }
    }

    fn product(&self, x: &[f64], rows: usize) -> Vec<f64> {
        let mut y = vec![0.0; rows * self.d_out];
        for r in 0..rows {
            for i in 0..self.d_in {
                let xv = x[r * self.d_in + i];
                for o in 0..self.d_out {
                    y[r * self.d_out + o] += xv * self.w[i * self.d_out + o];
                }
            }
        }
        y
    }

    fn setup(&self, req: &SetupRequest) -> SetupReply {
        let (m, r) = match expand_basis(&req.basis, self.d_in) {
            None => (self.d_in, self.w.clone()),
            Some(b) => {
                let m = b.len() / self.d_in;
                (m, self.product(&b, m))
            }
        };
        let r_pub = if req.f64 {
            Tensor::F64 {
                rows: m,
                cols: self.d_out,
                data: r,
            }
        } else {
            Tensor::F32 {
                rows: m,
                cols: self.d_out,
                data: r.iter().map(|&v| v as f32).collect(),
            }
        };
        SetupReply {
            op: req.op,
            r_pub: RPub::Float(r_pub),
        }
    }

    fn call(&self, x: &Tensor) -> Tensor {
        let (rows, _) = x.shape();
        match x {
            Tensor::U64 { .. } => unreachable!("integer calls: tests/integer.rs"),
            Tensor::F64 { .. } => Tensor::F64 {
                rows,
                cols: self.d_out,
                data: self.product(&x.to_f64(), rows),
            },
            Tensor::F32 { data, .. } => {
                // An f32 GEMM: f32 inputs, f32 accumulation.
                let mut y = vec![0f32; rows * self.d_out];
                for r in 0..rows {
                    for i in 0..self.d_in {
                        let xv = data[r * self.d_in + i];
                        for o in 0..self.d_out {
                            y[r * self.d_out + o] += xv * self.w[i * self.d_out + o] as f32;
                        }
                    }
                }
                Tensor::F32 {
                    rows,
                    cols: self.d_out,
                    data: y,
                }
            }
        }
    }
}

/// The float configuration these tests exercise (the integer mode, the default, has its own
/// tests in tests/integer.rs).
fn float() -> RemoConfig {
    RemoConfig {
        precision: Precision::F64Gemm,
        dummy_rows: Precision::F64Gemm.default_dummy_rows(),
        // These tests are about the masks; length padding is tested in `freivalds.rs`.
        pad_rows: PadRows::Off,
        ..RemoConfig::default()
    }
}

fn masker(cloud: &Cloud, config: RemoConfig, seed: u8) -> Masker {
    let mut m = Masker::new(config, 9, Some([seed; 32])).unwrap();
    let req = m.setup_request(OP, cloud.d_in).unwrap();
    m.install(&req, cloud.setup(&req), cloud.d_in, cloud.d_out, 1.0)
        .unwrap();
    m.start_pool();
    m
}

fn rows(n: usize, d: usize, scale: f32, seed: u64) -> Rows {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Rows::new(
        n,
        d,
        (0..n * d)
            .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect(),
    )
    .unwrap()
}

fn max_err(got: &Rows, want: &[f64]) -> f64 {
    got.data()
        .iter()
        .zip(want)
        .fold(0f64, |a, (&g, &w)| a.max((f64::from(g) - w).abs()))
}

#[test]
fn unmasking_recovers_the_product_for_every_mode() {
    let mut case = 0u64;
    for precision in [Precision::F32, Precision::F64Client, Precision::F64Gemm] {
        for rank in [Rank::Full, Rank::Fraction(0.5)] {
            for (d_in, d_out, n) in [(32, 48, 1), (64, 16, 5), (40, 40, 3)] {
                case += 1;
                let cloud = Cloud::random(d_in, d_out, case);
                let config = RemoConfig {
                    rank,
                    precision,
                    scale: 30.0,
                    dummy_rows: 2,
                    shuffle: true,
                    pool: if case.is_multiple_of(2) { 4 } else { 0 },
                    ..float()
                };
                let mut m = masker(&cloud, config, case as u8);
                for call in 0..3 {
                    let x = rows(n, d_in, 1.0, case * 10 + call);
                    let want = cloud.product(
                        &x.data().iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                        n,
                    );
                    let (sent, pending) = m.mask(OP, &x).unwrap();
                    assert_eq!(sent.shape(), (n + 2, d_in));
                    let got = m.unmask(pending, &cloud.call(&sent)).unwrap();
                    let err = max_err(&got, &want);
                    // The error grows with the mask (σ·ρ = 30, rows of ~√d_in·30) in f32 modes.
                    let tol = match precision {
                        Precision::F64Gemm => 1e-5,
                        _ => 2e-2,
                    };
                    assert!(
                        err < tol,
                        "{precision:?} {rank:?} {d_in}x{d_out}: error {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn f64_client_is_more_accurate_than_f32() {
    let cloud = Cloud::random(256, 64, 5);
    let err_for = |precision| {
        let mut m = masker(
            &cloud,
            RemoConfig {
                precision,
                scale: 100.0,
                pool: 0,
                ..float()
            },
            1,
        );
        let mut worst = 0f64;
        for call in 0..8 {
            let x = rows(4, 256, 1.0, call);
            let want = cloud.product(
                &x.data().iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                4,
            );
            let (sent, p) = m.mask(OP, &x).unwrap();
            worst = worst.max(max_err(&m.unmask(p, &cloud.call(&sent)).unwrap(), &want));
        }
        worst
    };
    let (f32_err, client_err, gemm_err) = (
        err_for(Precision::F32),
        err_for(Precision::F64Client),
        err_for(Precision::F64Gemm),
    );
    assert!(
        client_err < f32_err,
        "f64 client {client_err} vs f32 {f32_err}"
    );
    assert!(
        gemm_err < 1e-4 && gemm_err < client_err / 100.0,
        "f64 gemm {gemm_err}"
    );
}

#[test]
fn masks_never_repeat() {
    let cloud = Cloud::random(16, 8, 1);
    let mut m = masker(&cloud, RemoConfig { pool: 8, ..float() }, 3);
    let zero = Rows::new(2, 16, vec![0.0; 32]).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let (sent, pending) = m.mask(OP, &zero).unwrap();
        for v in sent.to_f64().chunks(16) {
            let key: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
            assert!(seen.insert(key), "a mask was sent twice");
        }
        drop(pending);
    }
    assert_eq!(seen.len(), 200 * 4);
}

#[test]
fn the_mask_does_not_depend_on_the_row() {
    // Mask norms for rows of very different magnitude must have the same distribution.
    let cloud = Cloud::random(64, 8, 2);
    let mean_mask_norm = |scale: f32| {
        let mut m = masker(
            &cloud,
            RemoConfig {
                dummy_rows: 0,
                shuffle: false,
                pool: 0,
                ..float()
            },
            4,
        );
        let mut total = 0.0;
        for call in 0..200 {
            let x = rows(1, 64, scale, call);
            let (sent, _) = m.mask(OP, &x).unwrap();
            let d: f64 = sent
                .to_f64()
                .iter()
                .zip(x.data())
                .map(|(s, &v)| (s - f64::from(v)).powi(2))
                .sum();
            total += d.sqrt();
        }
        total / 200.0
    };
    let (small, large) = (mean_mask_norm(1e-3), mean_mask_norm(10.0));
    // Same seed, same draws: identical up to the rounding of x̃.
    assert!((small - large).abs() / small < 1e-6, "{small} vs {large}");
    let expected = 100.0 * 64f64.sqrt(); // σ·ρ·√d for the default σ = 100, ρ = 1
    assert!(
        (small - expected).abs() / expected < 0.05,
        "{small} vs {expected}"
    );
}

#[test]
fn a_corrupted_row_is_detected_by_freivalds_check_and_with_rank_below_d_by_the_canaries() {
    let cloud = Cloud::random(32, 16, 3);
    let tamper = |y: &Tensor, row: usize| -> Tensor {
        let mut y = y.clone();
        match &mut y {
            Tensor::F32 { data, cols, .. } => data[row * *cols] += 0.5,
            Tensor::F64 { data, cols, .. } => data[row * *cols] += 0.5,
            Tensor::U64 { .. } => unreachable!("a float session"),
        }
        y
    };
    let x = rows(3, 32, 1.0, 1);
    for precision in [Precision::F32, Precision::F64Client, Precision::F64Gemm] {
        let config = RemoConfig {
            precision,
            dummy_rows: 1,
            shuffle: false,
            pool: 0,
            ..float()
        };
        // Full rank: every row is verified, real or dummy.
        let mut m = masker(&cloud, config.clone(), 6);
        for row in 0..4 {
            let (sent, p) = m.mask(OP, &x).unwrap();
            let err = m.unmask(p, &tamper(&cloud.call(&sent), row)).unwrap_err();
            assert_eq!(
                err.error_type(),
                "integrity",
                "{precision:?} row {row}: {err}"
            );
        }
        let (sent, p) = m.mask(OP, &x).unwrap();
        assert!(m.unmask(p, &cloud.call(&sent)).is_ok());
        // Rank < d: the CVM holds only M·W, so only the canaries (the dummy rows, with their
        // products) can catch a cloud; without the shuffle the canary is the last row.
        let mut m = masker(
            &cloud,
            RemoConfig {
                rank: Rank::Fraction(0.5),
                ..config
            },
            6,
        );
        let (sent, p) = m.mask(OP, &x).unwrap();
        let err = m.unmask(p, &tamper(&cloud.call(&sent), 3)).unwrap_err();
        assert!(matches!(err, RemoError::Canary { .. }), "{err}");
        let (sent, p) = m.mask(OP, &x).unwrap();
        assert!(m.unmask(p, &tamper(&cloud.call(&sent), 0)).is_ok());
        let (sent, p) = m.mask(OP, &x).unwrap();
        assert!(m.unmask(p, &cloud.call(&sent)).is_ok());
    }
}

#[test]
fn bad_replies_and_inputs_are_typed_errors() {
    let cloud = Cloud::random(32, 16, 4);
    let mut m = masker(&cloud, float(), 7);
    let x = rows(2, 32, 1.0, 1);
    let (_, p) = m.mask(OP, &x).unwrap();
    let short = Tensor::F64 {
        rows: 1,
        cols: 16,
        data: vec![0.0; 16],
    };
    assert!(matches!(
        m.unmask(p, &short),
        Err(RemoError::ReplyShape { .. })
    ));
    let (sent, p) = m.mask(OP, &x).unwrap();
    let y = cloud.call(&sent);
    let as_f32 = Tensor::F32 {
        rows: 4,
        cols: 16,
        data: y.to_f64().iter().map(|&v| v as f32).collect(),
    };
    assert!(m.unmask(p, &as_f32).is_err());
    let (_, p) = m.mask(OP, &x).unwrap();
    let lying = Tensor::F64 {
        rows: 4,
        cols: 16,
        data: vec![0.0; 3],
    };
    assert!(matches!(m.unmask(p, &lying), Err(RemoError::Wire(_))));
    assert!(matches!(
        m.mask(OP, &rows(1, 31, 1.0, 1)),
        Err(RemoError::Shape { .. })
    ));
    assert!(matches!(
        m.mask(OpId::LmHead, &x),
        Err(RemoError::NotSetUp(_))
    ));
    assert!(
        Masker::new(
            RemoConfig {
                scale: -1.0,
                ..float()
            },
            1,
            None
        )
        .is_err()
    );
    assert!(
        Masker::new(
            RemoConfig {
                rank: Rank::Fraction(1.5),
                ..float()
            },
            1,
            None
        )
        .is_err()
    );
}

#[test]
fn masking_off_sends_the_rows_as_they_are() {
    let cloud = Cloud::random(8, 4, 5);
    let mut m = Masker::new(
        RemoConfig {
            enabled: false,
            ..float()
        },
        1,
        Some([1; 32]),
    )
    .unwrap();
    assert!(m.setup_request(OP, 8).is_none());
    let x = rows(3, 8, 1.0, 2);
    let (sent, p) = m.mask(OP, &x).unwrap();
    assert_eq!(
        sent.to_f64(),
        x.data().iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
    );
    let y = m.unmask(p, &cloud.call(&sent)).unwrap();
    assert_eq!(y.rows(), 3);
}

/// Waits (up to 20 s) until the shared pools hold `n` pairs.
fn wait_ready(pools: &SharedPools, n: usize) {
    let t0 = std::time::Instant::now();
    while pools.ready() < n {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "pools hold {} of {n} pairs",
            pools.ready()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn shared_masker(cloud: &Cloud, config: RemoConfig, pools: &Arc<SharedPools>) -> Masker {
    let mut m = Masker::new(config, 9, None).unwrap();
    m.share_pools(pools.clone());
    let req = m.setup_request(OP, cloud.d_in).unwrap();
    m.install(&req, cloud.setup(&req), cloud.d_in, cloud.d_out, 1.0)
        .unwrap();
    m.start_pool();
    m
}

#[test]
fn sessions_sharing_pools_get_fresh_masks_exact_products_and_a_warm_start() {
    let cloud = Cloud::random(16, 8, 5);
    let config = RemoConfig { pool: 8, ..float() };
    let pools = Arc::new(SharedPools::new(config.clone()));
    let mut a = shared_masker(&cloud, config.clone(), &pools);
    let mut b = shared_masker(&cloud, config.clone(), &pools);
    // Interleaved calls of two sessions: every mask sent is new, every product exact.
    let zero = Rows::new(1, 16, vec![0.0; 16]).unwrap();
    let mut seen = std::collections::HashSet::new();
    for call in 0..100u64 {
        let m = if call % 2 == 0 { &mut a } else { &mut b };
        let x = rows(2, 16, 1.0, call);
        let want = cloud.product(
            &x.data().iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            2,
        );
        let (sent, pending) = m.mask(OP, &x).unwrap();
        let got = m.unmask(pending, &cloud.call(&sent)).unwrap();
        assert!(max_err(&got, &want) < 1e-5, "call {call}");
        let (sent, _) = m.mask(OP, &zero).unwrap();
        for v in sent.to_f64().chunks(16) {
            let key: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
            assert!(seen.insert(key), "a mask was sent twice");
        }
    }
    assert_eq!(seen.len(), 100 * 3);
    // The sessions end; their pool does not: a new session starts with masks ready.
    drop((a, b));
    wait_ready(&pools, 3);
    let mut c = shared_masker(&cloud, config.clone(), &pools);
    let (sent, pending) = c.mask(OP, &zero).unwrap();
    c.unmask(pending, &cloud.call(&sent)).unwrap();
    // One pair for the real row; the two dummies are cover rows, pure masks with no product.
    assert_eq!((c.stats().pool_hits, c.stats().pool_misses), (1, 0));
    // ... made by the agent's pool thread: the session has none of its own.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(c.stats().mask_generation_s, 0.0);
    assert!(pools.mask_generation_s() > 0.0);
    // A session of another configuration, or with a basis of its own, keeps its own pool.
    for (session, shared) in [
        (
            RemoConfig {
                dummy_rows: 3,
                ..config.clone()
            },
            config.clone(),
        ),
        (
            RemoConfig {
                rank: Rank::Fraction(0.5),
                ..config.clone()
            },
            RemoConfig {
                rank: Rank::Fraction(0.5),
                ..config.clone()
            },
        ),
    ] {
        let pools = Arc::new(SharedPools::new(shared));
        let mut d = shared_masker(&cloud, session, &pools);
        for call in 0..4 {
            let x = rows(2, 16, 1.0, call);
            let (sent, pending) = d.mask(OP, &x).unwrap();
            d.unmask(pending, &cloud.call(&sent)).unwrap();
        }
        assert_eq!(
            pools.ready(),
            0,
            "a session of its own used the shared pools"
        );
    }
}
