//! The topology file: which processes make a cluster, where they listen, which layers each
//! gpu-node stage owns, and the TLS material and limits they share.
//!
//! [`Topology::load`] reads and validates a file completely before anything starts, and reports
//! every mistake it finds with its key path (`stage[1].layers: ...`). The format is documented in
//! `topology/README.md`; `topology/examples/` holds a local and a multi-host file.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use talaria_params::RemoConfig;

/// One mistake in a topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `stage[0].listen`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a topology cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n  {}", problems.len(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl TopologyError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            TopologyError::Read { .. } => "topology_read",
            TopologyError::Syntax { .. } => "topology_syntax",
            TopologyError::Invalid { .. } => "topology_invalid",
        }
    }

    /// The problems found, if the file parsed.
    pub fn problems(&self) -> &[Problem] {
        match self {
            TopologyError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// Where a gpu-node stage computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    /// The CUDA device with this index.
    Cuda(usize),
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Cpu => write!(f, "cpu"),
            Backend::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    /// `cpu` or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        parse_backend(s)
    }
}

/// How a gpu-node's shard batches the masked calls of many sessions and tenants.
#[derive(Debug, Clone, PartialEq)]
pub struct Batching {
    /// Most masked calls in one batch (one GEMM).
    pub max_calls: usize,
    /// Longest the oldest call of a batch waits for calls of the same op from other live
    /// sessions. A lone session never waits.
    pub max_wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_calls: 64,
            max_wait: Duration::from_micros(1000),
        }
    }
}

/// How long each exchange may take before it is an error, and how fast a dead peer is noticed.
#[derive(Debug, Clone, PartialEq)]
pub struct Deadlines {
    /// A masked call, from the coordinator's forward to the stage's answer.
    pub call: Duration,
    /// A set-up (its reply can be hundreds of MB on a slow link), a session's opening or close.
    pub setup: Duration,
    /// A connection with no packet from its peer this long is dead (the QUIC idle timeout;
    /// keep-alives go every quarter of it).
    pub idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            call: Duration::from_secs(60),
            setup: Duration::from_secs(300),
            idle: Duration::from_secs(2),
        }
    }
}

/// One gpu-node process: a contiguous range of layers, and maybe the LM head. Stages with the
/// same layers and LM head are replicas of each other: the coordinator spreads sessions over
/// them and moves a call to another when one fails.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub listen: SocketAddr,
    /// Where it serves `/metrics` (plain HTTP), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The layers it owns, first and last included.
    pub layers: RangeInclusive<usize>,
    pub lm_head: bool,
    pub backend: Backend,
    /// This stage's own weight file (`talaria shard-model`), if it has one; else the model file.
    pub weights: Option<PathBuf>,
}

impl Stage {
    /// Whether this stage serves `layer`.
    pub fn owns_layer(&self, layer: usize) -> bool {
        self.layers.contains(&layer)
    }

    /// Whether `other` serves exactly what this stage serves (a replica).
    pub fn same_part(&self, other: &Stage) -> bool {
        self.layers == other.layers && self.lm_head == other.lm_head
    }
}

/// One tenant's cvm-agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub tenant: String,
    /// Where it serves its tenant the QUIC protocol (`talaria-tenant/1`).
    pub listen: SocketAddr,
    /// Where it serves its tenant the OpenAI-compatible HTTPS API and `/metrics`, if anywhere.
    pub http: Option<SocketAddr>,
    /// Most generations of this tenant running at once (the coordinator refuses more sessions;
    /// the agent queues requests beyond it).
    pub max_sessions: usize,
    /// Most requests waiting for a slot; more are refused as overloaded.
    pub max_waiting: usize,
    /// Where the agent publishes the certificate it serves its tenant with (`ca.pem`,
    /// `cert.pem`: public). Its key is made in the agent's memory at every start and never
    /// written; the agent never serves with the cluster's key. Without it, a local cluster's
    /// agent publishes into `<generated TLS folder>/agent-<tenant>` ([`Agent::cert_dir`]).
    pub tenant_tls: Option<PathBuf>,
    /// SHA-256 (hex) of the API keys the agent's HTTPS API accepts: the tenant makes its keys
    /// and hands over only their hashes. The agent's attestation claims bind the list, so the
    /// tenant sees if anyone added one.
    pub api_key_sha256: Vec<String>,
}

