//! `talaria load --synthetic`: the gpu-nodes alone. Sessions are opened on the stages directly
//! (as the coordinator opens them, with the cluster's certificate) and driven with
//! masked-shaped traffic and no CVM work: every decode step is one call per op, in forward-pass
//! order, each of one row of the cluster's ReMO precision (uniform residues mod 2^64 in the
//! integer mode; float rows in the float modes) — what a call of one token with no dummy rows is
//! to the cloud. The calls go through one [`Coalescer`] a stage, as the coordinator forwards
//! them: calls waiting together leave in one `Batch` frame. This shows what cross-tenant
//! batching gives a gpu-node when the CVMs (and their attention, masking and verification) are
//! elsewhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use talaria_actors::Coalescer;
use talaria_engine::{ModelConfig, OpId};
use talaria_net::TlsMaterial;
use talaria_wire::{MaskedCall, Reply, Request, Tensor, frame};

use crate::cluster::Running;

/// One point of the synthetic curve: `sessions` concurrent sessions, each of its own tenant.
#[derive(Debug, Serialize)]
pub struct SyntheticStep {
    /// Which pass over the session counts (from 0; `--rounds`).
    round: usize,
    sessions: usize,
    /// Decode steps (one call per op) of all sessions.
    tokens: usize,
    wall_s: f64,
    /// Decode steps of all sessions per second: the gpu-nodes' throughput.
    tokens_per_s: f64,
    /// `tokens_per_s` over the one-session step's of the same round, if measured.
    speedup_vs_one_session: Option<f64>,
    /// Masked calls answered per second, all stages together.
    calls_per_s: f64,
    batches: Vec<crate::load::StageBatches>,
    /// CPU milliseconds per decode step, by process (the driver's own included).
    cpu_ms_per_token: BTreeMap<String, f64>,
    /// The driver's QUIC connection to each stage, in stage order, after this step (its own
    /// sends: quinn's loss detection sees the sender's side).
    links: Vec<LinkStats>,
    /// Datagrams of the stages' answers lost during this step, all stages together.
    answer_datagrams_lost: u64,
}

/// One session count over every round: the median of its steps' throughput, and the ratio of
/// medians to one session's (each round measured the counts side by side).
#[derive(Debug, Serialize)]
pub struct SyntheticMedian {
    sessions: usize,
    /// Steps measured with this count: one a round (more where `--tenants` lists it twice).
    steps: usize,
    tokens_per_s: f64,
    min_tokens_per_s: f64,
    max_tokens_per_s: f64,
    /// `tokens_per_s` over one session's median, if measured (in any round).
    speedup_vs_one_session: Option<f64>,
    /// Each step's own ratio, against its round's one session, in round order (none for a
    /// count measured before one session in its round).
    speedups_by_round: Vec<f64>,
}

impl std::fmt::Display for SyntheticMedian {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} session(s), median of {} steps: {:.2} steps/s ({:.2}-{:.2})",
            self.sessions,
            self.steps,
            self.tokens_per_s,
            self.min_tokens_per_s,
            self.max_tokens_per_s
        )?;
        if let Some(x) = self.speedup_vs_one_session {
            write!(f, ", {x:.2}× one session's median")?;
        }
        Ok(())
    }
}

/// The median of a non-empty sample (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Each session count's median over the rounds of `steps`, in the order the counts were first
/// measured.
pub fn medians(steps: &[SyntheticStep]) -> Vec<SyntheticMedian> {
    let mut counts: Vec<usize> = Vec::new();
    for s in steps {
        if !counts.contains(&s.sessions) {
            counts.push(s.sessions);
        }
    }
    let of =
        |n: usize| -> Vec<&SyntheticStep> { steps.iter().filter(|s| s.sessions == n).collect() };
    let one = counts
        .contains(&1)
        .then(|| median(of(1).iter().map(|s| s.tokens_per_s).collect()));
    counts
        .into_iter()
        .map(|n| {
            let mine = of(n);
            let rates: Vec<f64> = mine.iter().map(|s| s.tokens_per_s).collect();
            let m = median(rates.clone());
            SyntheticMedian {
                sessions: n,
                steps: mine.len(),
                tokens_per_s: m,
                min_tokens_per_s: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max_tokens_per_s: rates.iter().copied().fold(0.0, f64::max),
                speedup_vs_one_session: one.map(|o| m / o),
                speedups_by_round: mine
                    .iter()
                    .filter_map(|s| s.speedup_vs_one_session)
                    .collect(),
            }
        })
        .collect()
}

