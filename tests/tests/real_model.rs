//! The engine on the real SmolLM2-135M-Instruct GGUF against independent goldens: llama.cpp's
//! tokenizer and a float64 numpy forward pass (`tools/`).

use std::sync::{Mutex, OnceLock};

use talaria_engine::{ChatMessage, chat_prompt};
use talaria_gpu_node::PlainEngine;
use talaria_tests::{golden, golden_cases, ids, real_model};

fn engine() -> &'static Mutex<PlainEngine> {
    static ENGINE: OnceLock<Mutex<PlainEngine>> = OnceLock::new();
    ENGINE.get_or_init(|| Mutex::new(PlainEngine::load(real_model()).expect("real model loads")))
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let e = engine().lock().unwrap();
    let cases = golden("tokenizer.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            e.tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "encoding {text:?}"
        );
        assert_eq!(
            e.tokenizer.decode(&ids(&case["ids"])).unwrap(),
            text,
            "decoding {text:?}"
        );
    }
}

#[test]
fn chat_template_matches_the_golden_prompts() {
    let e = engine().lock().unwrap();
    let prompts = golden("prompts.json");
    let mut chats = 0;
    for p in prompts["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let full = if p["chat"].as_bool().unwrap() {
            chats += 1;
            chat_prompt(&[ChatMessage {
                role: "user".into(),
                content: text.into(),
            }])
        } else {
            text.to_string()
        };
        assert_eq!(
            e.tokenizer.encode(&full).unwrap(),
            ids(&p["prompt_ids"]),
            "{text:?}"
        );
    }
    assert!(chats >= 1);
}

#[test]
fn greedy_ids_match_the_reference_forward_pass() {
    let mut e = engine().lock().unwrap();
    // Decode reads the stored Q4_1 / Q8_0 blocks, so the goldens check that path, not the
    // dense fallback.
    assert!(
        e.quant.is_some(),
        "the plain engine decodes from dense weights"
    );
    let eos = e.tokenizer.eos();
    for case in golden_cases() {
        let g = e.generate(&case.request(eos), |_| Ok(())).unwrap();
        assert_eq!(g.ids, case.ids, "prompt {}", case.name);
    }
}

#[test]
fn fetching_again_finds_the_verified_file() {
    let path = real_model();
    let dir = path.parent().unwrap();
    let again = talaria_model_store::fetch(dir, &talaria_model_store::SMOLLM2_135M).unwrap();
    assert_eq!(again, talaria_model_store::Fetched::AlreadyPresent(path));
}

/// `talaria shard-model`'s parts: each holds exactly its tensors, a stage loaded from its shard has
/// the same folded weights as from the whole file, and a shard is refused by any other part.
#[test]
fn shards_hold_their_part_and_nothing_else() {
    use talaria_engine::{BlockOp, OpId};
    use talaria_gguf::GgufFile;
    use talaria_gpu_node::LinearWeights;
    use talaria_model_file::{Part, read_config};
    let whole = GgufFile::open(real_model()).unwrap();
    let config = read_config(&whole).unwrap();
    let cut = |part: &Part| {
        GgufFile::from_bytes(part.shard(&whole, &config, "test").unwrap().to_bytes()).unwrap()
    };
    let first = Part::Stage {
        layers: 0..=14,
        lm_head: false,
    };
    let last = Part::Stage {
        layers: 15..=29,
        lm_head: true,
    };
    let (a, b, c) = (cut(&first), cut(&last), cut(&Part::Coordinator));
    let layers = |f: &GgufFile| -> std::collections::BTreeSet<usize> {
        f.tensors()
            .iter()
            .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse().ok())
            .collect()
    };
    assert_eq!(layers(&a), (0..=14).collect());
    assert_eq!(layers(&b), (15..=29).collect());
    assert!(layers(&c).is_empty() && c.has_tensor("token_embd.weight"));
    assert!(!a.has_tensor("token_embd.weight") && b.has_tensor("output_norm.weight"));
    // Every stage tensor is in exactly one stage shard, byte for byte.
    for t in whole
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk."))
    {
        let holder = if a.has_tensor(&t.name) { &a } else { &b };
        assert_eq!(
            holder.tensor_bytes(&t.name).unwrap(),
            whole.tensor_bytes(&t.name).unwrap()
        );
    }
    let from_shard =
        LinearWeights::load_on(&b, &config, 15..=29, true, talaria_topology::Backend::Cpu).unwrap();
    let from_whole = LinearWeights::load_on(
        &whole,
        &config,
        15..=29,
        true,
        talaria_topology::Backend::Cpu,
    )
    .unwrap();
    for op in [
        OpId::Block {
            layer: 29,
            op: BlockOp::Qkv,
        },
        OpId::LmHead,
    ] {
        assert!(from_shard.dense(op).unwrap() == from_whole.dense(op).unwrap());
    }
    // A shard for other layers, or for another process, is refused with what it holds.
    first.check_file(&a).unwrap();
    Part::Coordinator.check_file(&c).unwrap();
    Part::Coordinator.check_file(&whole).unwrap();
    let e = last.check_file(&a).unwrap_err().to_string();
    assert!(
        e.contains("holds layers 0-14") && e.contains("needs layers 15-29"),
        "{e}"
    );
    let e = Part::Stage {
        layers: 10..=14,
        lm_head: true,
    }
    .check_file(&a)
    .unwrap_err();
    assert!(e.to_string().contains("and the LM head"), "{e}");
    assert!(Part::Coordinator.check_file(&a).is_err());
    assert!(first.check_file(&c).is_err());
    // Shards are cut from the whole model only.
    assert!(first.shard(&a, &config, "x").is_err());
}
