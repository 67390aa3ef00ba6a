//! `talaria soak`: the soak and chaos run. A local cluster with two replicas of every stage, N
//! tenants × M sessions asking greedy generations for T minutes, while gpu-nodes and the
//! coordinator are SIGKILLed at random (the launcher restarts them). Every finished answer is
//! checked against the plain engine's greedy answer for its prompt; a request that fails is
//! retried until it is answered, and one that never is counts as lost. Memory of every process
//! is sampled throughout. Writes a JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use talaria_cvm_agent::client::{self, Trust};
use talaria_engine::SamplingParams;
use talaria_net::TlsMaterial;
use talaria_wire::{Prompt, TenantRequest};

use crate::cluster::{Running, UpArgs};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Tenants, each with its own cvm-agent.
    #[arg(long, default_value_t = 2)]
    pub tenants: usize,
    /// Concurrent sessions per tenant.
    #[arg(long, default_value_t = 2)]
    pub sessions: usize,
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 12)]
    pub gen_tokens: usize,
    /// Mean seconds between kills (each waits a uniform 0.5×..1.5× of it); 0: no chaos.
    #[arg(long, default_value_t = 20.0)]
    pub kill_every_s: f64,
    /// Seed of the chaos (which process, when) and of the prompts' order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A request failing this many times in a row counts as lost.
    #[arg(long, default_value_t = 30)]
    pub max_attempts: usize,
    /// Write the report here as JSON (it is printed too).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the cluster's topology, TLS material and logs go.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// First port of the cluster (it uses a block of ports above it).
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// Seconds to wait for the cluster to be ready.
    #[arg(long, default_value_t = 600)]
    pub ready_timeout_s: u64,
}

/// The topology: two parts, each on two replicas; `tenants` agents.
fn topology_text(args: &SoakArgs) -> String {
    let p = args.base_port;
    let mut t = format!(
        "# Written by `talaria soak`.\n[model]\nname = \"smollm2-135m\"\n\n\
         [coordinator]\nlisten = \"127.0.0.1:{p}\"\nmetrics = \"127.0.0.1:{}\"\n\n",
        p + 1
    );
    let parts = [("0-14", false), ("15-29", true)];
    for (i, (layers, head)) in parts.iter().enumerate() {
        for (r, replica) in ["a", "b"].iter().enumerate() {
            let port = p + 10 + (2 * i + r) as u16;
            let _ = writeln!(
                t,
                "[[stage]]\nname = \"stage-{i}{replica}\"\nlisten = \"127.0.0.1:{port}\"\n\
                 layers = \"{layers}\"\nlm_head = {head}\n"
            );
        }
    }
    for i in 0..args.tenants {
        let _ = writeln!(
            t,
            "[[agent]]\ntenant = \"tenant-{i:02}\"\nlisten = \"127.0.0.1:{}\"\nmax_sessions = {}\n",
            p + 100 + i as u16,
            args.sessions
        );
    }
    t + "[tls]\ngenerate = true\n\n[admission]\nallow_insecure = true\n"
}

/// The prompts of tenant `t`: its own, so an answer delivered to the wrong tenant cannot match.
fn prompts(t: usize) -> Vec<String> {
    const SUBJECTS: [&str; 6] = [
        "the tides",
        "a bridge in winter",
        "how bees find flowers",
        "an old clock",
        "the night train",
        "a harbour at dawn",
    ];
    (0..3)
        .map(|k| {
            format!(
                "Tenant {t}, question {k}: tell me about {}.",
                SUBJECTS[(t * 3 + k) % SUBJECTS.len()]
            )
        })
        .collect()
}

/// What happened to the requests of the run.
#[derive(Debug, Default, Serialize)]
struct Outcomes {
    /// Answers equal to the plain engine's.
    answered: usize,
    /// Answers that differ from it (a wrong or misdelivered answer): must be 0.
    wrong: usize,
    /// Requests that failed every attempt: must be 0.
    lost: usize,
    /// Attempts that failed and were retried, by error type.
    retried: BTreeMap<String, usize>,
    /// `(seconds into the run, error type)` of every failed attempt, to set against the kills.
    failures: Vec<(f64, String)>,
    /// Generated tokens of the answered requests.
    tokens: usize,
}

