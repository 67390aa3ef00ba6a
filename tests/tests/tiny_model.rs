//! The engine on a tiny random-weight GGUF written by the test support: fast, and it exercises
//! every loader error.

use talaria_engine::{
    BlockOp, EngineError, GenerateRequest, LinearOps, OpId, Rows, SamplingParams, StopReason,
};
use talaria_gguf::GgufFile;
use talaria_gpu_node::{LinearWeights, NodeError, PlainEngine};
use talaria_model_file::{ModelFileError, read_config};
use talaria_tests::{TINY_D, TinyOptions, tiny_model};

fn tiny(opts: &TinyOptions) -> Result<PlainEngine, NodeError> {
    PlainEngine::from_gguf(&GgufFile::from_bytes(tiny_model(opts)).unwrap())
}

fn greedy(max_tokens: usize, prompt: &[u32]) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    }
}

#[test]
fn generation_is_deterministic_and_respects_the_budget() {
    let mut e = tiny(&TinyOptions::default()).unwrap();
    let a = e.generate(&greedy(12, &[5, 6, 7]), |_| Ok(())).unwrap();
    let b = e.generate(&greedy(12, &[5, 6, 7]), |_| Ok(())).unwrap();
    assert_eq!(a.ids.len(), 12);
    assert_eq!(a.stop_reason, StopReason::Length);
    assert_eq!(a.ids, b.ids);
    let other = tiny(&TinyOptions {
        seed: 2,
        ..Default::default()
    })
    .unwrap()
    .generate(&greedy(12, &[5, 6, 7]), |_| Ok(()))
    .unwrap();
    assert_ne!(
        a.ids, other.ids,
        "different weights should give different tokens"
    );
}

#[test]
fn batched_prefill_equals_token_by_token() {
    let e = tiny(&TinyOptions::default()).unwrap();
    let mut w = e.weights;
    let prompt = [10u32, 70, 71, 3, 200, 9];
    let mut cache = e.model.new_cache();
    let batched = e.model.forward(&mut w, &mut cache, &prompt).unwrap();
    let mut cache = e.model.new_cache();
    let mut last = Vec::new();
    for t in prompt {
        last = e.model.forward(&mut w, &mut cache, &[t]).unwrap();
    }
    assert_eq!(cache.len(), prompt.len());
    let max_diff = batched
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff < 1e-4,
        "batched and incremental logits differ by {max_diff}"
    );
}

#[test]
fn eos_stops_generation() {
    let mut e = tiny(&TinyOptions::default()).unwrap();
    let free = e.generate(&greedy(8, &[5, 6]), |_| Ok(())).unwrap();
    let stop = free.ids[3];
    let mut req = greedy(8, &[5, 6]);
    req.stop_ids = vec![stop];
    let g = e.generate(&req, |_| Ok(())).unwrap();
    let first = free.ids.iter().position(|&t| t == stop).unwrap();
    assert_eq!(g.ids, free.ids[..=first]);
    assert_eq!(g.stop_reason, StopReason::Eos);
}

#[test]
fn context_limit_stops_cleanly() {
    let mut e = tiny(&TinyOptions {
        context_length: 10,
        ..Default::default()
    })
    .unwrap();
    let g = e.generate(&greedy(50, &[5, 6, 7, 8]), |_| Ok(())).unwrap();
    assert_eq!(g.stop_reason, StopReason::Context);
    assert_eq!(
        g.prompt_ids.len() + g.ids.len(),
        11,
        "the last token needs no position"
    );
    // A prompt the context cannot hold is the tenant's error, not an empty success.
    let too_long: Vec<u32> = (0..11).collect();
    let err = e.generate(&greedy(1, &too_long), |_| Ok(())).unwrap_err();
    assert_eq!(err.error_type(), "context_length_exceeded");
    // One that exactly fills it still gets its one token.
    let full: Vec<u32> = (0..10).collect();
    let g = e.generate(&greedy(5, &full), |_| Ok(())).unwrap();
    assert_eq!((g.ids.len(), g.stop_reason), (1, StopReason::Context));
}

#[test]
fn bad_token_is_an_error_and_leaves_the_cache_alone() {
    let e = tiny(&TinyOptions::default()).unwrap();
    let mut w = e.weights;
    let mut cache = e.model.new_cache();
    e.model.forward(&mut w, &mut cache, &[4, 5]).unwrap();
    let err = e
        .model
        .forward(&mut w, &mut cache, &[6, 1_000_000])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::TokenOutOfRange { id: 1_000_000, .. }),
        "{err}"
    );
    assert_eq!(cache.len(), 2);
    assert!(matches!(
        e.model.forward(&mut w, &mut cache, &[]),
        Err(EngineError::EmptyPrompt)
    ));
    // The cache still works after the errors.
    e.model.forward(&mut w, &mut cache, &[6]).unwrap();
    assert_eq!(cache.len(), 3);
}