impl Agent {
    /// Where the agent publishes its tenant-facing certificate: `tenant_tls`, or beside the
    /// generated TLS material of a local cluster (`generated`: its folder).
    pub fn cert_dir(&self, generated: Option<&Path>) -> Option<PathBuf> {
        self.tenant_tls
            .clone()
            .or_else(|| generated.map(|d| d.join(format!("agent-{}", self.tenant))))
    }
}

/// Default cap on a tenant's concurrent sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 16;

/// Default number of requests an agent holds waiting for a free session slot; beyond it a
/// request is refused as `overloaded` (HTTP 429).
pub const DEFAULT_MAX_WAITING: usize = 64;

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
    enabled: Option<bool>,
    tenant_accepts_below_floor: Option<bool>,
}

/// The ReMO parameters the agents start with, typed and validated (defaults for what the file
/// omits; the dummy rows' default follows the precision).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RemoSection {
    pub config: RemoConfig,
    /// The agent refuses to start below the floor (masking off, rank < d, a float σ below 100
    /// or unshuffled float rows) unless this says the tenant accepted it. The operator writes
    /// this file, so it is not the tenant's consent by itself: the agent's attestation binds
    /// the effective configuration, and the tenant's verifier refuses a configuration below
    /// the floor unless the tenant passes `--accept-below-floor` (docs/remo.md, "The floor").
    pub tenant_accepts_below_floor: bool,
}

impl RemoSection {
    /// Whether the agents run the integer mode, the default (the gpu-nodes then load the
    /// integer weights).
    pub fn integer_mode(&self) -> bool {
        self.config.precision.is_int()
    }
}

/// Where the cluster's TLS material comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsSource {
    /// Generated at start-up by the launcher of a local cluster.
    Generate,
    /// PEM files provisioned by the operator.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// The coordinator's SEV-SNP attestation policy: AMD's root and signing keys (files, provisioned
/// by the operator) and the agent images it trusts.
#[derive(Debug, Clone, PartialEq)]
pub struct AttestationSection {
    pub ark: PathBuf,
    pub ask: PathBuf,
    /// Launch measurements (hex) of trusted agent images.
    pub measurements: Vec<String>,
    /// Minimum reported TCB: `[bootloader, tee, snp, microcode]`; by default
    /// `talaria_attestation::DEFAULT_MIN_TCB` (3, 0, 8, 115), never 0.0.0.0.
    pub min_tcb: [u8; 4],
    pub max_vmpl: u32,
    /// Admit agents whose guest policy allows SMT (off by default).
    pub allow_smt: bool,
    /// The least guest SVN admitted.
    pub min_guest_svn: u32,
}

/// The default minimum TCB (the attestation crate's `DEFAULT_MIN_TCB`).
fn default_min_tcb() -> [u8; 4] {
    [3, 0, 8, 115]
}

/// A validated topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The file it was read from (relative paths in it are from its folder).
    pub path: PathBuf,
    /// The whole model: read by every process that has no weight file of its own.
    pub model_file: PathBuf,
    /// The coordinator's own weight file (`talaria shard-model`: the tokenizer and embeddings,
    /// no block weights), if it has one.
    pub coordinator_weights: Option<PathBuf>,
    /// The model's id in the agents' APIs: its catalog name, or the file's stem.
    pub model_name: String,
    pub coordinator: SocketAddr,
    /// Where the coordinator serves `/metrics` (plain HTTP), if anywhere.
    pub coordinator_metrics: Option<SocketAddr>,
    pub stages: Vec<Stage>,
    pub batching: Batching,
    pub agents: Vec<Agent>,
    pub remo: RemoSection,
    pub tls: TlsSource,
    /// The name in the servers' certificate, checked by clients.
    pub server_name: String,
    pub max_frame_bytes: usize,
    pub deadlines: Deadlines,
    /// Admit agents that present no hardware attestation (development only; logged loudly).
    pub allow_insecure_agents: bool,
    /// The hardware attestation policy, if provisioned.
    pub attestation: Option<AttestationSection>,
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

