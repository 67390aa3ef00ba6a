//! The fuzz targets: every decoder of bytes that come from a peer, a file or a tenant, driven the
//! way its receiver drives it, with a corpus of valid inputs built from real messages.

use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::json;
use talaria_attestation::{
    AttestationError, Evidence, InsecurePolicy, Policy, parse_report, verify_without_root,
};
use talaria_cvm_agent::openai::{Limits, decode_body};
use talaria_engine::{
    BlockOp, ChatMessage, CvmProvision, Generation, ModelConfig, OpId, SamplingParams, StopReason,
    TokenizerSpec,
};
use talaria_gguf::{
    GgmlType, GgufFile, GgufWriter, TensorPayload, Value, exact_shift, integer_blocks,
    quantize_q4_1, quantize_q8_0,
};
use talaria_kernels::IntWeight;
use talaria_topology::{Role, Topology};
use talaria_wire::frame::{self, DEFAULT_MAX_FRAME};
use talaria_wire::{
    BasisSpec, ErrorReply, LatencySplit, MaskedCall, MaskedReply, Prompt, RPub, Reply, Request,
    SessionId, SetupReply, SetupRequest, TenantEvent, TenantMessage, TenantRequest, Tensor,
};

use crate::runner::signature;

/// A fuzz target: a decoder, its seed corpus and, for text, the tokens of its language.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> Vec<u64>,
    pub seeds: fn() -> Vec<Vec<u8>>,
    pub text: bool,
    pub dict: &'static [&'static str],
}

