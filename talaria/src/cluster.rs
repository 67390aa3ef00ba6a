//! `talaria up` (a whole local cluster as child processes) and the tenant side of
//! `--engine cluster`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use talaria_cvm_agent::client::{self, Answer};
use talaria_gguf::GgufFile;
use talaria_net::TlsMaterial;
use talaria_topology::{TlsSource, Topology};
use talaria_wire::TenantRequest;

/// What a running local cluster tells its tenants: where the agents are and whom to trust.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub topology: PathBuf,
    pub server_name: String,
    /// The cluster's CA: what the gpu-nodes and the coordinator present (not the agents).
    pub ca: PathBuf,
    /// `(tenant, address)` of each agent.
    pub agents: Vec<(String, SocketAddr)>,
    /// `(tenant, CA file)` of each agent: the CA of the certificate it serves its tenant with,
    /// made with its key at its start.
    pub agent_cas: Vec<(String, PathBuf)>,
    /// `(tenant, key file)` of each agent: the API key `talaria up` made for that tenant (the
    /// file is readable by its owner only; the agent knows only its hash).
    #[serde(default)]
    pub api_keys: Vec<(String, PathBuf)>,
    /// Process ids by name.
    pub pids: Vec<(String, u32)>,
    pub logs: PathBuf,
}

/// Makes a random API key for `tenant` in `dir/<tenant>.key` (mode 0600 from its creation);
/// returns the file and the key's SHA-256 in hex.
fn make_api_key(dir: &Path, tenant: &str) -> Result<(PathBuf, String)> {
    use sha2::Digest;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = format!("tk-{}", hex::encode(rand::random::<[u8; 32]>()));
    let path = dir.join(format!("{tenant}.key"));
    talaria_net::write_atomic(&path, key.as_bytes(), true)?;
    Ok((path, hex::encode(sha2::Sha256::digest(key.as_bytes()))))
}

impl ClusterInfo {
    /// How a tenant reaches the agent of `tenant`: its address, and the TLS trust of the
    /// certificate that agent made at its start (never the cluster's CA).
    pub fn agent_tls(&self, tenant: &str) -> Option<(SocketAddr, TlsMaterial)> {
        let addr = self.agents.iter().find(|(t, _)| t == tenant)?.1;
        let ca = self.agent_cas.iter().find(|(t, _)| t == tenant)?.1.clone();
        Some((
            addr,
            TlsMaterial {
                ca,
                cert: PathBuf::new(),
                key: PathBuf::new(),
                server_name: self.server_name.clone(),
            },
        ))
    }
}

/// The default folder of a local cluster's run files (TLS material, logs, `cluster.json`).
pub fn default_run_dir() -> PathBuf {
    talaria_model_store::home().join("cluster")
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The topology to start (e.g. topology/examples/local.toml).
    #[arg(long)]
    pub topology: PathBuf,
    /// Where to keep the cluster's TLS material, logs and `cluster.json`.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Record what each gpu-node sees into `DIR/<stage>` (docs/tap-format.md).
    #[arg(long)]
    pub tap: Option<PathBuf>,
    /// Seconds to wait for every process to be ready.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout_s: u64,
}

/// A child process of the cluster, killed when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    bin: String,
    args: Vec<String>,
    /// When it was restarted, latest last.
    restarts: Vec<Instant>,
}

/// A child that dies is restarted unless it died this often within [`RESTART_WINDOW`]: then
/// something is wrong that restarting will not mend, and the cluster stops.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What to show of a child's log: its error and causes if it printed one (a backtrace after
/// them is left out), else its last `lines` lines.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    if let Some(start) = all.iter().position(|l| l.starts_with("Error:")) {
        let end = all[start..]
            .iter()
            .position(|l| l.starts_with("Stack backtrace:"))
            .map_or(all.len(), |n| start + n);
        return all[start..end.min(start + lines)].join("\n");
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The path of a sibling binary of this executable.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the talaria binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the cluster binaries (`cargo build --release --workspace`)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `bin` with `args`, its stderr in `log`; sends `name` on `ready` when it prints its
/// ready line.
fn spawn(
    name: &str,
    bin: &str,
    args: &[String],
    logs: &Path,
    ready: &mpsc::Sender<String>,
) -> Result<Proc> {
    let log = logs.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    let child = launch(name, bin, args, log_file, ready)?;
    Ok(Proc {
        name: name.into(),
        child,
        log,
        bin: bin.into(),
        args: args.to_vec(),
        restarts: Vec::new(),
    })
}