/// Default largest frame: 256 MiB (the largest set-up reply of the default model fits).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 << 20;
/// Default server name in the cluster's certificates.
pub const DEFAULT_SERVER_NAME: &str = "talaria.cluster";

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

fn parse_backend(text: &str) -> Result<Backend, String> {
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
    };
    if let Err(e) = config.validate() {
        c.problem(format!("remo.{}", e.field), e.message);
    }
    RemoSection {
        config,
        tenant_accepts_below_floor: r.tenant_accepts_below_floor.unwrap_or(false),
    }
}

/// Which process reads a topology: it decides which of the files the topology names must exist
/// on this host. A gpu-node host holds only its stage's weights, an agent host no weights at
/// all, and only the coordinator holds AMD's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// Every process on this host (`talaria up`, a local cluster).
    All,
    Coordinator,
    /// The gpu-node of this stage.
    Stage(&'a str),
    /// The cvm-agent of this tenant.
    Agent(&'a str),
}

impl Role<'_> {
    fn reads_coordinator(self) -> bool {
        matches!(self, Role::All | Role::Coordinator)
    }

    fn reads_attestation(self) -> bool {
        self.reads_coordinator()
    }

    fn reads_stage(self, name: &str) -> bool {
        match self {
            Role::All => true,
            Role::Stage(n) => n == name,
            _ => false,
        }
    }
}