/// Every target, in the order `--target all` runs them.
pub const TARGETS: [Target; 6] = [
    Target {
        name: "wire",
        run: wire,
        seeds: wire_seeds,
        text: false,
        dict: &[],
    },
    Target {
        name: "gguf",
        run: gguf,
        seeds: gguf_seeds,
        text: false,
        dict: &[],
    },
    Target {
        name: "topology",
        run: topology,
        seeds: topology_seeds,
        text: true,
        dict: TOML_TOKENS,
    },
    Target {
        name: "openai",
        run: openai,
        seeds: openai_seeds,
        text: true,
        dict: JSON_TOKENS,
    },
    Target {
        name: "sev",
        run: sev,
        seeds: sev_seeds,
        text: false,
        dict: &[],
    },
    Target {
        name: "reply",
        run: reply,
        seeds: reply_seeds,
        text: false,
        dict: &[],
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

fn sig<T, E: std::fmt::Display>(stage: &str, r: &Result<T, E>) -> u64 {
    match r {
        Ok(_) => signature(stage, "ok"),
        Err(e) => signature(stage, &e.to_string()),
    }
}

// ---- reply: what the CVM does with a cloud's answer to a masked call ---------------------------

const REPLY_OP: OpId = OpId::Block {
    layer: 0,
    op: BlockOp::Down,
};

/// A small integer weight, as a cloud would send it at set-up.
fn reply_weight() -> IntWeight {
    let (d_in, d_out) = (64, 24);
    IntWeight {
        d_in,
        d_out,
        codes: (0..d_in * d_out).map(|i| (i * 7 % 16) as u8).collect(),
        scales: (0..2 * d_out).map(|i| 100 + i as u64).collect(),
        mins: (0..2 * d_out).map(|i| (-(i as i64) * 50) as u64).collect(),
        shift: 16,
        gain: None,
    }
}

/// Maskers of one session each: the integer default (padding, no dummies) and f32 with dummy
/// rows, set up with the small weight.
fn reply_maskers() -> Vec<talaria_remo::Masker> {
    use talaria_params::{Precision, RemoConfig};
    use talaria_remo::Masker;
    let w = reply_weight();
    let float_w: Vec<f32> = (0..w.d_in * w.d_out)
        .map(|k| w.at(k / w.d_out, k % w.d_out) as f32 / 65536.0)
        .collect();
    [Precision::Int, Precision::F32]
        .into_iter()
        .map(|precision| {
            let config = RemoConfig {
                precision,
                dummy_rows: precision.default_dummy_rows(),
                pool: 0,
                ..RemoConfig::default()
            };
            let mut m = Masker::new(config, 1, Some([7; 32])).expect("valid config");
            m.set_context(64);
            let req = m.setup_request(REPLY_OP, w.d_in).expect("masking on");
            let r_pub = if req.integer {
                RPub::Int(w.clone())
            } else {
                RPub::Float(Tensor::F32 {
                    rows: w.d_in,
                    cols: w.d_out,
                    data: float_w.clone(),
                })
            };
            let reply = SetupReply {
                op: REPLY_OP,
                r_pub,
            };
            m.install(&req, reply, w.d_in, w.d_out, 1.0)
                .expect("set-up");
            m
        })
        .collect()
}

/// The rows every masker of the reply target masks: 3 rows of the small weight's input width.
fn reply_rows() -> talaria_engine::Rows {
    talaria_engine::Rows::new(3, 64, (0..192).map(|i| (i % 13) as f32 - 6.0).collect())
        .expect("rows")
}

thread_local! {
    static MASKERS: std::cell::RefCell<Vec<talaria_remo::Masker>> =
        std::cell::RefCell::new(reply_maskers());
}

/// One masked call of 3 rows per masker, answered with the decoded reply: every path of the
/// checks (shape, precision, Freivalds, range) ends in a typed error or rows, never a panic.
pub fn reply(data: &[u8]) -> Vec<u64> {
    let decoded = frame::body::<MaskedReply>(data);
    let mut parts = vec![sig("masked_reply", &decoded)];
    let Ok(reply) = decoded else {
        return parts;
    };
    let x = reply_rows();
    MASKERS.with(|m| {
        for masker in m.borrow_mut().iter_mut() {
            let (_, pending) = masker.mask(REPLY_OP, &x).expect("a valid row masks");
            let r = masker.unmask(pending, &reply.y);
            parts.push(match &r {
                Ok(rows) => signature("unmask", &format!("ok {}", rows.rows())),
                Err(e) => signature("unmask", e.error_type()),
            });
        }
    });
    parts
}

/// Honest replies to each masker's call, and a few near misses.
pub fn reply_seeds() -> Vec<Vec<u8>> {
    let w = reply_weight();
    let x = reply_rows();
    let mut seeds = Vec::new();
    for mut m in reply_maskers() {
        let (sent, pending) = m.mask(REPLY_OP, &x).expect("masks");
        let y = match &sent {
            Tensor::U64 { data, rows, .. } => Tensor::U64 {
                rows: *rows,
                cols: w.d_out,
                data: talaria_kernels::int_matmul(data, *rows, &w),
            },
            other => {
                let rows = other.shape().0;
                let v = other.to_f64();
                let mut y = vec![0f32; rows * w.d_out];
                for r in 0..rows {
                    for i in 0..w.d_in {
                        for j in 0..w.d_out {
                            y[r * w.d_out + j] +=
                                v[r * w.d_in + i] as f32 * (w.at(i, j) as f32 / 65536.0);
                        }
                    }
                }
                Tensor::F32 {
                    rows,
                    cols: w.d_out,
                    data: y,
                }
            }
        };
        drop(pending);
        let reply = MaskedReply {
            seq: 1,
            y: y.clone(),
        };
        seeds.push(bytes_of(&reply));
        let mut bad = y;
        match &mut bad {
            Tensor::U64 { data, .. } => data[0] ^= 1 << 63,
            Tensor::F32 { data, .. } => data[0] = f32::INFINITY,
            Tensor::F64 { data, .. } => data[0] = f64::NAN,
        }
        seeds.push(bytes_of(&MaskedReply { seq: 1, y: bad }));
    }
    seeds
}

// ---- wire -------------------------------------------------------------------------------------

/// A tensor as a receiver checks it, then reads it.
fn tensor(t: &Tensor) -> u64 {
    let r = t.validate();
    if r.is_ok() && t.shape().0.saturating_mul(t.shape().1) <= 1 << 16 {
        std::hint::black_box(t.to_f64());
    }
    sig("tensor", &r)
}

/// An integer weight as the CVM checks it, then reads it.
fn int_weight(w: &IntWeight) -> u64 {
    let r = w.validate();
    if r.is_ok() && w.bytes() <= 1 << 16 {
        std::hint::black_box(w.column_norm_bound());
        if w.d_out > 0 {
            std::hint::black_box(w.at(w.d_in - 1, w.d_out - 1));
        }
    }
    sig("int_weight", &r)
}

/// A payload decoded as each type a receiver may expect there.
fn payloads(p: &[u8], parts: &mut Vec<u64>) {
    let r = frame::body::<SetupRequest>(p);
    parts.push(sig("setup_request", &r));
    if let Ok(s) = r {
        std::hint::black_box(s.basis.rank(1024));
    }
    let r = frame::body::<MaskedCall>(p);
    parts.push(sig("masked_call", &r));
    if let Ok(c) = r {
        parts.push(tensor(&c.x));
    }
    let r = frame::body::<SetupReply>(p);
    parts.push(sig("setup_reply", &r));
    match r {
        Ok(SetupReply {
            r_pub: RPub::Float(t),
            ..
        }) => parts.push(tensor(&t)),
        Ok(SetupReply {
            r_pub: RPub::Int(w),
            ..
        }) => parts.push(int_weight(&w)),
        Err(_) => {}
    }
    let r = frame::body::<MaskedReply>(p);
    parts.push(sig("masked_reply", &r));
    if let Ok(m) = r {
        parts.push(tensor(&m.y));
    }
    let r = frame::body::<CvmProvision>(p);
    parts.push(sig("provision", &r));
    if let Ok(v) = r {
        let config = v.config.validate();
        parts.push(sig("config", &config));
        // What the agent does with it: the tokenizer and the weight-free half, built.
        if config.is_ok() && v.embeddings.len() <= 1 << 16 {
            parts.push(sig("provision_build", &v.build()));
        }
    }
    parts.push(sig("session", &frame::body::<SessionId>(p)));
    parts.push(sig("nonce", &frame::body::<[u8; 32]>(p)));
}

/// Every decoder of the cloud and tenant protocols on the same bytes: a request frame and its
/// payload, a reply frame and its payload, the tenant's messages, tensors, the length prefix.
pub fn wire(data: &[u8]) -> Vec<u64> {
    let mut parts = Vec::with_capacity(12);
    match frame::split::<Request>(data) {
        Ok((req, payload)) => {
            parts.push(signature(
                "request",
                &format!("{:?}", std::mem::discriminant(&req)),
            ));
            std::hint::black_box(req.session());
            if let Request::Hello { evidence, .. } = &req {
                parts.push(sig("hello_evidence", &frame::body::<Evidence>(evidence)));
            }
            if let Request::Batch { calls } = req {
                // What a stage does with a batch: unpack it, split each call's header.
                let r = frame::unpack(payload, calls as usize);
                parts.push(sig("batch", &r));
                for call in r.unwrap_or_default() {
                    let r = frame::split::<Request>(call);
                    parts.push(sig("batch_call", &r));
                    if let Ok((_, p)) = r {
                        parts.push(sig("batch_call_body", &frame::body::<MaskedCall>(p)));
                    }
                }
            }
            payloads(payload, &mut parts);
        }
        Err(e) => parts.push(signature("request", &e.to_string())),
    }
    match frame::split::<Reply>(data) {
        Ok((reply, payload)) => {
            parts.push(signature(
                "reply",
                &format!("{}", matches!(reply, Reply::Ok { .. })),
            ));
            payloads(payload, &mut parts);
        }
        Err(e) => parts.push(signature("reply", &e.to_string())),
    }
    let r = frame::body_padded::<TenantMessage>(data, talaria_wire::TENANT_REQUEST_BUCKET);
    parts.push(sig("tenant_message", &r));
    if let Ok(TenantMessage::Generate { request, .. }) = &r {
        parts.push(sig("sampling", &request.sampling.validate()));
    }
    let r = frame::tenant_event(data);
    parts.push(sig("tenant_event", &r));
    if let Ok(TenantEvent::Done { text, .. }) = &r {
        std::hint::black_box(talaria_engine::first_stop(&["\n".into()], text));
    }
    let r = frame::body::<Tensor>(data);
    parts.push(sig("tensor", &r));
    if let Ok(t) = &r {
        parts.push(tensor(t));
    }
    let r = frame::body::<IntWeight>(data);
    parts.push(sig("int_weight", &r));
    if let Ok(w) = &r {
        parts.push(int_weight(w));
    }
    if let Some(prefix) = data.first_chunk::<4>() {
        parts.push(sig("length", &frame::check_len(*prefix, DEFAULT_MAX_FRAME)));
    }
    parts
}

fn config() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        d_ff: 16,
        vocab: 4,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        max_seq: 64,
    }
}

