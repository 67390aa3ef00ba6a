//! Reading a topology file: the file as written (`Raw*`, serde), then every section checked into
//! its typed form, each problem at its key path. `Topology::parse_for` is [`read`].

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use talaria_params::RemoConfig;

use crate::{
    Agent, AttestationSection, Backend, Batching, DEFAULT_CONVERSATION_CACHE_MIB,
    DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_SESSIONS, DEFAULT_MAX_WAITING, DEFAULT_SERVER_NAME,
    Deadlines, MAX_CONVERSATION_CACHE_MIB, Problem, RemoSection, Role, Stage, TlsSource, Topology,
    TopologyError, default_min_tcb,
};

/// Reads and validates topology text as if read from `path` by the process `role`: every
/// problem of every section is collected, each at its key path.
pub(crate) fn read(text: &str, path: &Path, role: Role) -> Result<Topology, TopologyError> {
    let raw: RawTopology = toml::from_str(text).map_err(|e| TopologyError::Syntax {
        path: path.into(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let files = Files {
        base: path.parent().unwrap_or(Path::new(".")),
    };
    let mut c = Checker {
        problems: Vec::new(),
    };
    let model_file = check_model(&mut c, &raw.model, &files);
    let mut listens = Listens::default();
    let coordinator = c.addr("coordinator.listen".into(), &raw.coordinator.listen);
    listens.note(&mut c, "coordinator.listen".into(), coordinator);
    let coordinator_metrics = raw
        .coordinator
        .metrics
        .as_deref()
        .map(|t| listens.at(&mut c, "coordinator.metrics".into(), t));
    let stages = check_stages(&mut c, &raw.stage, &mut listens, &files);
    let agents = check_agents(&mut c, &raw.agent, &mut listens, &files);
    let remo = check_remo(&mut c, &raw.remo.unwrap_or_default());
    let tls = check_tls(&mut c, &raw.tls, role, &listens, &files);
    let max_frame_bytes = check_limits(&mut c, raw.limits);
    let deadlines = check_deadlines(&mut c, raw.deadlines);
    let batching = check_batching(&mut c, raw.batching);
    let attestation = raw
        .attestation
        .map(|a| check_attestation(&mut c, a, role, &files));
    let coordinator_weights = raw.coordinator.weights.as_deref().map(|f| files.resolve(f));
    check_weight_files(
        &mut c,
        role,
        &raw.model,
        &model_file,
        &coordinator_weights,
        &stages,
    );

    let model_name = raw.model.name.clone().unwrap_or_else(|| {
        model_file
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let plain_name = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if model_name.len() > MAX_MODEL_NAME || !model_name.chars().all(plain_name) {
        // It is in every event an agent streams, as JSON: its length there moves where an
        // event's text outgrows the padding's bucket, and the topology is the cloud's file.
        // Letters, digits, `.`, `_` and `-` are their own JSON, so its length there is this.
        c.problem(
            raw.model.key(),
            format!(
                "the model's name (the file's stem) must be at most {MAX_MODEL_NAME} bytes of \
                 letters, digits, '.', '_' and '-'"
            ),
        );
    }
    if !c.problems.is_empty() {
        return Err(TopologyError::Invalid {
            path: path.into(),
            problems: c.problems,
        });
    }
    Ok(Topology {
        path: path.into(),
        model_file,
        coordinator_weights,
        model_name,
        coordinator,
        coordinator_metrics,
        stages,
        batching,
        agents,
        remo,
        tls,
        server_name: raw
            .tls
            .server_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVER_NAME.into()),
        max_frame_bytes,
        deadlines,
        allow_insecure_agents: raw.admission.is_some_and(|a| a.allow_insecure),
        attestation,
    })
}

/// Paths in the file are relative to the file's directory.
struct Files<'a> {
    base: &'a Path,
}

impl Files<'_> {
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.into()
        } else {
            self.base.join(p)
        }
    }
}

/// Every listen address seen so far, by the key that named it: no two processes may listen on
/// one.
#[derive(Default)]
struct Listens(BTreeMap<SocketAddr, String>);

impl Listens {
    fn note(&mut self, c: &mut Checker, key: String, addr: SocketAddr) {
        if addr.port() == 0 {
            return;
        }
        if let Some(prev) = self.0.get(&addr) {
            c.problem(key, format!("{addr} is already used by {prev}"));
        } else {
            self.0.insert(addr, key);
        }
    }