impl Topology {
    /// Reads and validates a topology file for a host that runs every process (everything but
    /// the layer count of the model; see [`Topology::check_layers`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TopologyError> {
        Self::load_for(path, Role::All)
    }

    /// Reads and validates a topology file for the process `role`: the files only other
    /// processes read need not exist here.
    pub fn load_for(path: impl AsRef<Path>, role: Role) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError::Read {
            path: path.into(),
            message: e.to_string(),
        })?;
        Self::parse_for(&text, path, role)
    }

    /// Validates topology text as if read from `path` by a host that runs every process.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TopologyError> {
        Self::parse_for(text, path, Role::All)
    }

    /// Validates topology text as if read from `path` by the process `role`.
    pub fn parse_for(text: &str, path: &Path, role: Role) -> Result<Self, TopologyError> {
        let raw: RawTopology = toml::from_str(text).map_err(|e| TopologyError::Syntax {
            path: path.into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.into()
            } else {
                base.join(p)
            }
        };
        let mut c = Checker {
            problems: Vec::new(),
        };

        let model_file = match (&raw.model.name, &raw.model.file) {
            (Some(name), None) => match talaria_model_store::spec(name) {
                Ok(spec) => talaria_model_store::model_path(&talaria_model_store::home(), spec),
                Err(e) => {
                    c.problem("model.name", e.to_string());
                    PathBuf::new()
                }
            },
            (None, Some(file)) => resolve(file),
            _ => {
                c.problem(
                    "model",
                    "give exactly one of `name` (a catalog model) or `file`",
                );
                PathBuf::new()
            }
        };
        let coordinator = c.addr("coordinator.listen".into(), &raw.coordinator.listen);
        let mut listens: BTreeMap<SocketAddr, String> = BTreeMap::new();
        listens.insert(coordinator, "coordinator.listen".into());
        let mut note_listen = |c: &mut Checker, key: String, addr: SocketAddr| {
            if addr.port() == 0 {
                return;
            }
            if let Some(prev) = listens.get(&addr) {
                c.problem(key, format!("{addr} is already used by {prev}"));
            } else {
                listens.insert(addr, key);
            }
        };
        // A listen address: parsed, and checked against every other.
        let mut listen_at = |c: &mut Checker, key: String, text: &str| {
            let addr = c.addr(key.clone(), text);
            note_listen(c, key, addr);
            addr
        };
        let coordinator_metrics = raw
            .coordinator
            .metrics
            .as_deref()
            .map(|t| listen_at(&mut c, "coordinator.metrics".into(), t));

        if raw.stage.is_empty() {
            c.problem("stage", "a topology needs at least one [[stage]]");
        }
        let mut names = HashSet::new();
        let mut stages = Vec::new();
        for (i, s) in raw.stage.iter().enumerate() {
            let key = |k: &str| format!("stage[{i}].{k}");
            if s.name.is_empty() || !names.insert(s.name.clone()) {
                c.problem(key("name"), format!("{:?} is empty or not unique", s.name));
            }
            let listen = listen_at(&mut c, key("listen"), &s.listen);
            let metrics = s
                .metrics
                .as_deref()
                .map(|t| listen_at(&mut c, key("metrics"), t));
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
                weights: s.weights.as_deref().map(resolve),
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

        let mut tenants = HashSet::new();
        let mut agents = Vec::new();
        for (i, a) in raw.agent.iter().enumerate() {
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
            let listen = listen_at(&mut c, key("listen"), &a.listen);
            let http = a.http.as_deref().map(|t| listen_at(&mut c, key("http"), t));
            for h in &a.api_key_sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    c.problem(
                        key("api_key_sha256"),
                        "each entry is a SHA-256 in hex (64 digits)",
                    );
                }
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
                tenant_tls: a.tenant_tls.as_deref().map(resolve),
                api_key_sha256: a.api_key_sha256.clone(),
            });
        }

        let remo = check_remo(&mut c, &raw.remo.unwrap_or_default());

        let t = &raw.tls;
        let tls = match (t.generate, &t.ca, &t.cert, &t.key) {
            (true, None, None, None) => TlsSource::Generate,
            (false, Some(ca), Some(cert), Some(key)) => {
                // An agent is only a client of the cluster (it serves its tenant with a key of
                // its own): it needs the CA, and its host should hold no cluster key.
                let client_only = matches!(role, Role::Agent(_));
                let files = [("tls.ca", ca), ("tls.cert", cert), ("tls.key", key)];
                for (k, f) in files.into_iter().take(if client_only { 1 } else { 3 }) {
                    if !resolve(f).is_file() {
                        c.problem(k, format!("{} does not exist", resolve(f).display()));
                    }
                }
                TlsSource::Files {
                    ca: resolve(ca),
                    cert: resolve(cert),
                    key: resolve(key),
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
        if tls == TlsSource::Generate && !listens.keys().all(|a| a.ip().is_loopback()) {
            c.problem(
                "tls.generate",
                "generated TLS material is only for clusters on loopback addresses; provision `ca`, `cert` and `key`",
            );
        }
        let max_frame_bytes = raw
            .limits
            .and_then(|l| l.max_frame_bytes)
            .unwrap_or(DEFAULT_MAX_FRAME_BYTES);
        if !(1 << 16..=u32::MAX as usize).contains(&max_frame_bytes) {
            c.problem(
                "limits.max_frame_bytes",
                format!("{max_frame_bytes} is outside 64 KiB ..= 4 GiB"),
            );
        }

        let dd = Deadlines::default();
        let deadlines = match raw.deadlines {
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

        let d = Batching::default();
        let batching = match raw.batching {
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

        let attestation = raw.attestation.map(|a| {
            for (k, f) in [("attestation.ark", &a.ark), ("attestation.ask", &a.ask)] {
                if role.reads_attestation() && !resolve(f).is_file() {
                    c.problem(k, format!("{} does not exist", resolve(f).display()));
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
                ark: resolve(&a.ark),
                ask: resolve(&a.ask),
                measurements: a.measurements,
                min_tcb: a.min_tcb,
                max_vmpl: a.max_vmpl,
                allow_smt: a.allow_smt,
                min_guest_svn: a.min_guest_svn,
            }
        });
        // The weight files this process reads: its own shard, else the whole model.
        let coordinator_weights = raw.coordinator.weights.as_deref().map(resolve);
        let mut model_needed = false;
        let mut weight_file = |c: &mut Checker, key: String, own: &Option<PathBuf>| match own {
            Some(f) if !f.is_file() => c.problem(key, format!("{} does not exist", f.display())),
            Some(_) => {}
            None => model_needed = true,
        };
        if role.reads_coordinator() {
            weight_file(&mut c, "coordinator.weights".into(), &coordinator_weights);
        }
        for (i, s) in stages.iter().enumerate() {
            if role.reads_stage(&s.name) {
                weight_file(&mut c, format!("stage[{i}].weights"), &s.weights);
            }
        }
        if model_needed && !model_file.as_os_str().is_empty() && !model_file.is_file() {
            let key = if raw.model.name.is_some() {
                "model.name"
            } else {
                "model.file"
            };
            c.problem(
                key,
                format!(
                    "model file {} does not exist (run `talaria fetch-model`)",
                    model_file.display()
                ),
            );
        }

        if !c.problems.is_empty() {
            return Err(TopologyError::Invalid {
                path: path.into(),
                problems: c.problems,
            });
        }
        let model_name = raw.model.name.clone().unwrap_or_else(|| {
            model_file
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        });
        Ok(Self {
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
            server_name: t
                .server_name
                .clone()
                .unwrap_or_else(|| DEFAULT_SERVER_NAME.into()),
            max_frame_bytes,
            deadlines,
            allow_insecure_agents: raw.admission.is_some_and(|a| a.allow_insecure),
            attestation,
        })
    }

    /// Checks that the stages cover the model's `n_layers` layers exactly.
    pub fn check_layers(&self, n_layers: usize) -> Result<(), TopologyError> {
        let mut problems = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            if *s.layers.end() >= n_layers {
                problems.push(Problem {
                    key: format!("stage[{i}].layers"),
                    message: format!(
                        "layer {} does not exist: the model has layers 0-{}",
                        s.layers.end(),
                        n_layers.saturating_sub(1)
                    ),
                });
            }
        }
        let missing: Vec<usize> = (0..n_layers)
            .filter(|&l| !self.stages.iter().any(|s| s.owns_layer(l)))
            .collect();
        if !missing.is_empty() {
            problems.push(Problem {
                key: "stage".into(),
                message: format!("no stage serves layer(s) {}", ranges(&missing)),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TopologyError::Invalid {
                path: self.path.clone(),
                problems,
            })
        }
    }

    /// The stage named `name`.
    /// The file the coordinator reads the tokenizer and embeddings from.
    pub fn coordinator_file(&self) -> &Path {
        self.coordinator_weights
            .as_deref()
            .unwrap_or(&self.model_file)
    }

    /// The file `stage` reads its weights from.
    pub fn stage_file<'a>(&'a self, stage: &'a Stage) -> &'a Path {
        stage.weights.as_deref().unwrap_or(&self.model_file)
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The agent of `tenant`.
    pub fn agent(&self, tenant: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.tenant == tenant)
    }

    /// The stages grouped into parts: each group's stages are replicas of one another (same
    /// layers, same LM head), groups in order of their first stage.
    pub fn parts(&self) -> Vec<Vec<usize>> {
        let mut parts: Vec<Vec<usize>> = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            match parts.iter_mut().find(|p| self.stages[p[0]].same_part(s)) {
                Some(p) => p.push(i),
                None => parts.push(vec![i]),
            }
        }
        parts
    }

    /// The index of the stage that serves `layer` (`None`: the LM head's stage).
    pub fn stage_for(&self, layer: Option<usize>) -> Option<usize> {
        match layer {
            Some(l) => self.stages.iter().position(|s| s.owns_layer(l)),
            None => self.stages.iter().position(|s| s.lm_head),
        }
    }
}

/// `[0, 1, 2, 7]` as `"0-2, 7"`.
fn ranges(values: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            values[i].to_string()
        } else {
            format!("{}-{}", values[i], values[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests;
