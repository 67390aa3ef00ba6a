//! `talaria bench-hop`: the floor of the cluster's transport on this host. Real QUIC (the
//! cluster's endpoints and TLS, `talaria_net`) on loopback between single-threaded event loops,
//! each on a thread of its own as each process of a cluster has one: a client asks, a server
//! answers at once with no work, directly (one hop) or through a relay that only forwards
//! frames (two hops, the coordinator's place in the path). Whatever the cluster's hop costs
//! beyond these numbers is its own logic; what these numbers cost, no routing logic can remove.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde::Serialize;
use talaria_net::{ClientAuth, TlsMaterial};
use talaria_wire::frame::FrameError;

const ALPN: &[u8] = b"talaria-bench-hop";

/// Largest frame any case sends.
const MAX_FRAME: usize = 1 << 20;

/// `talaria bench-hop`'s options.
#[derive(Debug, Args)]
pub struct BenchHopArgs {
    /// Timed round trips per case (each case also makes a tenth of that, untimed, first).
    #[arg(long, default_value_t = 4000)]
    pub calls: usize,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How a client's calls use QUIC streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Streams {
    /// A new stream per call, one frame each way (the cluster today).
    PerCall,
    /// One stream for all calls, frame after frame (a session's stream).
    OneStream,
}

/// The bytes one call carries each way.
#[derive(Debug, Clone, Copy, Serialize)]
struct Payload {
    name: &'static str,
    request_bytes: usize,
    answer_bytes: usize,
}

/// A near-empty call, and the mean decode call of SmolLM2-135M's block ops in the integer mode
/// (one row of u64: inputs 576, 576, 576, 1536; outputs 960, 576, 3072, 576).
const PAYLOADS: [Payload; 2] = [
    Payload {
        name: "tiny",
        request_bytes: 64,
        answer_bytes: 64,
    },
    Payload {
        name: "decode-call",
        request_bytes: 6528,
        answer_bytes: 10368,
    },
];

#[derive(Debug, Serialize)]
struct Case {
    hops: usize,
    streams: Streams,
    /// Each end hands every call to a worker thread and back, as the cluster's do: the client
    /// calls from a worker through its event loop (the agent's session and uplink), the server
    /// answers from a worker woken by its event loop (the stage's shard).
    handoffs: bool,
    payload: Payload,
    calls: usize,
    /// Wall time per round trip as the client saw it.
    us_per_call: f64,
    /// CPU time per call of each role's thread (client, relay, server, and with hand-offs the
    /// client's caller and the server's worker), from `/proc/self/task/*/stat` (10 ms ticks: a
    /// few per cent of resolution over a case).
    cpu_us_per_call: BTreeMap<&'static str, f64>,
    /// The client connection's traffic per call (`quinn::Connection::stats`): at least one
    /// datagram each way; what is beyond that is ACKs or flow-control credit sent alone.
    client_per_call: Traffic,
}

/// A connection's traffic per call between two readings of its statistics.
#[derive(Debug, Serialize)]
struct Traffic {
    datagrams_sent: f64,
    datagrams_received: f64,
    ack_frames_sent: f64,
    ack_frames_received: f64,
    /// MAX_STREAMS, MAX_DATA and MAX_STREAM_DATA frames received: the peer's credit.
    credit_frames_received: f64,
}

