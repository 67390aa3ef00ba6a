//! The fuzz loop: seeds first, then mutants of the corpus, each run under `catch_unwind` with its
//! heap peak measured; inputs that reach a new outcome join the corpus.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::mutate::Mutator;
use crate::{abort, memory};

/// A decoder under test: it takes any bytes and returns the signatures of what each of its
/// stages made of them (which error, or how far it got): the features that steer the corpus.
pub type Decoder<'a> = &'a dyn Fn(&[u8]) -> Vec<u64>;

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Mutated inputs to run (the seeds run on top of these).
    pub runs: u64,
    pub seed: u64,
    /// Longest input tried.
    pub max_len: usize,
    /// Heap one input may take above what was held before it ran.
    pub memory_limit: usize,
    /// Inputs slower than this are reported (not failed: timing depends on the machine).
    pub slow: Duration,
    /// Where finding inputs are written; `None` keeps them in the report only.
    pub out: Option<PathBuf>,
    /// Largest corpus kept; past it, new inputs replace random non-seed ones.
    pub max_corpus: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 10_000,
            seed: 0,
            max_len: 64 << 10,
            memory_limit: 256 << 20,
            slow: Duration::from_secs(1),
            out: None,
            max_corpus: 4096,
        }
    }
}

/// One finding: an input that panicked, took too much memory, or ran too long.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    /// `panic`, `memory`, `slow`, or `abort` (the process died running it).
    pub kind: String,
    /// The panic message, or the bytes or time taken.
    pub message: String,
    /// Where it panicked (`file:line`), for panics.
    pub location: Option<String>,
    pub input_hex: String,
    /// The file the input was written to, if any.
    pub file: Option<PathBuf>,
}

/// What a pass over one target found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub seed: u64,
    /// Inputs run, seeds included.
    pub runs: u64,
    pub crashes: u64,
    /// Distinct panic locations among the crashes.
    pub unique_crashes: usize,
    pub memory_findings: u64,
    pub slow_inputs: u64,
    pub seconds: f64,
    pub exec_per_s: f64,
    /// The slowest input, in milliseconds.
    pub slowest_ms: f64,
    /// The most heap one input took, in bytes.
    pub peak_input_heap: u64,
    /// The process's peak RSS (`VmHWM`) after the pass, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Distinct features (stage outcomes) reached, and the corpus size at the end.
    pub outcomes: usize,
    pub corpus: usize,
    /// The first findings of each kind and location, with their inputs.
    pub findings: Vec<Finding>,
}

impl Report {
    /// A report of no runs yet.
    pub fn new(target: &str, seed: u64) -> Self {
        Self {
            target: target.to_string(),
            seed,
            runs: 0,
            crashes: 0,
            unique_crashes: 0,
            memory_findings: 0,
            slow_inputs: 0,
            seconds: 0.0,
            exec_per_s: 0.0,
            slowest_ms: 0.0,
            peak_input_heap: 0,
            peak_rss_kib: None,
            outcomes: 0,
            corpus: 0,
            findings: Vec::new(),
        }
    }

    /// Whether anything failed (slow inputs are reported, not failed).
    pub fn failed(&self) -> bool {
        self.crashes > 0 || self.memory_findings > 0
    }
}

thread_local! {
    static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LAST_PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// Panics of a fuzzing thread are recorded quietly; any other thread's go to the usual hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(|f| f.get()) {
                return default(info);
            }
            let message = talaria_actors::panic_message(info.payload())
                .unwrap_or("(non-string panic)")
                .to_string();
            let location = info
                .location()
                .map_or_else(|| "?".into(), |l| format!("{}:{}", l.file(), l.line()));
            LAST_PANIC.with(|p| *p.borrow_mut() = Some((message, location)));
        }));
    });
}

/// Findings kept per kind and location: enough to reproduce, not a flood.
const KEEP_PER_LOCATION: usize = 3;

