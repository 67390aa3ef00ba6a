//! The ReMO split on the real model: the same greedy answers as the plain engine, a tap that
//! holds no plaintext, and a tampering cloud caught by the canaries.

use std::ops::ControlFlow;

use talaria_engine::{
    ChatMessage, EngineError, GenerateRequest, LinearOps, OpId, PrefixCache, Rows, SamplingParams,
    Transformer, cached_ids, chat_prompt, generate, generate_cached, generate_until,
};
use talaria_gpu_node::CloudExecutor;
use talaria_params::{Precision, RemoConfig};
use talaria_remo::{FixedPointLinear, Masker};
use talaria_tests::{golden_cases, real_model, remo_split};
use talaria_wire::{
    CloudLink, LinkError, Loopback, MaskedCall, MaskedReply, RPub, SetupReply, SetupRequest, Tensor,
};

/// Every golden prompt, greedy through `linear`, gives the reference's ids.
fn assert_golden_ids(model: &Transformer, linear: &mut dyn LinearOps, eos: u32) {
    for case in golden_cases() {
        let g = generate(model, linear, &case.request(eos), |_| Ok(()), None).unwrap();
        assert_eq!(g.ids, case.ids, "prompt {}", case.name);
    }
}

fn golden_ids_hold(config: RemoConfig) {
    let mut split = remo_split(&real_model(), config, None, Loopback).unwrap();
    let eos = split.tokenizer.eos();
    assert_golden_ids(&split.model, &mut split.linear, eos);
    let stats = split.linear.stats();
    // Every row of every call was verified by Freivalds' check, and none failed.
    assert!(stats.calls > 0 && stats.checked_rows >= stats.rows_sent);
}

#[test]
fn default_setting_gives_the_reference_greedy_ids() {
    golden_ids_hold(RemoConfig::default());
}

#[test]
fn f64_gemm_at_scale_1e4_with_shuffle_and_dummies_gives_the_reference_greedy_ids() {
    golden_ids_hold(RemoConfig {
        precision: Precision::F64Gemm,
        scale: 1e4,
        shuffle: true,
        dummy_rows: 3,
        ..Default::default()
    });
}

/// The integer mode's session, checking every call against the plain fixed-point engine.
struct ExactnessCheck {
    masker: Masker,
    cloud: Loopback<CloudExecutor>,
    reference: FixedPointLinear,
    seen: std::collections::BTreeSet<OpId>,
    rows: usize,
}

impl LinearOps for ExactnessCheck {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        let (sent, pending) = self.masker.mask(op, x).unwrap();
        let call = MaskedCall {
            session: 7,
            seq: pending.seq(),
            op,
            x: sent,
        };
        let reply = self.cloud.call(&call).unwrap();
        let got = self.masker.unmask_exact(pending, &reply.y).unwrap();
        let want = self.reference.product(op, x).unwrap();
        assert_eq!(got.frac_bits, want.frac_bits, "{op}");
        assert!(
            got.values == want.values,
            "{op}: the integer products differ"
        );
        self.seen.insert(op);
        self.rows += x.rows();
        Ok(got.decode().unwrap())
    }
}

#[test]
fn the_integer_mode_gives_the_golden_ids_through_products_equal_to_plain_fixed_point_bit_for_bit() {
    let f = talaria_gguf::GgufFile::open(real_model()).unwrap();
    let provision = talaria_model_file::read_provision(&f).unwrap();
    let c = provision.config.clone();
    let mut weights = talaria_gpu_node::LinearWeights::load(&f, &c).unwrap();
    weights.load_int(&f).unwrap();
    let config = RemoConfig {
        precision: Precision::Int,
        ..Default::default()
    };
    let mut masker = Masker::new(config.clone(), 7, Some([5; 32])).unwrap();
    let mut reference = FixedPointLinear::new(config.frac_bits);
    let cloud = Loopback(CloudExecutor::new(weights, None));
    for op in talaria_cvm_agent::all_ops(&c) {
        let (d_in, d_out) = op.shape(&c);
        let req = masker.setup_request(op, d_in).unwrap();
        let reply = cloud.0.setup(&req).unwrap();
        let RPub::Int(w) = &reply.r_pub else {
            panic!("{op}: a float R_pub for an integer session")
        };
        reference.install(op, w.clone(), d_in, d_out).unwrap();
        masker.install(&req, reply, d_in, d_out, 1.0).unwrap();
    }
    masker.start_pool();
    let mut check = ExactnessCheck {
        masker,
        cloud,
        reference,
        seen: Default::default(),
        rows: 0,
    };
    let (tokenizer, model) = provision.build().unwrap();
    // Every golden prompt: the greedy ids of the reference, through bit-exact products.
    assert_golden_ids(&model, &mut check, tokenizer.eos());
    assert_eq!(check.seen.len(), c.n_layers * 4 + 1, "every op was checked");
    eprintln!(
        "{} rows checked bit for bit; {} encoded with fewer than {} fractional bits",
        check.rows,
        check.masker.stats().downshifted_rows,
        config.frac_bits
    );
}

