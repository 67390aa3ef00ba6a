//! The integer mode against an in-test cloud that holds an integer weight and answers with the
//! wrapping product: exactness against the plain fixed-point engine, length padding, a tampered
//! cover row, the overflow path (the cheating clouds of issue 23 are in `freivalds.rs`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use talaria_engine::{BlockOp, OpId, Rows};
use talaria_kernels::{INT_BLOCK, IntWeight, int_matmul};
use talaria_params::{PadRows, Precision, RemoConfig};
use talaria_remo::{FixedPointLinear, Masker, RemoError};
use talaria_wire::{RPub, SetupReply, Tensor};

const OP: OpId = OpId::Block {
    layer: 2,
    op: BlockOp::GateUp,
};

/// A weight shaped like a Q4_1 tensor's at shift 18: codes 0..16, scales and minimums of a
/// few thousand, and a norm gain.
fn weight(d_in: usize, d_out: usize, seed: u64) -> IntWeight {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blocks = d_in / INT_BLOCK * d_out;
    IntWeight {
        d_in,
        d_out,
        codes: (0..d_in * d_out).map(|_| rng.random_range(0..16)).collect(),
        scales: (0..blocks)
            .map(|_| rng.random_range(1..4000i64) as u64)
            .collect(),
        mins: (0..blocks)
            .map(|_| rng.random_range(-30000..0i64) as u64)
            .collect(),
        shift: 18,
        gain: Some((0..d_in).map(|_| rng.random_range(0.5..2.0)).collect()),
    }
}

fn masker(w: &IntWeight, config: RemoConfig) -> Masker {
    let mut m = Masker::new(config, 4, Some([3; 32])).unwrap();
    let req = m.setup_request(OP, w.d_in).unwrap();
    assert!(req.integer);
    let reply = SetupReply {
        op: OP,
        r_pub: RPub::Int(w.clone()),
    };
    m.install(&req, reply, w.d_in, w.d_out, 1.0).unwrap();
    m.start_pool();
    m
}

fn cloud(w: &IntWeight, x: &Tensor) -> Tensor {
    let Tensor::U64 { rows, data, .. } = x else {
        panic!("the integer mode sends residues, got {}", x.precision())
    };
    Tensor::U64 {
        rows: *rows,
        cols: w.d_out,
        data: int_matmul(data, *rows, w),
    }
}

fn rows(n: usize, d: usize, scale: f32, seed: u64) -> Rows {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = (0..n * d)
        .map(|_| scale * rng.random_range(-1.0..1.0f32))
        .collect();
    Rows::new(n, d, data).unwrap()
}

fn int_config() -> RemoConfig {
    RemoConfig {
        precision: Precision::Int,
        frac_bits: 30,
        ..Default::default()
    }
}

#[test]
fn unmasked_products_equal_the_plain_fixed_point_products_bit_for_bit() {
    let w = weight(96, 80, 1);
    for (pool, shuffle, dummies) in [(0, true, 2), (4, false, 0), (8, true, 5)] {
        let config = RemoConfig {
            pool,
            shuffle,
            dummy_rows: dummies,
            ..int_config()
        };
        let mut m = masker(&w, config.clone());
        let mut plain = FixedPointLinear::new(config.frac_bits);
        plain.install(OP, w.clone(), 96, 80).unwrap();
        for (n, seed) in [(1, 1), (5, 2), (3, 3)] {
            let x = rows(n, 96, 3.0, seed);
            let (sent, pending) = m.mask(OP, &x).unwrap();
            // Every call here is of the session's first pass (no LM head yet): padded to its
            // bucket, then the dummies.
            let padded = config.pad_rows.bucket(n, usize::MAX);
            assert_eq!(padded, 16);
            assert_eq!(sent.shape(), (padded + dummies, 96));
            let got = m.unmask_exact(pending, &cloud(&w, &sent)).unwrap();
            let want = plain.product(OP, &x).unwrap();
            assert_eq!(got, want, "pool {pool}, {n} rows");
            // And the decoded rows are the real product, to the fixed point's precision.
            let y = got.decode().unwrap();
            for r in 0..n {
                for j in 0..80 {
                    let exact: f64 = (0..96)
                        .map(|i| {
                            f64::from(x.row(r)[i])
                                * f64::from(w.gain.as_ref().unwrap()[i])
                                * w.at(i, j) as f64
                                / 2f64.powi(18)
                        })
                        .sum();
                    let err = (f64::from(y.row(r)[j]) - exact).abs();
                    assert!(err <= 1e-6 * exact.abs().max(1.0), "{err} at {r},{j}");
                }
            }
        }
    }
}

