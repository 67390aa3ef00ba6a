//! The attack suite on the real model, through real processes: the small grid of
//! `talaria attack-report`, `talaria attack` on a recorded tap, and malformed taps.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use talaria_engine::{BlockOp, OpId};
use talaria_gpu_node::PlainEngine;
use talaria_tests::cluster::bin;
use talaria_tests::{real_model, repo_root};

fn talaria(args: &[&str]) -> std::process::Output {
    Command::new(bin("talaria"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("talaria runs")
}

fn attack<'a>(setting: &'a Value, name: &str) -> &'a Value {
    setting["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["attack"] == name)
        .unwrap_or_else(|| panic!("no {name} in {setting}"))
}

fn setting<'a>(report: &'a Value, prefix: &str) -> &'a Value {
    report["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no setting {prefix}"))
}

fn acc(a: &Value) -> f64 {
    a["accuracy"].as_f64().unwrap()
}

/// No attack's 95 % interval lies above the frequency prior's, and the setting does not leak.
fn at_chance(setting: &Value) {
    assert_eq!(setting["leaks"], false, "{setting}");
    let prior_hi = attack(setting, "prior")["ci95"][1].as_f64().unwrap();
    for a in setting["attacks"].as_array().unwrap() {
        assert!(
            a["ci95"][0].as_f64().unwrap() <= prior_hi,
            "{a} above the prior in {}",
            setting["name"]
        );
    }
}