fn small_int_weight() -> IntWeight {
    IntWeight {
        d_in: 32,
        d_out: 2,
        codes: (0..64).map(|i| i as u8).collect(),
        scales: vec![3, u64::MAX].into(),
        mins: vec![7, 1 << 40].into(),
        shift: 12,
        gain: Some(vec![1.0; 32]),
    }
}

fn frame_of<H: Serialize, B: Serialize>(head: &H, body: Option<&B>) -> Vec<u8> {
    frame::encode(head, body).expect("seed messages encode")
}

fn bytes_of<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("seed messages encode")
}

fn tenant_request(prompt: Prompt) -> TenantRequest {
    TenantRequest {
        prompt,
        max_tokens: 16,
        sampling: SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            seed: 42,
        },
        ignore_eos: false,
        stop: vec!["\n\n".into(), "END".into()],
        cache_salt: None,
    }
}

/// Real frames of both protocols, as the agent, coordinator and gpu-nodes send them.
pub fn wire_seeds() -> Vec<Vec<u8>> {
    let op = OpId::Block {
        layer: 3,
        op: BlockOp::GateUp,
    };
    let f32s = Tensor::F32 {
        rows: 2,
        cols: 3,
        data: vec![1.0, -2.5, 3.0, f32::MAX, f32::MIN_POSITIVE, 0.0],
    };
    let u64s = Tensor::U64 {
        rows: 1,
        cols: 4,
        data: vec![0, 1, u64::MAX, 1 << 63],
    };
    let f64s = Tensor::F64 {
        rows: 2,
        cols: 1,
        data: vec![0.5, -1e300],
    };
    let evidence = bytes_of(&Evidence::Insecure {
        reason: "no /dev/sev-guest".into(),
    });
    let provision = CvmProvision {
        config: config(),
        tokenizer: TokenizerSpec {
            model: "gpt2".into(),
            pre: "smollm".into(),
            tokens: vec!["a".into(), "b".into(), "ab".into(), "<|im_end|>".into()],
            token_types: vec![1, 1, 1, 3],
            merges: vec!["a b".into()],
            eos: 3,
            bos: None,
            add_bos: false,
        },
        embeddings: vec![0.25; 8],
    };
    let generation = Generation {
        prompt_ids: vec![1, 2, 3],
        ids: vec![4, 5],
        stop_reason: StopReason::Eos,
        prefill_ms: 1.5,
        decode_ms: 2.5,
        decode_tok_per_s: 400.0,
        prefill_tok_per_s: 2000.0,
        cached_tokens: 0,
    };
    vec![
        frame_of(&Request::Challenge, None::<&()>),
        frame_of(&Reply::Ok { compute_us: 0 }, Some(&[7u8; 32])),
        frame_of(
            &Request::Hello {
                tenant: "tenant-a".into(),
                agent: "agent-0".into(),
                evidence,
                key: vec![0x30, 0x82, 0x01, 0x0a],
            },
            None::<&()>,
        ),
        frame_of(&Reply::Ok { compute_us: 12 }, Some(&provision)),
        frame_of(&Request::OpenSession, None::<&()>),
        frame_of(&Reply::Ok { compute_us: 1 }, Some(&(77 as SessionId))),
        frame_of(&Request::CloseSession { session: 77 }, None::<&()>),
        frame_of(
            &Request::StageOpen {
                session: 77,
                tenant: "tenant-a".into(),
            },
            None::<&()>,
        ),
        frame_of(
            &Request::Setup { session: 77, op },
            Some(&SetupRequest {
                session: 77,
                op,
                basis: BasisSpec::Orthonormal {
                    seed: [9; 32],
                    m: 6,
                },
                f64: true,
                integer: false,
            }),
        ),
        frame_of(
            &Reply::Ok { compute_us: 900 },
            Some(&SetupReply {
                op,
                r_pub: RPub::Float(f64s.clone()),
            }),
        ),
        frame_of(
            &Reply::Ok { compute_us: 900 },
            Some(&SetupReply {
                op: OpId::LmHead,
                r_pub: RPub::Int(small_int_weight()),
            }),
        ),
        frame_of(
            &Request::Call {
                session: 77,
                op,
                seq: 5,
            },
            Some(&MaskedCall {
                session: 77,
                seq: 5,
                op,
                x: f32s.clone(),
            }),
        ),
        frame_of(
            &Reply::Ok { compute_us: 33 },
            Some(&MaskedReply {
                seq: 5,
                y: u64s.clone(),
            }),
        ),
        frame_of(
            &Reply::Err(ErrorReply::new("unknown_session", "session 78 is not open")),
            None::<&()>,
        ),
        bytes_of(&TenantMessage::Attest { nonce: [3; 32] }),
        bytes_of(&TenantMessage::Generate {
            request: tenant_request(Prompt::Text {
                text: "Hello".into(),
                chat: true,
            }),
            api_key: "sk-test".into(),
        }),
        bytes_of(&TenantMessage::Generate {
            request: tenant_request(Prompt::Ids(vec![1, 2, 3, 70000])),
            api_key: String::new(),
        }),
        bytes_of(&TenantMessage::Generate {
            request: tenant_request(Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }])),
            api_key: "k".into(),
        }),
        bytes_of(&TenantEvent::Attestation {
            evidence: bytes_of(&Evidence::Insecure { reason: "x".into() }),
            claims: b"{\"remo\":{}}".to_vec(),
        }),
        bytes_of(&TenantEvent::Token {
            id: 12,
            piece: Some(" the".into()),
        }),
        bytes_of(&TenantEvent::Done {
            generation,
            text: "ab".into(),
            latency: LatencySplit::default(),
        }),
        bytes_of(&TenantEvent::Error(ErrorReply::new(
            "invalid_api_key",
            "no",
        ))),
        bytes_of(&f32s),
        bytes_of(&small_int_weight()),
        (64u32 << 20).to_le_bytes().to_vec(),
        {
            // A coordinator's batch of two calls.
            let call = |seq: u64, x: &Tensor| {
                frame_of(
                    &Request::Call {
                        session: 77,
                        op,
                        seq,
                    },
                    Some(&MaskedCall {
                        session: 77,
                        seq,
                        op,
                        x: x.clone(),
                    }),
                )
            };
            let (a, b) = (call(6, &u64s), call(7, &f32s));
            frame::encode_packed(&Request::Batch { calls: 2 }, [&a[..], &b[..]])
                .expect("a small batch")
        },
    ]
}