#[test]
fn the_cloud_sees_fresh_uniform_residues() {
    let w = weight(64, 32, 2);
    let mut m = masker(
        &w,
        RemoConfig {
            shuffle: false,
            dummy_rows: 0,
            pad_rows: PadRows::Off,
            ..int_config()
        },
    );
    // The same row twice, and a zero row: every sent value differs, and the top bits (where a
    // fixed-point value of this size has only sign bits) are evenly spread.
    let x = rows(1, 64, 1.0, 9);
    let (a, _) = m.mask(OP, &x).unwrap();
    let (b, _) = m.mask(OP, &x).unwrap();
    let (Tensor::U64 { data: a, .. }, Tensor::U64 { data: b, .. }) = (a, b) else {
        panic!()
    };
    assert!(a.iter().zip(&b).all(|(p, q)| p != q));
    let mut ones = 0;
    for _ in 0..200 {
        let (t, _) = m.mask(OP, &x).unwrap();
        let Tensor::U64 { data, .. } = t else {
            panic!()
        };
        ones += data.iter().filter(|&&v| v >> 63 == 1).count();
    }
    let frac = ones as f64 / (200.0 * 64.0);
    assert!((frac - 0.5).abs() < 0.02, "top bit set in {frac} of values");
}

#[test]
fn a_changed_cover_row_value_is_caught() {
    let w = weight(64, 32, 3);
    let mut m = masker(
        &w,
        RemoConfig {
            shuffle: false,
            dummy_rows: 2,
            ..int_config()
        },
    );
    let x = rows(2, 64, 1.0, 4);
    let (sent, p) = m.mask(OP, &x).unwrap();
    assert_eq!(m.stats().padding_rows, 14);
    let mut y = cloud(&w, &sent);
    let Tensor::U64 { data, cols, .. } = &mut y else {
        panic!()
    };
    // Without the shuffle the last row is a dummy: its output is dropped, but Freivalds'
    // check verifies it like every row. Flip its lowest bit.
    let last = data.len() - *cols;
    data[last] ^= 1;
    match m.unmask_exact(p, &y) {
        Err(e @ RemoError::Integrity { .. }) => assert_eq!(e.error_type(), "integrity"),
        other => panic!("expected an integrity error, got {other:?}"),
    }
    // A float reply to an integer call is refused.
    let (_, p) = m.mask(OP, &x).unwrap();
    let float = Tensor::F64 {
        rows: 18,
        cols: 32,
        data: vec![0.0; 18 * 32],
    };
    assert_eq!(m.unmask(p, &float).unwrap_err().error_type(), "wire");
}

#[test]
fn large_rows_get_fewer_fractional_bits_and_stay_exact_and_huge_ones_are_refused() {
    let w = weight(64, 48, 5);
    let config = RemoConfig {
        frac_bits: 40,
        ..int_config()
    };
    let mut m = masker(&w, config);
    let mut plain = FixedPointLinear::new(40);
    plain.install(OP, w.clone(), 64, 48).unwrap();
    // A massive activation, as layer 11's down projection sees: it cannot keep 40 bits.
    let x = rows(2, 64, 3.0e4, 6);
    let (sent, pending) = m.mask(OP, &x).unwrap();
    let got = m.unmask_exact(pending, &cloud(&w, &sent)).unwrap();
    assert!(got.frac_bits.iter().all(|&f| f < 40), "{:?}", got.frac_bits);
    assert_eq!(m.stats().downshifted_rows, 2);
    assert_eq!(got, plain.product(OP, &x).unwrap());
    // Every product is within 63 bits by the bound; check the largest one has room left.
    let peak = got.values.iter().map(|v| v.unsigned_abs()).max().unwrap();
    assert!(peak < 1 << 62, "{peak}");
    // A row that cannot fit with 10 fractional bits is a typed error, and costs no pads.
    let huge = rows(1, 64, 1.0e30, 7);
    let err = m.mask(OP, &huge).err().unwrap();
    assert_eq!(err.error_type(), "fixed_point_overflow");
    let inf = Rows::new(1, 64, vec![f32::INFINITY; 64]).unwrap();
    assert_eq!(
        m.mask(OP, &inf).err().unwrap().error_type(),
        "fixed_point_overflow"
    );
    // The session goes on.
    let (sent, pending) = m.mask(OP, &rows(1, 64, 1.0, 8)).unwrap();
    assert!(m.unmask(pending, &cloud(&w, &sent)).is_ok());
}

#[test]
fn the_integer_mode_is_full_rank_only_and_checks_the_weight_it_gets() {
    let bad = RemoConfig {
        rank: talaria_params::Rank::Fraction(0.5),
        ..int_config()
    };
    assert!(bad.validate().is_err());
    assert!(
        RemoConfig {
            frac_bits: 4,
            ..int_config()
        }
        .validate()
        .is_err()
    );
    let w = weight(64, 32, 6);
    let mut m = Masker::new(int_config(), 1, None).unwrap();
    let req = m.setup_request(OP, 64).unwrap();
    let wrong_shape = SetupReply {
        op: OP,
        r_pub: RPub::Int(w.clone()),
    };
    assert!(m.install(&req, wrong_shape, 64, 33, 1.0).is_err());
    let short = IntWeight {
        codes: vec![0; 10].into(),
        ..w
    };
    let reply = SetupReply {
        op: OP,
        r_pub: RPub::Int(short),
    };
    assert_eq!(
        m.install(&req, reply, 64, 32, 1.0)
            .unwrap_err()
            .error_type(),
        "remo_setup"
    );
}
