//! Staying up with real processes on loopback: a replica takes over a killed, hung or frozen
//! gpu-node (the resent call is the very bytes first sent) and new sessions of a stopped one, a hung stage without a replica is an error
//! within the deadline, the agent survives a coordinator restart, abandoned requests stop
//! consuming the cloud, and oversized or malformed input is refused with memory bounded; a
//! gpu-node that corrupts its replies is caught by the agent's Freivalds check.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use talaria_engine::{BlockOp, OpId, SamplingParams};
use talaria_gpu_node::{ALLOW_FAULTS_ENV, FAULT_ENV};
use talaria_net::TlsMaterial;
use talaria_tests::cluster::{
    LocalCluster, RawPeer, Who, free_port, generate_streaming, metric, rss_bytes, scrape,
};
use talaria_tests::{plain_greedy, real_model};
use talaria_wire::{MaskedCall, Prompt, Reply, Request, TenantRequest, Tensor};

fn greedy(ids: Vec<u32>, max_tokens: usize) -> TenantRequest {
    TenantRequest {
        prompt: Prompt::Ids(ids),
        max_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: false,
        stop: Vec::new(),
        cache_salt: None,
    }
}

/// The plain engine's greedy answer to [`PROMPT`]: what every request here must get.
fn want_for(model: &Path, max_tokens: usize) -> Vec<u32> {
    let mut plain = talaria_gpu_node::PlainEngine::load(model).unwrap();
    plain_greedy(&mut plain, PROMPT.to_vec(), max_tokens)
}

/// A prompt of the real model's vocabulary ("The capital of France is").
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