/// Runs `talaria attack-report --small` on the victims' first prompts; the report's JSON.
fn attack_report(out: &Path, extra: &[&str]) -> Value {
    let model = real_model();
    let mut args = vec![
        "attack-report",
        "--gen-tokens",
        "3",
        "--shortlist",
        "32",
        "--model-file",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = talaria(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "attack-report failed: {stderr}");
    serde_json::from_slice(&std::fs::read(out.join("attack-report.json")).unwrap()).unwrap()
}

/// Every attack but the ideal one (tests/attack_ideal.rs runs it: minutes per tap).
const CLASSIC: &str = "prior,nn,forward,projection,gaussian,multi-view,learned,exactness";

/// The small grid in two runs: every attack on the control and the default (with its drift);
/// and on the two leaking float settings only the prior and the attacks that must find each
/// leak (the others add minutes there, and nothing the first run does not test).
#[test]
fn the_small_grid_finds_every_leak_and_nothing_at_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let taps = dir.path().join("taps");
    let report = attack_report(
        &out,
        &[
            "--small",
            "--settings",
            "plaintext;default",
            "--attacks",
            CLASSIC,
            "--victims",
            "4",
            "--drift-prompts",
            "1",
            "--drift-tokens",
            "4",
            "--keep-taps",
            "--taps",
            taps.to_str().unwrap(),
        ],
    );
    assert!(report["victim_tokens"].as_u64().unwrap() >= 30, "{report}");
    // The response's length is read off the decode passes in every mode; the prompt's off the
    // prefill's rows with masking off (the attack's power), and only to its bucket at the
    // default, whose padding sends 16 rows for every one of these short prompts
    // (docs/attacks.md).
    for (name, prompts_read) in [("plaintext", 4), ("default", 0)] {
        let m = &setting(&report, name)["metadata"];
        assert_eq!(m["sessions"].as_u64(), Some(4), "{name}: {m}");
        assert_eq!(
            m["prompt_length_exact"].as_u64(),
            Some(prompts_read),
            "{name}: {m}"
        );
        assert_eq!(m["response_length_exact"].as_u64(), Some(4), "{name}: {m}");
    }
    let leaky_out = dir.path().join("leaky");
    let leaky = attack_report(
        &leaky_out,
        &[
            "--small",
            "--settings",
            "f64-gemm, rank 1/2;f64-gemm, σ=1",
            "--attacks",
            "prior,projection,gaussian",
            "--victims",
            "2",
            "--drift-prompts",
            "0",
            "--no-plot",
        ],
    );
    assert_eq!(leaky["settings"].as_array().unwrap().len(), 2, "{leaky}");

    // The control: against the plaintext tap the matching attacks recover the prompts.
    let plain = setting(&report, "plaintext");
    for name in [
        "nn",
        "forward",
        "projection",
        "gaussian",
        "multi-view",
        "exactness",
    ] {
        assert!(
            acc(attack(plain, name)) >= 0.975,
            "{name} on plaintext: {plain}"
        );
    }
    // Rank d/2 leaks the complement exactly.
    let half = setting(&leaky, "f64-gemm, rank 1/2");
    assert!(acc(attack(half, "projection")) >= 0.975, "{half}");
    assert_eq!(half["leaks"], true);
    // σ = 1 is far too small: the Gaussian attack sees through it.
    let weak = setting(&leaky, "f64-gemm, σ=1");
    assert_eq!(weak["leaks"], true, "{weak}");
    // The default, the integer one-time pad: the cloud's view is independent of the data, and
    // no attack does better than guessing from word frequencies.
    let default = setting(&report, "default");
    assert_eq!(default["config"]["precision"], "int", "{default}");
    at_chance(default);
    // Drift and cost from `talaria lossless` in the same run: none.
    assert_eq!(default["lossless"]["token_agreement"].as_f64(), Some(1.0));
    assert!(plain["lossless"].is_null());
    let md = std::fs::read_to_string(out.join("attack-report.md")).unwrap();
    assert!(md.contains("| default: int"), "{md}");
    assert!(
        std::fs::metadata(out.join("attack-report.png"))
            .unwrap()
            .len()
            > 10_000
    );

    // `talaria attack` on a kept tap, scored against its truth.json.
    let plain_tap = taps.join("plaintext----remo-off-");
    assert!(
        plain_tap.is_dir(),
        "taps: {:?}",
        std::fs::read_dir(&taps).unwrap().collect::<Vec<_>>()
    );
    let o = talaria(&[
        "attack",
        "--tap",
        plain_tap.to_str().unwrap(),
        "--attack",
        "nn",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        run["runs"][0]["score"]["accuracy"].as_f64(),
        Some(1.0),
        "{run}"
    );
    assert_eq!(run["runs"][0]["guesses"].as_array().unwrap().len(), 4);
    // The metadata the tap records besides values: arrival times (no frames in process).
    let metas = run["metadata"].as_array().unwrap();
    assert_eq!(metas.len(), 4, "{run}");
    for m in metas {
        assert_eq!(m["generated_tokens"].as_u64(), Some(3), "{m}");
        assert!(m["prefill_us"].as_u64().is_some(), "{m}");
        assert!(m["step_us"].as_u64().is_some_and(|us| us > 0), "{m}");
        assert!(m["frame_bytes"].is_null(), "{m}");
    }
    assert_eq!(
        run["runs"][0]["score"]["response"]["accuracy"].as_f64(),
        Some(1.0)
    );

    malformed_taps_get_clear_errors(&plain_tap, dir.path());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn malformed_taps_get_clear_errors(good: &Path, scratch: &Path) {
    let fails_with = |tap: &Path, want: &str| {
        let o = talaria(&["attack", "--tap", tap.to_str().unwrap(), "--attack", "nn"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "accepted a bad tap");
        assert!(err.contains(want), "expected {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    // A call file cut short.
    let cut = scratch.join("cut");
    copy_dir(good, &cut);
    let index: Value =
        serde_json::from_slice(&std::fs::read(cut.join("index.json")).unwrap()).unwrap();
    let first = index["events"][0]["file"].as_str().unwrap();
    let bytes = std::fs::read(cut.join(first)).unwrap();
    std::fs::write(cut.join(first), &bytes[..bytes.len() - 8]).unwrap();
    fails_with(&cut, "data size does not match");
    // An index naming a file outside the tap.
    let escape = scratch.join("escape");
    copy_dir(good, &escape);
    let text = std::fs::read_to_string(escape.join("index.json")).unwrap();
    std::fs::write(
        escape.join("index.json"),
        text.replacen(first, "../../etc/passwd", 1),
    )
    .unwrap();
    fails_with(&escape, "not a plain name inside the tap");
    // No public parameters.
    let bare = scratch.join("bare");
    copy_dir(good, &bare);
    std::fs::remove_file(bare.join("public.json")).unwrap();
    fails_with(&bare, "public.json");
}

/// A branch (a candidate next token) sees exactly what the causal pass sees at that position.
#[test]
fn forward_branches_equal_the_causal_pass_at_every_op() {
    let mut e = PlainEngine::load(real_model()).unwrap();
    let prompt = e.tokenizer.encode("The cat sat on the mat").unwrap();
    let (prefix, last) = prompt.split_at(prompt.len() - 1);
    let view = OpId::Block {
        layer: 3,
        op: BlockOp::Down,
    };
    let mut causal = Vec::new();
    let mut cache = e.model.new_cache();
    e.model
        .forward_observed(&mut e.weights, &mut cache, &prompt, &mut |op, rows| {
            if op == view {
                causal = rows.row(rows.rows() - 1).to_vec();
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    let mut cache = e.model.new_cache();
    e.model.forward(&mut e.weights, &mut cache, prefix).unwrap();
    let before = cache.len();
    let mut branch = Vec::new();
    let candidates = [last[0], 42, last[0]];
    e.model
        .forward_branches(&mut e.weights, &cache, &candidates, &mut |op, rows| {
            if op == view {
                branch = rows.data().to_vec();
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(cache.len(), before, "branches must not touch the cache");
    let d = causal.len();
    assert_eq!(branch.len(), 3 * d);
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
    };
    assert!(
        close(&branch[..d], &causal),
        "branch differs from the causal pass"
    );
    assert!(close(&branch[2 * d..], &causal));
    assert!(
        !close(&branch[d..2 * d], &causal),
        "another token gave the same row"
    );
}

/// The exactness attack (exact bits of each masked value against every token) finds every
/// token of a tap recorded before the grid masks (f64-gemm, σ = 100: `fl(σ·ρ·z)` added exactly,
/// tests/fixtures/tap-f64-gemm-legacy-masks, its layer-0 calls), and nothing in any float mode
/// now: there it does exactly what the prior does.
#[test]
fn the_exactness_attack_breaks_the_old_float_masks_and_not_the_grid_masks() {
    let legacy = repo_root().join("tests/fixtures/tap-f64-gemm-legacy-masks");
    let o = talaria(&[
        "attack",
        "--tap",
        legacy.to_str().unwrap(),
        "--attack",
        "exactness",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: Value = serde_json::from_slice(&o.stdout).unwrap();
    let score = &run["runs"][0]["score"];
    assert_eq!(score["accuracy"].as_f64(), Some(1.0), "{run}");
    assert!(score["total"].as_u64().unwrap() >= 29, "{run}");
    assert_eq!(score["response"]["accuracy"].as_f64(), Some(1.0), "{run}");

    let dir = tempfile::tempdir().unwrap();
    let report = attack_report(
        &dir.path().join("report"),
        &[
            "--settings",
            "f64-gemm, σ=100;f64-client, σ=100;f32, σ=100",
            "--attacks",
            "prior,exactness",
            "--victims",
            "3",
            "--drift-prompts",
            "0",
            "--no-plot",
        ],
    );
    let settings = report["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 3, "{report}");
    for s in settings {
        let (exact, prior) = (attack(s, "exactness"), attack(s, "prior"));
        assert_eq!(
            exact["recovered"], prior["recovered"],
            "the exactness attack learned something in {}: {s}",
            s["name"]
        );
    }
}