/// Reads a `.npy` written by the tap: (rows, cols, values as f64).
fn read_npy(path: &std::path::Path) -> (usize, usize, Vec<f64>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert_eq!((10 + hlen) % 64, 0, "header is padded to 64 bytes");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = &b[10 + hlen..];
    let values = if header.contains("<f8") {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect::<Vec<_>>()
    };
    assert_eq!(values.len(), dims[0] * dims[1]);
    (dims[0], dims[1], values)
}

/// The first op's plaintext input rows: the gain-free norm of the prompt's embeddings.
fn first_layer_inputs(
    split: &talaria_tests::RemoSplit<impl CloudLink>,
    prompt: &[u32],
) -> Vec<Vec<f64>> {
    let d = split.model.config().d_model;
    let h = split.model.embed(prompt).unwrap();
    let x = talaria_engine::ops::rms_norm(&h, d, split.model.config().norm_eps);
    x.chunks(d)
        .map(|r| r.iter().map(|&v| f64::from(v)).collect())
        .collect()
}

fn tap_run(config: RemoConfig) -> (tempfile::TempDir, Vec<Vec<f64>>, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let mut split = remo_split(&real_model(), config, Some(dir.path()), Loopback).unwrap();
    let prompt = split
        .tokenizer
        .encode("My secret password is hunter2")
        .unwrap();
    let req = GenerateRequest {
        prompt_ids: prompt.clone(),
        max_tokens: 2,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    };
    generate(&split.model, &mut split.linear, &req, |_| Ok(()), None).unwrap();
    split.linear.link_mut().0.finish_tap().unwrap();
    let plain_rows = first_layer_inputs(&split, &prompt);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json")).unwrap())
            .unwrap();
    (dir, plain_rows, index)
}

fn nearest(rows: &[f64], cols: usize, target: &[f64]) -> f64 {
    rows.chunks(cols)
        .map(|r| {
            r.iter()
                .zip(target)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn the_tap_records_what_the_cloud_sees_and_no_plaintext() {
    let (dir, plain_rows, index) = tap_run(RemoConfig {
        precision: Precision::F32,
        dummy_rows: 2,
        ..Default::default()
    });
    let events = index["events"].as_array().unwrap();
    assert_eq!(index["format"], talaria_gpu_node::TAP_FORMAT);
    assert_eq!(events.iter().filter(|e| e["kind"] == "setup").count(), 121);
    let calls: Vec<_> = events.iter().filter(|e| e["kind"] == "call").collect();
    assert_eq!(
        calls.len(),
        2 * 121,
        "prefill and one decode step, every op"
    );
    let first = calls[0];
    assert_eq!(first["op"].as_str(), Some("0.qkv"));
    let (rows, cols, values) = read_npy(&dir.path().join(first["file"].as_str().unwrap()));
    // The prompt's rows padded to their bucket (16: the default's least), plus two dummies.
    assert!(plain_rows.len() < 16);
    assert_eq!((rows, cols), (16 + 2, 576), "prompt rows plus two dummies");
    for x in &plain_rows {
        // Masked rows are σ·ρ·√d ≈ 2400 away from the data; none is anywhere near it.
        assert!(nearest(&values, cols, x) > 100.0);
    }

    // The control: with masking off the tap holds exactly the plaintext rows.
    let (dir, plain_rows, index) = tap_run(RemoConfig {
        enabled: false,
        ..Default::default()
    });
    let first = index["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "call")
        .unwrap()
        .clone();
    let (_, cols, values) = read_npy(&dir.path().join(first["file"].as_str().unwrap()));
    for x in &plain_rows {
        assert!(nearest(&values, cols, x) < 1e-6);
    }
}

/// A cloud that adds a small error to every result it returns.
struct Tamperer(CloudExecutor);

impl CloudLink for Tamperer {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        CloudLink::setup(&mut self.0, req)
    }
    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        let mut reply = CloudLink::call(&mut self.0, call)?;
        match &mut reply.y {
            Tensor::F32 { data, .. } => data.iter_mut().for_each(|v| *v += 0.05),
            Tensor::F64 { data, .. } => data.iter_mut().for_each(|v| *v += 0.05),
            Tensor::U64 { data, .. } => data.iter_mut().for_each(|v| *v ^= 1),
        }
        Ok(reply)
    }
}

#[test]
fn a_tampering_cloud_is_caught_by_freivalds_check() {
    let mut split = remo_split(&real_model(), RemoConfig::default(), None, Tamperer).unwrap();
    let req = GenerateRequest {
        prompt_ids: vec![504, 3458],
        max_tokens: 3,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    };
    let err = generate(&split.model, &mut split.linear, &req, |_| Ok(()), None).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Outsourced {
                error_type: "integrity",
                ..
            }
        ),
        "{err}"
    );
}