#[test]
fn wrong_input_shape_is_a_typed_error() {
    let e = tiny(&TinyOptions::default()).unwrap();
    let mut w = e.weights;
    let x = Rows::new(2, TINY_D + 1, vec![0.0; 2 * (TINY_D + 1)]).unwrap();
    let op = OpId::Block {
        layer: 0,
        op: BlockOp::Qkv,
    };
    assert!(matches!(w.linear(op, &x), Err(EngineError::Shape { .. })));
    let x = Rows::new(1, TINY_D, vec![0.0; TINY_D]).unwrap();
    let op = OpId::Block {
        layer: 99,
        op: BlockOp::Qkv,
    };
    assert!(matches!(w.linear(op, &x), Err(EngineError::BadOp { .. })));
    assert!(Rows::new(2, 3, vec![0.0; 5]).is_err());
}

/// The folded, fused, transposed weights must compute exactly what the stored tensors define.
#[test]
fn folded_projections_match_the_stored_tensors() {
    let f = GgufFile::from_bytes(tiny_model(&TinyOptions::default())).unwrap();
    let config = read_config(&f).unwrap();
    let mut w = LinearWeights::load(&f, &config).unwrap();
    let x: Vec<f32> = (0..2 * TINY_D)
        .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
        .collect();
    let rows = Rows::new(2, TINY_D, x.clone()).unwrap();
    let got = w
        .linear(
            OpId::Block {
                layer: 1,
                op: BlockOp::GateUp,
            },
            &rows,
        )
        .unwrap();
    let (gain, _) = f.dequantize("blk.1.ffn_norm.weight").unwrap();
    let (gate, _) = f.dequantize("blk.1.ffn_gate.weight").unwrap();
    let (up, _) = f.dequantize("blk.1.ffn_up.weight").unwrap();
    let d_ff = config.d_ff;
    for r in 0..2 {
        for (o, expected) in (0..2 * d_ff).map(|o| {
            let (m, j) = if o < d_ff {
                (&gate, o)
            } else {
                (&up, o - d_ff)
            };
            let dot: f32 = (0..TINY_D)
                .map(|i| x[r * TINY_D + i] * gain[i] * m[j * TINY_D + i])
                .sum();
            (o, dot)
        }) {
            let g = got.row(r)[o];
            assert!(
                (g - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                "row {r} col {o}: {g} vs {expected}"
            );
        }
    }
}

#[test]
fn loader_errors_are_typed() {
    let wrong_arch = tiny(&TinyOptions {
        architecture: "qwen2".into(),
        ..Default::default()
    });
    assert!(matches!(
        wrong_arch,
        Err(NodeError::ModelFile(ModelFileError::Unsupported(_)))
    ));

    let missing = tiny(&TinyOptions {
        drop_tensor: Some("blk.1.ffn_up.weight".into()),
        ..Default::default()
    });
    assert!(
        matches!(missing, Err(NodeError::ModelFile(ModelFileError::Gguf(talaria_gguf::GgufError::MissingTensor(ref n)))) if n == "blk.1.ffn_up.weight")
    );

    for name in [
        "blk.0.attn_k.weight",
        "blk.0.attn_norm.weight",
        "token_embd.weight",
    ] {
        let r = tiny(&TinyOptions {
            misshape_tensor: Some(name.into()),
            ..Default::default()
        });
        let err = r
            .err()
            .unwrap_or_else(|| panic!("misshapen {name} was accepted"));
        assert!(
            matches!(err, NodeError::ModelFile(ModelFileError::InvalidModel(ref m)) if m.contains(name)),
            "{err}"
        );
    }
}

#[test]
fn tiny_tokenizer_round_trips() {
    let e = tiny(&TinyOptions::default()).unwrap();
    let text = "hello the world 123 <|im_start|>";
    let ids = e.tokenizer.encode(text).unwrap();
    assert!(ids.contains(&1), "the special token is recognised: {ids:?}");
    assert!(
        ids.contains(&(3 + 256 + 3)),
        "the merge 'hell'+'o' applies: {ids:?}"
    );
    assert_eq!(e.tokenizer.decode(&ids).unwrap(), text);
}
