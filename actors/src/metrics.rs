//! Prometheus metrics of every binary, and the `/metrics` endpoint that serves them.
//!
//! Each binary registers only what it uses (the statics are created on first use) in the
//! process-wide default registry. Names are `talaria_<part>_<what>`; every refused request counts
//! in `talaria_errors_total{type=...}` with the same `error_type` label its log line carries.

use std::net::SocketAddr;
use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, TextEncoder, exponential_buckets,
};

/// A registered gauge, as the statics hold it.
pub type IntGaugeRef = LazyLock<IntGauge>;

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // Names are unique constants of this module, so registration cannot collide.
    if let Err(e) = prometheus::register(Box::new(c.clone())) {
        tracing::warn!("metric not registered: {e}");
    }
    c
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric"))
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

/// Latency buckets from 100 µs to ~105 s.
fn seconds() -> Vec<f64> {
    exponential_buckets(1e-4, 2.0, 21).expect("valid buckets")
}

/// Size buckets 1, 2, 4, … 512.
fn sizes() -> Vec<f64> {
    exponential_buckets(1.0, 2.0, 10).expect("valid buckets")
}

/// Refused or failed requests by error type, in every binary.
pub static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "talaria_errors_total",
                "Refused or failed requests by error type",
            ),
            &["type"],
        )
        .expect("valid metric"),
    )
});

/// Counts one error of `error_type`.
pub fn error(error_type: &str) {
    ERRORS.with_label_values(&[error_type]).inc();
}

// gpu-node: the shard's queue and batches.
pub static STAGE_QUEUE_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_stage_queue_depth",
        "Masked calls waiting for the shard",
    )
});
pub static STAGE_SESSIONS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("talaria_stage_sessions", "Live sessions on this stage"));
/// Datagrams this stage sent (its answers) that its connections lost, all connections together.
pub static STAGE_LINK_LOST: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_stage_link_datagrams_lost_total",
        "Datagrams this stage sent on its connections that were lost",
    )
});
/// Times a connection of this stage concluded its path drops large datagrams and fell back to
/// 1,200-byte ones (quinn's black-hole detection).
pub static STAGE_LINK_BLACK_HOLES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_stage_link_black_holes_total",
        "Times a connection of this stage fell back to 1200-byte datagrams",
    )
});
pub static STAGE_BATCH_CALLS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_stage_batch_calls",
        "Masked calls (sessions) per GEMM batch",
        sizes(),
    )
});
pub static STAGE_BATCH_TENANTS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_stage_batch_tenants",
        "Distinct tenants per GEMM batch",
        sizes(),
    )
});
pub static STAGE_BATCH_ROWS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_stage_batch_rows",
        "Masked rows per GEMM batch",
        sizes(),
    )
});
pub static STAGE_QUEUE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_stage_queue_seconds",
        "Time a call waited for its batch",
        seconds(),
    )
});
pub static STAGE_COMPUTE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_stage_compute_seconds",
        "Compute time of one batch",
        seconds(),
    )
});
pub static STAGE_FRAME_CALLS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_stage_frame_calls",
        "Admitted masked calls per request frame (more than one: a coordinator's batch)",
        sizes(),
    )
});
pub static STAGE_CALLS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("talaria_stage_calls_total", "Masked calls answered"));
pub static STAGE_EVENT_LOOP_CALLS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_stage_event_loop_calls_total",
        "Masked calls computed on the stage's event loop rather than its worker",
    )
});
pub static STAGE_ROWS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("talaria_stage_rows_total", "Masked rows multiplied"));

// coordinator: sessions and routed requests.
pub static ROUTER_SESSIONS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("talaria_router_sessions", "Open sessions, all tenants"));
pub static ROUTER_AGENTS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("talaria_router_agents", "Admitted cvm-agents"));
pub static ROUTER_REQUESTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_router_requests_total",
        "Requests routed to a stage",
    )
});
pub static ROUTER_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_router_request_seconds",
        "Routed request to answer, at the coordinator",
        seconds(),
    )
});
pub static ROUTER_FAILOVERS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_router_failovers_total",
        "Requests resent, byte for byte, to another replica after theirs failed",
    )
});
pub static ROUTER_STAGES_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_router_stages_connected",
        "gpu-node stages (replicas included) connected now",
    )
});
/// Datagrams the coordinator sent on its connection to each stage that were lost, by stage
/// (quinn's loss detection sees the sender's side only: the stages count their answers'). On loopback or a datacenter link this stays at 0; a rising count means calls wait
/// on retransmission timers.
pub static ROUTER_LINK_LOST: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "talaria_router_link_datagrams_lost_total",
                "Datagrams the coordinator sent on its connection to each stage that were lost",
            ),
            &["stage"],
        )
        .expect("valid metric"),
    )
});
/// The largest datagram each stage link carries now (path MTU discovery; 1200 after a black hole
/// was detected).
pub static ROUTER_LINK_MTU: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "talaria_router_link_mtu_bytes",
                "Largest UDP payload the coordinator's connection to each stage sends now",
            ),
            &["stage"],
        )
        .expect("valid metric"),
    )
});

