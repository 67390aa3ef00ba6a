//! `talaria load`: the multi-tenant load generator. Brings up a local cluster with one
//! cvm-agent per tenant, runs K tenants × S concurrent sessions for each K asked, and writes
//! aggregate tokens/s, time-to-first-token and inter-token latency percentiles, and the batch
//! sizes the gpu-nodes formed (from their `/metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;
use talaria_cvm_agent::client::{self, Trust};
use talaria_engine::SamplingParams;
use talaria_net::TlsMaterial;
use talaria_wire::{Prompt, TenantRequest};

use crate::cluster::{Running, UpArgs};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Tenant counts to measure, in one run on one cluster (each tenant its own cvm-agent).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub tenants: Vec<usize>,
    /// Concurrent sessions per tenant.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Tokens each session generates (end-of-sequence ignored, so every session does the same
    /// work).
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Write the results here as JSON (they are printed too).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the cluster's topology, TLS material and logs go.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// First port of the cluster (it uses a block of ports above it).
    #[arg(long, default_value_t = 7600)]
    pub base_port: u16,
    /// The gpu-nodes' batching: most calls per GEMM.
    #[arg(long, default_value_t = 64)]
    pub max_calls: usize,
    /// The gpu-nodes' batching: longest wait for a batch to fill, µs (0 batches only what
    /// queued up while the shard was busy).
    #[arg(long, default_value_t = 1000)]
    pub max_wait_us: u64,
    /// Seconds to wait for the cluster to be ready.
    #[arg(long, default_value_t = 600)]
    pub ready_timeout_s: u64,
    /// Drive the gpu-nodes alone: `--tenants` counts concurrent sessions (each its own tenant)
    /// opened on the stages directly, each making `--gen-tokens` decode steps of one-row calls
    /// of the cluster's ReMO precision, with no CVM work (`load_synthetic.rs`).
    #[arg(long)]
    pub synthetic: bool,
    /// With `--synthetic`: the cluster's ReMO precision, so the rows the stages get (and the
    /// product they run) are that mode's. The float modes are below the protection floor; the
    /// synthetic load carries no tenant data, so its topology accepts them.
    #[arg(long, default_value_t = talaria_params::Precision::Int, requires = "synthetic")]
    pub precision: talaria_params::Precision,
    /// With `--synthetic`: measure the whole `--tenants` list this many times, interleaved (1,
    /// 16, 1, 16, ...), and report each count's median beside every step: one short step of
    /// one session moves by a tenth between back-to-back runs on a shared VM, and the ratio
    /// with it.
    #[arg(long, default_value_t = 1, requires = "synthetic", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Device of the stages' weights: `cpu` or `cuda:N` (a build with the `cuda` feature). The
    /// integer mode's product runs on the CPU either way.
    #[arg(long, default_value = "cpu")]
    pub backend: talaria_topology::Backend,
    /// Fairness: one more tenant (its own agent) sends back-to-back prompts of this many tokens
    /// (one generated token each) while the measured sessions decode; every step is measured
    /// alone, then beside it, in the same run (0: no neighbour).
    #[arg(long, default_value_t = 0, conflicts_with = "synthetic")]
    pub neighbour_prompt_tokens: usize,
    /// The cluster's ReMO `prefill_chunk`: a prefill padded past this many rows runs in passes
    /// of this many (0: one pass).
    #[arg(long, default_value_t = talaria_params::RemoConfig::default().prefill_chunk)]
    pub prefill_chunk: usize,
}

/// Percentiles of a sample, in milliseconds.
#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
    n: usize,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize] * 1e3
        }
    };
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
        mean: if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64 * 1e3
        },
        n: v.len(),
    }
}

/// A histogram as `/metrics` gives it: cumulative counts per upper bound, sum and count.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Histogram {
    /// Observations in each bucket (not cumulative), by upper bound.
    buckets: BTreeMap<String, u64>,
    sum: f64,
    count: u64,
    pub(crate) mean: f64,
}

