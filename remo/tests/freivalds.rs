//! Freivalds' check against clouds that cheat in each way issue 23 lists, counted over enough
//! trials to compare with the documented bound (`docs/remo.md`, "Verifying every product"), and
//! the power controls: the same check weakened (one vector, no range check) lets the ring's
//! high-bit errors through at the rate the argument predicts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use talaria_engine::{BlockOp, OpId, Rows};
use talaria_kernels::{INT_BLOCK, IntWeight, int_matmul, int_weight_times};
use talaria_params::{PadRows, Precision, RemoConfig};
use talaria_remo::Masker;
use talaria_remo::verify::int_vectors_for;
use talaria_wire::{RPub, SetupReply, Tensor};

const OP: OpId = OpId::Block {
    layer: 5,
    op: BlockOp::Down,
};

/// A Q4_1-shaped weight at shift 18, as `tests/integer.rs` uses.
fn int_weight(d_in: usize, d_out: usize, seed: u64) -> IntWeight {
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
        gain: None,
    }
}

fn int_masker(w: &IntWeight, config: RemoConfig, seed: u8) -> Masker {
    let mut m = Masker::new(config, 4, Some([seed; 32])).unwrap();
    let req = m.setup_request(OP, w.d_in).unwrap();
    let reply = SetupReply {
        op: OP,
        r_pub: RPub::Int(w.clone()),
    };
    m.install(&req, reply, w.d_in, w.d_out, 1.0).unwrap();
    m
}

fn rows(n: usize, d: usize, scale: f32, rng: &mut ChaCha8Rng) -> Rows {
    let data = (0..n * d)
        .map(|_| scale * rng.random_range(-1.0..1.0f32))
        .collect();
    Rows::new(n, d, data).unwrap()
}

fn u64_data(t: &mut Tensor) -> (&mut Vec<u64>, usize) {
    match t {
        Tensor::U64 { data, cols, .. } => (data, *cols),
        other => panic!("expected residues, got {}", other.precision()),
    }
}

/// How a cheating cloud changes an honest reply. `real` lists the slots holding real rows (the
/// test knows them because it turned the shuffle off), `other` is an honest reply to another
/// call of the same shape.
#[derive(Debug, Clone, Copy)]
enum Cheat {
    /// Adds `2^j` to one element of one real row.
    PowerOfTwo(u32),
    /// Adds uniform errors to a random number of elements of a random real row.
    Random,
    /// Returns another call's reply.
    OtherReply,
    /// Swaps a real row with another row.
    Swap,
    /// Zeroes a real row.
    Zero,
}

fn cheat_u64(y: &mut Tensor, cheat: Cheat, real: usize, other: &Tensor, rng: &mut ChaCha8Rng) {
    let (rows_total, _) = y.shape();
    let (data, cols) = u64_data(y);
    let r = rng.random_range(0..real);
    let row = r * cols..(r + 1) * cols;
    match cheat {
        Cheat::PowerOfTwo(j) => {
            let c = rng.random_range(0..cols);
            data[r * cols + c] = data[r * cols + c].wrapping_add(1u64 << j);
        }
        Cheat::Random => {
            let count = rng.random_range(1..=cols);
            for _ in 0..count {
                let c = rng.random_range(0..cols);
                data[r * cols + c] = data[r * cols + c].wrapping_add(rng.random());
            }
        }
        Cheat::OtherReply => {
            let Tensor::U64 { data: o, .. } = other else {
                panic!()
            };
            data.copy_from_slice(o);
        }
        Cheat::Swap => {
            let s = (r + 1 + rng.random_range(0..rows_total - 1)) % rows_total;
            for c in 0..cols {
                data.swap(r * cols + c, s * cols + c);
            }
        }
        Cheat::Zero => data[row].iter_mut().for_each(|v| *v = 0),
    }
}