/// What a connection's path looked like: datagrams lost, or an MTU fallen back to 1,200 bytes,
/// stall every call on it.
#[derive(Debug, Serialize)]
struct LinkStats {
    rtt_us: u64,
    current_mtu: u16,
    lost_packets: u64,
    congestion_events: u64,
}

impl LinkStats {
    fn of(conn: &quinn::Connection) -> Self {
        let path = conn.stats().path;
        Self {
            rtt_us: path.rtt.as_micros() as u64,
            current_mtu: path.current_mtu,
            lost_packets: path.lost_packets,
            congestion_events: path.congestion_events,
        }
    }
}

/// The rows a call of the cluster's ReMO precision carries to the cloud.
#[derive(Debug, Clone, Copy)]
enum RowKind {
    /// The integer mode: residues mod 2^64.
    U64,
    /// `f32` and `f64-client`: the cloud's product in f32.
    F32,
    /// `f64-gemm`: the cloud's product in f64.
    F64,
}

impl RowKind {
    fn of(precision: talaria_params::Precision) -> Self {
        use talaria_params::Precision;
        match precision {
            Precision::Int => Self::U64,
            Precision::F32 | Precision::F64Client => Self::F32,
            Precision::F64Gemm => Self::F64,
        }
    }

    /// One row of `cols` values: uniform residues, or floats of a masked row's magnitude.
    fn row(self, cols: usize) -> Tensor {
        let float = || (rand::random::<f64>() - 0.5) * 2e3;
        match self {
            Self::U64 => Tensor::U64 {
                rows: 1,
                cols,
                data: (0..cols).map(|_| rand::random()).collect(),
            },
            Self::F32 => Tensor::F32 {
                rows: 1,
                cols,
                data: (0..cols).map(|_| float() as f32).collect(),
            },
            Self::F64 => Tensor::F64 {
                rows: 1,
                cols,
                data: (0..cols).map(|_| float()).collect(),
            },
        }
    }
}

/// Where each op runs: the stage index of every op, in forward-pass order.
fn route(cluster: &Running, config: &ModelConfig) -> Result<Vec<(OpId, usize)>> {
    talaria_cvm_agent::all_ops(config)
        .into_iter()
        .map(|op| {
            let layer = match op {
                OpId::Block { layer, .. } => Some(layer),
                OpId::LmHead => None,
            };
            let stage = cluster
                .topology
                .stage_for(layer)
                .ok_or_else(|| anyhow!("no stage serves {op}"))?;
            Ok((op, stage))
        })
        .collect()
}

/// One request on `conn`; an error unless the answer is `Ok`.
async fn ask(conn: &quinn::Connection, frame: &[u8], max: usize) -> Result<()> {
    answered(&talaria_net::request(conn, frame, max).await?, max)
}

/// An error unless `answer` is `Ok` and at most `max` bytes (what a single call's answer may
/// be, batched or not).
fn answered(answer: &[u8], max: usize) -> Result<()> {
    if answer.len() > max {
        return Err(anyhow!(
            "an answer of {} bytes (at most {max})",
            answer.len()
        ));
    }
    match frame::split::<Reply>(answer)?.0 {
        Reply::Ok { .. } => Ok(()),
        Reply::Err(e) => Err(anyhow!("{}: {}", e.error_type, e.message)),
    }
}