/// Reads histogram `name` from a Prometheus text exposition.
fn parse_histogram(text: &str, name: &str) -> Histogram {
    let mut cumulative: Vec<(f64, String, u64)> = Vec::new();
    let mut h = Histogram::default();
    for line in text.lines() {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(le) = key
            .strip_prefix(&format!("{name}_bucket{{le=\""))
            .and_then(|r| r.strip_suffix("\"}"))
        {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            cumulative.push((bound, le.to_string(), value.parse().unwrap_or(0)));
        } else if key == format!("{name}_sum") {
            h.sum = value.parse().unwrap_or(0.0);
        } else if key == format!("{name}_count") {
            h.count = value.parse().unwrap_or(0);
        }
    }
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut below = 0;
    for (_, le, c) in cumulative {
        h.buckets.insert(le, c.saturating_sub(below));
        below = c;
    }
    h
}

/// `after − before`, bucket by bucket.
fn delta(after: &Histogram, before: &Histogram) -> Histogram {
    let buckets: BTreeMap<String, u64> = after
        .buckets
        .iter()
        .map(|(k, &v)| {
            (
                k.clone(),
                v.saturating_sub(*before.buckets.get(k).unwrap_or(&0)),
            )
        })
        .filter(|&(_, v)| v > 0)
        .collect();
    let count = after.count.saturating_sub(before.count);
    let sum = after.sum - before.sum;
    Histogram {
        buckets,
        sum,
        count,
        mean: if count > 0 { sum / count as f64 } else { 0.0 },
    }
}

const BATCH_METRICS: [&str; 6] = [
    "talaria_stage_batch_calls",
    "talaria_stage_batch_tenants",
    "talaria_stage_batch_rows",
    "talaria_stage_queue_seconds",
    "talaria_stage_compute_seconds",
    "talaria_stage_frame_calls",
];

/// One reading of a stage's `/metrics`.
pub(crate) struct StageReading {
    /// Its batch histograms ([`BATCH_METRICS`]).
    histograms: Vec<Histogram>,
    /// Datagrams it sent and lost so far, over all its connections.
    pub(crate) datagrams_lost: u64,
    /// Masked calls it computed on its event loop so far.
    event_loop_calls: u64,
}

/// Every stage's reading now, one scrape each.
pub(crate) fn read_stages(stages: &[(String, SocketAddr)]) -> Result<Vec<StageReading>> {
    stages
        .iter()
        .map(|(name, addr)| {
            let text = talaria_actors::metrics::scrape(*addr)
                .with_context(|| format!("scraping {name}'s /metrics"))?;
            Ok(StageReading {
                histograms: BATCH_METRICS
                    .iter()
                    .map(|m| parse_histogram(&text, m))
                    .collect(),
                datagrams_lost: talaria_actors::metrics::value(
                    &text,
                    "talaria_stage_link_datagrams_lost_total",
                )
                .unwrap_or(0.0) as u64,
                event_loop_calls: talaria_actors::metrics::value(
                    &text,
                    "talaria_stage_event_loop_calls_total",
                )
                .unwrap_or(0.0) as u64,
            })
        })
        .collect()
}

/// What one stage's shard did during a step.
#[derive(Debug, Serialize)]
pub(crate) struct StageBatches {
    pub(crate) stage: String,
    /// Masked calls (sessions) per GEMM.
    pub(crate) calls_per_batch: Histogram,
    /// Distinct tenants per GEMM.
    tenants_per_batch: Histogram,
    /// Masked rows per GEMM.
    rows_per_batch: Histogram,
    /// Seconds each call waited in the shard's queue for its batch.
    pub(crate) queue_seconds_per_call: Histogram,
    /// Seconds of compute per batch.
    pub(crate) compute_seconds_per_batch: Histogram,
    /// Masked calls per request frame the stage received (more than one: a `Batch` frame).
    pub(crate) calls_per_frame: Histogram,
    /// Masked calls computed on the stage's event loop rather than its shard's worker.
    calls_on_event_loop: u64,
}