/// Runs `trials` calls of `n` rows against a cloud that cheats with `cheat` on each; returns how
/// many cheats were caught (as typed `integrity` errors).
fn int_trials(
    m: &mut Masker,
    w: &IntWeight,
    cheat: Cheat,
    n: usize,
    scale: f32,
    trials: usize,
    rng: &mut ChaCha8Rng,
) -> usize {
    let mut caught = 0;
    for _ in 0..trials {
        let x = rows(n, w.d_in, scale, rng);
        let (sent, pending) = m.mask(OP, &x).unwrap();
        let (other_sent, _) = m.mask(OP, &rows(n, w.d_in, scale, rng)).unwrap();
        let Tensor::U64 { data, rows: r, .. } = &sent else {
            panic!()
        };
        let mut y = Tensor::U64 {
            rows: *r,
            cols: w.d_out,
            data: int_matmul(data, *r, w),
        };
        let other = match &other_sent {
            Tensor::U64 { data, rows: r, .. } => Tensor::U64 {
                rows: *r,
                cols: w.d_out,
                data: int_matmul(data, *r, w),
            },
            _ => panic!(),
        };
        let before = y.clone();
        cheat_u64(&mut y, cheat, n, &other, rng);
        if y == before {
            // A swap of two equal rows changes nothing: not a cheat.
            caught += 1;
            continue;
        }
        if let Err(e) = m.unmask_exact(pending, &y) {
            assert_eq!(e.error_type(), "integrity", "{cheat:?}: {e}");
            caught += 1;
        }
    }
    caught
}

fn int_config() -> RemoConfig {
    RemoConfig {
        shuffle: false,
        pool: 0,
        ..RemoConfig::default()
    }
}