    /// A listen address: parsed, and checked against every other.
    fn at(&mut self, c: &mut Checker, key: String, text: &str) -> SocketAddr {
        let addr = c.addr(key.clone(), text);
        self.note(c, key, addr);
        addr
    }

    fn all_loopback(&self) -> bool {
        self.0.keys().all(|a| a.ip().is_loopback())
    }
}

/// The longest model name a topology may give (it is part of every streamed event's envelope).
pub const MAX_MODEL_NAME: usize = 64;

fn check_model(c: &mut Checker, model: &RawModel, files: &Files) -> PathBuf {
    match (&model.name, &model.file) {
        (Some(name), None) => match talaria_model_store::spec(name) {
            Ok(spec) => talaria_model_store::model_path(&talaria_model_store::home(), spec),
            Err(e) => {
                c.problem("model.name", e.to_string());
                PathBuf::new()
            }
        },
        (None, Some(file)) => files.resolve(file),
        _ => {
            c.problem(
                "model",
                "give exactly one of `name` (a catalog model) or `file`",
            );
            PathBuf::new()
        }
    }
}

fn check_stages(
    c: &mut Checker,
    raw: &[RawStage],
    listens: &mut Listens,
    files: &Files,
) -> Vec<Stage> {
    if raw.is_empty() {
        c.problem("stage", "a topology needs at least one [[stage]]");
    }
    let mut names = HashSet::new();
    let mut stages = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let key = |k: &str| format!("stage[{i}].{k}");
        if s.name.is_empty() || !names.insert(s.name.clone()) {
            c.problem(key("name"), format!("{:?} is empty or not unique", s.name));
        }
        let listen = listens.at(c, key("listen"), &s.listen);
        let metrics = s
            .metrics
            .as_deref()
            .map(|t| listens.at(c, key("metrics"), t));
        let layers = parse_layers(&s.layers).unwrap_or_else(|m| {
            c.problem(key("layers"), m);
            no_layers()
        });
        let backend = parse_backend(&s.backend).unwrap_or_else(|m| {
            c.problem(key("backend"), m);
            Backend::Cpu
        });
        stages.push(Stage {
            name: s.name.clone(),
            listen,
            metrics,
            layers,
            lm_head: s.lm_head,
            backend,
            weights: s.weights.as_deref().map(|f| files.resolve(f)),
        });
    }
    for (i, a) in stages.iter().enumerate() {
        for (j, b) in stages.iter().enumerate().skip(i + 1) {
            let overlap =
                a.layers.start().max(b.layers.start())..=a.layers.end().min(b.layers.end());
            if a.same_part(b) {
                // A replica: the same layers and LM head, another process.
                continue;
            }
            if !a.layers.is_empty() && !b.layers.is_empty() && !overlap.is_empty() {
                c.problem(
                    format!("stage[{j}].layers"),
                    format!(
                        "layers {}-{} are also served by stage[{i}] ({:?})",
                        overlap.start(),
                        overlap.end(),
                        a.name
                    ),
                );
            }
        }
    }
    let lm_heads: Vec<&Stage> = stages.iter().filter(|s| s.lm_head).collect();
    let lm_head_parts = lm_heads
        .iter()
        .enumerate()
        .filter(|(i, s)| !lm_heads[..*i].iter().any(|t| t.same_part(s)))
        .count();
    match lm_head_parts {
        1 => {}
        0 if !stages.is_empty() => c.problem(
            "stage",
            "no stage has `lm_head = true`: one must serve the LM head",
        ),
        0 => {}
        _ => c.problem(
            "stage",
            "stages with `lm_head = true` serve different layers: one part serves the LM \
             head (its replicas have the same layers)",
        ),
    }
    stages
}