/// Stage 0 alone, stage 1 (with the LM head) on two replicas; one tenant with the HTTPS API;
/// `extra` appended (deadlines).
fn replicated(model: &Path, extra: &str) -> String {
    let port = free_port;
    format!(
        "[model]\nfile = \"{}\"\n[coordinator]\nlisten = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{}\"\n\
         [[stage]]\nname = \"stage-0\"\nlisten = \"127.0.0.1:{}\"\nlayers = \"0-14\"\nmetrics = \"127.0.0.1:{}\"\n\
         [[stage]]\nname = \"stage-1a\"\nlisten = \"127.0.0.1:{}\"\nlayers = \"15-29\"\nlm_head = true\nmetrics = \"127.0.0.1:{}\"\n\
         [[stage]]\nname = \"stage-1b\"\nlisten = \"127.0.0.1:{}\"\nlayers = \"15-29\"\nlm_head = true\nmetrics = \"127.0.0.1:{}\"\n\
         [[agent]]\ntenant = \"t\"\nlisten = \"127.0.0.1:{}\"\nhttp = \"127.0.0.1:{}\"\nmax_sessions = 2\nmax_waiting = 2\n\
         [tls]\ngenerate = true\n[admission]\nallow_insecure = true\n{extra}",
        model.display(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
        port(),
    )
}

/// [`replicated`] (with `extra`) started with `args` for `talaria up` and the test fault
/// `fault` (`<stage>:<fault>`, `talaria_gpu_node::FAULT_ENV`) allowed.
fn with_fault(model: &Path, extra: &str, args: &[&str], fault: &str) -> LocalCluster {
    LocalCluster::start_with_env(
        &replicated(model, extra),
        args,
        &[(FAULT_ENV, fault), (ALLOW_FAULTS_ENV, "1")],
    )
}

struct Tenant {
    tls: TlsMaterial,
    addr: SocketAddr,
    key: String,
}

impl Tenant {
    fn of(cluster: &LocalCluster) -> Self {
        Self {
            tls: cluster.agent_tls("t"),
            addr: cluster.topology().agent("t").unwrap().listen,
            key: cluster.api_key("t"),
        }
    }

    /// Generates `req`; `on_token(n)` runs after the n-th token (1-based). The ids, or the
    /// error's type.
    fn ask(
        &self,
        req: &TenantRequest,
        mut on_token: impl FnMut(usize),
    ) -> Result<Vec<u32>, String> {
        let mut n = 0;
        generate_streaming(&self.tls, self.addr, &self.key, req, |_| {
            n += 1;
            on_token(n);
        })
        .map_err(|e| e.error_type().to_string())
    }
}

fn coordinator_metrics(cluster: &LocalCluster) -> SocketAddr {
    cluster.topology().coordinator_metrics.unwrap()
}

fn stage_metrics(cluster: &LocalCluster, name: &str) -> SocketAddr {
    cluster.topology().stage(name).unwrap().metrics.unwrap()
}

/// Waits until `ok` holds, polling every 200 ms, at most `limit`.
fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kill(pid: u32, signal: i32) {
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
}

/// The agent's `GET /health`: 200 or the status code it answered.
fn health(cluster: &LocalCluster) -> u16 {
    let addr = cluster.topology().agent("t").unwrap().http.unwrap();
    let body = talaria_tests::cluster::https_get(&cluster.agent_tls("t").ca, addr, "/health");
    if body.contains("\"ok\"") {
        200
    } else {
        body.parse().unwrap_or(0)
    }
}

#[test]
fn a_killed_gpu_node_and_a_killed_coordinator_cost_the_tenant_nothing() {
    let model = real_model();
    let cluster = LocalCluster::start(&replicated(&model, ""));
    let tenant = Tenant::of(&cluster);
    let want = want_for(&model, 16);
    assert_eq!(health(&cluster), 200);

    // 1. SIGKILL the replica serving the session (the first: both are idle) after 3 tokens:
    //    its calls go to the other replica, byte for byte, and the tokens do not change.
    let victim = cluster.pid("stage-1a");
    let t0 = Instant::now();
    let ids = tenant
        .ask(&greedy(PROMPT.to_vec(), 16), |n| {
            if n == 3 {
                kill(victim, libc::SIGKILL);
            }
        })
        .expect("the replica takes over");
    assert_eq!(ids, want, "same tokens as the plain engine");
    let failovers = metric(
        &scrape(coordinator_metrics(&cluster)),
        "talaria_router_failovers_total",
    );
    assert!(
        failovers >= 1.0,
        "the call moved to the replica: {failovers}"
    );
    eprintln!(
        "killed mid-generation: answered in {:?}, {failovers} failover(s)",
        t0.elapsed()
    );

    // 2. The launcher restarts the dead gpu-node; the coordinator connects to it again.
    wait_until(
        Duration::from_secs(120),
        "stage-1a restarted and connected",
        || {
            cluster.current_pid("stage-1a") != victim
                && metric(
                    &scrape(coordinator_metrics(&cluster)),
                    "talaria_router_stages_connected",
                ) == 3.0
        },
    );

    // 3. Hang the coordinator (SIGSTOP: the launcher restarts only processes that exit): the
    //    agent's health turns 503 within the idle timeout. Then SIGKILL it: the launcher
    //    restarts the coordinator, the agent joins again by itself, and the next request is
    //    served without restarting the agent. (Killed at once, a coordinator can be back
    //    before a poll sees the 503: the agent rejoined 0.3 s after it noticed, in one run.)
    let agent = cluster.pid("agent-t");
    let coordinator = cluster.pid("coordinator");
    kill(coordinator, libc::SIGSTOP);
    wait_until(
        Duration::from_secs(10),
        "health reports the uplink down",
        || health(&cluster) == 503,
    );
    kill(coordinator, libc::SIGKILL);
    wait_until(
        Duration::from_secs(120),
        "the agent joined the new coordinator",
        || health(&cluster) == 200,
    );
    assert_eq!(
        cluster.current_pid("agent-t"),
        agent,
        "the agent was not restarted"
    );
    let ids = tenant
        .ask(&greedy(PROMPT.to_vec(), 16), |_| {})
        .expect("served after the coordinator's restart");
    assert_eq!(ids, want);
}

/// The calls of one session a stage's tap recorded: `(seq, op, npy bytes)`.
fn tapped_calls(dir: &Path, session: u64) -> Vec<(u64, String, Vec<u8>)> {
    tap_events(dir)
        .into_iter()
        .filter(|e| e["kind"] == "call" && e["session"].as_u64() == Some(session))
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["op"].as_str().unwrap().to_string(),
                std::fs::read(dir.join(e["file"].as_str().unwrap())).unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_hung_stage_is_left_for_its_replica_with_the_same_bytes_and_without_one_is_an_error_in_time() {
    let model = real_model();
    // stage-1a computes (and records) its first 150 calls, then never answers again.
    let cluster = with_fault(
        &model,
        "[deadlines]\ncall_ms = 1500\nsetup_ms = 3000\n",
        &["--tap", "{dir}/tap"],
        "stage-1a:hang-after-calls=150",
    );
    let tenant = Tenant::of(&cluster);
    let want = want_for(&model, 6);
    let ids = tenant
        .ask(&greedy(PROMPT.to_vec(), 6), |_| {})
        .expect("the replica takes over the hung stage's calls");
    assert_eq!(ids, want, "same tokens as the plain engine");
    let failovers = metric(
        &scrape(coordinator_metrics(&cluster)),
        "talaria_router_failovers_total",
    );
    assert!(failovers >= 1.0, "{failovers}");

    // Without a live replica, the hung stage is an error within the deadline: stop stage-1b
    // (SIGSTOP: the launcher restarts only processes that exit); after stage-1a's cool-down it
    // is connected again, and the next session goes there, whose worker is stuck.
    let stopped = cluster.pid("stage-1b");
    kill(stopped, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(11));
    let t0 = Instant::now();
    let err = tenant
        .ask(&greedy(PROMPT.to_vec(), 4), |_| {})
        .expect_err("no stage answers");
    let took = t0.elapsed();
    // Streamed over the OpenAI API, the failure ends the stream with an error event in
    // OpenAI's shape, then [DONE]: never a silent cut.
    let sse = talaria_tests::cluster::https_post(
        &cluster.agent_tls("t").ca,
        cluster.topology().agent("t").unwrap().http.unwrap(),
        "/v1/completions",
        &tenant.key,
        &format!(
            r#"{{"model": "{}", "prompt": [504, 3575], "max_tokens": 4, "stream": true}}"#,
            cluster.topology().model_name
        ),
    );
    let events: Vec<&str> = sse.lines().filter(|l| l.starts_with("data: ")).collect();
    assert!(
        events.iter().any(|e| e.starts_with("data: {\"error\"")),
        "an error event: {sse}"
    );
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{sse}");
    kill(stopped, libc::SIGCONT);
    assert!(
        ["deadline_exceeded", "node_unavailable"].contains(&err.as_str()),
        "a typed error: {err}"
    );
    assert!(
        took < Duration::from_secs(20),
        "within the deadlines: {took:?}"
    );
    eprintln!("hung stage without a replica: {err} after {took:?}");

    // The call stage-1a never answered reached stage-1b as the very same bytes: both taps hold
    // it, and the values are identical (a fresh mask would be a second view of the rows).
    let tap = cluster.dir.path().join("tap");
    let session = session_of(&tap.join("stage-1a"));
    let hung = tapped_calls(&tap.join("stage-1a"), session);
    let (seq, op, bytes) = hung.last().expect("stage-1a recorded calls").clone();
    let replica = tapped_calls(&tap.join("stage-1b"), session);
    let resent = replica
        .iter()
        .find(|(s, o, _)| *s == seq && *o == op)
        .expect("the hung call reached the replica");
    assert_eq!(
        resent.2, bytes,
        "the resent call is byte for byte the first"
    );
    assert!(
        !replica.iter().any(|(s, _, _)| *s < seq),
        "the replica saw only the calls from the failover on"
    );
}

/// A product that never returns on a stage's event loop (a lone session's calls run there)
/// freezes the whole process; its connections go silent, and the coordinator moves the session
/// to the replica in seconds, well within the call deadline (60 s by default) that a stuck worker
/// with a live event loop takes (the test above).
#[test]
fn a_stage_frozen_by_a_product_on_its_event_loop_is_left_for_its_replica_in_seconds() {
    let model = real_model();
    // stage-1a computes its first 150 calls, then the next one never returns.
    let cluster = with_fault(&model, "", &[], "stage-1a:freeze-after-calls=150");
    let tenant = Tenant::of(&cluster);
    let want = want_for(&model, 6);
    let t0 = Instant::now();
    let ids = tenant
        .ask(&greedy(PROMPT.to_vec(), 6), |_| {})
        .expect("the replica takes over the frozen stage's calls");
    let took = t0.elapsed();
    assert_eq!(ids, want, "same tokens as the plain engine");
    let failovers = metric(
        &scrape(coordinator_metrics(&cluster)),
        "talaria_router_failovers_total",
    );
    assert!(failovers >= 1.0, "{failovers}");
    // The frozen stage did compute its lone session's calls on its event loop (its metrics
    // server has threads of its own and still answers)...
    let frozen = scrape(stage_metrics(&cluster, "stage-1a"));
    let on_loop = metric(&frozen, "talaria_stage_event_loop_calls_total");
    assert!(on_loop > 0.0, "{on_loop} calls on stage-1a's event loop");
    // ...and the call that froze it was not left to the call deadline.
    assert!(took < Duration::from_secs(20), "failover took {took:?}");
    eprintln!("frozen stage left for its replica after {took:?}");
}

/// A stopped stage (SIGSTOP) counts as connected until its 2 s idle timeout, and with no
/// sessions anywhere it is the first choice of its part: a session opened meanwhile is opened on
/// the live replica instead of failing.
#[test]
fn a_session_opened_while_a_stage_is_stopped_is_opened_on_its_replica() {
    let model = real_model();
    let cluster = LocalCluster::start(&replicated(&model, ""));
    let tenant = Tenant::of(&cluster);
    let want = want_for(&model, 4);
    let stopped = cluster.pid("stage-1a");
    kill(stopped, libc::SIGSTOP);
    let t0 = Instant::now();
    let got = tenant.ask(&greedy(PROMPT.to_vec(), 4), |_| {});
    let took = t0.elapsed();
    kill(stopped, libc::SIGCONT);
    assert_eq!(
        got,
        Ok(want),
        "same tokens as the plain engine, from stage-1b"
    );
    let failovers = metric(
        &scrape(coordinator_metrics(&cluster)),
        "talaria_router_failovers_total",
    );
    // Once: the open moved; its calls then went to stage-1b directly.
    assert_eq!(failovers, 1.0);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    eprintln!("session opened on the replica after {took:?}");
    // Neither replica keeps the session: stage-1b closed it at the end, and stage-1a, resumed,
    // never took it or was told it is over.
    for stage in ["stage-1a", "stage-1b"] {
        wait_until(Duration::from_secs(5), "no session left on stage-1", || {
            metric(
                &scrape(stage_metrics(&cluster, stage)),
                "talaria_stage_sessions",
            ) == 0.0
        });
    }

    // With both replicas of a part stopped the open fails, and the stage that did open the
    // session (stage-0) is told it is over: left open, it would count as live in its batching.
    let others = [cluster.pid("stage-1a"), cluster.pid("stage-1b")];
    for &p in &others {
        kill(p, libc::SIGSTOP);
    }
    let err = tenant.ask(&greedy(PROMPT.to_vec(), 4), |_| {});
    for &p in &others {
        kill(p, libc::SIGCONT);
    }
    assert!(
        err.as_ref().is_err_and(|e| {
            ["connection", "node_unavailable", "deadline_exceeded"].contains(&e.as_str())
        }),
        "{err:?}"
    );
    wait_until(Duration::from_secs(5), "stage-0 closed the session", || {
        metric(
            &scrape(stage_metrics(&cluster, "stage-0")),
            "talaria_stage_sessions",
        ) == 0.0
    });
}

/// The events of a stage's tap index, in order.
fn tap_events(dir: &Path) -> Vec<serde_json::Value> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    index["events"].as_array().unwrap().clone()
}

/// The session of the first call a tap recorded.
fn session_of(dir: &Path) -> u64 {
    tap_events(dir)
        .into_iter()
        .find(|e| e["kind"] == "call")
        .expect("a call")["session"]
        .as_u64()
        .unwrap()
}

#[test]
fn abandoned_requests_stop_and_oversized_or_malformed_input_is_refused_with_memory_bounded() {
    let model = real_model();
    let cluster = LocalCluster::start(&replicated(&model, ""));
    let tenant = Tenant::of(&cluster);
    let topo = cluster.topology();
    let calls = |c: &LocalCluster| {
        metric(
            &scrape(stage_metrics(c, "stage-1a")),
            "talaria_stage_calls_total",
        ) + metric(
            &scrape(stage_metrics(c, "stage-1b")),
            "talaria_stage_calls_total",
        )
    };

    // 1. A prompt longer than the context is the OpenAI error, not an empty success.
    let max_seq = talaria_model_file::read_config(&talaria_gguf::GgufFile::open(&model).unwrap())
        .unwrap()
        .max_seq;
    let err = tenant
        .ask(&greedy(vec![504; max_seq + 1], 4), |_| {})
        .expect_err("too long");
    assert_eq!(err, "context_length_exceeded");

    // 2. Two slots and two waiting places: a fifth request is refused as overloaded at once;
    //    then every tenant hangs up: the waiting ones never reach the cloud, the running ones
    //    stop, and the stages' call counts stop growing.
    let (first_token, got_first) = mpsc::channel();
    let hang_up = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (tls, addr, key) = (tenant.tls.clone(), tenant.addr, tenant.key.clone());
        let (first_token, hang_up) = (first_token.clone(), hang_up.clone());
        clients.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let trust = talaria_cvm_agent::client::Trust::development();
            let mut told = false;
            // Past the end of sequence: the running requests must still run when their
            // tenants hang up. The model's answer to the prompt ends after a few dozen tokens,
            // and a fast enough agent finished it before the hang-up (then one of the waiting
            // requests ran in its slot, and fewer than four were cancelled).
            let request = TenantRequest {
                ignore_eos: true,
                ..greedy(PROMPT.to_vec(), 2000)
            };
            rt.block_on(async {
                let ask = talaria_cvm_agent::client::generate(
                    &tls,
                    addr,
                    &trust,
                    &request,
                    &key,
                    |_, _| {
                        if !told {
                            told = true;
                            let _ = first_token.send(());
                        }
                    },
                );
                // The tenant hangs up: its connection closes when the runtime goes.
                tokio::select! {
                    _ = ask => panic!("the request finished before its tenant hung up"),
                    () = hang_up.notified() => {}
                }
            });
        }));
    }
    // Both running requests have their first token: the other two wait.
    for _ in 0..2 {
        got_first.recv_timeout(Duration::from_secs(120)).unwrap();
    }
    let agent_metrics = |name: &str| {
        let text = talaria_tests::cluster::https_get(
            &cluster.agent_tls("t").ca,
            topo.agent("t").unwrap().http.unwrap(),
            "/metrics",
        );
        metric(&text, name)
    };
    wait_until(Duration::from_secs(30), "two requests waiting", || {
        agent_metrics("talaria_agent_waiting_generations") == 2.0
    });
    let err = tenant
        .ask(&greedy(PROMPT.to_vec(), 4), |_| {})
        .expect_err("full");
    assert_eq!(err, "overloaded");
    // Over the OpenAI API the same refusal is HTTP 429 (which clients retry), streaming or
    // not: a streaming request is refused before its headers, never `200` and an error event.
    // Each refusal is counted once.
    let overloaded = || agent_metrics("talaria_errors_total{type=\"overloaded\"}");
    let counted = overloaded();
    for stream in [false, true] {
        let status = talaria_tests::cluster::https_post(
            &cluster.agent_tls("t").ca,
            topo.agent("t").unwrap().http.unwrap(),
            "/v1/completions",
            &tenant.key,
            &format!(
                r#"{{"model": "{}", "prompt": [504, 3575], "max_tokens": 4, "stream": {stream}}}"#,
                topo.model_name
            ),
        );
        assert_eq!(status, "429", "stream: {stream}");
    }
    assert_eq!(overloaded(), counted + 2.0, "one count per refusal");
    hang_up.notify_waiters();
    for c in clients {
        c.join().expect("a client hung up");
    }
    // Every client is gone: nothing is left running in the cloud for them.
    wait_until(
        Duration::from_secs(30),
        "the abandoned requests stopped",
        || {
            agent_metrics("talaria_agent_active_generations") == 0.0
                && agent_metrics("talaria_agent_waiting_generations") == 0.0
        },
    );
    let before = calls(&cluster);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(calls(&cluster), before, "no call after every tenant left");
    assert_eq!(agent_metrics("talaria_agent_cancelled_total"), 4.0);

    // 3. Oversized and malformed frames of every kind get typed refusals, memory bounded.
    let tls = cluster.tls();
    let agent_pid = cluster.pid("agent-t");
    let coordinator_pid = cluster.pid("coordinator");
    let rss0 = (rss_bytes(agent_pid), rss_bytes(coordinator_pid));
    // A tenant message over 4 MiB: refused from its length prefix.
    let to_agent = RawPeer::connect_tenant(&tenant.tls, tenant.addr);
    let big = (40u32 << 20).to_le_bytes();
    let reply = to_agent.send_partial(&big, 1024);
    assert!(reply.contains("frame_too_large"), "{reply}");
    // Frames that claim 64 MiB and send 1 KiB, on many streams at once: nothing is allocated
    // for what never arrives.
    let to_coordinator = RawPeer::connect_as(&tls, topo.coordinator, Who::OwnKey);
    let claims = (64u32 << 20).to_le_bytes();
    to_coordinator.hold_partial(&claims, 1024, 200);
    // A request larger than the largest call of the model: refused.
    let huge = (u32::MAX).to_le_bytes();
    let reply = to_coordinator.send_partial(&huge, 16);
    assert!(reply.contains("frame_too_large"), "{reply}");
    // A call of more rows than the context allows, straight to a stage: refused before any
    // product is computed.
    let to_stage = RawPeer::connect(&tls, topo.stage("stage-0").unwrap().listen);
    let session = 7;
    assert!(matches!(
        to_stage
            .request::<()>(
                &Request::StageOpen {
                    session,
                    tenant: "t".into()
                },
                None
            )
            .unwrap()
            .0,
        Reply::Ok { .. }
    ));
    let op = OpId::Block {
        layer: 0,
        op: BlockOp::AttnOut,
    };
    let rows = max_seq + talaria_params::MAX_EXTRA_ROWS + 1;
    let call = MaskedCall {
        session,
        seq: 0,
        op,
        x: Tensor::U64 {
            rows,
            cols: 1,
            data: vec![0; rows],
        },
    };
    let e = to_stage.refusal(
        &Request::Call {
            session,
            op,
            seq: 0,
        },
        Some(&call),
    );
    assert_eq!(e.error_type, "too_many_rows");
    // Garbage after a valid prefix, to each process: typed, and they stay up.
    for peer in [&to_agent, &to_coordinator, &to_stage] {
        let mut bytes = 8u32.to_le_bytes().to_vec();
        bytes.extend([0xff; 8]);
        let reply = peer.send_partial(&bytes, 0);
        assert!(reply.contains("malformed"), "{reply}");
    }
    let rss1 = (rss_bytes(agent_pid), rss_bytes(coordinator_pid));
    eprintln!("RSS before/after the oversized frames: agent {rss0:?} -> {rss1:?}");
    assert!(
        rss1.0 < rss0.0 + (200 << 20),
        "agent RSS {rss0:?} -> {rss1:?}"
    );
    assert!(
        rss1.1 < rss0.1 + (200 << 20),
        "coordinator RSS {rss0:?} -> {rss1:?}"
    );
    drop((to_agent, to_coordinator, to_stage));

    // And the tenant is still served.
    let want = want_for(&model, 4);
    assert_eq!(
        tenant.ask(&greedy(PROMPT.to_vec(), 4), |_| {}).unwrap(),
        want
    );
}

