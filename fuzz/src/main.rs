//! `talaria-fuzz`: runs the fuzz targets and reports what they found.
//!
//! `--target all` runs each target in a child process of its own (up to `--jobs` at once), so
//! each reports its own peak RSS, and an abort (a stack overflow, an allocation the system
//! refuses) ends one target's pass, not the others'.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use talaria_fuzz::runner::{Finding, Report, write_json};
use talaria_fuzz::{Options, TARGETS, fuzz_target, target};

/// Stack of the fuzzing thread: the 2 MiB a tokio or actix worker thread has, so a decoder
/// that would overflow a server's stack overflows here too.
const STACK: usize = 2 << 20;

#[derive(Parser)]
#[command(about = "Fuzz every decoder of untrusted input (stable Rust, no framework)")]
struct Args {
    /// A target (wire, gguf, topology, openai, sev, reply) or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Mutated inputs per target.
    #[arg(long, default_value_t = 100_000)]
    runs: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where inputs that crash (or take too much memory or time) are written.
    #[arg(long, default_value = "target/fuzz-findings")]
    out: PathBuf,
    /// A JSON summary of every target.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Heap one input may take, in MiB.
    #[arg(long, default_value_t = 256)]
    memory_limit_mib: usize,
    /// Longest input tried, in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    max_len: usize,
    /// Targets run at once with `--target all` (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
}

fn print(r: &Report) {
    println!(
        "{:<9} runs {:>9}  crashes {:>3} ({} unique)  memory {:>3}  slow {:>3}  {:>8.0} exec/s  \
         peak RSS {:>7} KiB  peak input heap {:>9} B  outcomes {:>5}",
        r.target,
        r.runs,
        r.crashes,
        r.unique_crashes,
        r.memory_findings,
        r.slow_inputs,
        r.exec_per_s,
        r.peak_rss_kib.map_or("?".into(), |k| k.to_string()),
        r.peak_input_heap,
        r.outcomes,
    );
    for f in &r.findings {
        println!(
            "  {} at {}: {} -> {}",
            f.kind,
            f.location.as_deref().unwrap_or("-"),
            f.message,
            f.file
                .as_ref()
                .map_or_else(|| f.input_hex.clone(), |p| p.display().to_string())
        );
    }
}

/// One target in this process, on a thread with a server's stack.
fn run_one(name: &str, args: &Args) -> Result<Report> {
    let t = target(name).with_context(|| {
        let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        format!(
            "unknown target {name:?} (targets: {}, all)",
            names.join(", ")
        )
    })?;
    let opts = Options {
        runs: args.runs,
        seed: args.seed,
        max_len: args.max_len,
        memory_limit: args.memory_limit_mib << 20,
        slow: Duration::from_secs(1),
        out: Some(args.out.clone()),
        ..Options::default()
    };
    let handle = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(STACK)
        .spawn(move || fuzz_target(t, &opts))?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the fuzz loop of {name} panicked"))
}

/// Every target, each in a child process of this binary.
fn run_all(args: &Args) -> Result<Vec<Report>> {
    let exe = std::env::current_exe()?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    std::fs::create_dir_all(&args.out)?;
    let mut reports = Vec::new();
    for chunk in TARGETS.chunks(jobs) {
        let children: Vec<_> = chunk
            .iter()
            .map(|t| {
                let json = args.out.join(format!(".{}-seed{}.json", t.name, args.seed));
                let child = Command::new(&exe)
                    .args(["--target", t.name, "--runs", &args.runs.to_string()])
                    .args(["--seed", &args.seed.to_string()])
                    .args(["--memory-limit-mib", &args.memory_limit_mib.to_string()])
                    .args(["--max-len", &args.max_len.to_string()])
                    .arg("--out")
                    .arg(&args.out)
                    .arg("--json")
                    .arg(&json)
                    .spawn()
                    .with_context(|| format!("starting the {} pass", t.name))?;
                Ok((t.name, json, child))
            })
            .collect::<Result<_>>()?;
        for (name, json, mut child) in children {
            let status = child.wait()?;
            let text = std::fs::read_to_string(&json).ok();
            let _ = std::fs::remove_file(&json);
            match text.and_then(|t| serde_json::from_str::<Vec<serde_json::Value>>(&t).ok()) {
                Some(mut v) if status.success() || status.code() == Some(1) => {
                    reports.push(serde_json::from_value(v.remove(0))?)
                }
                _ => {
                    // Died: a stack overflow or a refused allocation. The abort handler wrote
                    // the input it was running.
                    let file = args.out.join(format!("{name}-abort-seed{}.bin", args.seed));
                    let input = std::fs::read(&file).unwrap_or_default();
                    let mut r = Report::new(name, args.seed);
                    r.crashes = 1;
                    r.unique_crashes = 1;
                    r.findings.push(Finding {
                        kind: "abort".into(),
                        message: format!("the process died: {status}"),
                        location: None,
                        input_hex: hex::encode(input),
                        file: Some(file),
                    });
                    reports.push(r);
                }
            }
        }
    }
    Ok(reports)
}

fn main() -> Result<ExitCode> {
    let args = Args::parse();
    let reports = if args.target == "all" {
        let reports = run_all(&args)?;
        println!("--- all targets, seed {} ---", args.seed);
        reports.iter().for_each(print);
        reports
    } else {
        let r = run_one(&args.target, &args)?;
        print(&r);
        vec![r]
    };
    if let Some(path) = &args.json {
        write_json(path, &reports).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if reports.iter().any(Report::failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