/// Starts `bin` with `args`, its stderr into `log_file`.
fn launch(
    name: &str,
    bin: &str,
    args: &[String],
    log_file: std::fs::File,
    ready: &mpsc::Sender<String>,
) -> Result<Child> {
    let mut cmd = Command::new(sibling(bin)?);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // Children die with the launcher, even if it is killed outright.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, name2) = (ready.clone(), name.to_string());
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.starts_with("ready") {
                let _ = tx.send(name2.clone());
            }
        }
    });
    Ok(child)
}

impl Proc {
    /// Starts the process again after it exited, its log continued; `false` when it has been
    /// restarted too often lately.
    fn restart(&mut self, ready: &mpsc::Sender<String>) -> Result<bool> {
        let now = Instant::now();
        self.restarts.retain(|t| now - *t < RESTART_WINDOW);
        if self.restarts.len() >= MAX_RESTARTS {
            return Ok(false);
        }
        self.restarts.push(now);
        let log_file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("{}", self.log.display()))?;
        self.child = launch(&self.name, &self.bin, &self.args, log_file, ready)?;
        Ok(true)
    }
}

/// Waits until every process in `procs[from..]` said it is ready.
fn wait_ready(
    procs: &mut [Proc],
    from: usize,
    ready: &mpsc::Receiver<String>,
    deadline: Instant,
) -> Result<()> {
    let mut waiting: Vec<String> = procs[from..].iter().map(|p| p.name.clone()).collect();
    while !waiting.is_empty() {
        if let Ok(name) = ready.recv_timeout(Duration::from_millis(100)) {
            waiting.retain(|n| n != &name);
            eprintln!("  {name}: ready");
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}) before the cluster was ready; its log ({}):\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 20)
                );
            }
        }
        if Instant::now() > deadline {
            bail!("not ready in time: {}", waiting.join(", "));
        }
    }
    Ok(())
}

/// A running local cluster: its processes (stopped when dropped: agents first, then the
/// coordinator, then the stages) and what its tenants need to know.
pub struct Running {
    procs: Vec<Proc>,
    /// The topology it was started from, as validated.
    pub topology: Topology,
    pub info: ClusterInfo,
    info_path: PathBuf,
    ready: (mpsc::Sender<String>, mpsc::Receiver<String>),
}

impl Drop for Running {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        let _ = std::fs::remove_file(&self.info_path);
    }
}

impl Running {
    /// Waits until a signal asks to stop (`Ok`). A process that dies is restarted (the others
    /// recover: agents join again, the coordinator dials the stage again); one that keeps
    /// dying stops the cluster with its error.
    fn wait(&mut self) -> Result<()> {
        let rt = crate::current_thread_runtime()?;
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = term.recv() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        self.restart_exited()?;
                    }
                }
            }
        })
    }

    /// Restarts every process that exited since the last look; the names restarted. A process
    /// that died [`MAX_RESTARTS`] times within [`RESTART_WINDOW`] is an error.
    pub fn restart_exited(&mut self) -> Result<Vec<String>> {
        while let Ok(name) = self.ready.1.try_recv() {
            eprintln!("  {name}: ready");
        }
        let mut restarted = Vec::new();
        for p in self.procs.iter_mut() {
            let Ok(Some(status)) = p.child.try_wait() else {
                continue;
            };
            if !p.restart(&self.ready.0)? {
                bail!(
                    "{} exited ({status}) {MAX_RESTARTS} times within {} s; its log ({}):\n{}",
                    p.name,
                    RESTART_WINDOW.as_secs(),
                    p.log.display(),
                    tail(&p.log, 20)
                );
            }
            eprintln!("{} exited ({status}); restarted it", p.name);
            if let Some(entry) = self.info.pids.iter_mut().find(|(n, _)| *n == p.name) {
                entry.1 = p.child.id();
            }
            restarted.push(p.name.clone());
        }
        if !restarted.is_empty() {
            talaria_net::write_atomic(
                &self.info_path,
                serde_json::to_string_pretty(&self.info)?.as_bytes(),
                false,
            )?;
        }
        Ok(restarted)
    }
}