// ---- gguf -------------------------------------------------------------------------------------

/// Most bytes of one tensor decoded per input: the decode is linear in what the input holds.
const MAX_DECODE: u64 = 1 << 20;

fn walk(v: &Value) -> u64 {
    std::hint::black_box((
        v.as_u64(),
        v.as_i64(),
        v.as_f64(),
        v.as_str(),
        v.type_name(),
    ));
    match v {
        Value::Array(items) => items.iter().map(walk).sum::<u64>() + 1,
        _ => u64::from(v.type_code()),
    }
}

/// A GGUF image read as a model loader reads it: the header and directory, every metadata
/// value, every tensor's bytes, dequantized, and in the integer mode's exact form.
pub fn gguf(data: &[u8]) -> Vec<u64> {
    let file = match GgufFile::from_bytes(data.to_vec()) {
        Ok(f) => f,
        Err(e) => return vec![signature("gguf", &e.to_string())],
    };
    let mut parts = vec![signature("gguf", "ok")];
    for v in file.metadata().values() {
        std::hint::black_box(walk(v));
    }
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        parts.push(sig(key, &file.get_string_array(key)));
    }
    parts.push(sig("block_count", &file.get_u64("llama.block_count")));
    parts.push(sig(
        "eps",
        &file.get_f64("llama.attention.layer_norm_rms_epsilon"),
    ));
    parts.push(sig(
        "add_bos",
        &file.get_bool("tokenizer.ggml.add_bos_token"),
    ));
    for t in file.tensors() {
        let bytes = file.tensor_bytes(&t.name);
        parts.push(sig("tensor_bytes", &bytes));
        if t.n_bytes > MAX_DECODE {
            continue;
        }
        parts.push(sig("dequantize", &file.dequantize(&t.name)));
        if let (Ok(b), GgmlType::Q4_1 | GgmlType::Q8_0) = (bytes, t.ty) {
            let shift = exact_shift(&t.name, t.ty, b);
            parts.push(sig("exact_shift", &shift));
            if let Ok(s) = shift {
                parts.push(sig("integer_blocks", &integer_blocks(&t.name, t.ty, b, s)));
            }
        }
    }
    // A part of a valid file is a valid file: what `talaria shard-model` writes must read back.
    let names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
    if let Ok(w) = file.subset(&names, vec![("fuzz.part".into(), Value::Bool(true))]) {
        let back = GgufFile::from_bytes(w.to_bytes());
        assert!(back.is_ok(), "a subset does not read back: {back:?}");
    }
    parts
}