impl Traffic {
    fn between(
        before: &quinn::ConnectionStats,
        after: &quinn::ConnectionStats,
        calls: usize,
    ) -> Self {
        let per = |b: u64, a: u64| a.saturating_sub(b) as f64 / calls as f64;
        let credit = |s: &quinn::ConnectionStats| {
            s.frame_rx.max_streams_bidi + s.frame_rx.max_data + s.frame_rx.max_stream_data
        };
        Self {
            datagrams_sent: per(before.udp_tx.datagrams, after.udp_tx.datagrams),
            datagrams_received: per(before.udp_rx.datagrams, after.udp_rx.datagrams),
            ack_frames_sent: per(before.frame_tx.acks, after.frame_tx.acks),
            ack_frames_received: per(before.frame_rx.acks, after.frame_rx.acks),
            credit_frames_received: per(credit(before), credit(after)),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    cases: Vec<Case>,
}

/// A role's thread: its id, for its CPU clock.
fn tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// CPU seconds of this process's thread `tid` so far.
fn thread_cpu_seconds(tid: i32) -> Option<f64> {
    crate::load::stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

/// Where a relay sends what it receives: the next hop's connection.
#[derive(Clone)]
struct Upstream(quinn::Connection);

/// Serves each stream of `conn` as `streams` says, answering every frame with `answer`, or,
/// through `upstream`, with what the next hop answers it (a relay that reads only the length
/// prefix, as the coordinator reads only the header).
async fn serve(
    conn: quinn::Connection,
    streams: Streams,
    answer: Arc<Vec<u8>>,
    upstream: Option<Upstream>,
    worker: Option<Worker>,
) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let answer = answer.clone();
        let upstream = upstream.clone();
        let worker = worker.clone();
        tokio::spawn(async move {
            // In one-stream mode a relay keeps one stream to the next hop per stream it serves.
            let mut onward: Option<(quinn::SendStream, quinn::RecvStream)> = None;
            loop {
                let Ok(Some(frame)) = talaria_net::read_frame(&mut recv, MAX_FRAME).await else {
                    break;
                };
                let reply = match (&upstream, streams) {
                    (None, _) => match &worker {
                        None => Ok(answer.to_vec()),
                        Some(w) => w.answer(answer.clone()).await,
                    },
                    (Some(Upstream(up)), Streams::PerCall) => {
                        talaria_net::request(up, &frame, MAX_FRAME).await
                    }
                    (Some(Upstream(up)), Streams::OneStream) => {
                        one_stream_call(up, &mut onward, &frame).await
                    }
                };
                let Ok(reply) = reply else { break };
                if streams == Streams::PerCall {
                    // The request's end came with its frame: take it, as serve_streams does.
                    talaria_net::take_end(&mut recv);
                }
                if talaria_net::write_frame(&mut send, &reply).await.is_err()
                    || streams == Streams::PerCall
                {
                    break;
                }
            }
            let _ = send.finish();
        });
    }
}

/// A server's worker thread: it takes each call from the event loop and gives the answer
/// back (a condition variable's wake one way, a oneshot's the other, as the stage's shard).
#[derive(Clone)]
struct Worker(mpsc::Sender<Job>);

/// A call for the server's worker: the answer to give, and where to give it.
type Job = (Arc<Vec<u8>>, tokio::sync::oneshot::Sender<Vec<u8>>);

impl Worker {
    /// The worker and its thread's id; it stops when the last sender is dropped.
    fn start() -> Result<(Self, i32)> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (id_tx, id_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("bench-hop-worker".into())
            .spawn(move || {
                let _ = id_tx.send(tid());
                while let Ok((answer, back)) = rx.recv() {
                    let _ = back.send(answer.to_vec());
                }
            })?;
        Ok((Self(tx), id_rx.recv()?))
    }