/// The soak's short fixed-seed pass: two sessions for 40 s while a gpu-node or the coordinator
/// is killed every ~8 s; every answer must equal the plain engine's and none may be lost.
#[test]
fn a_short_soak_under_chaos_loses_no_answer_and_gives_no_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("soak.json");
    let out = std::process::Command::new(talaria_tests::cluster::bin("talaria"))
        .args([
            "soak",
            "--tenants",
            "1",
            "--sessions",
            "2",
            "--minutes",
            "0.67",
            "--gen-tokens",
            "8",
            "--kill-every-s",
            "8",
            "--seed",
            "3",
            "--base-port",
            "17700",
        ])
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--json")
        .arg(&report)
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("{report:#}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["passed"], true);
    assert_eq!(report["outcomes"]["wrong"], 0);
    assert_eq!(report["outcomes"]["lost"], 0);
    assert!(
        report["outcomes"]["answered"].as_u64().unwrap() >= 4,
        "{report}"
    );
    assert!(
        report["kills"].as_array().unwrap().len() >= 3,
        "the chaos ran: {report}"
    );
}

#[test]
fn a_gpu_node_that_corrupts_its_replies_is_caught_through_the_cluster() {
    let model = real_model();
    // stage-0 (layers 0-14, no replica: 60 calls a pass) answers its first 150 calls honestly,
    // then changes one value of every reply: the third pass's 31st call is the first wrong one.
    let cluster = with_fault(&model, "", &[], "stage-0:corrupt-after-calls=150");
    let tenant = Tenant::of(&cluster);
    let mut tokens = 0;
    let err = tenant
        .ask(&greedy(PROMPT.to_vec(), 8), |n| tokens = n)
        .expect_err("a wrong product is caught");
    assert_eq!(err, "integrity");
    assert_eq!(
        tokens, 2,
        "the tokens of the two honest passes were streamed, no more"
    );
    // Over the OpenAI API: 502 Bad Gateway, and the agent stays up for the next one.
    let body = talaria_tests::cluster::https_post(
        &cluster.agent_tls("t").ca,
        cluster.topology().agent("t").unwrap().http.unwrap(),
        "/v1/completions",
        &tenant.key,
        &format!(
            r#"{{"model": "{}", "prompt": [504, 3575], "max_tokens": 2}}"#,
            cluster.topology().model_name
        ),
    );
    assert_eq!(
        body, "502",
        "the OpenAI API's status for an integrity failure"
    );
    assert_eq!(health(&cluster), 200);

    // The switch itself: a node asked to misbehave without the second variable refuses to
    // start, before it loads anything.
    let out = std::process::Command::new(talaria_tests::cluster::bin("gpu-node"))
        .args(["--topology"])
        .arg(cluster.dir.path().join("topology.toml"))
        .args(["--stage", "stage-0"])
        .env(FAULT_ENV, "stage-0:corrupt-after-calls=1")
        .env_remove(ALLOW_FAULTS_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused"), "{stderr}");
}