/// What each stage's shard did between two readings of its histograms.
pub(crate) fn batches(
    stages: &[(String, SocketAddr)],
    before: &[StageReading],
    after: &[StageReading],
) -> Vec<StageBatches> {
    stages
        .iter()
        .zip(before.iter().zip(after))
        .map(|((name, _), (rb, ra))| {
            let (b, a) = (&rb.histograms, &ra.histograms);
            StageBatches {
                stage: name.clone(),
                calls_on_event_loop: ra.event_loop_calls.saturating_sub(rb.event_loop_calls),
                calls_per_batch: delta(&a[0], &b[0]),
                tenants_per_batch: delta(&a[1], &b[1]),
                rows_per_batch: delta(&a[2], &b[2]),
                queue_seconds_per_call: delta(&a[3], &b[3]),
                compute_seconds_per_batch: delta(&a[4], &b[4]),
                calls_per_frame: delta(&a[5], &b[5]),
            }
        })
        .collect()
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// User and system CPU seconds in a `/proc` `stat` file (a process's, or a thread's under
/// `/proc/self/task`).
pub(crate) fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// CPU seconds of each kind of process (`stage-*`, `coordinator`, `agent-*`).
pub(crate) fn cpu_by_role(pids: &[(String, u32)]) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    for (name, pid) in pids {
        let role = if name.starts_with("agent-") {
            "agents".to_string()
        } else {
            name.clone()
        };
        *by.entry(role).or_default() += cpu_seconds(*pid).unwrap_or(0.0);
    }
    by
}

/// One point of the curve.
#[derive(Debug, Serialize)]
struct Step {
    tenants: usize,
    sessions: usize,
    generated_tokens: usize,
    wall_s: f64,
    /// Generated tokens of all sessions per second of wall time.
    tokens_per_s: f64,
    /// `tokens_per_s` over the one-tenant step's, if measured.
    speedup_vs_one_tenant: Option<f64>,
    ttft_ms: Percentiles,
    inter_token_ms: Percentiles,
    batches: Vec<StageBatches>,
    /// CPU milliseconds per generated token, by process kind: where the machine's cores went.
    cpu_ms_per_token: BTreeMap<String, f64>,
    /// `--neighbour-prompt-tokens`: the same sessions again, beside the neighbour's prefills.
    #[serde(skip_serializing_if = "Option::is_none")]
    beside_neighbour: Option<Beside>,
}

/// A step's sessions run again while a neighbour tenant sends long prompts.
#[derive(Debug, Serialize)]
struct Beside {
    tokens_per_s: f64,
    ttft_ms: Percentiles,
    inter_token_ms: Percentiles,
    /// `inter_token_ms.p50` over the step's alone.
    inter_token_p50_ratio: f64,
    /// The neighbour's requests that finished while the sessions ran, and how long each took.
    neighbour_requests: usize,
    neighbour_request_ms: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    gen_tokens: usize,
    sessions_per_tenant: usize,
    prefill_chunk: usize,
    neighbour_prompt_tokens: usize,
    max_calls: usize,
    max_wait_us: u64,
    cores: usize,
    steps: Vec<Step>,
    /// `--synthetic`: the gpu-nodes alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    synthetic: Vec<crate::load_synthetic::SyntheticStep>,
    /// `--synthetic`: each session count's median over the rounds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    synthetic_medians: Vec<crate::load_synthetic::SyntheticMedian>,
}

/// The topology of the load cluster: two stages, `tenants` agents.
fn topology_text(args: &LoadArgs, tenants: usize) -> String {
    let p = args.base_port;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Written by `talaria load`.\n[model]\nname = \"smollm2-135m\"\n\n\
         [coordinator]\nlisten = \"127.0.0.1:{p}\"\nmetrics = \"127.0.0.1:{}\"\n",
        p + 1
    );
    for (i, (layers, head)) in [("0-14", false), ("15-29", true)].iter().enumerate() {
        let _ = writeln!(
            t,
            "[[stage]]\nname = \"stage-{i}\"\nlisten = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{}\"\n\
             layers = \"{layers}\"\nlm_head = {head}\nbackend = \"{}\"\n",
            p + 10 + i as u16,
            p + 20 + i as u16,
            args.backend
        );
    }
    for i in 0..tenants {
        let _ = writeln!(
            t,
            "[[agent]]\ntenant = \"tenant-{i:02}\"\nlisten = \"127.0.0.1:{}\"\nmax_sessions = {}\n",
            p + 100 + i as u16,
            args.sessions
        );
    }
    let _ = writeln!(
        t,
        "[batching]\nmax_calls = {}\nmax_wait_us = {}\n\n[tls]\ngenerate = true\n\n\
         [admission]\nallow_insecure = true\n\n[remo]\nprecision = \"{}\"\nprefill_chunk = {}\n\
         tenant_accepts_below_floor = {}",
        args.max_calls,
        args.max_wait_us,
        args.precision,
        args.prefill_chunk,
        !args.precision.is_int()
    );
    t
}