fn check_agents(
    c: &mut Checker,
    raw: &[RawAgent],
    listens: &mut Listens,
    files: &Files,
) -> Vec<Agent> {
    let mut tenants = HashSet::new();
    let mut agents = Vec::new();
    for (i, a) in raw.iter().enumerate() {
        let key = |k: &str| format!("agent[{i}].{k}");
        if a.tenant.is_empty() || !tenants.insert(a.tenant.clone()) {
            c.problem(
                key("tenant"),
                format!("{:?} is empty or not unique", a.tenant),
            );
        } else if !a
            .tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            // Tenant names become file names (`agent-<tenant>`, `<tenant>.key`).
            c.problem(
                key("tenant"),
                format!("{:?}: only letters, digits, '-' and '_'", a.tenant),
            );
        }
        let listen = listens.at(c, key("listen"), &a.listen);
        let http = a.http.as_deref().map(|t| listens.at(c, key("http"), t));
        for h in &a.api_key_sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                c.problem(
                    key("api_key_sha256"),
                    "each entry is a SHA-256 in hex (64 digits)",
                );
            }
        }
        let cache_mib = a
            .conversation_cache_mib
            .unwrap_or(DEFAULT_CONVERSATION_CACHE_MIB);
        if cache_mib > MAX_CONVERSATION_CACHE_MIB {
            c.problem(
                key("conversation_cache_mib"),
                format!("at most {MAX_CONVERSATION_CACHE_MIB} (1 TiB)"),
            );
        }
        let max_sessions = a.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        if max_sessions == 0 {
            c.problem(key("max_sessions"), "must be at least 1");
        }
        agents.push(Agent {
            tenant: a.tenant.clone(),
            listen,
            http,
            max_sessions,
            max_waiting: a.max_waiting.unwrap_or(DEFAULT_MAX_WAITING),
            conversation_cache_bytes: cache_mib.min(MAX_CONVERSATION_CACHE_MIB) << 20,
            tenant_tls: a.tenant_tls.as_deref().map(|f| files.resolve(f)),
            api_key_sha256: a.api_key_sha256.clone(),
        });
    }
    agents
}

fn check_tls(
    c: &mut Checker,
    t: &RawTls,
    role: Role,
    listens: &Listens,
    files: &Files,
) -> TlsSource {
    let tls = match (t.generate, &t.ca, &t.cert, &t.key) {
        (true, None, None, None) => TlsSource::Generate,
        (false, Some(ca), Some(cert), Some(key)) => {
            // An agent is only a client of the cluster (it serves its tenant with a key of
            // its own): it needs the CA, and its host should hold no cluster key.
            let client_only = matches!(role, Role::Agent(_));
            let named = [("tls.ca", ca), ("tls.cert", cert), ("tls.key", key)];
            for (k, f) in named.into_iter().take(if client_only { 1 } else { 3 }) {
                if !files.resolve(f).is_file() {
                    c.problem(k, format!("{} does not exist", files.resolve(f).display()));
                }
            }
            TlsSource::Files {
                ca: files.resolve(ca),
                cert: files.resolve(cert),
                key: files.resolve(key),
            }
        }
        _ => {
            c.problem(
                "tls",
                "set either `generate = true` (local cluster) or all of `ca`, `cert` and `key`",
            );
            TlsSource::Generate
        }
    };
    if tls == TlsSource::Generate && !listens.all_loopback() {
        c.problem(
            "tls.generate",
            "generated TLS material is only for clusters on loopback addresses; provision `ca`, `cert` and `key`",
        );
    }
    tls
}

fn check_limits(c: &mut Checker, limits: Option<RawLimits>) -> usize {
    let max_frame_bytes = limits
        .and_then(|l| l.max_frame_bytes)
        .unwrap_or(DEFAULT_MAX_FRAME_BYTES);
    if !(1 << 16..=u32::MAX as usize).contains(&max_frame_bytes) {
        c.problem(
            "limits.max_frame_bytes",
            format!("{max_frame_bytes} is outside 64 KiB ..= 4 GiB"),
        );
    }
    max_frame_bytes
}

fn check_deadlines(c: &mut Checker, raw: Option<RawDeadlines>) -> Deadlines {
    let dd = Deadlines::default();
    let deadlines = match raw {
        None => dd,
        Some(d) => Deadlines {
            call: d.call_ms.map_or(dd.call, Duration::from_millis),
            setup: d.setup_ms.map_or(dd.setup, Duration::from_millis),
            idle: d.idle_timeout_ms.map_or(dd.idle, Duration::from_millis),
        },
    };
    if deadlines.call < Duration::from_millis(100) {
        c.problem("deadlines.call_ms", "must be at least 100 ms");
    }
    if deadlines.setup < deadlines.call {
        c.problem("deadlines.setup_ms", "must be at least deadlines.call_ms");
    }
    if !(Duration::from_millis(200)..=Duration::from_secs(600)).contains(&deadlines.idle) {
        c.problem("deadlines.idle_timeout_ms", "must be in 200 ..= 600000");
    }
    deadlines
}