/// Tiny GGUF v3 models: a llama-shaped header, tokenizer arrays, every value type, and
/// tensors of every type the dequantizers read.
pub fn gguf_seeds() -> Vec<Vec<u8>> {
    let weights: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(2))
        .kv("llama.embedding_length", Value::U64(8))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(
                ["a", "b", "ab", "<|im_end|>"]
                    .map(|t| Value::String(t.into()))
                    .into(),
            ),
        )
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1); 4]),
        )
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a b".into())]),
        )
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .kv(
            "fuzz.every_type",
            Value::Array(vec![
                Value::Array(vec![Value::U8(1), Value::U8(255)]),
                Value::Array(vec![Value::I8(-1)]),
                Value::Array(vec![Value::U16(65535), Value::U16(0)]),
                Value::Array(vec![Value::I16(-2)]),
                Value::Array(vec![Value::I64(-3), Value::I64(i64::MAX)]),
                Value::Array(vec![Value::F64(0.25)]),
                Value::Array(vec![]),
            ]),
        )
        .tensor_f32("token_embd.weight", &[8, 4], &weights[..32])
        .tensor(TensorPayload {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![32, 2],
            ty: GgmlType::Q8_0,
            bytes: quantize_q8_0(&weights),
        })
        .tensor(TensorPayload {
            name: "blk.0.ffn_down.weight".into(),
            dims: vec![32, 2],
            ty: GgmlType::Q4_1,
            bytes: quantize_q4_1(&weights),
        })
        .tensor(TensorPayload {
            name: "output_norm.weight".into(),
            dims: vec![8],
            ty: GgmlType::F16,
            bytes: [0x00, 0x3c].repeat(8),
        })
        .tensor(TensorPayload {
            name: "blk.0.attn_norm.weight".into(),
            dims: vec![2, 2],
            ty: GgmlType::BF16,
            bytes: [0x80, 0x3f].repeat(4),
        });
    let full = w.to_bytes();
    let mut aligned = GgufWriter::new();
    aligned
        .kv("general.alignment", Value::U32(64))
        .kv("general.name", Value::String("tiny".into()))
        .tensor_f32("a", &[3], &[1.0, 2.0, 3.0])
        .tensor_f32("b", &[1, 1, 1, 2], &[4.0, 5.0]);
    let mut header_only = GgufWriter::new();
    header_only.kv("general.architecture", Value::String("llama".into()));
    vec![full, aligned.to_bytes(), header_only.to_bytes()]
}

