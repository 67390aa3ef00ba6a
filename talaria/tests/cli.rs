//! The `talaria` binary as a user runs it: real processes on the real model.

use std::process::{Command, Output};

use serde_json::Value;
use talaria_tests::{TinyOptions, golden, ids, real_model, write_tiny_model};

fn talaria(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("talaria runs")
}

fn ok_json(args: &[&str]) -> Value {
    let out = talaria(args);
    assert!(
        out.status.success(),
        "talaria {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn csv(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn json_greedy_ids_match_the_reference() {
    let model = real_model();
    let model = model.to_str().unwrap();
    let reference = golden("greedy.json");
    let prompts = golden("prompts.json");
    // Two prompts through the process boundary: one plain text, one chat.
    for name in ["story", "chat_list"] {
        let r = reference["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap();
        let p = prompts["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        let max = p["max_tokens"].to_string();
        let out = ok_json(&[
            "generate",
            "--engine",
            "plain",
            "--prompt-ids",
            &csv(&ids(&r["prompt_ids"])),
            "--max-tokens",
            &max,
            "--json",
            "--model-file",
            model,
        ]);
        assert_eq!(ids(&out["ids"]), ids(&r["ids"]), "{name}");
        assert_eq!(ids(&out["prompt_ids"]), ids(&r["prompt_ids"]));
        assert!(out["prefill_ms"].as_f64().unwrap() > 0.0);
        assert!(out["decode_tok_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn text_prompt_streams_the_same_text_as_json() {
    let model = real_model();
    let model = model.to_str().unwrap();
    let args = [
        "generate",
        "--prompt",
        "Once upon a time, there was a little",
        "--max-tokens",
        "25",
        "--model-file",
        model,
    ];
    let out = talaria(&args);
    assert!(out.status.success());
    let streamed = String::from_utf8(out.stdout).unwrap();
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let j = ok_json(&json_args);
    assert_eq!(streamed.trim_end_matches('\n'), j["text"].as_str().unwrap());
    assert_eq!(j["generated_tokens"], 25);
    // The reference's greedy continuation of this prompt.
    let story = &golden("greedy.json")["results"][0];
    assert_eq!(ids(&j["ids"]), ids(&story["ids"])[..25]);
}

#[test]
fn chat_stops_at_end_of_turn() {
    let model = real_model();
    let j = ok_json(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of Germany?",
        "--max-tokens",
        "64",
        "--json",
        "--model-file",
        model.to_str().unwrap(),
    ]);
    assert_eq!(j["stop_reason"], "eos");
    assert_eq!(*ids(&j["ids"]).last().unwrap(), 2, "ends with <|im_end|>");
    let text = j["text"].as_str().unwrap();
    assert!(text.contains("Berlin"), "{text}");
    assert!(!text.contains("<|im_end|>"));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = real_model();
    let model = model.to_str().unwrap();
    let run = |seed: &str| {
        ids(&ok_json(&[
            "generate",
            "--prompt",
            "The weather today is",
            "--max-tokens",
            "16",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
            "--model-file",
            model,
        ])["ids"])
    };
    let a = run("7");
    assert_eq!(a, run("7"));
    assert!(
        ["8", "9", "10"].iter().any(|s| run(s) != a),
        "every seed gave the same tokens"
    );
}

#[test]
fn corrupt_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(real_model()).unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("truncated", good[..good.len() / 3].to_vec()),
        ("bad magic", [b"XXXX".as_slice(), &good[4..4096]].concat()),
        ("empty", vec![]),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        let out = talaria(&[
            "generate",
            "--prompt",
            "hi",
            "--model-file",
            path.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} was accepted");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            err.contains("m.gguf"),
            "{what}: the error names the file: {err}"
        );
    }
    let tiny = write_tiny_model(
        dir.path(),
        &TinyOptions {
            architecture: "mamba".into(),
            ..Default::default()
        },
    );
    let out = talaria(&[
        "generate",
        "--prompt",
        "hi",
        "--model-file",
        tiny.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mamba") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let model = real_model();
    let model = model.to_str().unwrap();
    for args in [
        vec![
            "generate",
            "--prompt",
            "x",
            "--temperature",
            "-1",
            "--model-file",
            model,
        ],
        vec![
            "generate",
            "--prompt",
            "x",
            "--top-p",
            "0",
            "--model-file",
            model,
        ],
        vec![
            "generate",
            "--prompt-ids",
            "1,99999999",
            "--model-file",
            model,
        ],
        vec!["generate", "--prompt", "x", "--prompt-ids", "1"],
        vec!["generate"],
    ] {
        let out = talaria(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            !err.contains("panicked") && !err.is_empty(),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn missing_model_points_to_fetch_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(["generate", "--prompt", "hi"])
        .env("TALARIA_HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("talaria fetch-model"));
}

#[test]
fn bench_writes_its_numbers() {
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("bench.json");
    let j = ok_json(&[
        "bench",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--out",
        out_file.to_str().unwrap(),
        "--model-file",
        model.to_str().unwrap(),
    ]);
    assert!(j["median_prefill_tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["median_decode_tok_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(j["prompt_tokens"], 16);
    let written: Value = serde_json::from_str(&std::fs::read_to_string(out_file).unwrap()).unwrap();
    assert_eq!(written, j);
}

#[test]
fn fetch_model_is_idempotent_and_prints_only_the_path() {
    let model = real_model();
    let out = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .arg("fetch-model")
        .env("TALARIA_HOME", model.parent().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim_end(),
        model.to_str().unwrap()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already present and verified"));
}

#[test]
fn remo_engine_through_the_cli() {
    let model = real_model();
    let model = model.to_str().unwrap();
    let story = &golden("greedy.json")["results"][0];
    let dir = tempfile::tempdir().unwrap();
    let tap = dir.path().join("tap");
    let j = ok_json(&[
        "generate",
        "--engine",
        "remo",
        "--prompt-ids",
        &csv(&ids(&story["prompt_ids"])),
        "--max-tokens",
        "8",
        "--remo-precision",
        "f32",
        "--remo-scale",
        "30",
        "--remo-seed",
        "5",
        "--json",
        "--tap",
        tap.to_str().unwrap(),
        "--model-file",
        model,
    ]);
    assert_eq!(ids(&j["ids"]), ids(&story["ids"])[..8]);
    assert_eq!(j["engine"], "remo");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(tap.join("index.json")).unwrap()).unwrap();
    let calls = index["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "call")
        .count();
    assert_eq!(calls, 8 * 121);

    for bad in [
        ["--remo-rank", "1.5"],
        ["--remo-precision", "f16"],
        ["--remo-scale", "-3"],
    ] {
        let out = talaria(&[
            "generate",
            "--engine",
            "remo",
            "--prompt",
            "hi",
            "--model-file",
            model,
            bad[0],
            bad[1],
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !err.contains("panicked"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn lossless_reports_agreement_drift_and_cost() {
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\nOnce upon a time\n").unwrap();
    let out = ok_json(&[
        "lossless",
        "--prompts",
        prompts.to_str().unwrap(),
        "--n-prompts",
        "2",
        "--max-tokens",
        "3",
        "--precisions",
        "f32,f64-gemm",
        "--scales",
        "10",
        "--model-file",
        model.to_str().unwrap(),
    ]);
    let reports = out.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    for r in reports {
        assert_eq!(r["prompts"], 2);
        assert_eq!(r["token_agreement"], 1.0, "{r}");
        assert!(r["max_abs_dlogit"].as_f64().unwrap() < 0.1);
        assert!(r["online_mask_ms_per_token"].as_f64().unwrap() > 0.0);
        // One pad product per real row and no more: the dummy rows are cover rows whose
        // products Freivalds' check makes unnecessary. (Below the model's multiply-adds per
        // position: a prefill runs the LM head for its last position only.)
        let (offline, model) = (
            r["offline_mask_macs_per_token"].as_f64().unwrap(),
            r["model_macs_per_token"].as_f64().unwrap(),
        );
        assert!(
            offline <= model && offline > 0.8 * model,
            "{offline} vs {model}"
        );
    }
    assert_eq!(reports[1]["config"]["precision"], "f64-gemm");
    assert!(reports[1]["max_abs_dlogit"].as_f64().unwrap() < 1e-3);
}