fn check_batching(c: &mut Checker, raw: Option<RawBatching>) -> Batching {
    let d = Batching::default();
    let batching = match raw {
        None => d,
        Some(b) => Batching {
            max_calls: b.max_calls.unwrap_or(d.max_calls),
            max_wait: b.max_wait_us.map_or(d.max_wait, Duration::from_micros),
        },
    };
    if batching.max_calls == 0 {
        c.problem("batching.max_calls", "must be at least 1");
    }
    if batching.max_wait > Duration::from_secs(1) {
        c.problem(
            "batching.max_wait_us",
            "more than a second per batch would stall every session",
        );
    }
    batching
}

fn check_attestation(
    c: &mut Checker,
    a: RawAttestation,
    role: Role,
    files: &Files,
) -> AttestationSection {
    for (k, f) in [("attestation.ark", &a.ark), ("attestation.ask", &a.ask)] {
        if role.reads_attestation() && !files.resolve(f).is_file() {
            c.problem(k, format!("{} does not exist", files.resolve(f).display()));
        }
    }
    if a.measurements.is_empty() {
        c.problem(
            "attestation.measurements",
            "list at least one trusted measurement",
        );
    }
    for (i, m) in a.measurements.iter().enumerate() {
        let ok = m.len() == 96 && m.chars().all(|ch| ch.is_ascii_hexdigit());
        if !ok {
            c.problem(
                format!("attestation.measurements[{i}]"),
                format!("{m:?} is not 48 bytes of hex"),
            );
        }
    }
    AttestationSection {
        ark: files.resolve(&a.ark),
        ask: files.resolve(&a.ask),
        measurements: a.measurements,
        min_tcb: a.min_tcb,
        max_vmpl: a.max_vmpl,
        allow_smt: a.allow_smt,
        min_guest_svn: a.min_guest_svn,
    }
}

/// The weight files this process reads: its own shard, else the whole model.
fn check_weight_files(
    c: &mut Checker,
    role: Role,
    model: &RawModel,
    model_file: &Path,
    coordinator_weights: &Option<PathBuf>,
    stages: &[Stage],
) {
    // The weight files this process reads: its own shard, else the whole model.
    let mut model_needed = false;
    let mut weight_file = |c: &mut Checker, key: String, own: &Option<PathBuf>| match own {
        Some(f) if !f.is_file() => c.problem(key, format!("{} does not exist", f.display())),
        Some(_) => {}
        None => model_needed = true,
    };
    if role.reads_coordinator() {
        weight_file(c, "coordinator.weights".into(), coordinator_weights);
    }
    for (i, s) in stages.iter().enumerate() {
        if role.reads_stage(&s.name) {
            weight_file(c, format!("stage[{i}].weights"), &s.weights);
        }
    }
    if model_needed && !model_file.as_os_str().is_empty() && !model_file.is_file() {
        c.problem(
            model.key(),
            format!(
                "model file {} does not exist (run `talaria fetch-model`)",
                model_file.display()
            ),
        );
    }
}

// The file as written, before validation.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    model: RawModel,
    coordinator: RawCoordinator,
    #[serde(default)]
    stage: Vec<RawStage>,
    #[serde(default)]
    agent: Vec<RawAgent>,
    remo: Option<RawRemo>,
    tls: RawTls,
    limits: Option<RawLimits>,
    deadlines: Option<RawDeadlines>,
    batching: Option<RawBatching>,
    admission: Option<RawAdmission>,
    attestation: Option<RawAttestation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    ark: String,
    ask: String,
    measurements: Vec<String>,
    #[serde(default = "default_min_tcb")]
    min_tcb: [u8; 4],
    #[serde(default)]
    max_vmpl: u32,
    #[serde(default)]
    allow_smt: bool,
    #[serde(default)]
    min_guest_svn: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    file: Option<String>,
}