/// What one session saw: when it started, and when each token arrived.
struct Trace {
    start: Instant,
    tokens: Vec<Instant>,
}

/// Runs one generation against `addr`, timing each token.
fn session(
    tls: &TlsMaterial,
    addr: SocketAddr,
    api_key: &str,
    req: &TenantRequest,
) -> Result<Trace> {
    let rt = crate::current_thread_runtime().map_err(|e| anyhow!("runtime: {e}"))?;
    let trust = Trust::development();
    let start = Instant::now();
    let mut tokens = Vec::new();
    rt.block_on(client::generate(tls, addr, &trust, req, api_key, |_, _| {
        tokens.push(Instant::now())
    }))
    .map_err(|e| anyhow!("agent {addr}: {e}"))?;
    Ok(Trace { start, tokens })
}

fn request(tenant: usize, session: usize, gen_tokens: usize) -> TenantRequest {
    const TOPICS: [&str; 8] = [
        "the sea",
        "a lighthouse",
        "winter in the mountains",
        "a busy market",
        "an old library",
        "the first train",
        "a garden at night",
        "a long letter",
    ];
    TenantRequest {
        prompt: Prompt::Text {
            text: format!(
                "Tenant {tenant}, session {session}: write a few sentences about {}.",
                TOPICS[(tenant + session) % TOPICS.len()]
            ),
            chat: true,
        },
        max_tokens: gen_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        stop: Vec::new(),
        // Every request cold, as a new conversation would be.
        cache_salt: Some(crate::fresh_salt()),
    }
}

/// Runs every session of `agents` at once; the traces of all of them.
fn run_all(
    agents: &[(SocketAddr, TlsMaterial, String)],
    sessions: usize,
    gen_tokens: usize,
) -> Result<Vec<Trace>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = agents
            .iter()
            .enumerate()
            .flat_map(|(t, agent)| (0..sessions).map(move |s| (t, s, agent)))
            .map(|(t, s, (addr, tls, key))| {
                scope.spawn(move || {
                    session(tls, *addr, key, &request(t, s, gen_tokens))
                        .with_context(|| format!("tenant {t} session {s}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a session thread panicked"))?)
            .collect()
    })
}