/// How [`OneBadCall`] corrupts its one reply.
#[derive(Debug, Clone, Copy)]
enum Cheat {
    /// Adds `2^j` to one element of one row.
    PowerOfTwo(u32),
    /// Adds a uniform error to every element of one row.
    Random,
    /// Answers with the previous call's reply (when it has the same shape) or zeros.
    Replay,
    /// Swaps the first and last rows.
    Swap,
    /// Zeroes one row.
    Zero,
}

/// A cloud that answers honestly except for one call, the `bad`-th, which it corrupts.
struct OneBadCall {
    cloud: CloudExecutor,
    calls: usize,
    bad: usize,
    cheat: Cheat,
    last: Option<Tensor>,
    rng: u64,
}

impl CloudLink for OneBadCall {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        CloudLink::setup(&mut self.cloud, req)
    }
    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        let mut reply = CloudLink::call(&mut self.cloud, call)?;
        self.calls += 1;
        let honest = reply.y.clone();
        if self.calls == self.bad {
            // A xorshift for the row and element: the test is reproducible.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let Tensor::U64 { data, rows, cols } = &mut reply.y else {
                panic!("the default is the integer mode")
            };
            let (rows, cols) = (*rows, *cols);
            let r = (self.rng as usize) % rows;
            let c = (self.rng as usize >> 20) % cols;
            match self.cheat {
                Cheat::PowerOfTwo(j) => {
                    data[r * cols + c] = data[r * cols + c].wrapping_add(1 << j)
                }
                Cheat::Random => data[r * cols..(r + 1) * cols]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = v.wrapping_add(self.rng.rotate_left(i as u32) | 1)),
                Cheat::Replay => match &self.last {
                    Some(t) if t.shape() == (rows, cols) => reply.y = t.clone(),
                    _ => data.iter_mut().for_each(|v| *v = 0),
                },
                Cheat::Swap => {
                    for i in 0..cols {
                        data.swap(i, (rows - 1) * cols + i);
                    }
                    if rows == 1 {
                        data[c] ^= 1;
                    }
                }
                Cheat::Zero => data[r * cols..(r + 1) * cols]
                    .iter_mut()
                    .for_each(|v| *v = 0),
            }
        }
        self.last = Some(honest);
        Ok(reply)
    }
}

