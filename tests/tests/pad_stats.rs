//! The statistical tests of the integer mode's pads (`talaria attack --pad-stats`) on a real
//! tap: the real generation's pads are uniform, and the same tap with one pad reused is not.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use talaria_tests::cluster::bin;
use talaria_tests::{real_model, repo_root};

fn talaria(args: &[&str]) -> std::process::Output {
    let o = Command::new(bin("talaria"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("talaria runs");
    assert!(
        o.status.success(),
        "talaria {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `talaria attack --pad-stats --json` on a tap: the report.
fn pad_stats(tap: &Path) -> Value {
    let o = talaria(&[
        "attack",
        "--tap",
        tap.to_str().unwrap(),
        "--pad-stats",
        "--json",
    ]);
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    out["pads"].clone()
}

fn failed(report: &Value) -> Vec<&str> {
    report["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A `.npy` file of u64 residues: its bytes and where the data starts (format 1.0 header).
struct Npy {
    bytes: Vec<u8>,
    start: usize,
    cols: usize,
}

impl Npy {
    fn read(path: &Path, cols: usize) -> Self {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
        let start = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        Self { bytes, start, cols }
    }

    fn get(&self, row: usize, col: usize) -> u64 {
        let at = self.start + 8 * (row * self.cols + col);
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }

    fn set(&mut self, row: usize, col: usize, v: u64) {
        let at = self.start + 8 * (row * self.cols + col);
        self.bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// What a row padded with another row's pad looks like: that row plus a difference of two
/// fixed-point encodings (here up to ±100 · 2^24, about ±0.4 at 32 fractional bits).
fn delta(col: usize) -> u64 {
    ((col as i64 % 201 - 100) << 24) as u64
}

#[test]
fn a_real_integer_tap_is_uniform_and_a_reused_pad_in_it_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let tap = dir.path().join("tap");
    let model = real_model();
    talaria(&[
        "generate",
        "--engine",
        "remo",
        "--remo-precision",
        "int",
        "--tap",
        tap.to_str().unwrap(),
        "--prompt",
        "My password is hunter2",
        "--max-tokens",
        "2",
        "--model-file",
        model.to_str().unwrap(),
    ]);

    let report = pad_stats(&tap);
    assert_eq!(report["verdict"], "uniform", "{:?}", failed(&report));
    assert_eq!(report["tests"].as_array().unwrap().len(), 142);
    // Two forward passes of 121 calls: the prefill and one decode step.
    assert_eq!(report["calls"], 242, "{report}");
    assert!(report["values"].as_u64().unwrap() > 500_000, "{report}");
    assert_eq!(report["pairs_in_call"]["exhaustive"], true);
    assert_eq!(report["pairs_across_calls"]["exhaustive"], true);

    // The prefill's first call (the most rows) and a later call of the same op.
    let index: Value =
        serde_json::from_slice(&std::fs::read(tap.join("index.json")).unwrap()).unwrap();
    let calls: Vec<&Value> = index["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "call")
        .collect();
    let first = calls[0];
    assert!(first["rows"].as_u64().unwrap() >= 4, "{first}");
    let later = calls[1..]
        .iter()
        .find(|e| e["op"] == first["op"])
        .expect("a decode call of the first op");
    let cols = first["cols"].as_u64().unwrap() as usize;
    let file = |e: &Value| e["file"].as_str().unwrap().to_string();

    // Row 1 of the first call re-padded with row 0's pad.
    let in_call = dir.path().join("in-call");
    copy_dir(&tap, &in_call);
    let path = in_call.join(file(first));
    let mut npy = Npy::read(&path, cols);
    for c in 0..cols {
        npy.set(1, c, npy.get(0, c).wrapping_add(delta(c)));
    }
    std::fs::write(&path, &npy.bytes).unwrap();
    let report = pad_stats(&in_call);
    assert_eq!(report["verdict"], "not uniform");
    let f = failed(&report);
    assert!(f.contains(&"pairs in call (difference)"), "{f:?}");
    assert!(f.contains(&"pairs in call (xor)"), "{f:?}");
    let worst = &report["pairs_in_call"]["worst_difference"];
    assert_eq!(
        (worst["row_a"].as_u64(), worst["row_b"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(worst["hits"].as_u64(), Some(cols as u64), "{worst}");

    // Row 0 of the later call re-padded with row 3 of the first call's pad.
    let across = dir.path().join("across");
    copy_dir(&tap, &across);
    let source = Npy::read(&across.join(file(first)), cols);
    let path = across.join(file(later));
    let mut npy = Npy::read(&path, cols);
    for c in 0..cols {
        npy.set(0, c, source.get(3, c).wrapping_add(delta(c)));
    }
    std::fs::write(&path, &npy.bytes).unwrap();
    let report = pad_stats(&across);
    assert_eq!(report["verdict"], "not uniform");
    let f = failed(&report);
    assert!(f.contains(&"pairs across calls (difference)"), "{f:?}");
    assert!(!f.contains(&"pairs in call (difference)"), "{f:?}");

    // The table names the verdict.
    let o = talaria(&["attack", "--tap", across.to_str().unwrap(), "--pad-stats"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("verdict: not uniform"), "{table}");
    assert!(table.contains("REJECTED"), "{table}");
}