pub fn run(args: LoadArgs) -> Result<()> {
    if args.tenants.is_empty() || args.tenants.contains(&0) || args.sessions == 0 {
        bail!("--tenants and --sessions must be positive");
    }
    // The synthetic load needs no agent beyond the one every topology has.
    let most = if args.synthetic {
        1
    } else {
        *args.tenants.iter().max().expect("not empty")
    };
    let neighbour = args.neighbour_prompt_tokens > 0;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| talaria_model_store::home().join("load"));
    std::fs::create_dir_all(&run_dir)?;
    let topo_path = run_dir.join("load.toml");
    std::fs::write(
        &topo_path,
        topology_text(&args, most + usize::from(neighbour)),
    )?;
    let cluster: Running = crate::cluster::start(&UpArgs {
        topology: topo_path.clone(),
        run_dir: Some(run_dir.clone()),
        tap: None,
        ready_timeout_s: args.ready_timeout_s,
    })?;
    let agents: Vec<(SocketAddr, TlsMaterial, String)> = cluster
        .info
        .agents
        .iter()
        .map(|(t, _)| {
            let (addr, tls) = cluster
                .info
                .agent_tls(t)
                .ok_or_else(|| anyhow!("no certificate of the agent of {t}"))?;
            let key = cluster
                .info
                .api_keys
                .iter()
                .find(|(k, _)| k == t)
                .ok_or_else(|| anyhow!("no API key of {t}"))?;
            let key = std::fs::read_to_string(&key.1)?;
            Ok((addr, tls, key.trim().to_string()))
        })
        .collect::<Result<_>>()?;
    let stages: Vec<(String, SocketAddr)> = cluster
        .topology
        .stages
        .iter()
        .filter_map(|s| s.metrics.map(|m| (s.name.clone(), m)))
        .collect();

    if args.synthetic {
        let synthetic = crate::load_synthetic::run(
            &cluster,
            &args.tenants,
            args.rounds as usize,
            args.gen_tokens,
            &stages,
        )?;
        let synthetic_medians = crate::load_synthetic::medians(&synthetic);
        if args.rounds > 1 {
            for m in &synthetic_medians {
                eprintln!("{m}");
            }
        }
        let model = cluster.topology.model_name.clone();
        drop(cluster);
        return write_report(
            &args,
            Report {
                model,
                gen_tokens: args.gen_tokens,
                sessions_per_tenant: 1,
                prefill_chunk: args.prefill_chunk,
                neighbour_prompt_tokens: 0,
                max_calls: args.max_calls,
                max_wait_us: args.max_wait_us,
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                steps: Vec::new(),
                synthetic,
                synthetic_medians,
            },
        );
    }

    // Warm-up, not measured: each agent's first session fetches R_pub (once per agent).
    eprintln!("warming up {most} agent(s)");
    let t0 = Instant::now();
    for chunk in agents.chunks(4) {
        run_all(chunk, 1, 2)?;
    }
    eprintln!("  warm in {:.1} s", t0.elapsed().as_secs_f64());

    let (agents, neighbour) = if neighbour {
        let (last, rest) = agents.split_last().expect("the neighbour's agent");
        (rest.to_vec(), Some(last.clone()))
    } else {
        (agents, None)
    };
    let mut steps: Vec<Step> = Vec::new();
    for &k in &args.tenants {
        eprintln!(
            "{k} tenant(s) × {} session(s) × {} tokens",
            args.sessions, args.gen_tokens
        );
        let before = read_stages(&stages)?;
        let cpu_before = cpu_by_role(&cluster.info.pids);
        let t0 = Instant::now();
        let traces = run_all(&agents[..k], args.sessions, args.gen_tokens)?;
        let wall = t0.elapsed().as_secs_f64();
        let after = read_stages(&stages)?;
        let cpu_after = cpu_by_role(&cluster.info.pids);
        let generated: usize = traces.iter().map(|t| t.tokens.len()).sum();
        if generated != k * args.sessions * args.gen_tokens {
            bail!(
                "{generated} tokens arrived, {} expected: a response was cut short",
                k * args.sessions * args.gen_tokens
            );
        }
        let (ttft, itl) = latencies(&traces);
        let batches = batches(&stages, &before, &after);
        let tokens_per_s = generated as f64 / wall;
        let one = steps
            .iter()
            .find(|s| s.tenants == 1)
            .map(|s| s.tokens_per_s);
        let step = Step {
            tenants: k,
            sessions: args.sessions,
            generated_tokens: generated,
            wall_s: wall,
            tokens_per_s,
            speedup_vs_one_tenant: one.map(|o| tokens_per_s / o),
            ttft_ms: ttft,
            inter_token_ms: itl,
            batches,
            cpu_ms_per_token: cpu_after
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        (v - cpu_before.get(k).unwrap_or(&0.0)) * 1e3 / generated as f64,
                    )
                })
                .collect(),
            beside_neighbour: None,
        };
        eprintln!(
            "  {:.2} tok/s in {:.1} s; TTFT p50 {:.0} ms; ITL p50 {:.0} ms; calls/batch {}",
            step.tokens_per_s,
            step.wall_s,
            step.ttft_ms.p50,
            step.inter_token_ms.p50,
            step.batches
                .iter()
                .map(|b| format!("{} {:.2}", b.stage, b.calls_per_batch.mean))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut step = step;
        if let Some(n) = &neighbour {
            let beside = beside_neighbour(&agents[..k], n, &args, step.inter_token_ms.p50)?;
            eprintln!(
                "  beside the neighbour: ITL p50 {:.0} ms ({:.2}x), p90 {:.0}, max {:.0}; {} of its prompts",
                beside.inter_token_ms.p50,
                beside.inter_token_p50_ratio,
                beside.inter_token_ms.p90,
                beside.inter_token_ms.max,
                beside.neighbour_requests
            );
            step.beside_neighbour = Some(beside);
        }
        steps.push(step);
    }
    let model = cluster.topology.model_name.clone();
    drop(cluster);

    let report = Report {
        model,
        gen_tokens: args.gen_tokens,
        sessions_per_tenant: args.sessions,
        prefill_chunk: args.prefill_chunk,
        neighbour_prompt_tokens: args.neighbour_prompt_tokens,
        max_calls: args.max_calls,
        max_wait_us: args.max_wait_us,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        steps,
        synthetic: Vec::new(),
        synthetic_medians: Vec::new(),
    };
    write_report(&args, report)
}