/// Memory of one process over the run, MB.
#[derive(Debug, Default, Serialize)]
struct Memory {
    first_mb: f64,
    peak_mb: f64,
    last_mb: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    tenants: usize,
    sessions: usize,
    gen_tokens: usize,
    minutes: f64,
    seed: u64,
    kill_every_s: f64,
    /// `(seconds into the run, process)` of every kill.
    kills: Vec<(f64, String)>,
    outcomes: Outcomes,
    tokens_per_s: f64,
    /// By process name (restarted processes keep their name).
    memory: BTreeMap<String, Memory>,
    passed: bool,
}

fn rss_mb(pid: u32) -> Option<f64> {
    talaria_actors::rss_bytes_of(pid).map(|b| b as f64 / (1 << 20) as f64)
}

/// One tenant's agent, as a client reaches it.
struct Agent {
    addr: SocketAddr,
    tls: TlsMaterial,
    key: String,
}

/// Asks once: the ids, or the error's type.
fn ask(agent: &Agent, req: &TenantRequest) -> Result<Vec<u32>, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let trust = Trust::development();
    rt.block_on(client::generate(
        &agent.tls,
        agent.addr,
        &trust,
        req,
        &agent.key,
        |_, _| {},
    ))
    .map(|a| a.generation.ids)
    .map_err(|e| e.error_type().to_string())
}

