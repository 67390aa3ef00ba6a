//! The CI pass: every real target takes a few thousand mutants of its corpus without a crash or
//! a memory finding, and the same engine, with the same budget, does find bugs planted in a
//! decoder written here: a fuzzer that never finds anything proves nothing.

use std::time::Instant;

use talaria_fuzz::runner::signature;
use talaria_fuzz::{Options, TARGETS, fuzz, fuzz_target};

/// Mutants per target: a fixed-seed pass that keeps the whole test well under 30 s in release.
const RUNS: u64 = 50_000;

fn opts() -> Options {
    Options {
        runs: RUNS,
        seed: 2024,
        ..Options::default()
    }
}

#[test]
fn every_target_survives_a_fixed_seed_pass() {
    for t in &TARGETS {
        let start = Instant::now();
        let r = fuzz_target(t, &opts());
        eprintln!(
            "{}: {} runs, {} features, {:.0} exec/s, peak input heap {} B, {:.1} s",
            t.name,
            r.runs,
            r.outcomes,
            r.exec_per_s,
            r.peak_input_heap,
            start.elapsed().as_secs_f64()
        );
        assert_eq!(r.runs, RUNS + (t.seeds)().len() as u64);
        assert_eq!(r.crashes, 0, "{}: {:#?}", t.name, r.findings);
        assert_eq!(r.memory_findings, 0, "{}: {:#?}", t.name, r.findings);
        // The corpus steers somewhere: more than the seeds' own outcomes were reached.
        assert!(
            r.outcomes > (t.seeds)().len(),
            "{}: {} features",
            t.name,
            r.outcomes
        );
    }
}

/// A little TLV format with the two classic decoder bugs: it trusts the entry count and each
/// entry's length (indexing past the end), and it takes a length field's word for how much to
/// allocate. Entry kind `0xff` with flags `0x80` panics: a bug two mutations deep.
fn fragile(data: &[u8]) -> Vec<u64> {
    if data.len() < 4 || &data[..2] != b"TL" {
        return vec![signature("fragile", "bad magic")];
    }
    if data[2] != 1 {
        return vec![signature("fragile", "bad version")];
    }
    let mut features = vec![signature("fragile", "header")];
    let mut pos = 4;
    for _ in 0..data[3] {
        let kind = data[pos];
        let len = data[pos + 1] as usize;
        let body = &data[pos + 2..pos + 2 + len];
        features.push(signature(
            "kind",
            &format!("{}", char::from(b'a' + kind % 26)),
        ));
        if kind == 0xff && body.first() == Some(&0x80) {
            panic!("planted: kind 0xff with flags 0x80");
        }
        if kind == 7 && len >= 2 {
            // The "reserve what the header claims" bug: up to 4 MiB, touched.
            let claimed = u16::from_le_bytes([body[0], body[1]]) as usize * 64;
            features.push(std::hint::black_box(vec![1u8; claimed]).len() as u64 % 7);
        }
        pos += 2 + len;
    }
    features
}

fn fragile_seeds() -> Vec<Vec<u8>> {
    vec![
        b"TL\x01\x02\x01\x03abc\x02\x01z".to_vec(),
        b"TL\x01\x01\x07\x02\x01\x00".to_vec(),
    ]
}

#[test]
fn the_engine_finds_bugs_planted_in_a_decoder() {
    let opts = Options {
        memory_limit: 1 << 20,
        ..opts()
    };
    let r = fuzz("fragile", &fragile, fragile_seeds(), false, &[], &opts);
    let messages: Vec<&str> = r.findings.iter().map(|f| f.message.as_str()).collect();
    eprintln!(
        "fragile: {} crashes ({} unique), {} memory findings: {messages:#?}",
        r.crashes, r.unique_crashes, r.memory_findings
    );
    assert!(r.failed());
    // The unchecked count and length: an index out of range.
    assert!(
        messages.iter().any(|m| m.contains("out of range")),
        "{messages:?}"
    );
    // The two-mutation-deep panic.
    assert!(
        messages.iter().any(|m| m.contains("planted")),
        "{messages:?}"
    );
    // The claimed allocation, as a memory finding.
    assert!(r.memory_findings > 0);
    // Every finding keeps its input, and the input reproduces it.
    let panic = r.findings.iter().find(|f| f.kind == "panic").unwrap();
    let input = hex::decode(&panic.input_hex).unwrap();
    assert!(std::panic::catch_unwind(|| fragile(&input)).is_err());
}