// cvm-agent: generations for the tenant.
pub static AGENT_UPLINK_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_agent_uplink_up",
        "1 while the agent is connected to and admitted by the coordinator",
    )
});
/// Datagrams the agent sent on its uplink (its requests) that were lost: quinn sees losses on the
/// sender's side only, so the coordinator's count does not include them.
pub static AGENT_LINK_LOST: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_link_datagrams_lost_total",
        "Datagrams the agent sent to the coordinator that were lost",
    )
});
/// Times the agent's uplink fell back to 1,200-byte datagrams (quinn's black-hole detection).
pub static AGENT_LINK_BLACK_HOLES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_link_black_holes_total",
        "Times the agent's uplink fell back to 1200-byte datagrams",
    )
});
pub static AGENT_UPLINK_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "talaria_agent_uplink_calls_total",
                "Requests on the uplink by who drove its event loop meanwhile: the calling worker \
                 itself (the only session open) or the uplink's own thread",
            ),
            &["driver"],
        )
        .expect("valid metric"),
    )
});
pub static AGENT_RECONNECTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_reconnects_total",
        "Times the agent was admitted again after its uplink dropped",
    )
});
pub static AGENT_CANCELLED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_cancelled_total",
        "Requests stopped because their tenant went away",
    )
});
pub static AGENT_INTEGRITY_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_integrity_failures_total",
        "Replies of the cloud that failed verification (the session was aborted)",
    )
});
pub static AGENT_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_agent_active_generations",
        "Generations running now",
    )
});
pub static AGENT_WAITING: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_agent_waiting_generations",
        "Requests waiting for a session slot",
    )
});
pub static AGENT_REQUESTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_requests_total",
        "Generation requests received",
    )
});
pub static AGENT_PROMPT_TOKENS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_prompt_tokens_total",
        "Prompt tokens processed",
    )
});
pub static AGENT_TOKENS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("talaria_agent_generated_tokens_total", "Tokens generated"));
pub static AGENT_TTFT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_agent_ttft_seconds",
        "Request to first token",
        seconds(),
    )
});
pub static AGENT_ITL_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "talaria_agent_inter_token_seconds",
        "Between consecutive tokens",
        seconds(),
    )
});
/// Mask pairs (a mask and its product with the weight) used by masked calls, by where they came
/// from: `pool` (made ahead, off the critical path) or `on_the_spot` (the pool had run dry).
pub static AGENT_MASK_PAIRS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "talaria_agent_mask_pairs_total",
                "Mask pairs used by masked calls, by source (pool, on_the_spot)",
            ),
            &["source"],
        )
        .expect("valid metric"),
    )
});
/// The agent's warm-up before its first tenant (every op set up, Freivalds' vectors made):
/// how long it took, and the ops it left holding check vectors. Both are set to 0 before it
/// starts, so a failed warm-up shows as 0.
pub static AGENT_WARM_UP_SECONDS: LazyLock<Gauge> = LazyLock::new(|| {
    register(
        Gauge::new(
            "talaria_agent_warm_up_seconds",
            "Seconds the agent's warm-up took (0 until it succeeds)",
        )
        .expect("valid metric"),
    )
});
pub static AGENT_CHECKED_OPS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_agent_checked_ops",
        "Ops holding Freivalds check vectors at the end of the warm-up (0 until it succeeds, \
         and without the check: ReMO off, or a basis)",
    )
});
/// Freivalds' vectors made during requests (the warm-up makes every op's before the first;
/// more after a failed check, or for a row with a larger bound).
pub static AGENT_CHECK_VECTORS_MADE: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_check_vectors_made_total",
        "Freivalds check vectors made while serving requests (not in the warm-up)",
    )
});
pub static AGENT_MASK_POOL_READY: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_agent_mask_pool_ready",
        "Mask pairs ready in the agent's shared pools, all ops together",
    )
});
/// Requests that looked for a conversation's cached keys and values, by result (`hit`: it
/// reused some, `miss`: it ran its whole prompt).
pub static AGENT_PREFIX_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "talaria_agent_prefix_cache_lookups_total",
                "Requests that looked for a cached conversation prefix, by result (hit, miss)",
            ),
            &["result"],
        )
        .expect("valid metric"),
    )
});
pub static AGENT_PREFIX_REUSED_TOKENS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_prefix_cache_reused_tokens_total",
        "Prompt tokens taken from the conversation cache instead of being run (and masked)",
    )
});
pub static AGENT_PREFIX_EVICTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "talaria_agent_prefix_cache_evictions_total",
        "Conversation caches dropped to stay within the agent's budget",
    )
});
pub static AGENT_PREFIX_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "talaria_agent_prefix_cache_bytes",
        "Bytes of keys and values the conversation cache holds",
    )
});

/// The registry in Prometheus' text format.
pub fn render() -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus::gather(), &mut out) {
        tracing::warn!("encoding metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The `GET /metrics` route, for any actix-web app.
pub async fn metrics_route() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type(prometheus::TEXT_FORMAT)
        .body(render())
}

/// Reads a plain-HTTP `/metrics` endpoint (HTTP/1.0): the whole response, headers included
/// (the metric lines are what a reader looks for).
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the sample `name` (a counter or gauge without labels, or `name{labels}` spelled
/// out) in a text exposition, if it is there.
pub fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Serves `GET /metrics` over plain HTTP on `addr` (cloud-internal: it carries counts and
/// timings, no payloads). Runs until the process ends; must be called inside an actix `System`.
pub fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let server = actix_web::HttpServer::new(|| {
        actix_web::App::new().route("/metrics", actix_web::web::get().to(metrics_route))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)?
    .run();
    actix_rt::spawn(server);
    tracing::info!(%addr, "serving /metrics");
    Ok(())
}
