//! Hostile peers against real processes: strangers and unadmitted peers that hold resources
//! without ever completing a request.
//!
//! `reliability.rs` shows that a frame which claims a large length and sends little of it
//! costs the receiver little. The first two tests send nearly all of a frame that is within the
//! receiver's limit, then stall. Reading a frame as it arrives hands QUIC's flow-control credit
//! back, so before `talaria_net::Intake` a receiver held everything that arrived, waiting for
//! the last byte with no deadline, on every stream a connection may open: memory grew with what
//! a peer chose to send. The last two hold connections open and silent: the agent's tenant port
//! (a cap of 256 connections, which strangers' idle ones used to fill) and its HTTPS port
//! (actix's per-worker cap on TLS handshakes in progress). Each test failed before the fix
//! (docs/reliability.md has the numbers before and after).

use std::time::{Duration, Instant};

use talaria_engine::SamplingParams;
use talaria_tests::cluster::{LocalCluster, RawPeer, Who, ask_agent, rss_bytes, topology};
use talaria_tests::real_model;
use talaria_wire::{Prompt, Request, TenantRequest};

const STAGES: &[(&str, &str, bool)] = &[("stage-0", "0-14", false), ("stage-1", "15-29", true)];

/// What a process may grow by under the attacks below (the bound `reliability.rs` uses).
const BOUND: u64 = 200 << 20;

fn greedy(max_tokens: usize) -> TenantRequest {
    TenantRequest {
        // "The capital of France is"
        prompt: Prompt::Ids(vec![504, 3575, 282, 4649, 314]),
        max_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: false,
        stop: Vec::new(),
        cache_salt: None,
    }
}

/// Polls the resident memory of `pid` until it exceeds `base + stop_above` or stops growing
/// for 3 s (at most `limit`); the largest value seen.
fn settled_rss(pid: u32, base: u64, stop_above: u64, limit: Duration) -> u64 {
    let t0 = Instant::now();
    let (mut peak, mut since) = (rss_bytes(pid), Instant::now());
    while t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_bytes(pid);
        if now > peak + (1 << 20) {
            since = Instant::now();
        }
        peak = peak.max(now);
        if peak > base + stop_above || since.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    peak
}

const MIB: u64 = 1 << 20;

/// An unauthenticated stranger (no API key, no client certificate: anyone who can reach the
/// tenant port) opens one QUIC connection to the agent and, on 128 of its 256 streams, sends a
/// tenant frame of 4 MiB (`MAX_TENANT_MESSAGE`, so not refused from its prefix) minus its last
/// byte. The agent cannot check the API key before the frame is whole; without a budget it held
/// every byte (512 MiB for this connection, 1 GiB with all 256 streams, and 256 connections
/// are admitted). The rule: bad input never costs unbounded memory.
#[test]
fn a_stranger_cannot_make_the_agent_hold_unbounded_memory_with_unfinished_tenant_frames() {
    let model = real_model();
    let cluster = LocalCluster::start(&topology(&model, STAGES, &["t"]));
    let addr = cluster.topology().agent("t").unwrap().listen;
    let stranger = RawPeer::connect_tenant(&cluster.agent_tls("t"), addr);
    let claim = talaria_wire::MAX_TENANT_MESSAGE;
    stalled_frames_stay_bounded(&cluster, "agent-t", &stranger, claim, 128);
}

/// Has `stranger` open `streams` streams, each sending a frame that claims `claim` bytes and
/// carries all but the last one, and hold them: process `name` of `cluster` must grow by less
/// than [`BOUND`], and the tenant must be served meanwhile.
fn stalled_frames_stay_bounded(
    cluster: &LocalCluster,
    name: &str,
    stranger: &RawPeer,
    claim: usize,
    streams: usize,
) {
    let addr = cluster.topology().agent("t").unwrap().listen;
    let (tls, key) = (cluster.agent_tls("t"), cluster.api_key("t"));
    let pid = cluster.pid(name);
    // The tenant is served (and the process warm) before the stranger comes.
    let want = ask_agent(&tls, addr, &key, &greedy(4)).expect("served before");
    let rss0 = rss_bytes(pid);
    let t0 = Instant::now();
    stranger.hold_partial(&(claim as u32).to_le_bytes(), claim - 1, streams);
    let sent_s = t0.elapsed().as_secs_f64();
    let rss1 = settled_rss(pid, rss0, 2 * BOUND, Duration::from_secs(30));
    eprintln!(
        "{name} RSS {} MiB -> {} MiB after {streams} unfinished {} MiB frames ({} MiB offered, \
         {sent_s:.1} s)",
        rss0 / MIB,
        rss1 / MIB,
        claim as u64 / MIB,
        (streams * claim) as u64 / MIB,
    );
    // The tenant's own request while the stranger holds its streams.
    let during = ask_agent(&tls, addr, &key, &greedy(4));
    assert_eq!(
        during.as_deref(),
        Ok(&want[..]),
        "the tenant is still served"
    );
    assert!(
        rss1 < rss0 + BOUND,
        "unfinished frames grew {name} by {} MiB (bound {} MiB)",
        (rss1.saturating_sub(rss0)) / MIB,
        BOUND / MIB
    );
}