/// One session: opened on every stage, `tokens` decode steps (their calls sent through
/// `calls`, one coalescer a stage, as the coordinator forwards them), closed.
async fn session(
    conns: &[quinn::Connection],
    calls: &[Coalescer],
    ops: &[(OpId, usize)],
    config: &ModelConfig,
    kind: RowKind,
    session: u64,
    tokens: usize,
) -> Result<usize> {
    let open = frame::encode::<_, ()>(
        &Request::StageOpen {
            session,
            tenant: format!("synthetic-{session}"),
        },
        None,
    )?;
    for conn in conns {
        ask(conn, &open, 4096).await?;
    }
    // One row per op, made once: the cloud cannot tell uniform residues from fresh ones, and
    // the float modes' masked rows are noise-like at the mask's scale.
    let rows: Vec<Tensor> = ops
        .iter()
        .map(|(op, _)| kind.row(op.shape(config).0))
        .collect();
    let mut seq = 0u64;
    for _ in 0..tokens {
        for ((op, stage), x) in ops.iter().zip(&rows) {
            seq += 1;
            let call = MaskedCall {
                session,
                seq,
                op: *op,
                x: x.clone(),
            };
            let frame = frame::encode(
                &Request::Call {
                    session,
                    op: *op,
                    seq,
                },
                Some(&call),
            )?;
            let max = talaria_wire::max_call_reply(config, *op, 1);
            let bound = talaria_wire::frame::max_answer_of(config, *op, frame.len());
            let answer = calls[*stage].call(frame.into(), *op, bound).await;
            answer
                .map_err(anyhow::Error::from)
                .and_then(|a| answered(&a, max))
                .with_context(|| format!("session {session}, {op}"))?;
        }
    }
    let close = frame::encode::<_, ()>(&Request::CloseSession { session }, None)?;
    for conn in conns {
        ask(conn, &close, 4096).await?;
    }
    Ok(tokens * ops.len())
}

/// The stages' metrics, read on a thread of its own while `rt` keeps serving the driver's
/// connections: a current-thread runtime runs only inside `block_on`, and a connection left
/// unserved past the stages' idle timeout (2 s) is dropped.
fn scrape(
    rt: &tokio::runtime::Runtime,
    stages: &[(String, SocketAddr)],
) -> Result<Vec<crate::load::StageReading>> {
    let stages = stages.to_vec();
    rt.block_on(async move {
        tokio::task::spawn_blocking(move || crate::load::read_stages(&stages)).await
    })?
}

