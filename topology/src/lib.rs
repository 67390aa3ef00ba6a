//! The topology file: which processes make a cluster, where they listen, which layers each
//! gpu-node stage owns, and the TLS material and limits they share.
//!
//! [`Topology::load`] reads and validates a file completely before anything starts, and reports
//! every mistake it finds with its key path (`stage[1].layers: ...`). The format is documented in
//! `topology/README.md`; `topology/examples/` holds a local and a multi-host file.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
        check::parse_backend(s)
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
    /// Where it serves its tenant the QUIC protocol (`talaria-tenant/3`).
    pub listen: SocketAddr,
    /// Where it serves its tenant the OpenAI-compatible HTTPS API and `/metrics`, if anywhere.
    pub http: Option<SocketAddr>,
    /// Most generations of this tenant running at once (the coordinator refuses more sessions;
    /// the agent queues requests beyond it).
    pub max_sessions: usize,
    /// Most requests waiting for a slot; more are refused as overloaded.
    pub max_waiting: usize,
    /// Bytes of past conversations' keys and values the agent keeps so that a conversation's
    /// next turn runs only its new tokens (0: none kept).
    pub conversation_cache_bytes: usize,
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

/// Default memory an agent gives its conversation cache, in MiB.
pub const DEFAULT_CONVERSATION_CACHE_MIB: usize = 256;

/// Most memory an agent may give its conversation cache, in MiB (1 TiB).
pub const MAX_CONVERSATION_CACHE_MIB: usize = 1 << 20;

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
pub(crate) fn default_min_tcb() -> [u8; 4] {
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

/// Default largest frame: 256 MiB (the largest set-up reply of the default model fits).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 << 20;
/// Default server name in the cluster's certificates.
pub const DEFAULT_SERVER_NAME: &str = "talaria.cluster";

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
    pub(crate) fn reads_coordinator(self) -> bool {
        matches!(self, Role::All | Role::Coordinator)
    }

    pub(crate) fn reads_attestation(self) -> bool {
        self.reads_coordinator()
    }

    pub(crate) fn reads_stage(self, name: &str) -> bool {
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
        check::read(text, path, role)
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

mod check;

#[cfg(test)]
mod tests;