    async fn answer(&self, answer: Arc<Vec<u8>>) -> Result<Vec<u8>, FrameError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || FrameError::Connection("the worker stopped".into());
        self.0.send((answer, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

/// One call on `stream` (opened on `conn` at the first call): a frame out, a frame back.
async fn one_stream_call(
    conn: &quinn::Connection,
    stream: &mut Option<(quinn::SendStream, quinn::RecvStream)>,
    frame: &[u8],
) -> Result<Vec<u8>, FrameError> {
    if stream.is_none() {
        *stream = Some(
            conn.open_bi()
                .await
                .map_err(|e| FrameError::Connection(e.to_string()))?,
        );
    }
    let (send, recv) = stream.as_mut().expect("opened above");
    talaria_net::write_frame(send, frame).await?;
    talaria_net::read_frame(recv, MAX_FRAME)
        .await?
        .ok_or_else(|| FrameError::Connection("the stream ended".into()))
}

/// Runs a server (and, for two hops, a relay in front of it) on threads of their own; returns
/// the address the client dials and the threads' ids (relay first, if any; the server's worker
/// last, with hand-offs).
fn start(
    tls: &TlsMaterial,
    hops: usize,
    streams: Streams,
    handoffs: bool,
    payload: Payload,
) -> Result<(SocketAddr, Vec<(&'static str, i32)>)> {
    let mut next: Option<SocketAddr> = None;
    let mut roles = Vec::new();
    // The server first, then the relay that dials it.
    for hop in (0..hops).rev() {
        let role = if hop + 1 == hops { "server" } else { "relay" };
        let (tx, rx) = mpsc::channel::<Result<(SocketAddr, i32, Option<i32>)>>();
        let tls = tls.clone();
        let upstream_addr = next;
        std::thread::Builder::new()
            .name(format!("bench-hop-{role}"))
            .spawn(move || {
                let run = || -> Result<()> {
                    let rt = crate::current_thread_runtime()?;
                    rt.block_on(async {
                        let endpoint =
                            tls.server("127.0.0.1:0".parse()?, ALPN, ClientAuth::Anyone)?;
                        let upstream = match upstream_addr {
                            Some(addr) => {
                                let client = tls.client(ALPN)?;
                                Some(Upstream(tls.connect(&client, addr).await?))
                            }
                            None => None,
                        };
                        let worker = (handoffs && upstream.is_none())
                            .then(Worker::start)
                            .transpose()?;
                        let worker_id = worker.as_ref().map(|&(_, id)| id);
                        tx.send(Ok((endpoint.local_addr()?, tid(), worker_id)))
                            .map_err(|_| anyhow!("the bench stopped"))?;
                        let answer = Arc::new(vec![7u8; payload.answer_bytes]);
                        // One client: the bench's, or the relay's.
                        let conn = endpoint
                            .accept()
                            .await
                            .ok_or_else(|| anyhow!("no client"))?
                            .await?;
                        let worker = worker.map(|(w, _)| w);
                        serve(conn.clone(), streams, answer, upstream, worker).await;
                        anyhow::Ok(())
                    })
                };
                if let Err(e) = run() {
                    let _ = tx.send(Err(e));
                }
            })?;
        let (addr, id, worker) = rx.recv().context("a bench thread stopped")??;
        next = Some(addr);
        roles.push((role, id));
        if let Some(id) = worker {
            roles.push(("server-worker", id));
        }
    }
    roles.reverse();
    Ok((next.expect("at least one hop"), roles))
}

/// The CPU seconds of each role's thread so far.
fn cpu_of(roles: &[(&'static str, i32)]) -> Result<Vec<f64>> {
    roles
        .iter()
        .map(|&(role, id)| {
            thread_cpu_seconds(id).ok_or_else(|| anyhow!("no CPU clock for the {role}'s thread"))
        })
        .collect()
}

/// One call from the client: per call on its own stream, or on `stream`.
async fn client_call(
    conn: &quinn::Connection,
    streams: Streams,
    stream: &mut Option<(quinn::SendStream, quinn::RecvStream)>,
    frame: &[u8],
) -> Result<Vec<u8>, FrameError> {
    match streams {
        Streams::PerCall => talaria_net::request(conn, frame, MAX_FRAME).await,
        Streams::OneStream => one_stream_call(conn, stream, frame).await,
    }
}

/// `n` calls made by `one`; microseconds a call.
fn timed_sync(n: usize, mut one: impl FnMut() -> Result<usize>, want: usize) -> Result<f64> {
    let t0 = Instant::now();
    for _ in 0..n {
        anyhow::ensure!(one()? == want, "a short answer");
    }
    Ok(t0.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// One case: `calls` timed round trips from a client whose event loop runs on this thread.
fn case(
    tls: &TlsMaterial,
    hops: usize,
    streams: Streams,
    handoffs: bool,
    payload: Payload,
    calls: usize,
) -> Result<Case> {
    let (addr, mut roles) = start(tls, hops, streams, handoffs, payload)?;
    roles.insert(0, ("client", tid()));
    let rt = crate::current_thread_runtime()?;
    let warm = calls / 10 + 1;
    let (us, before, after, roles, traffic) = rt.block_on(async {
        type Out = (
            f64,
            Vec<f64>,
            Vec<f64>,
            Vec<(&'static str, i32)>,
            (quinn::ConnectionStats, quinn::ConnectionStats),
        );
        let client = tls.client(ALPN)?;
        let conn = tls.connect(&client, addr).await?;
        let frame = vec![1u8; payload.request_bytes];
        let mut stream = None;
        if !handoffs {
            let mut calls_of = async |n: usize| -> Result<f64> {
                let t0 = Instant::now();
                for _ in 0..n {
                    let answer = client_call(&conn, streams, &mut stream, &frame).await?;
                    anyhow::ensure!(answer.len() == payload.answer_bytes, "a short answer");
                }
                Ok(t0.elapsed().as_secs_f64() * 1e6 / n as f64)
            };
            calls_of(warm).await?;
            let (before, stats_before) = (cpu_of(&roles)?, conn.stats());
            let us = calls_of(calls).await?;
            let (after, stats_after) = (cpu_of(&roles)?, conn.stats());
            conn.close(0u32.into(), b"done");
            // The close reaches the relay and server, whose threads then end.
            client.wait_idle().await;
            return anyhow::Ok::<Out>((us, before, after, roles, (stats_before, stats_after)));
        }
        // The calls come from a worker thread through this event loop, and wait blocked.
        type Back = tokio::sync::oneshot::Sender<Result<Vec<u8>, FrameError>>;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Back>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let mut roles = roles;
        let client_roles = roles.clone();
        let (tid_tx, tid_rx) = mpsc::channel();
        let stats_of = conn.clone();
        std::thread::Builder::new()
            .name("bench-hop-caller".into())
            .spawn(move || {
                let _ = tid_tx.send(tid());
                let one = || -> Result<usize> {
                    let (back, answer) = tokio::sync::oneshot::channel();
                    tx.send(back)
                        .map_err(|_| anyhow!("the event loop stopped"))?;
                    Ok(futures::executor::block_on(answer)??.len())
                };
                let mut one = one;
                type Timed = (f64, Vec<f64>, Vec<f64>, quinn::ConnectionStats);
                let result = (|| -> Result<(Timed, quinn::ConnectionStats)> {
                    timed_sync(warm, &mut one, payload.answer_bytes)?;
                    let mut all = client_roles;
                    all.push(("caller", tid()));
                    let (before, stats_before) = (cpu_of(&all)?, stats_of.stats());
                    let us = timed_sync(calls, &mut one, payload.answer_bytes)?;
                    Ok(((us, before, cpu_of(&all)?, stats_before), stats_of.stats()))
                })();
                let _ = done_tx.send(result);
            })?;
        roles.push(("caller", tid_rx.recv()?));
        let serving = async {
            while let Some(back) = rx.recv().await {
                let _ = back.send(client_call(&conn, streams, &mut stream, &frame).await);
            }
        };
        let (result, ()) = tokio::join!(done_rx, serving);
        let ((us, before, after, stats_before), stats_after) =
            result.map_err(|_| anyhow!("the caller stopped"))??;
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        Ok((us, before, after, roles, (stats_before, stats_after)))
    })?;
    Ok(Case {
        hops,
        streams,
        handoffs,
        payload,
        calls,
        us_per_call: us,
        cpu_us_per_call: roles
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(&(role, _), (b, a))| (role, (a - b) * 1e6 / calls as f64))
            .collect(),
        client_per_call: Traffic::between(&traffic.0, &traffic.1, calls),
    })
}

/// Runs every case and prints (and with `--out` writes) the report.
pub fn run(args: BenchHopArgs) -> Result<()> {
    anyhow::ensure!(args.calls > 0, "--calls must be at least 1");
    let dir = std::env::temp_dir().join(format!("talaria-bench-hop-{}", std::process::id()));
    let tls = TlsMaterial::generate(&dir, "talaria-bench-hop")?;
    let mut cases = Vec::new();
    for payload in PAYLOADS {
        for hops in [1, 2] {
            for (streams, handoffs) in [
                (Streams::PerCall, false),
                (Streams::OneStream, false),
                (Streams::PerCall, true),
            ] {
                let c = case(&tls, hops, streams, handoffs, payload, args.calls)?;
                eprintln!(
                    "{:>11}, {hops} hop(s), {:>10}{}: {:6.1} µs a call; CPU µs a call {:?}",
                    payload.name,
                    format!("{streams:?}"),
                    if handoffs { ", hand-offs" } else { "" },
                    c.us_per_call,
                    c.cpu_us_per_call
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.1}"))
                        .collect::<Vec<_>>()
                );
                cases.push(c);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let report = Report { cases };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{json}");
    Ok(())
}