// ---- topology ---------------------------------------------------------------------------------

const TOML_TOKENS: &[&str] = &[
    "[model]",
    "[coordinator]",
    "[[stage]]",
    "[[agent]]",
    "[remo]",
    "[tls]",
    "[limits]",
    "[batching]",
    "[admission]",
    "[attestation]",
    "=",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "#",
    "true",
    "false",
    "name",
    "file",
    "listen",
    "metrics",
    "layers",
    "lm_head",
    "backend",
    "weights",
    "tenant",
    "http",
    "max_sessions",
    "api_key_sha256",
    "rank",
    "precision",
    "generate",
    "ca",
    "cert",
    "key",
    "server_name",
    "max_frame_bytes",
    "max_calls",
    "max_wait_us",
    "allow_insecure",
    "ark",
    "ask",
    "measurements",
    "min_tcb",
    "\"cuda:0\"",
    "\"0-29\"",
    "\"[::1]:7400\"",
    "\"127.0.0.1:0\"",
    "\"full\"",
    "\"int\"",
    "inf",
    "nan",
    "1979-05-27T07:32:00Z",
    "\\u0000",
    "\\uD800",
];

/// A topology file read as every process of a host reads it, then queried.
pub fn topology(data: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/nonexistent/talaria-fuzz/topology.toml");
    match Topology::parse_for(&text, path, Role::All) {
        Ok(t) => {
            let layers = sig("layers", &t.check_layers(30));
            for l in [None, Some(0), Some(29), Some(usize::MAX)] {
                std::hint::black_box(t.stage_for(l));
            }
            for s in &t.stages {
                std::hint::black_box((t.stage_file(s), t.stage(&s.name), s.owns_layer(0)));
            }
            for a in &t.agents {
                std::hint::black_box((t.agent(&a.tenant), a.cert_dir(None)));
            }
            std::hint::black_box((t.coordinator_file(), t.remo.integer_mode()));
            vec![signature("topology", "ok"), layers]
        }
        // Each problem is a feature of its own: a file with one more problem fixed is progress.
        Err(e) if !e.problems().is_empty() => e
            .problems()
            .iter()
            .map(|p| signature(&p.key.replace(|c: char| c.is_ascii_digit(), ""), &p.message))
            .collect(),
        Err(e) => vec![signature(e.error_type(), &e.to_string())],
    }
}