/// Starts every process of `args.topology` and waits until each is ready.
pub fn start(args: &UpArgs) -> Result<Running> {
    let topology = Topology::load(&args.topology)?;
    let config = talaria_model_file::read_config(&GgufFile::open(topology.coordinator_file())?)?;
    topology.check_layers(config.n_layers)?;
    let run_dir = args.run_dir.clone().unwrap_or_else(default_run_dir);
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let topo = std::fs::canonicalize(&args.topology)?;
    let mut common = vec!["--topology".to_string(), topo.display().to_string()];
    let (ca, generated) = match &topology.tls {
        TlsSource::Generate => {
            let dir = run_dir.join("tls");
            let m = TlsMaterial::generate(&dir, &topology.server_name)?;
            common.extend(["--tls-dir".into(), dir.display().to_string()]);
            (m.ca, Some(dir))
        }
        TlsSource::Files { ca, .. } => (ca.clone(), None),
    };

    let (tx, rx) = mpsc::channel();
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout_s);
    let mut procs = Vec::new();
    eprintln!("starting {} gpu-node stage(s)", topology.stages.len());
    for s in &topology.stages {
        let mut a = common.clone();
        a.extend(["--stage".into(), s.name.clone()]);
        if let Some(tap) = &args.tap {
            a.extend(["--tap".into(), tap.join(&s.name).display().to_string()]);
        }
        procs.push(spawn(&s.name, "gpu-node", &a, &logs, &tx)?);
    }
    wait_ready(&mut procs, 0, &rx, deadline)?;
    eprintln!("starting the coordinator");
    procs.push(spawn("coordinator", "coordinator", &common, &logs, &tx)?);
    let last = procs.len() - 1;
    wait_ready(&mut procs, last, &rx, deadline)?;
    eprintln!("starting {} cvm-agent(s)", topology.agents.len());
    let first_agent = procs.len();
    let mut api_keys = Vec::new();
    for a in &topology.agents {
        let mut args = common.clone();
        args.extend(["--tenant".into(), a.tenant.clone()]);
        // The tenant's API key for this local cluster: made here, the agent gets its hash.
        let (path, digest) = make_api_key(&run_dir.join("api-keys"), &a.tenant)?;
        args.extend(["--api-key-sha256".into(), digest]);
        api_keys.push((a.tenant.clone(), path));
        if topology.allow_insecure_agents {
            // No SEV-SNP hardware on a development machine: the topology opted in.
            args.push("--insecure-no-attestation".into());
        }
        procs.push(spawn(
            &format!("agent-{}", a.tenant),
            "cvm-agent",
            &args,
            &logs,
            &tx,
        )?);
    }
    wait_ready(&mut procs, first_agent, &rx, deadline)?;

    let info = ClusterInfo {
        topology: topo,
        server_name: topology.server_name.clone(),
        ca,
        agents: topology
            .agents
            .iter()
            .map(|a| (a.tenant.clone(), a.listen))
            .collect(),
        agent_cas: topology
            .agents
            .iter()
            .filter_map(|a| {
                Some((
                    a.tenant.clone(),
                    a.cert_dir(generated.as_deref())?.join("ca.pem"),
                ))
            })
            .collect(),
        api_keys,
        pids: procs
            .iter()
            .map(|p| (p.name.clone(), p.child.id()))
            .collect(),
        logs: logs.clone(),
    };
    let info_path = run_dir.join("cluster.json");
    talaria_net::write_atomic(
        &info_path,
        serde_json::to_string_pretty(&info)?.as_bytes(),
        false,
    )?;
    Ok(Running {
        procs,
        topology,
        info,
        info_path,
        ready: (tx, rx),
    })
}

pub fn up(args: UpArgs) -> Result<()> {
    let mut cluster = start(&args)?;
    for (tenant, addr) in &cluster.info.agents {
        eprintln!("tenant {tenant}: agent at {addr}");
    }
    eprintln!(
        "logs in {}; Ctrl-C stops the cluster",
        cluster.info.logs.display()
    );
    println!("ready {}", cluster.info_path.display());
    let outcome = cluster.wait();
    eprintln!("stopping the cluster");
    drop(cluster);
    outcome
}