#[test]
fn one_corrupted_call_in_a_long_generation_is_caught_and_an_honest_one_never_fails() {
    // 24 tokens: 24 passes of 121 calls. Each cheat hits one call, chosen across the
    // generation (prefill and decode, every kind of op).
    let cheats = [
        (Cheat::PowerOfTwo(0), 5),
        (Cheat::PowerOfTwo(40), 400),
        (Cheat::PowerOfTwo(62), 1210),
        (Cheat::PowerOfTwo(63), 2000),
        (Cheat::Random, 2750),
        (Cheat::Replay, 1700),
        (Cheat::Swap, 121),
        (Cheat::Zero, 2903),
    ];
    let req = GenerateRequest {
        prompt_ids: vec![504, 3458, 314, 253, 1345],
        max_tokens: 24,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    };
    for (cheat, bad) in cheats {
        let mut split = remo_split(&real_model(), RemoConfig::default(), None, |cloud| {
            OneBadCall {
                cloud,
                calls: 0,
                bad,
                cheat,
                last: None,
                rng: 0x9E37_79B9_7F4A_7C15 ^ bad as u64,
            }
        })
        .unwrap();
        let err = generate(&split.model, &mut split.linear, &req, |_| Ok(()), None).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Outsourced {
                    error_type: "integrity",
                    ..
                }
            ),
            "{cheat:?} at call {bad}: {err}"
        );
        assert_eq!(
            split.linear.link_mut().calls,
            bad,
            "{cheat:?}: stopped at once"
        );
    }
    // The control: the same cloud with no bad call gives all 24 tokens.
    let mut split = remo_split(&real_model(), RemoConfig::default(), None, |cloud| {
        OneBadCall {
            cloud,
            calls: 0,
            bad: usize::MAX,
            cheat: Cheat::Zero,
            last: None,
            rng: 1,
        }
    })
    .unwrap();
    let g = generate(&split.model, &mut split.linear, &req, |_| Ok(()), None).unwrap();
    assert_eq!(g.ids.len(), 24);
    assert_eq!(split.linear.link_mut().calls, 24 * 121);
}

#[test]
fn every_float_mode_passes_its_checks_on_every_golden_prompt() {
    // Drift may change a float mode's greedy ids; an honest cloud must never fail a check.
    for precision in [Precision::F32, Precision::F64Client, Precision::F64Gemm] {
        let config = RemoConfig {
            precision,
            dummy_rows: precision.default_dummy_rows(),
            ..Default::default()
        };
        let mut split = remo_split(&real_model(), config, None, Loopback).unwrap();
        let eos = split.tokenizer.eos();
        for case in golden_cases() {
            generate(
                &split.model,
                &mut split.linear,
                &case.request(eos),
                |_| Ok(()),
                None,
            )
            .unwrap_or_else(|e| panic!("{precision:?}, prompt {}: {e}", case.name));
        }
        let stats = split.linear.stats();
        assert!(stats.checked_rows >= stats.rows_sent && stats.padding_rows > 0);
    }
}

/// The cloud's executor over all of the real model's weights, recording nothing.
fn real_cloud() -> CloudExecutor {
    let f = talaria_gguf::GgufFile::open(real_model()).unwrap();
    let config = talaria_model_file::read_config(&f).unwrap();
    CloudExecutor::new(
        talaria_gpu_node::LinearWeights::load(&f, &config).unwrap(),
        None,
    )
}

#[test]
fn malformed_calls_get_typed_errors_from_the_cloud() {
    let cloud = real_cloud();
    let op = talaria_engine::OpId::Block {
        layer: 0,
        op: talaria_engine::BlockOp::Down,
    };
    let bad = [
        Tensor::F32 {
            rows: 1,
            cols: 576,
            data: vec![0.0; 576],
        }, // wrong width for down
        Tensor::F64 {
            rows: 2,
            cols: 1536,
            data: vec![0.0; 1536],
        }, // length disagrees
    ];
    for x in bad {
        let err = cloud
            .call(&MaskedCall {
                session: 1,
                seq: 1,
                op,
                x,
            })
            .unwrap_err();
        assert!(
            ["shape", "bad_request", "bad_op"].contains(&err.error_type()),
            "{err}"
        );
    }
    let far = talaria_engine::OpId::Block {
        layer: 30,
        op: talaria_engine::BlockOp::Qkv,
    };
    let x = Tensor::F32 {
        rows: 1,
        cols: 576,
        data: vec![0.0; 576],
    };
    assert!(
        cloud
            .call(&MaskedCall {
                session: 1,
                seq: 2,
                op: far,
                x
            })
            .is_err()
    );
    // The executor still serves a good call afterwards.
    let x = Tensor::F32 {
        rows: 1,
        cols: 1536,
        data: vec![0.0; 1536],
    };
    assert!(
        cloud
            .call(&MaskedCall {
                session: 1,
                seq: 3,
                op,
                x
            })
            .is_ok()
    );
}