/// The example topologies shipped with the project.
pub fn topology_seeds() -> Vec<Vec<u8>> {
    vec![
        include_bytes!("../../topology/examples/local.toml").to_vec(),
        include_bytes!("../../topology/examples/multi-host.toml").to_vec(),
    ]
}

// ---- openai -----------------------------------------------------------------------------------

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "false",
    "\"model\"",
    "\"messages\"",
    "\"prompt\"",
    "\"role\"",
    "\"content\"",
    "\"type\"",
    "\"text\"",
    "\"stop\"",
    "\"stream\"",
    "\"stream_options\"",
    "\"include_usage\"",
    "\"max_tokens\"",
    "\"max_completion_tokens\"",
    "\"temperature\"",
    "\"top_p\"",
    "\"seed\"",
    "\"n\"",
    "\"echo\"",
    "\"smollm2-135m\"",
    "\"user\"",
    "\"system\"",
    "\"developer\"",
    "\"assistant\"",
    "\"image_url\"",
    "\\u0000",
    "\\ud800",
    "\\\"",
    "1e-400",
    "[[[[[[[[",
    "]]]]]]]]",
    "{\"a\":{\"a\":",
];

/// Both OpenAI endpoints' bodies, decoded and checked as the routes do.
pub fn openai(data: &[u8]) -> Vec<u64> {
    let limits = Limits {
        model: "smollm2-135m",
        max_tokens: 2048,
    };
    let part = |chat| match decode_body(limits, chat, data) {
        Ok(r) => signature(
            "openai",
            &format!("ok {:?}", std::mem::discriminant(&r.prompt)),
        ),
        Err(e) => signature(e.code(), &e.to_string()),
    };
    vec![part(true), part(false)]
}