pub fn run(args: SoakArgs) -> Result<()> {
    if args.tenants == 0 || args.sessions == 0 || args.gen_tokens == 0 {
        bail!("--tenants, --sessions and --gen-tokens must be positive");
    }
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| talaria_model_store::home().join("soak"));
    std::fs::create_dir_all(&run_dir)?;
    let topo_path = run_dir.join("soak.toml");
    std::fs::write(&topo_path, topology_text(&args))?;

    // The answers every request must get: the plain engine's greedy ids.
    let model = crate::resolve_model(None)?;
    let mut plain = talaria_gpu_node::PlainEngine::load(&model)?;
    let eos = plain.tokenizer.eos();
    let mut cases: Vec<Vec<(Vec<u32>, Vec<u32>)>> = Vec::new();
    for t in 0..args.tenants {
        let mut mine = Vec::new();
        for text in prompts(t) {
            let ids = plain.tokenizer.encode(&text)?;
            let want = talaria_engine::generate(
                &plain.model,
                &mut plain.weights,
                &talaria_engine::GenerateRequest {
                    prompt_ids: ids.clone(),
                    max_tokens: args.gen_tokens,
                    sampling: SamplingParams::default(),
                    stop_ids: vec![eos],
                },
                |_| Ok(()),
                None,
            )?
            .ids;
            mine.push((ids, want));
        }
        cases.push(mine);
    }
    drop(plain);

    let mut cluster: Running = crate::cluster::start(&UpArgs {
        topology: topo_path,
        run_dir: Some(run_dir),
        tap: None,
        ready_timeout_s: args.ready_timeout_s,
    })?;
    let agents: Vec<Agent> = (0..args.tenants)
        .map(|t| {
            let tenant = format!("tenant-{t:02}");
            let (addr, tls) = cluster
                .info
                .agent_tls(&tenant)
                .ok_or_else(|| anyhow!("no agent of {tenant}"))?;
            let key_file = &cluster
                .info
                .api_keys
                .iter()
                .find(|(k, _)| *k == tenant)
                .ok_or_else(|| anyhow!("no API key of {tenant}"))?
                .1;
            let key = std::fs::read_to_string(key_file)?.trim().to_string();
            Ok(Agent { addr, tls, key })
        })
        .collect::<Result<_>>()?;

    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let outcomes = Mutex::new(Outcomes::default());
    let memory: Mutex<BTreeMap<String, Memory>> = Mutex::new(BTreeMap::new());
    let mut kills = Vec::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let victims: Vec<String> = cluster
        .topology
        .stages
        .iter()
        .map(|s| s.name.clone())
        .chain(["coordinator".to_string()])
        .collect();
    let end = t0 + Duration::from_secs_f64(args.minutes * 60.0);
    let mut next_kill = (args.kill_every_s > 0.0).then(|| t0 + jitter(&mut rng, args.kill_every_s));
    eprintln!(
        "soak: {} tenant(s) × {} session(s), {} min, a kill every ~{} s",
        args.tenants, args.sessions, args.minutes, args.kill_every_s
    );
    let supervised: Result<()> = std::thread::scope(|scope| {
        for (t, agent) in agents.iter().enumerate() {
            for s in 0..args.sessions {
                let (cases, stop, outcomes) = (&cases[t], &stop, &outcomes);
                let max_attempts = args.max_attempts;
                let gen_tokens = args.gen_tokens;
                scope.spawn(move || {
                    let mut k = s;
                    while !stop.load(Ordering::Relaxed) {
                        let (ids, want) = &cases[k % cases.len()];
                        k += 1;
                        let req = TenantRequest {
                            prompt: Prompt::Ids(ids.clone()),
                            max_tokens: gen_tokens,
                            sampling: SamplingParams::default(),
                            ignore_eos: false,
                            stop: Vec::new(),
                            cache_salt: None,
                        };
                        let mut attempt = 0;
                        loop {
                            attempt += 1;
                            match ask(agent, &req) {
                                Ok(got) => {
                                    let mut o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                                    if got == *want {
                                        o.answered += 1;
                                        o.tokens += got.len();
                                    } else {
                                        o.wrong += 1;
                                        eprintln!(
                                            "WRONG answer for tenant {t}: {got:?} != {want:?}"
                                        );
                                    }
                                    break;
                                }
                                Err(e) => {
                                    let mut o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                                    o.failures.push((t0.elapsed().as_secs_f64(), e.clone()));
                                    *o.retried.entry(e).or_default() += 1;
                                    drop(o);
                                    if attempt >= max_attempts {
                                        outcomes.lock().unwrap_or_else(|e| e.into_inner()).lost +=
                                            1;
                                        break;
                                    }
                                    std::thread::sleep(Duration::from_millis(500));
                                }
                            }
                        }
                    }
                });
            }
        }
        // The launcher's duties, the chaos and the memory samples, on this thread.
        let mut last_sample = Instant::now() - Duration::from_secs(10);
        let result = loop {
            let now = Instant::now();
            if now >= end {
                break Ok(());
            }
            if let Err(e) = cluster.restart_exited() {
                break Err(e);
            }
            if last_sample.elapsed() >= Duration::from_secs(2) {
                last_sample = now;
                let mut m = memory.lock().unwrap_or_else(|e| e.into_inner());
                for (name, pid) in &cluster.info.pids {
                    if let Some(mb) = rss_mb(*pid) {
                        let e = m.entry(name.clone()).or_insert(Memory {
                            first_mb: mb,
                            ..Memory::default()
                        });
                        e.peak_mb = e.peak_mb.max(mb);
                        e.last_mb = mb;
                    }
                }
            }
            if next_kill.is_some_and(|t| now >= t) {
                let victim = &victims[rng.random_range(0..victims.len())];
                if let Some((_, pid)) = cluster.info.pids.iter().find(|(n, _)| n == victim) {
                    eprintln!("  {:.0} s: SIGKILL {victim}", t0.elapsed().as_secs_f64());
                    // SAFETY: kill has no memory preconditions; the pid is our child's.
                    unsafe {
                        libc::kill(*pid as i32, libc::SIGKILL);
                    }
                    kills.push((t0.elapsed().as_secs_f64(), victim.clone()));
                }
                next_kill = Some(now + jitter(&mut rng, args.kill_every_s));
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        stop.store(true, Ordering::Relaxed);
        // The sessions finish their current request (with the launcher still restarting).
        result
    });
    supervised.context("supervising the cluster")?;
    let wall = t0.elapsed().as_secs_f64();
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    let passed = outcomes.wrong == 0 && outcomes.lost == 0 && outcomes.answered > 0;
    let report = Report {
        tenants: args.tenants,
        sessions: args.sessions,
        gen_tokens: args.gen_tokens,
        minutes: args.minutes,
        seed: args.seed,
        kill_every_s: args.kill_every_s,
        kills,
        tokens_per_s: outcomes.tokens as f64 / wall,
        outcomes,
        memory: memory.into_inner().unwrap_or_else(|e| e.into_inner()),
        passed,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("{}", path.display()))?;
    }
    drop(cluster);
    if !passed {
        bail!("the soak found wrong or lost answers");
    }
    Ok(())
}

/// A wait of `mean` seconds, jittered uniformly by ±50 %.
fn jitter(rng: &mut impl Rng, mean: f64) -> Duration {
    Duration::from_secs_f64(mean * rng.random_range(0.5..1.5))
}