#[test]
fn a_batch_of_calls_from_several_sessions_answers_each_as_if_alone() {
    let cloud = real_cloud();
    let op = talaria_engine::OpId::Block {
        layer: 3,
        op: talaria_engine::BlockOp::GateUp,
    };
    let rows = |n: usize, salt: f64| -> Vec<f64> {
        (0..n * 576)
            .map(|i| ((i as f64 + salt) * 0.731).sin() * 100.0)
            .collect()
    };
    let call = |session: u64, x: Tensor| MaskedCall {
        session,
        seq: session * 10,
        op,
        x,
    };
    let calls = vec![
        call(
            1,
            Tensor::F64 {
                rows: 3,
                cols: 576,
                data: rows(3, 1.0),
            },
        ),
        // A malformed call in the middle of the batch.
        call(
            2,
            Tensor::F64 {
                rows: 1,
                cols: 100,
                data: vec![0.0; 100],
            },
        ),
        call(
            3,
            Tensor::F32 {
                rows: 2,
                cols: 576,
                data: rows(2, 2.0).iter().map(|&v| v as f32).collect(),
            },
        ),
        call(
            4,
            Tensor::F64 {
                rows: 5,
                cols: 576,
                data: rows(5, 3.0),
            },
        ),
    ];
    let batch = cloud.call_batch(&calls);
    assert_eq!(batch.len(), calls.len());
    assert_eq!(batch[1].as_ref().unwrap_err().error_type(), "shape");
    for i in [0, 2, 3] {
        let alone = cloud.call(&calls[i]).unwrap();
        let together = batch[i].as_ref().unwrap();
        assert_eq!(together.seq, calls[i].seq);
        assert_eq!(together.y.shape(), alone.y.shape(), "call {i}");
        assert_eq!(together.y.precision(), alone.y.precision(), "call {i}");
        let (a, b) = (together.y.to_f64(), alone.y.to_f64());
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        // The same GEMM over more rows: equal up to the summation order of the backend.
        assert!(worst <= scale * 1e-6, "call {i}: off by {worst} of {scale}");
    }
}

/// The next turn of a chat run on the first turn's cached keys and values answers what running
/// the whole history again answers, from logits equal bit for bit (the integer mode's products
/// are exact, so which rows share a call changes nothing), and sends the cloud only the new rows.
#[test]
fn a_second_turn_on_the_first_turns_cache_equals_running_the_whole_history() {
    let config = RemoConfig {
        precision: Precision::Int,
        ..Default::default()
    };
    let mut split = remo_split(&real_model(), config, None, Loopback).unwrap();
    let eos = split.tokenizer.eos();
    let message = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let request = |prompt_ids: Vec<u32>| GenerateRequest {
        prompt_ids,
        max_tokens: 12,
        sampling: SamplingParams::default(),
        stop_ids: vec![eos],
    };
    let question = message("user", "What is the capital of France?");
    let first = split
        .tokenizer
        .encode(&chat_prompt(std::slice::from_ref(&question)))
        .unwrap();
    let mut cache = split.model.new_cache();
    let go = |_| Ok(ControlFlow::Continue(()));
    let g1 = generate_cached(
        &split.model,
        &mut split.linear,
        &request(first.clone()),
        &mut cache,
        go,
        None,
    )
    .unwrap();
    assert_eq!(g1.cached_tokens, 0);
    assert_eq!(
        cache.len(),
        first.len() + g1.ids.len() - 1,
        "all but the last id ran"
    );
    let reply = split.tokenizer.decode(g1.shown_ids()).unwrap();
    let mut conversations = PrefixCache::new(1 << 30);
    conversations.put(0u8, 0u8, cached_ids(&first, &g1.ids, cache.len()), cache);

    // Runs `prompt` on the cache `conversations` offers and again from nothing: the same ids from
    // the same logits, bit for bit, with fewer rows sent. Keeps the warm run's cache.
    let mut warm_and_cold = |prompt: Vec<u32>, conversations: &mut PrefixCache<u8, u8>| {
        let mut taken = conversations.take(&0, &prompt).expect("a cached prefix");
        let bits = |l: &[f32]| l.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        let (mut warm_logits, mut cold_logits) = (Vec::new(), Vec::new());
        split.linear.new_sequence();
        let rows_before = split.linear.stats().rows_sent;
        let warm = generate_cached(
            &split.model,
            &mut split.linear,
            &request(prompt.clone()),
            &mut taken.cache,
            go,
            Some(&mut |l: &[f32]| warm_logits.push(bits(l))),
        )
        .unwrap();
        let warm_rows = split.linear.stats().rows_sent - rows_before;
        split.linear.new_sequence();
        let rows_before = split.linear.stats().rows_sent;
        let cold = generate_until(
            &split.model,
            &mut split.linear,
            &request(prompt.clone()),
            go,
            Some(&mut |l: &[f32]| cold_logits.push(bits(l))),
        )
        .unwrap();
        let cold_rows = split.linear.stats().rows_sent - rows_before;
        assert_eq!(warm.ids, cold.ids);
        assert!(
            warm_logits == cold_logits,
            "every logit of every step is equal bit for bit"
        );
        assert_eq!((warm.cached_tokens, cold.cached_tokens), (taken.reused, 0));
        assert!(
            warm_rows < cold_rows,
            "the warm run sends fewer rows ({warm_rows}) than the cold one ({cold_rows})"
        );
        eprintln!(
            "{} tokens: {} reused; rows sent {warm_rows} (cold {cold_rows}); answer {:?}",
            prompt.len(),
            warm.cached_tokens,
            split.tokenizer.decode(warm.shown_ids()).unwrap()
        );
        let ids = cached_ids(&prompt, &warm.ids, taken.cache.len());
        conversations.put(0, 0, ids, taken.cache);
        warm.cached_tokens
    };
    let chat = |last: &str| {
        chat_prompt(&[
            question.clone(),
            message("assistant", &reply),
            message("user", last),
        ])
    };
    // The next turn: the whole first turn is reused.
    let second = split
        .tokenizer
        .encode(&chat("And the capital of Italy?"))
        .unwrap();
    let reused = warm_and_cold(second.clone(), &mut conversations);
    assert!(
        reused >= first.len(),
        "the whole first prompt is reused: {reused} of {}",
        first.len()
    );
    // A branch: the same history with another last question reuses the cache only up to where
    // they part, inside the cached positions.
    let branch = split
        .tokenizer
        .encode(&chat("And the capital of Spain?"))
        .unwrap();
    let parted = second
        .iter()
        .zip(&branch)
        .take_while(|(a, b)| a == b)
        .count();
    let reused = warm_and_cold(branch, &mut conversations);
    assert_eq!(reused, parted, "cut back to the shared prefix");
}

