//! The ideal attacker (`talaria attack --attack ideal`) on the real model, through real
//! processes: victims recorded by `talaria generate --engine remo --tap` (one session each,
//! merged into one tap), attacked by `talaria attack`, scored against the truth the test wrote.
//!
//! Each check can fail: the plaintext control and a weak mask must be read, the one-time pad
//! must give nothing, and linking sessions of the same prompt must add information.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use talaria_tests::cluster::bin;
use talaria_tests::{real_model, repo_root};

/// Short prompts keep the suite within its time (every position costs the attack a batch of
/// simulated candidates through the whole model).
const PROMPTS: [&str; 2] = ["The capital of Japan is", "Dogs are loyal animals that"];

/// Tokens each victim generates: the prefill's and two decode passes (attacked as the response).
const GEN_TOKENS: &str = "3";

fn talaria(args: &[&str]) -> std::process::Output {
    Command::new(bin("talaria"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("talaria runs")
}

/// Records one victim session into `dir` with the ReMO flags `remo`; the generation's JSON.
fn victim(dir: &Path, prompt: &str, seed: u64, remo: &[&str]) -> Value {
    let model = real_model();
    let seed = seed.to_string();
    let mut args = vec![
        "generate",
        "--engine",
        "remo",
        "--model-file",
        model.to_str().unwrap(),
        "--tap",
        dir.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        GEN_TOKENS,
        "--remo-seed",
        &seed,
        "--remo-pool",
        "0",
        // The ideal attacker is given every prompt's length (no length padding): the stronger
        // attacker for what these tests measure, the hiding of the content.
        "--remo-pad-rows",
        "off",
        "--json",
    ];
    args.extend_from_slice(remo);
    let o = talaria(&args);
    assert!(
        o.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

/// Records one session per prompt (session k gets mask seed `seed + k`) and merges them into
/// one tap at `out`, as the cloud would see them, with the truth beside it.
fn record(scratch: &Path, out: &Path, prompts: &[&str], seed: u64, remo: &[&str]) {
    std::fs::create_dir_all(out).unwrap();
    let mut events = Vec::new();
    let mut truth = Vec::new();
    for (k, prompt) in prompts.iter().enumerate() {
        let session = k as u64 + 1;
        let dir = scratch.join(format!("{}-{session}", out.file_name().unwrap().display()));
        let g = victim(&dir, prompt, seed + session, remo);
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        for e in index["events"].as_array().unwrap() {
            let mut e = e.clone();
            e["session"] = json!(session);
            for key in ["file", "basis_file"] {
                if let Some(name) = e[key].as_str().map(str::to_owned) {
                    let renamed = format!("s{session}-{name}");
                    std::fs::copy(dir.join(&name), out.join(&renamed)).unwrap();
                    e[key] = json!(renamed);
                }
            }
            events.push(e);
        }
        std::fs::copy(dir.join("public.json"), out.join("public.json")).unwrap();
        let ids = g["ids"].as_array().unwrap();
        truth.push(json!({
            "session": session,
            "prompt": g["prompt_ids"],
            "text": prompt,
            // The last generated token never goes back into the model.
            "response": ids[..ids.len() - 1],
        }));
    }
    let index = json!({"format": talaria_gpu_node::TAP_FORMAT, "events": events});
    std::fs::write(out.join("index.json"), index.to_string()).unwrap();
    let truth = json!({"format": "talaria-truth-1", "sessions": truth});
    std::fs::write(out.join("truth.json"), truth.to_string()).unwrap();
}

/// `talaria attack --attack ideal` on a tap, with a small beam; the run's JSON (score and
/// guesses).
fn ideal(tap: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "attack",
        "--tap",
        tap.to_str().unwrap(),
        "--attack",
        "ideal",
        "--beam",
        "2",
        "--top-k",
        "16",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = talaria(&args);
    assert!(
        o.status.success(),
        "attack failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    out["runs"][0].clone()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// One line of a score's figures, for the log.
fn summary(name: &str, s: &Value) {
    let (i, p) = (&s["information"], &s["paired"]);
    eprintln!(
        "{name}: prompt {:.1} %, {} / {} positions right (prior on the same prefix {}, McNemar \
         {}:{} p = {:.2e}), {:.3} bits/token; with the true prefix {:.3} bits/token",
        100.0 * f(&s["accuracy"]),
        p["attack_correct"],
        p["positions"],
        p["baseline_correct"],
        p["attack_only"],
        p["baseline_only"],
        f(&p["p_value"]),
        f(&i["bits_per_token"]),
        f(&s["true_prefix"]["bits_per_token"]),
    );
}

/// Plaintext, a weak mask and the one-time pad: the ideal attack reads the first two and gets
/// nothing from the third.
#[test]
fn the_ideal_attack_reads_plaintext_and_weak_masks_and_nothing_of_the_pad() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("victims");

    // The control: masking off. Every token, every position.
    let plain = dir.path().join("plain");
    record(&scratch, &plain, &PROMPTS, 10, &["--remo-off"]);
    let run = ideal(&plain, &[]);
    let s = &run["score"];
    summary("plaintext", s);
    assert!(f(&s["accuracy"]) >= 0.975, "plaintext: {s}");
    assert_eq!(f(&s["response"]["accuracy"]), 1.0, "{s}");
    let p = &s["paired"];
    assert_eq!(p["attack_correct"], p["positions"], "{p}");
    assert!(f(&p["p_value"]) < 0.05, "{p}");
    assert!(f(&s["information"]["bits_per_token"]) > 1.0, "{s}");
    assert_eq!(f(&s["true_prefix"]["posterior_top1"]), 1.0, "{s}");
    // Every guess carries its beliefs and the prior's own guesses.
    let g = &run["guesses"][0];
    assert!(g["beliefs"].as_array().unwrap().len() >= 5, "{g}");
    assert!(g["baseline"]["tokens"].is_array(), "{g}");

    // A weak float mask (σ = 1, f64 GEMM): nearly everything.
    let weak = dir.path().join("weak");
    record(
        &scratch,
        &weak,
        &PROMPTS,
        20,
        &["--remo-precision", "f64-gemm", "--remo-scale", "1"],
    );
    let s = ideal(&weak, &[])["score"].clone();
    summary("σ = 1", &s);
    assert!(f(&s["accuracy"]) >= 0.975, "σ = 1: {s}");
    assert!(f(&s["paired"]["p_value"]) < 0.05, "{s}");
    assert!(
        f(&s["paired"]["attack_only"]) > f(&s["paired"]["baseline_only"]),
        "{s}"
    );
    assert!(f(&s["information"]["bits_per_token"]) > 1.0, "{s}");

    // The integer one-time pad: the evidence is nothing, the attack is its prior.
    let pad = dir.path().join("pad");
    record(&scratch, &pad, &PROMPTS, 30, &["--remo-precision", "int"]);
    let run = ideal(&pad, &[]);
    let s = &run["score"];
    summary("int", s);
    let p = &s["paired"];
    assert!(f(&p["p_value"]) > 0.05, "the pad: {p}");
    assert!(f(&s["information"]["bits_per_token"]).abs() < 1e-6, "{s}");
    assert!(f(&s["true_prefix"]["bits_per_token"]).abs() < 1e-6, "{s}");
    for g in run["guesses"].as_array().unwrap() {
        assert_eq!(g["tokens"], g["baseline"]["tokens"], "{g}");
    }

    malformed_taps_get_clear_errors(&plain, dir.path());
}

/// A tap whose LM-head call has as many rows as the prompt (one real row is all it may have)
/// is refused with a typed error, not a panic.
fn malformed_taps_get_clear_errors(good: &Path, scratch: &Path) {
    let bad = scratch.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for e in std::fs::read_dir(good).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(bad.join("index.json")).unwrap()).unwrap();
    let events = index["events"].as_array_mut().unwrap();
    let calls: Vec<usize> = (0..events.len())
        .filter(|&i| events[i]["kind"] == "call")
        .collect();
    let (first, head) = (calls[0], calls[120]);
    assert_eq!(events[head]["op"], "lm_head");
    let file = events[first]["file"].as_str().unwrap().to_owned();
    events[head]["file"] = json!(file);
    events[head]["rows"] = events[first]["rows"].clone();
    std::fs::write(bad.join("index.json"), index.to_string()).unwrap();
    let o = talaria(&[
        "attack",
        "--tap",
        bad.to_str().unwrap(),
        "--attack",
        "ideal",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted a bad tap");
    assert!(err.contains("lm_head has"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Three sessions of the same prompt at σ = 30: linked, their views add up (the noise variance
/// falls by 3), and the attack learns more about each token than from one session.
#[test]
fn linking_sessions_of_the_same_prompt_adds_information() {
    let dir = tempfile::tempdir().unwrap();
    let tap = dir.path().join("repeated");
    let prompt = "The old man walked slowly down the road and";
    record(
        &dir.path().join("victims"),
        &tap,
        &[prompt, prompt, prompt],
        40,
        &["--remo-precision", "f64-gemm", "--remo-scale", "30"],
    );
    let single = ideal(&tap, &[]);
    let linked = ideal(&tap, &["--link-sessions"]);
    let bits = |run: &Value| f(&run["score"]["true_prefix"]["bits_per_token"]);
    let (one, three) = (bits(&single), bits(&linked));
    eprintln!(
        "σ = 30, bits/token along the true tokens: one session {one:.3}, three linked {three:.3}"
    );
    assert!(
        single["guesses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["group"].is_null())
    );
    assert!(
        linked["guesses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["group"] == 1),
        "{linked}"
    );
    assert!(three > one + 0.5, "linked {three} bits, one session {one}");
    assert!(
        f(&linked["score"]["true_prefix"]["bits_ci95"][0]) > 0.0,
        "{}",
        linked["score"]
    );
}