/// How a tenant reaches a cluster's agent.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The cvm-agent's address (default: the first agent of the running local cluster).
    #[arg(long)]
    pub agent: Option<SocketAddr>,
    /// The local cluster's run folder, for its CA and agent list (default: the model cache's
    /// `cluster/`).
    #[arg(long)]
    pub cluster_dir: Option<PathBuf>,
    /// The CA (PEM) of the agent's certificate — the agent's own `tenant_tls/ca.pem`, or the
    /// cluster's — for a cluster that `talaria up` did not start (e.g. one provisioned with
    /// ansible): with `--agent`, no run folder is read.
    #[arg(long, requires = "agent")]
    pub ca: Option<PathBuf>,
    /// The name in the agent's certificate (with `--ca`; the topology's `tls.server_name`).
    #[arg(long, requires = "ca", default_value = talaria_topology::DEFAULT_SERVER_NAME)]
    pub server_name: String,
    /// Trust an agent that presents no SEV-SNP report (development only).
    #[arg(long)]
    pub allow_insecure_agent: bool,
    /// AMD's root key (ARK), PEM or DER, for verifying the agent's report.
    #[arg(long, requires_all = ["ask", "measurement"])]
    pub ark: Option<PathBuf>,
    /// AMD's signing key (ASK), PEM or DER.
    #[arg(long, requires = "ark")]
    pub ask: Option<PathBuf>,
    /// The launch measurement (hex) of the agent image you expect; repeatable.
    #[arg(long, requires = "ark")]
    pub measurement: Vec<String>,
    /// Use an agent whose attested ReMO configuration is below the floor (masking off, rank <
    /// d, a float σ below 100, unshuffled float rows): your explicit choice, never a default.
    #[arg(long)]
    pub accept_below_floor: bool,
    /// A file holding your API key for the agent (default: `$TALARIA_API_KEY`, or the key a
    /// local cluster made, from its `cluster.json`).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Refuse the agent unless its attestation says it serves this tenant.
    #[arg(long)]
    pub expect_tenant: Option<String>,
    /// Refuse the agent unless it runs exactly this ReMO precision (e.g. `int`).
    #[arg(long)]
    pub expect_precision: Option<talaria_params::Precision>,
    /// Refuse the agent unless its API accepts exactly these key hashes (hex); repeatable.
    #[arg(long)]
    pub expect_api_key_sha256: Vec<String>,
    /// Minimum TCB of the agent's platform: bootloader,tee,snp,microcode (default: the
    /// attestation crate's DEFAULT_MIN_TCB; raise it to your platform's current TCB).
    #[arg(long, value_delimiter = ',', num_args = 4, default_values_t = [3u8, 0, 8, 115])]
    pub min_tcb: Vec<u8>,
    /// Trust an agent whose guest policy allows SMT (sibling threads share the core).
    #[arg(long)]
    pub allow_smt: bool,
    /// The least guest SVN (the agent image's security version) you trust.
    #[arg(long, default_value_t = 0)]
    pub min_guest_svn: u32,
}

impl AgentArgs {
    /// What this tenant trusts.
    pub fn trust(&self) -> Result<client::Trust> {
        let policy = match (&self.ark, &self.ask) {
            (Some(ark), Some(ask)) => Some({
                let mut p = talaria_attestation::Policy::new(
                    ark,
                    ask,
                    self.measurement
                        .iter()
                        .map(|m| talaria_attestation::parse_measurement(m))
                        .collect::<Result<_, _>>()
                        .map_err(anyhow::Error::msg)?,
                    talaria_attestation::Tcb {
                        bootloader: self.min_tcb[0],
                        tee: self.min_tcb[1],
                        snp: self.min_tcb[2],
                        microcode: self.min_tcb[3],
                    },
                    0,
                    self.allow_insecure_agent,
                )?;
                p.allow_smt = self.allow_smt;
                p.min_guest_svn = self.min_guest_svn;
                p
            }),
            _ => None,
        };
        Ok(client::Trust {
            policy,
            allow_insecure: self.allow_insecure_agent,
            accept_below_floor: self.accept_below_floor,
            expect: client::Expect {
                tenant: self.expect_tenant.clone(),
                precision: self.expect_precision,
                api_key_sha256: (!self.expect_api_key_sha256.is_empty())
                    .then(|| self.expect_api_key_sha256.clone()),
            },
        })
    }

    /// The agent's address and the TLS trust to reach it with.
    pub fn resolve(&self) -> Result<(SocketAddr, TlsMaterial)> {
        self.resolve_with_key().map(|(addr, tls, _)| (addr, tls))
    }

    /// The tenant's API key: `--api-key-file`, else `$TALARIA_API_KEY`, else the key a local
    /// cluster made for the agent (`local`, from its `cluster.json`).
    fn api_key(&self, local: Option<PathBuf>) -> Result<String> {
        let path = match (&self.api_key_file, std::env::var("TALARIA_API_KEY")) {
            (Some(f), _) => f.clone(),
            (None, Ok(key)) => return Ok(key),
            (None, Err(_)) => local.ok_or_else(|| {
                anyhow!("no API key: give --api-key-file FILE or set TALARIA_API_KEY")
            })?,
        };
        let key = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the API key in {}", path.display()))?;
        Ok(key.trim().to_string())
    }