/// An honest cloud that notes the op and row count of every call it answers.
struct Shapes(CloudExecutor, Vec<(OpId, usize)>);

impl CloudLink for Shapes {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        CloudLink::setup(&mut self.0, req)
    }
    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        self.1.push((call.op, call.x.shape().0));
        CloudLink::call(&mut self.0, call)
    }
}

/// A prompt of 300 tokens with `prefill_chunk = 128`: its bucket (512 rows) runs as four
/// passes whose every block call has exactly 128 rows, so the cloud counts the bucket and
/// nothing finer; the integer mode is exact row by row, so the ids are those of one pass.
/// A greedy request of a prompt of exactly `tokens` tokens of English prose.
fn long_prompt(
    tokenizer: &talaria_engine::Tokenizer,
    tokens: usize,
    max_tokens: usize,
) -> GenerateRequest {
    let text =
        "The history of the Roman Empire spans many centuries of conquest. ".repeat(tokens / 8);
    let mut prompt = tokenizer.encode(&text).unwrap();
    assert!(prompt.len() >= tokens, "{}", prompt.len());
    prompt.truncate(tokens);
    GenerateRequest {
        prompt_ids: prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    }
}

#[test]
fn a_prefill_in_passes_shows_the_cloud_its_bucket_only_and_answers_the_same() {
    let run = |prefill_chunk: usize| {
        let config = RemoConfig {
            prefill_chunk,
            ..Default::default()
        };
        let mut split = remo_split(&real_model(), config, None, |c| Shapes(c, Vec::new())).unwrap();
        let req = long_prompt(&split.tokenizer, 300, 3);
        let g = generate(&split.model, &mut split.linear, &req, |_| Ok(()), None).unwrap();
        (g.ids, std::mem::take(&mut split.linear.link_mut().1))
    };
    let (one_pass, one_shapes) = run(0);
    let (passes, shapes) = run(128);
    assert_eq!(passes, one_pass, "the same greedy ids");
    let rows_of = |shapes: &[(OpId, usize)], op: OpId| -> Vec<usize> {
        shapes
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|&(_, r)| r)
            .collect()
    };
    let qkv = OpId::Block {
        layer: 0,
        op: talaria_engine::BlockOp::Qkv,
    };
    assert_eq!(rows_of(&one_shapes, qkv), [512, 1, 1]);
    assert_eq!(rows_of(&shapes, qkv), [128, 128, 128, 128, 1, 1]);
    assert_eq!(
        rows_of(&shapes, OpId::LmHead),
        [1; 6],
        "a head call per pass"
    );
    // Every block call of the prefill, of every op, has exactly the chunk's rows.
    let prefill = &shapes[..shapes.len() - 2 * 121];
    assert_eq!(prefill.len(), 4 * 121);
    assert!(
        prefill
            .iter()
            .all(|&(op, r)| r == if op == OpId::LmHead { 1 } else { 128 })
    );
}