/// Runs `counts` concurrent sessions each (in order, the whole list `rounds` times) on
/// `cluster`'s stages; `stages` are their metrics addresses.
pub fn run(
    cluster: &Running,
    counts: &[usize],
    rounds: usize,
    tokens: usize,
    stages: &[(String, SocketAddr)],
) -> Result<Vec<SyntheticStep>> {
    let config = talaria_model_file::read_config(&talaria_gguf::GgufFile::open(
        cluster.topology.coordinator_file(),
    )?)?;
    let kind = RowKind::of(cluster.topology.remo.config.precision);
    let ops = route(cluster, &config)?;
    let ca = cluster.info.ca.clone();
    let dir = ca
        .parent()
        .ok_or_else(|| anyhow!("{}: no folder", ca.display()))?;
    let tls = TlsMaterial {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        server_name: cluster.info.server_name.clone(),
        ca,
    };
    // One thread, like the coordinator's event loop, which is what drives a stage in a
    // cluster. A multi-threaded runtime of one worker ran the sessions on this thread and
    // quinn's endpoint on the worker, two thread crossings a call: the driver took 8.1 ms of
    // CPU a step at 1 session (2.8 at 16) against 4.4 (1.9) now, on the cores the stages use.
    let rt = crate::current_thread_runtime()?;
    // As the coordinator: answers of at most the topology's frame limit, batches of at most
    // what a stage reads.
    let limits = talaria_actors::BatchLimits {
        request: talaria_wire::max_request_frame(&config).min(cluster.topology.max_frame_bytes),
        answer: cluster.topology.max_frame_bytes,
    };
    let (conns, calls): (Vec<quinn::Connection>, Vec<Coalescer>) = rt.block_on(async {
        let endpoint = tls.cluster_client(talaria_wire::ALPN_CLOUD)?;
        let mut conns = Vec::new();
        let mut calls = Vec::new();
        for stage in &cluster.topology.stages {
            let conn = tls.connect(&endpoint, stage.listen).await?;
            calls.push(Coalescer::new(conn.clone(), limits));
            conns.push(conn);
        }
        anyhow::Ok((conns, calls))
    })?;
    let stage_pids: Vec<(String, u32)> = cluster
        .info
        .pids
        .iter()
        .filter(|(name, _)| name.starts_with("stage-"))
        .cloned()
        .collect();
    let mut steps: Vec<SyntheticStep> = Vec::new();
    let mut next_session = 1u64 << 40;
    // Warm-up, not measured: the stages' first products touch their weights.
    rt.block_on(session(
        &conns,
        &calls,
        &ops,
        &config,
        kind,
        next_session,
        2,
    ))?;
    next_session += 1;
    let passes = (0..rounds).flat_map(|round| counts.iter().map(move |&n| (round, n)));
    for (round, n) in passes {
        eprintln!("synthetic: {n} session(s) × {tokens} decode steps (round {round})");
        let before = scrape(&rt, stages)?;
        let cpu_before = crate::load::cpu_by_role(&stage_pids);
        let me_before = crate::load::cpu_seconds(std::process::id()).unwrap_or(0.0);
        let t0 = Instant::now();
        let first = next_session;
        next_session += n as u64;
        let calls: usize = rt
            .block_on(async {
                let runs = (0..n as u64)
                    .map(|i| session(&conns, &calls, &ops, &config, kind, first + i, tokens));
                futures::future::try_join_all(runs).await
            })?
            .into_iter()
            .sum();
        let wall = t0.elapsed().as_secs_f64();
        // The stages read their connections' losses every second.
        rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(1100)).await });
        let after = scrape(&rt, stages)?;
        let lost = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.datagrams_lost.saturating_sub(b.datagrams_lost))
            .sum();
        let mut cpu: BTreeMap<String, f64> = crate::load::cpu_by_role(&stage_pids)
            .into_iter()
            .map(|(k, v)| (k.clone(), v - cpu_before.get(&k).unwrap_or(&0.0)))
            .collect();
        cpu.insert(
            "driver".into(),
            crate::load::cpu_seconds(std::process::id()).unwrap_or(0.0) - me_before,
        );
        let generated = n * tokens;
        let tokens_per_s = generated as f64 / wall;
        let one = steps
            .iter()
            .find(|s| s.sessions == 1 && s.round == round)
            .map(|s| s.tokens_per_s);
        let step = SyntheticStep {
            round,
            sessions: n,
            tokens: generated,
            wall_s: wall,
            tokens_per_s,
            speedup_vs_one_session: one.map(|o| tokens_per_s / o),
            calls_per_s: calls as f64 / wall,
            batches: crate::load::batches(stages, &before, &after),
            cpu_ms_per_token: cpu
                .into_iter()
                .map(|(k, v)| (k, v * 1e3 / generated as f64))
                .collect(),
            links: conns.iter().map(LinkStats::of).collect(),
            answer_datagrams_lost: lost,
        };
        eprintln!(
            "  {:.2} steps/s ({:.0} calls/s) in {:.1} s{}",
            step.tokens_per_s,
            step.calls_per_s,
            step.wall_s,
            step.speedup_vs_one_session
                .map(|s| format!(", {s:.2}× one session"))
                .unwrap_or_default()
        );
        for b in &step.batches {
            eprintln!(
                "  {}: {:.2} calls per frame, {:.2} per GEMM, {:.2} ms queued per call, {:.2} ms compute per GEMM",
                b.stage,
                b.calls_per_frame.mean,
                b.calls_per_batch.mean,
                b.queue_seconds_per_call.mean * 1e3,
                b.compute_seconds_per_batch.mean * 1e3
            );
        }
        steps.push(step);
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0]), 3.0);
        assert_eq!(median(vec![34.9, 29.9, 32.2]), 32.2);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        // An outlier moves the mean, not the median.
        assert_eq!(median(vec![30.0, 31.0, 300.0]), 31.0);
    }
}