#[test]
fn the_integer_check_catches_every_cheat_at_least_as_often_as_its_bound() {
    let w = int_weight(128, 96, 1);
    let mut m = int_masker(&w, int_config(), 1);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Ordinary rows (bound ~2^48) and massive ones (bound just under 2^62, fewer fractional
    // bits): e = 2^j in one element, for every j, 12 trials each; real rows are checked with 10
    // vectors, which a bound below 2^62 needs at most.
    let mut trials = 0;
    for scale in [1.0f32, 3.0e4] {
        for j in 0..64 {
            let caught = int_trials(&mut m, &w, Cheat::PowerOfTwo(j), 2, scale, 12, &mut rng);
            assert_eq!(caught, 12, "2^{j} at row scale {scale}");
            trials += 12;
        }
    }
    for (cheat, n) in [
        (Cheat::Random, 3),
        (Cheat::OtherReply, 3),
        (Cheat::Swap, 3),
        (Cheat::Zero, 3),
        (Cheat::Zero, 1),
    ] {
        for scale in [1.0f32, 3.0e4] {
            let caught = int_trials(&mut m, &w, cheat, n, scale, 100, &mut rng);
            assert_eq!(caught, 100, "{cheat:?}, {n} rows at scale {scale}");
            trials += 100;
        }
    }
    // 2536 cheats, each passing with probability at most 2^-20: all caught (a pass would
    // be a 0.24 % event if every cheat were at the bound; most are far below it).
    assert_eq!(trials, 2536);
    // After each failure the op's vectors were retired and new ones made: never reused.
    let made = m.stats().check_vectors_made;
    assert!(
        made as usize >= trials,
        "{made} vectors made over {trials} failures"
    );
}

#[test]
fn an_honest_cloud_never_fails_the_integer_check_and_the_vectors_are_made_once() {
    let w = int_weight(128, 96, 2);
    let mut m = int_masker(
        &w,
        RemoConfig {
            shuffle: true,
            dummy_rows: 3,
            ..int_config()
        },
        2,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for call in 0..300 {
        let scale = [1e-3f32, 1.0, 30.0, 3.0e4][call % 4];
        let x = rows(1 + call % 7, 128, scale, &mut rng);
        let (sent, pending) = m.mask(OP, &x).unwrap();
        let Tensor::U64 { data, rows: r, .. } = &sent else {
            panic!()
        };
        let y = Tensor::U64 {
            rows: *r,
            cols: 96,
            data: int_matmul(data, *r, &w),
        };
        m.unmask_exact(pending, &y).unwrap();
    }
    // All 20 made at the op's first call, whatever the rows: the check's timing depends on row
    // counts only. A bound just under 2^62 needs 10 (real rows); a cover row, unbounded, 20.
    assert_eq!(m.stats().check_vectors_made, 20);
    assert_eq!(int_vectors_for((1 << 62) - 1), 10);
    assert_eq!(int_vectors_for(u64::MAX), 20);
}

#[test]
fn the_power_control_one_vector_without_the_range_check_lets_high_bit_errors_through() {
    // The weakened check — one uniform v, no range check — on an error 2^j in one element
    // passes with probability 2^(j-64): 1/2 at j = 63, 1/4 at 62, 1/16 at 60. Measured here,
    // so the argument that needs the range check and k vectors is not vacuous.
    let w = int_weight(64, 48, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let x: Vec<u64> = (0..64).map(|_| rng.random()).collect();
    let y = int_matmul(&x, 1, &w);
    let dot = |a: &[u64], b: &[u64]| {
        a.iter()
            .zip(b)
            .fold(0u64, |s, (&p, &q)| s.wrapping_add(p.wrapping_mul(q)))
    };
    let trials = 4000;
    for (j, expect) in [(63u32, 0.5), (62, 0.25), (60, 1.0 / 16.0), (40, 0.0)] {
        let mut passed = 0;
        for _ in 0..trials {
            let v: Vec<u64> = (0..48).map(|_| rng.random()).collect();
            let u = &int_weight_times(&w, std::slice::from_ref(&v))[0];
            let mut bad = y.clone();
            let c = rng.random_range(0..48);
            bad[c] = bad[c].wrapping_add(1 << j);
            if dot(&bad, &v) == dot(&x, u) {
                passed += 1;
            }
        }
        let rate = passed as f64 / trials as f64;
        // Four binomial standard deviations.
        let sd = (expect * (1.0 - expect) / trials as f64).sqrt();
        assert!(
            (rate - expect).abs() <= 4.0 * sd + 1e-9,
            "2^{j}: passed {rate}, expected {expect}"
        );
    }
}

/// The float cloud: W in f32, its GEMM in the mode's arithmetic.
struct FloatCloud {
    w: Vec<f32>,
    d_in: usize,
    d_out: usize,
}

impl FloatCloud {
    fn new(d_in: usize, d_out: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            w: (0..d_in * d_out)
                .map(|_| rng.random::<f32>() * 0.1 - 0.05)
                .collect(),
            d_in,
            d_out,
        }
    }

    fn call(&self, x: &Tensor) -> Tensor {
        let (rows, _) = x.shape();
        match x {
            Tensor::F64 { data, .. } => {
                let mut y = vec![0f64; rows * self.d_out];
                for r in 0..rows {
                    for i in 0..self.d_in {
                        for o in 0..self.d_out {
                            y[r * self.d_out + o] +=
                                data[r * self.d_in + i] * f64::from(self.w[i * self.d_out + o]);
                        }
                    }
                }
                Tensor::F64 {
                    rows,
                    cols: self.d_out,
                    data: y,
                }
            }
            Tensor::F32 { data, .. } => {
                let mut y = vec![0f32; rows * self.d_out];
                for r in 0..rows {
                    for i in 0..self.d_in {
                        for o in 0..self.d_out {
                            y[r * self.d_out + o] +=
                                data[r * self.d_in + i] * self.w[i * self.d_out + o];
                        }
                    }
                }
                Tensor::F32 {
                    rows,
                    cols: self.d_out,
                    data: y,
                }
            }
            Tensor::U64 { .. } => panic!("a float session"),
        }
    }
}

fn float_masker(cloud: &FloatCloud, precision: Precision, seed: u8) -> Masker {
    let config = RemoConfig {
        precision,
        shuffle: false,
        pool: 0,
        dummy_rows: 2,
        pad_rows: PadRows::Off,
        ..RemoConfig::default()
    };
    let mut m = Masker::new(config, 4, Some([seed; 32])).unwrap();
    let req = m.setup_request(OP, cloud.d_in).unwrap();
    let r_pub = if req.f64 {
        Tensor::F64 {
            rows: cloud.d_in,
            cols: cloud.d_out,
            data: cloud.w.iter().map(|&v| f64::from(v)).collect(),
        }
    } else {
        Tensor::F32 {
            rows: cloud.d_in,
            cols: cloud.d_out,
            data: cloud.w.clone(),
        }
    };
    let reply = SetupReply {
        op: OP,
        r_pub: RPub::Float(r_pub),
    };
    m.install(&req, reply, cloud.d_in, cloud.d_out, 1.0)
        .unwrap();
    m
}

/// Applies a cheat to a float reply (row 0 is real: no shuffle); `rel` scales the single-element
/// error to the reply's largest magnitude.
fn cheat_float(y: &mut Tensor, cheat: Cheat, other: &Tensor, rel: f64, rng: &mut ChaCha8Rng) {
    let (rows_total, cols) = y.shape();
    let mut v = y.to_f64();
    let peak = v.iter().fold(0f64, |a, x| a.max(x.abs()));
    match cheat {
        Cheat::PowerOfTwo(_) => {
            let c = rng.random_range(0..cols);
            v[c] += peak * rel;
        }
        Cheat::Random => {
            for x in v.iter_mut().take(cols) {
                *x += peak * rng.random_range(-1.0..1.0);
            }
        }
        Cheat::OtherReply => v = other.to_f64(),
        Cheat::Swap => {
            let s = 1 + rng.random_range(0..rows_total - 1);
            for c in 0..cols {
                v.swap(c, s * cols + c);
            }
        }
        Cheat::Zero => v[..cols].iter_mut().for_each(|x| *x = 0.0),
    }
    *y = match y {
        Tensor::F32 { rows, cols, .. } => Tensor::F32 {
            rows: *rows,
            cols: *cols,
            data: v.iter().map(|&x| x as f32).collect(),
        },
        Tensor::F64 { rows, cols, .. } => Tensor::F64 {
            rows: *rows,
            cols: *cols,
            data: v,
        },
        Tensor::U64 { .. } => unreachable!(),
    };
}

/// Share of `trials` cheats caught in a float mode.
fn float_caught(
    cloud: &FloatCloud,
    m: &mut Masker,
    cheat: Cheat,
    rel: f64,
    trials: usize,
    rng: &mut ChaCha8Rng,
) -> f64 {
    let mut caught = 0;
    for _ in 0..trials {
        let x = rows(2, cloud.d_in, 1.0, rng);
        let (sent, pending) = m.mask(OP, &x).unwrap();
        let (other, _) = m.mask(OP, &rows(2, cloud.d_in, 1.0, rng)).unwrap();
        let mut y = cloud.call(&sent);
        cheat_float(&mut y, cheat, &cloud.call(&other), rel, rng);
        if let Err(e) = m.unmask(pending, &y) {
            assert_eq!(e.error_type(), "integrity", "{cheat:?}: {e}");
            caught += 1;
        }
    }
    caught as f64 / trials as f64
}

#[test]
fn the_float_checks_catch_gross_cheats_always_and_errors_below_the_rounding_bound_never() {
    let cloud = FloatCloud::new(96, 64, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for precision in [Precision::F32, Precision::F64Client, Precision::F64Gemm] {
        let mut m = float_masker(&cloud, precision, 5);
        // An honest cloud never fails, over many calls.
        for _ in 0..200 {
            let scale = [1e-3f32, 1.0, 50.0][rng.random_range(0..3)];
            let x = rows(3, 96, scale, &mut rng);
            let (sent, pending) = m.mask(OP, &x).unwrap();
            m.unmask(pending, &cloud.call(&sent))
                .unwrap_or_else(|e| panic!("{precision:?}: an honest reply failed: {e}"));
        }
        for cheat in [Cheat::Random, Cheat::OtherReply, Cheat::Swap, Cheat::Zero] {
            let rate = float_caught(&cloud, &mut m, cheat, 0.0, 100, &mut rng);
            assert_eq!(rate, 1.0, "{precision:?} {cheat:?}");
        }
        // One element off by a share of the reply's peak: caught down to the mode's rounding
        // bound; far below it, not (what the tolerance lets through: docs/remo.md).
        let (always, never) = match precision {
            Precision::F64Gemm => (2f64.powi(-30), 2f64.powi(-50)),
            _ => (2f64.powi(-8), 2f64.powi(-24)),
        };
        let rate = float_caught(&cloud, &mut m, Cheat::PowerOfTwo(0), always, 100, &mut rng);
        assert_eq!(rate, 1.0, "{precision:?}: error {always:e} of the peak");
        let rate = float_caught(&cloud, &mut m, Cheat::PowerOfTwo(0), never, 100, &mut rng);
        assert_eq!(rate, 0.0, "{precision:?}: error {never:e} of the peak");
    }
}

#[test]
fn length_padding_sends_buckets_of_verified_cover_rows() {
    let w = int_weight(64, 32, 6);
    let mut m = int_masker(
        &w,
        RemoConfig {
            pad_rows: PadRows::Pow2(16),
            ..int_config()
        },
        6,
    );
    m.set_context(100);
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    // The first pass (before the LM head): even one row is padded; longer calls go to their
    // power of two, never past the context.
    for (n, want) in [(1, 16), (5, 16), (16, 16), (17, 32), (65, 100), (100, 100)] {
        let (sent, pending) = m.mask(OP, &rows(n, 64, 1.0, &mut rng)).unwrap();
        assert_eq!(sent.shape().0, want, "{n} rows");
        let Tensor::U64 { data, rows: r, .. } = &sent else {
            panic!()
        };
        let mut y = Tensor::U64 {
            rows: *r,
            cols: 32,
            data: int_matmul(data, *r, &w),
        };
        // The padding rows are verified like every row: the last one is a cover row here.
        if want > n {
            let (d, cols) = u64_data(&mut y);
            let last = d.len() - cols;
            d[last] ^= 1 << 7;
            assert_eq!(
                m.unmask_exact(pending, &y).unwrap_err().error_type(),
                "integrity"
            );
        } else {
            m.unmask_exact(pending, &y).unwrap();
        }
    }
    assert_eq!(m.stats().padding_rows, 15 + 11 + 15 + 35);
    // `max` pads every prefill to the context length, and needs to know it.
    let mut unset = int_masker(
        &w,
        RemoConfig {
            pad_rows: PadRows::Max,
            ..int_config()
        },
        7,
    );
    assert_eq!(
        unset
            .mask(OP, &rows(3, 64, 1.0, &mut rng))
            .err()
            .unwrap()
            .error_type(),
        "remo_config"
    );
    unset.set_context(48);
    let (sent, _) = unset.mask(OP, &rows(3, 64, 1.0, &mut rng)).unwrap();
    assert_eq!(sent.shape().0, 48);
}

#[test]
fn a_top_bit_error_in_a_cover_row_passes_no_more_often_than_the_bound() {
    // The probe that would tell cover rows from real ones: 2^63 added to one row. A real row
    // fails it always (the range check); a cover row, which has no range check, passes each
    // vector half the time, so it gets 20 vectors: at most 2^-20, not the 1/4 of 2 vectors.
    let w = int_weight(64, 32, 8);
    let mut m = int_masker(&w, int_config(), 8);
    m.set_context(64);
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let (mut cover_passed, mut real_passed) = (0, 0);
    for trial in 0..400 {
        // 3 real rows padded to 16 (no shuffle: rows 3..16 are cover rows).
        let x = rows(3, 64, 1.0, &mut rng);
        let (sent, pending) = m.mask(OP, &x).unwrap();
        let Tensor::U64 { data, rows: r, .. } = &sent else {
            panic!()
        };
        assert_eq!(*r, 16);
        let mut y = Tensor::U64 {
            rows: 16,
            cols: 32,
            data: int_matmul(data, 16, &w),
        };
        let row = if trial % 2 == 0 {
            3 + trial % 13
        } else {
            trial % 3
        };
        let (d, cols) = u64_data(&mut y);
        d[row * cols + 5] = d[row * cols + 5].wrapping_add(1 << 63);
        if m.unmask_exact(pending, &y).is_ok() {
            if row >= 3 {
                cover_passed += 1;
            } else {
                real_passed += 1;
            }
        }
    }
    assert_eq!((cover_passed, real_passed), (0, 0));
}

#[test]
fn infinities_and_overflowing_values_fail_the_float_check() {
    // An infinity makes the rounding tolerance infinite; an f64 near the top of its range makes
    // |ỹ|·|v| overflow to one. Either must fail, never pass everything (with greedy decoding it
    // would let the cloud choose the token).
    let cloud = FloatCloud::new(96, 64, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    for precision in [Precision::F32, Precision::F64Client, Precision::F64Gemm] {
        let mut m = float_masker(&cloud, precision, 9);
        let mut values = vec![f64::INFINITY, f64::NEG_INFINITY, f64::NAN];
        if precision == Precision::F64Gemm {
            values.extend([-2.5e305, 1e306]);
        }
        for bad in values {
            for whole_row in [false, true] {
                let x = rows(2, 96, 1.0, &mut rng);
                let (sent, pending) = m.mask(OP, &x).unwrap();
                let mut y = cloud.call(&sent);
                match &mut y {
                    Tensor::F32 { data, .. } => {
                        let end = if whole_row { 63 } else { 1 };
                        data[..end].iter_mut().for_each(|v| *v = bad as f32);
                    }
                    Tensor::F64 { data, .. } => {
                        let end = if whole_row { 63 } else { 1 };
                        data[..end].iter_mut().for_each(|v| *v = bad);
                    }
                    Tensor::U64 { .. } => unreachable!(),
                }
                let err = m.unmask(pending, &y).err();
                assert_eq!(
                    err.map(|e| e.error_type()),
                    Some("integrity"),
                    "{precision:?}: {bad:e} (whole row: {whole_row})"
                );
            }
        }
    }
}

#[test]
fn vectors_retired_by_one_session_fail_another_sessions_calls_in_flight() {
    use std::sync::Arc;
    use talaria_remo::SharedPools;
    let w = int_weight(64, 32, 10);
    let config = RemoConfig {
        pool: 4,
        ..int_config()
    };
    let pools = Arc::new(SharedPools::new(config.clone()));
    let session = |seed: u8| {
        let mut m = Masker::new(config.clone(), u64::from(seed), None).unwrap();
        m.share_pools(pools.clone());
        let req = m.setup_request(OP, 64).unwrap();
        let reply = SetupReply {
            op: OP,
            r_pub: RPub::Int(w.clone()),
        };
        m.install(&req, reply, 64, 32, 1.0).unwrap();
        m
    };
    let (mut a, mut b) = (session(1), session(2));
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    let honest = |sent: &Tensor| {
        let Tensor::U64 { data, rows: r, .. } = sent else {
            panic!()
        };
        Tensor::U64 {
            rows: *r,
            cols: 32,
            data: int_matmul(data, *r, &w),
        }
    };
    // Both sessions' calls are masked with the agent's vectors for the op.
    let (sa, pa) = a.mask(OP, &rows(2, 64, 1.0, &mut rng)).unwrap();
    let (sb, pb) = b.mask(OP, &rows(2, 64, 1.0, &mut rng)).unwrap();
    // The cloud cheats on A's call: caught.
    let mut ya = honest(&sa);
    let (d, _) = u64_data(&mut ya);
    d[0] ^= 1;
    assert_eq!(
        a.unmask_exact(pa, &ya).unwrap_err().error_type(),
        "integrity"
    );
    // B's call was masked with the same vectors before the failure: whatever the reply, those
    // vectors vouch for nothing any more.
    assert_eq!(
        b.unmask_exact(pb, &honest(&sb)).unwrap_err().error_type(),
        "integrity"
    );
    // B's next call gets fresh vectors and an honest reply passes.
    let (sb, pb) = b.mask(OP, &rows(2, 64, 1.0, &mut rng)).unwrap();
    b.unmask_exact(pb, &honest(&sb)).unwrap();
    assert_eq!(b.stats().check_vectors_made, 20);
}