impl RawModel {
    /// The key a problem with the model is reported at: the one the topology gave it by.
    fn key(&self) -> &'static str {
        if self.name.is_some() {
            "model.name"
        } else {
            "model.file"
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    listen: String,
    metrics: Option<String>,
    weights: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatching {
    max_calls: Option<usize>,
    max_wait_us: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: String,
    listen: String,
    layers: String,
    #[serde(default)]
    lm_head: bool,
    #[serde(default = "default_backend")]
    backend: String,
    metrics: Option<String>,
    weights: Option<String>,
}

fn default_backend() -> String {
    "cpu".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    tenant: String,
    listen: String,
    http: Option<String>,
    max_sessions: Option<usize>,
    max_waiting: Option<usize>,
    conversation_cache_mib: Option<usize>,
    tenant_tls: Option<String>,
    #[serde(default)]
    api_key_sha256: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    generate: bool,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    server_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_frame_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadlines {
    call_ms: Option<u64>,
    setup_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    #[serde(default)]
    allow_insecure: bool,
}

/// The `[remo]` section as written: the parameters' text forms, read by their own `FromStr`
/// (`talaria-params`) when the file is checked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemo {
    rank: Option<String>,
    scale: Option<f64>,
    precision: Option<String>,
    frac_bits: Option<u32>,
    dummy_rows: Option<usize>,
    pad_rows: Option<String>,
    shuffle: Option<bool>,
    pool: Option<usize>,
    prefill_chunk: Option<usize>,
    enabled: Option<bool>,
    tenant_accepts_below_floor: Option<bool>,
}

/// The problems found so far, each at its key path.
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn addr(&mut self, key: String, text: &str) -> SocketAddr {
        match text.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => a,
            Ok(_) => {
                self.problem(key, format!("{text:?} needs a port other than 0"));
                unspecified()
            }
            Err(_) => {
                self.problem(
                    key,
                    format!("{text:?} is not an IP socket address (ip:port, e.g. 127.0.0.1:7400)"),
                );
                unspecified()
            }
        }
    }
}

fn unspecified() -> SocketAddr {
    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
}

/// The empty layer range of a stage whose `layers` did not parse (already reported).
#[allow(clippy::reversed_empty_ranges)]
fn no_layers() -> RangeInclusive<usize> {
    1..=0
}

fn parse_layers(text: &str) -> Result<RangeInclusive<usize>, String> {
    let bad = || format!("{text:?} is not a layer range \"first-last\" (e.g. \"0-14\")");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let first: usize = a.trim().parse().map_err(|_| bad())?;
    let last: usize = b.trim().parse().map_err(|_| bad())?;
    if first > last {
        return Err(format!("first layer {first} is after last layer {last}"));
    }
    Ok(first..=last)
}

pub(crate) fn parse_backend(text: &str) -> Result<Backend, String> {
    if text == "cpu" {
        return Ok(Backend::Cpu);
    }
    if let Some(i) = text.strip_prefix("cuda:")
        && let Ok(i) = i.parse()
    {
        return Ok(Backend::Cuda(i));
    }
    Err(format!(
        "unknown backend {text:?} (expected \"cpu\" or \"cuda:N\")"
    ))
}

/// Reads the `[remo]` section into its typed parameters; each bad value is a problem at its
/// key path, and so is each parameter `RemoConfig::validate` refuses.
fn check_remo(c: &mut Checker, r: &RawRemo) -> RemoSection {
    fn parse<T: std::str::FromStr<Err = String>>(
        c: &mut Checker,
        key: &str,
        text: &Option<String>,
        default: T,
    ) -> T {
        match text.as_deref().map(str::parse::<T>) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                c.problem(key, e);
                default
            }
        }
    }
    let d = RemoConfig::default();
    let rank = parse(c, "remo.rank", &r.rank, d.rank);
    let precision = parse(c, "remo.precision", &r.precision, d.precision);
    let config = RemoConfig {
        enabled: r.enabled.unwrap_or(d.enabled),
        rank,
        scale: r.scale.unwrap_or(d.scale),
        precision,
        dummy_rows: r.dummy_rows.unwrap_or(precision.default_dummy_rows()),
        pad_rows: parse(c, "remo.pad_rows", &r.pad_rows, d.pad_rows),
        shuffle: r.shuffle.unwrap_or(d.shuffle),
        pool: r.pool.unwrap_or(d.pool),
        frac_bits: r.frac_bits.unwrap_or(d.frac_bits),
        prefill_chunk: r.prefill_chunk.unwrap_or(d.prefill_chunk),
    };
    if let Err(e) = config.validate() {
        c.problem(format!("remo.{}", e.field), e.message);
    }
    RemoSection {
        config,
        tenant_accepts_below_floor: r.tenant_accepts_below_floor.unwrap_or(false),
    }
}
