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