/// A peer that is *not admitted* — a fresh self-signed key, no Hello, no attestation — opens
/// one connection to the coordinator and, on 8 streams, sends request frames of 48 MiB (below
/// the coordinator's `max_request_frame`, ~101 MiB for SmolLM2-135M) minus the last byte. The
/// coordinator reads a frame before it looks at it (and so before it could answer
/// `not_admitted`). "Nothing in the cloud answers a peer that has not proven who it is", and
/// nothing from such a peer should cost the coordinator more than a Hello's worth of memory.
#[test]
fn an_unadmitted_peer_cannot_make_the_coordinator_hold_unbounded_memory() {
    let model = real_model();
    let cluster = LocalCluster::start(&topology(&model, STAGES, &["t"]));
    let stranger = RawPeer::connect_as(&cluster.tls(), cluster.topology().coordinator, Who::OwnKey);
    // A plain request from it is refused: it is not admitted.
    let refused = stranger.refusal::<()>(&Request::OpenSession, None);
    assert_eq!(refused.error_type, "not_admitted");
    stalled_frames_stay_bounded(&cluster, "coordinator", &stranger, 48 << 20, 8);
}

/// An unauthenticated stranger opens `MAX_TENANT_CONNECTIONS` (256) QUIC connections to the
/// agent's tenant port and sends nothing on them; QUIC's keep-alives hold them open. With a
/// plain cap the tenant itself was then refused at the handshake: it could neither generate nor
/// attest the agent (`talaria verify`, which a tenant's HTTPS client needs first, goes over
/// this port). The rule: a stranger's input never harms the tenant's sessions.
#[test]
fn a_stranger_holding_idle_connections_does_not_lock_the_tenant_out() {
    let model = real_model();
    let cluster = LocalCluster::start(&topology(&model, STAGES, &["t"]));
    let topo = cluster.topology();
    let addr = topo.agent("t").unwrap().listen;
    let (tls, key) = (cluster.agent_tls("t"), cluster.api_key("t"));
    let want = ask_agent(&tls, addr, &key, &greedy(4)).expect("served before");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cap = talaria_cvm_agent::session::MAX_TENANT_CONNECTIONS;
    let (endpoint, held) = rt.block_on(async {
        let endpoint = tls.client(talaria_wire::ALPN_TENANT).unwrap();
        let mut held = Vec::new();
        for _ in 0..cap {
            match tls.connect(&endpoint, addr).await {
                Ok(c) => held.push(c),
                Err(e) => {
                    eprintln!("stranger's connection {} refused: {e}", held.len());
                    break;
                }
            }
        }
        (endpoint, held)
    });
    eprintln!("a stranger holds {} idle tenant connections", held.len());
    // Longer than the idle timeout: the connections are kept alive, not timed out.
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    let during = ask_agent(&tls, addr, &key, &greedy(4));
    eprintln!(
        "the tenant's request while they are held: {:?} after {:.1} s",
        during.as_ref().map(Vec::len),
        t0.elapsed().as_secs_f64()
    );
    rt.block_on(async move {
        for c in held {
            c.close(0u32.into(), b"bye");
        }
        endpoint.wait_idle().await;
    });
    assert_eq!(
        during.as_deref(),
        Ok(&want[..]),
        "the tenant is locked out by a stranger's idle connections"
    );
}

/// An unauthenticated stranger keeps 1024 TCP connections open to the agent's HTTPS port and
/// never starts a TLS handshake on them, opening a new one whenever the agent drops one. The
/// tenant's own requests must still be answered promptly: a stranger's silence is not the
/// tenant's outage.
#[test]
fn silent_tcp_connections_from_a_stranger_do_not_stall_the_https_api() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const SILENT: usize = 1024;
    let model = real_model();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], talaria_tests::cluster::free_port()));
    let text = topology(&model, STAGES, &["t"]).replace(
        "[[agent]]\ntenant = \"t\"\n",
        &format!("[[agent]]\ntenant = \"t\"\nhttp = \"{http}\"\n"),
    );
    let cluster = LocalCluster::start(&text);
    let ca = cluster.agent_tls("t").ca;
    let health = || {
        let t0 = Instant::now();
        let body = talaria_tests::cluster::https_get(&ca, http, "/health");
        (body, t0.elapsed().as_secs_f64())
    };
    let (body, base) = health();
    assert!(body.contains("\"ok\""), "{body}");
    eprintln!("GET /health before: {base:.2} s");

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let stranger = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || {
            let mut held: Vec<std::net::TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Whatever the agent closed (its handshake deadline) is opened again.
                held.retain(|s| {
                    let mut b = [0u8; 1];
                    match (&*s).read(&mut b) {
                        Ok(0) => false,
                        Ok(_) => true,
                        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                    }
                });
                while held.len() < SILENT {
                    match std::net::TcpStream::connect(http) {
                        Ok(s) => {
                            s.set_nonblocking(true).unwrap();
                            held.push(s);
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut during = Vec::new();
    for _ in 0..3 {
        let (body, s) = health();
        eprintln!("GET /health while the stranger is silent: {body:?} in {s:.2} s");
        during.push((body, s));
    }
    stop.store(true, Ordering::Relaxed);
    stranger.join().unwrap();
    eprintln!(
        "the stranger opened {} connections",
        opened.load(Ordering::Relaxed)
    );
    for (body, s) in during {
        assert!(body.contains("\"ok\""), "{body}");
        assert!(
            s < base + 2.0,
            "the tenant waited {s:.1} s (before: {base:.2} s)"
        );
    }
}