    /// [`resolve`](Self::resolve), and where a local cluster keeps the agent's API key.
    fn resolve_with_key(&self) -> Result<(SocketAddr, TlsMaterial, Option<PathBuf>)> {
        if let (Some(addr), Some(ca)) = (self.agent, &self.ca) {
            return Ok((
                addr,
                TlsMaterial {
                    ca: ca.clone(),
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    server_name: self.server_name.clone(),
                },
                None,
            ));
        }
        let dir = self.cluster_dir.clone().unwrap_or_else(default_run_dir);
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is a cluster up? start one with `talaria up --topology FILE`)",
                path.display()
            )
        })?;
        let info: ClusterInfo =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let tenant = match self.agent {
            Some(a) => info.agents.iter().find(|(_, addr)| *addr == a),
            None => info.agents.first(),
        }
        .map(|(t, _)| t.clone())
        .ok_or_else(|| anyhow!("the cluster in {} has no such agent", dir.display()))?;
        let key = info
            .api_keys
            .iter()
            .find(|(t, _)| *t == tenant)
            .map(|(_, p)| p.clone());
        let (addr, tls) = info.agent_tls(&tenant).ok_or_else(|| {
            anyhow!(
                "{}: no certificate of the agent of {tenant}",
                path.display()
            )
        })?;
        Ok((addr, tls, key))
    }
}

/// Sends one request to an agent and waits for the answer, streaming tokens to `on_token`.
pub fn generate(
    agent: &AgentArgs,
    req: &TenantRequest,
    on_token: impl FnMut(u32, Option<&str>),
) -> Result<Answer> {
    let (addr, tls, local_key) = agent.resolve_with_key()?;
    let api_key = agent.api_key(local_key)?;
    let rt = crate::current_thread_runtime()?;
    let trust = agent.trust()?;
    rt.block_on(client::generate(
        &tls, addr, &trust, req, &api_key, on_token,
    ))
    .map_err(|e| anyhow!("agent {addr}: {e}"))
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Keep the CA of the certificate the verified agent presented in FILE, for HTTPS clients
    /// of its OpenAI API (`--cacert FILE`). The agent made that CA with its key and threw the
    /// CA's key away, so FILE trusts this agent only, whatever its host's files say later.
    #[arg(long, value_name = "FILE")]
    pub save_ca: Option<PathBuf>,
}

#[derive(Serialize)]
struct VerifyOutput {
    agent: SocketAddr,
    trusted: bool,
    insecure: bool,
    measurement: Option<String>,
    /// The agent's claims as its report binds them: the tenant and the effective ReMO
    /// configuration.
    claims: Option<talaria_cvm_agent::claims::AgentClaims>,
    error_type: Option<String>,
    error: Option<String>,
}

/// `talaria verify`: asks the agent to attest over a fresh nonce and checks it, bound to the TLS
/// certificate of the connection. Prints JSON; exits non-zero when the agent is not trusted.
pub fn verify(args: VerifyArgs) -> Result<()> {
    let (addr, mut tls) = args.agent.resolve()?;
    if let Some(save) = &args.save_ca {
        // The connection trusts the very bytes that are kept: the host's file is read once.
        std::fs::copy(&tls.ca, save)
            .with_context(|| format!("copying {} to {}", tls.ca.display(), save.display()))?;
        tls.ca = save.clone();
    }
    let trust = args.agent.trust()?;
    let rt = crate::current_thread_runtime()?;
    let result = rt.block_on(async {
        let (endpoint, conn, verified) = client::connect(&tls, addr, &trust).await?;
        conn.close(0u32.into(), b"verified");
        endpoint.wait_idle().await;
        Ok::<_, client::ClientError>(verified)
    });
    let out = match &result {
        Ok(a) => VerifyOutput {
            agent: addr,
            trusted: true,
            insecure: a.verified.insecure,
            measurement: a.verified.measurement.map(hex::encode),
            claims: Some(a.claims.clone()),
            error_type: None,
            error: None,
        },
        Err(e) => VerifyOutput {
            agent: addr,
            trusted: false,
            insecure: false,
            measurement: None,
            claims: None,
            error_type: Some(e.error_type().to_string()),
            error: Some(e.to_string()),
        },
    };
    println!("{}", serde_json::to_string(&out)?);
    if let Err(e) = result {
        if let Some(save) = &args.save_ca {
            let _ = std::fs::remove_file(save);
        }
        bail!("agent {addr} is not trusted: {e}");
    }
    Ok(())
}