/// How [`PassCheat`] cheats in a later pass of a prefill in passes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PassCheatKind {
    /// From the second pass on, answers `op` with its answer of the pass before: the same op,
    /// the same shape (every pass's calls have the chunk's rows), an honest product of other
    /// masked rows.
    ReplayThePassBefore(OpId),
    /// Adds 1 to one value of `op`'s answer in pass `pass` (0-based).
    Nudge { op: OpId, pass: usize },
}

/// A cloud honest except for one call of a prefill in passes; counts the passes by the LM-head
/// calls that end them.
struct PassCheat {
    cloud: CloudExecutor,
    kind: PassCheatKind,
    calls: usize,
    heads: usize,
    before: std::collections::HashMap<OpId, Tensor>,
    /// The call (1-based) it cheated in.
    cheated: Option<usize>,
}

impl CloudLink for PassCheat {
    fn setup(&mut self, req: &SetupRequest) -> Result<SetupReply, LinkError> {
        CloudLink::setup(&mut self.cloud, req)
    }
    fn call(&mut self, call: &MaskedCall) -> Result<MaskedReply, LinkError> {
        let mut reply = CloudLink::call(&mut self.cloud, call)?;
        self.calls += 1;
        let pass = self.heads;
        if call.op == OpId::LmHead {
            self.heads += 1;
        }
        if self.cheated.is_some() {
            return Ok(reply);
        }
        match self.kind {
            PassCheatKind::ReplayThePassBefore(op) if call.op == op => {
                if let Some(old) = self.before.insert(op, reply.y.clone()) {
                    assert_eq!(old.shape(), reply.y.shape(), "passes of one shape");
                    reply.y = old;
                    self.cheated = Some(self.calls);
                }
            }
            PassCheatKind::Nudge { op, pass: p } if call.op == op && pass == p => {
                let Tensor::U64 { data, .. } = &mut reply.y else {
                    panic!("the default is the integer mode")
                };
                data[0] = data[0].wrapping_add(1);
                self.cheated = Some(self.calls);
            }
            _ => {}
        }
        Ok(reply)
    }
}

#[test]
fn a_cloud_that_cheats_in_a_later_pass_of_a_prefill_is_caught_at_once() {
    // 200 tokens, bucket 256, passes of 64: four passes of 121 calls.
    let config = RemoConfig {
        prefill_chunk: 64,
        ..Default::default()
    };
    let block = |layer, op| OpId::Block { layer, op };
    use talaria_engine::BlockOp::{AttnOut, Down, Qkv};
    let cheats = [
        PassCheatKind::ReplayThePassBefore(block(3, Qkv)),
        PassCheatKind::ReplayThePassBefore(block(29, Down)),
        PassCheatKind::Nudge {
            op: OpId::LmHead,
            pass: 1,
        },
        PassCheatKind::Nudge {
            op: block(17, AttnOut),
            pass: 3,
        },
    ];
    for kind in cheats {
        let mut split = remo_split(&real_model(), config.clone(), None, |cloud| PassCheat {
            cloud,
            kind,
            calls: 0,
            heads: 0,
            before: Default::default(),
            cheated: None,
        })
        .unwrap();
        let req = long_prompt(&split.tokenizer, 200, 2);
        let err = generate(&split.model, &mut split.linear, &req, |_| Ok(()), None).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Outsourced {
                    error_type: "integrity",
                    ..
                }
            ),
            "{kind:?}: {err}"
        );
        let link = split.linear.link_mut();
        let cheated = link.cheated.expect("the cloud cheated");
        assert!(cheated > 121, "{kind:?}: in a later pass (call {cheated})");
        assert_eq!(link.calls, cheated, "{kind:?}: stopped at once");
        assert!(
            link.heads < 4,
            "{kind:?}: before the prefill's last pass ended"
        );
    }
}