/// Each trace's time to first token, and every gap between two tokens.
fn latencies(traces: &[Trace]) -> (Percentiles, Percentiles) {
    let ttft = traces
        .iter()
        .filter_map(|t| t.tokens.first().map(|f| (*f - t.start).as_secs_f64()))
        .collect();
    let itl = traces
        .iter()
        .flat_map(|t| t.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
        .collect();
    (percentiles(ttft), percentiles(itl))
}

/// Runs the sessions of `agents` while `neighbour` sends prompts of
/// `--neighbour-prompt-tokens` back to back (its first is under way before they start).
fn beside_neighbour(
    agents: &[(SocketAddr, TlsMaterial, String)],
    neighbour: &(SocketAddr, TlsMaterial, String),
    args: &LoadArgs,
    alone_p50: f64,
) -> Result<Beside> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let prompt: Vec<u32> = (0..args.neighbour_prompt_tokens as u32)
        .map(|i| 1000 + i * 7919 % 20_000)
        .collect();
    let req = TenantRequest {
        prompt: Prompt::Ids(prompt),
        max_tokens: 1,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        stop: Vec::new(),
        cache_salt: Some(crate::fresh_salt()),
    };
    let (traces, wall, done) = std::thread::scope(|scope| {
        let prefills = scope.spawn(|| {
            let mut took = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                // A fresh salt each time: every prompt is prefilled whole.
                let req = TenantRequest {
                    cache_salt: Some(crate::fresh_salt()),
                    ..req.clone()
                };
                let t = session(&neighbour.1, neighbour.0, &neighbour.2, &req)?;
                took.push(t.start.elapsed().as_secs_f64());
            }
            Ok::<_, anyhow::Error>(took)
        });
        // The neighbour's first prompt is in the cloud before the sessions start.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let t0 = Instant::now();
        let traces = run_all(agents, args.sessions, args.gen_tokens);
        let wall = t0.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Release);
        let done = prefills
            .join()
            .map_err(|_| anyhow!("the neighbour's thread panicked"));
        (traces, wall, done)
    });
    let traces = traces?;
    let done = done??;
    let generated: usize = traces.iter().map(|t| t.tokens.len()).sum();
    let (ttft, itl) = latencies(&traces);
    Ok(Beside {
        tokens_per_s: generated as f64 / wall,
        ttft_ms: ttft,
        inter_token_p50_ratio: itl.p50 / alone_p50,
        inter_token_ms: itl,
        neighbour_requests: done.len(),
        neighbour_request_ms: (!done.is_empty()).then(|| percentiles(done)),
    })
}

/// Writes and prints the report.
fn write_report(args: &LoadArgs, report: Report) -> Result<()> {
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    println!("{json}");
    Ok(())
}