/// Runs `decoder` over its `seeds` and `opts.runs` mutants of them.
pub fn fuzz(
    name: &str,
    decoder: Decoder<'_>,
    seeds: Vec<Vec<u8>>,
    text: bool,
    dict: &'static [&'static str],
    opts: &Options,
) -> Report {
    install_hook();
    if let Some(dir) = &opts.out {
        let _ = std::fs::create_dir_all(dir);
        abort::install(&dir.join(format!("{name}-abort-seed{}.bin", opts.seed)));
    }
    let mut m = Mutator::new(opts.seed, text, dict, opts.max_len);
    let n_seeds = seeds.len();
    let mut corpus = seeds;
    let mut outcomes = HashSet::new();
    let mut kept: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    let mut report = Report::new(name, opts.seed);
    let start = Instant::now();
    let mut buf = Vec::new();
    FUZZING.with(|f| f.set(true));
    for i in 0..n_seeds as u64 + opts.runs {
        buf.clear();
        if (i as usize) < n_seeds {
            buf.extend_from_slice(&corpus[i as usize]);
        } else {
            // A seed a quarter of the time, so the corpus's newcomers never crowd them out.
            let base = if m.below(4) == 0 {
                m.below(n_seeds.max(1))
            } else {
                m.below(corpus.len())
            };
            buf.extend_from_slice(&corpus[base]);
            m.mutate(&mut buf, &corpus);
        }
        let before = memory::live();
        memory::reset_peak();
        abort::arm(&buf);
        let t0 = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(|| decoder(&buf)));
        let took = t0.elapsed();
        abort::disarm();
        let heap = (memory::peak() - before).max(0) as u64;
        report.runs += 1;
        report.peak_input_heap = report.peak_input_heap.max(heap);
        report.slowest_ms = report.slowest_ms.max(took.as_secs_f64() * 1e3);
        let mut new: Vec<(&'static str, String, Option<String>)> = Vec::new();
        match result {
            Ok(features) => {
                // A new feature: the input reached somewhere no earlier one did.
                let mut new_feature = false;
                for f in features {
                    new_feature |= outcomes.insert(f);
                }
                if new_feature && (i as usize) >= n_seeds {
                    if corpus.len() < opts.max_corpus {
                        corpus.push(buf.clone());
                    } else {
                        let j = n_seeds + m.below(corpus.len() - n_seeds);
                        corpus[j] = buf.clone();
                    }
                }
            }
            Err(_) => {
                report.crashes += 1;
                let (message, location) = LAST_PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| ("(no message)".into(), "?".into()));
                new.push(("panic", message, Some(location)));
            }
        }
        if heap > opts.memory_limit as u64 {
            report.memory_findings += 1;
            new.push((
                "memory",
                format!("{heap} bytes of heap for one input"),
                None,
            ));
        }
        if took > opts.slow {
            report.slow_inputs += 1;
            let ms = took.as_secs_f64() * 1e3;
            new.push(("slow", format!("{ms:.0} ms"), None));
        }
        for (kind, message, location) in new {
            let n = kept
                .entry((kind, location.clone().unwrap_or_default()))
                .or_insert(0);
            *n += 1;
            if *n > KEEP_PER_LOCATION {
                continue;
            }
            let file = opts.out.as_ref().map(|d| {
                let f = d.join(format!("{name}-{kind}-seed{}-run{i}.bin", opts.seed));
                let _ = std::fs::write(&f, &buf);
                f
            });
            report.findings.push(Finding {
                kind: kind.to_string(),
                message,
                location,
                input_hex: hex::encode(&buf),
                file,
            });
        }
    }
    FUZZING.with(|f| f.set(false));
    report.seconds = start.elapsed().as_secs_f64();
    report.exec_per_s = report.runs as f64 / report.seconds.max(1e-9);
    report.peak_rss_kib = memory::peak_rss_kib();
    report.outcomes = outcomes.len();
    report.corpus = corpus.len();
    report.unique_crashes = kept.keys().filter(|(k, _)| *k == "panic").count();
    report
}

/// A short, stable signature of an outcome: the shape of a message, without its numbers, its
/// quoted parts and any quoted source lines, so that one kind of error is one outcome whatever
/// values it quotes.
pub fn signature(stage: &str, message: &str) -> u64 {
    let mut h = Fnv::new();
    h.write(stage.as_bytes());
    let mut words = 0;
    for line in message.lines().filter(|l| !l.contains('|')) {
        let mut quoted = None;
        for word in line.split(|c: char| c.is_whitespace() || c == ',' || c == ':') {
            let was_quoted = quoted.is_some();
            for c in word.chars().filter(|c| matches!(c, '"' | '`' | '\'')) {
                quoted = match quoted {
                    Some(q) if q == c => None,
                    None => Some(c),
                    q => q,
                };
            }
            let plain = !was_quoted && quoted.is_none() && !word.contains(['"', '`', '\'']);
            if plain && !word.is_empty() && !word.bytes().any(|b| b.is_ascii_digit()) {
                h.write(word.as_bytes());
                h.write(b" ");
                words += 1;
                if words == 12 {
                    return h.finish();
                }
            }
        }
    }
    h.finish()
}

/// FNV-1a: a hash with no per-process key, so runs are reproducible.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Writes `report`s as a JSON summary.
pub fn write_json(path: &Path, reports: &[Report]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(reports).map_err(std::io::Error::other)?;
    std::fs::write(path, json + "\n")
}