/// Real request bodies of both endpoints, as OpenAI's clients send them.
pub fn openai_seeds() -> Vec<Vec<u8>> {
    let bodies = [
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hello!"}]}),
        json!({
            "model": "smollm2-135m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is "},
                    {"type": "text", "text": "2+2?"}
                ]},
                {"role": "assistant", "content": null},
                {"role": "user", "content": "And 3+3?"}
            ],
            "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 7,
            "stop": ["\n\n", "END"], "stream": true, "stream_options": {"include_usage": true},
            "n": 1, "user": "ignored-field"
        }),
        json!({"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 16,
               "stop": "\n", "temperature": 0}),
        json!({"model": "smollm2-135m", "prompt": ["one prompt"], "stream": false, "echo": false}),
        json!({"model": "smollm2-135m", "prompt": [1, 2, 3, 4_294_967_295u32], "max_tokens": 2048}),
        json!({"model": "gpt-4", "prompt": "wrong model"}),
    ];
    bodies
        .iter()
        .map(|b| serde_json::to_vec(b).expect("JSON encodes"))
        .collect()
}

// ---- sev --------------------------------------------------------------------------------------

/// The real Milan report and VCEK shipped with the attestation crate (its fixtures/NOTICE.md).
const REPORT_HEX: &str = include_str!("../../attestation/fixtures/report_milan.hex");
const VCEK: &[u8] = include_bytes!("../../attestation/fixtures/vcek_milan.der");
const ARK: &[u8] = include_bytes!("../../attestation/fixtures/ark.pem");
const ASK: &[u8] = include_bytes!("../../attestation/fixtures/ask.pem");

fn real_report() -> Vec<u8> {
    hex::decode(REPORT_HEX.trim()).expect("the fixture is hex")
}

/// A verifier with AMD's real Milan roots, as a coordinator holds them (read from files once).
fn policy() -> Option<&'static Policy> {
    static POLICY: OnceLock<Option<Policy>> = OnceLock::new();
    POLICY
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("talaria-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let (ark, ask) = (dir.join("ark.pem"), dir.join("ask.pem"));
            std::fs::write(&ark, ARK).ok()?;
            std::fs::write(&ask, ASK).ok()?;
            let report = parse_report(&real_report()).ok()?;
            let p = Policy::new(
                &ark,
                &ask,
                vec![report.measurement],
                Default::default(),
                0,
                false,
            );
            let _ = std::fs::remove_dir_all(&dir);
            p.ok()
        })
        .as_ref()
}

/// A verification's outcome by its error type: only a malformed input's message says more (the
/// others quote what the agent sent).
fn verdict<T>(stage: &str, r: &Result<T, AttestationError>) -> u64 {
    match r {
        Err(e @ AttestationError::Malformed(_)) => signature(stage, &e.to_string()),
        Err(e) => signature(stage, e.error_type()),
        Ok(_) => signature(stage, "ok"),
    }
}

/// Attestation evidence as a coordinator or tenant reads it: a raw report, and postcard
/// evidence verified without a root and against the real AMD roots.
pub fn sev(data: &[u8]) -> Vec<u64> {
    let mut parts = vec![sig("report", &parse_report(data))];
    let evidence = frame::body::<Evidence>(data);
    parts.push(sig("evidence", &evidence));
    if let Ok(e) = &evidence {
        let insecure = InsecurePolicy {
            allow_insecure: false,
        };
        parts.push(verdict("without_root", &verify_without_root(e, insecure)));
        if let Some(p) = policy() {
            parts.push(verdict(
                "with_root",
                &talaria_attestation::verify_evidence(e, p),
            ));
        }
    }
    parts
}

/// The real report (raw and as evidence with its VCEK), valid-shaped reports of every
/// version, and insecure evidence.
pub fn sev_seeds() -> Vec<Vec<u8>> {
    let report = real_report();
    let mut seeds = vec![
        report.clone(),
        bytes_of(&Evidence::Snp {
            report: report.clone(),
            vcek_der: VCEK.to_vec(),
        }),
        bytes_of(&Evidence::Insecure {
            reason: "no /dev/sev-guest".into(),
        }),
    ];
    for version in [2u32, 3, 5] {
        let mut r = vec![0u8; talaria_attestation::REPORT_LEN];
        r[..4].copy_from_slice(&version.to_le_bytes());
        seeds.push(r.clone());
        seeds.push(bytes_of(&Evidence::Snp {
            report: r,
            vcek_der: VCEK[..64].to_vec(),
        }));
    }
    seeds
}
