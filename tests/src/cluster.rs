//! A real local cluster for tests: `talaria up` as a child process on free loopback ports, and a
//! raw cloud-protocol peer to send it whatever bytes a test wants.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use talaria_net::TlsMaterial;
use talaria_wire::frame;
use talaria_wire::{ErrorReply, Reply, Request};

/// A binary of the workspace, next to the test executable's folder (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`)",
        path.display()
    );
    path
}

/// Runs `cmd` to its end and reads the JSON it wrote to `json`; fails the test, with the
/// command's error output, if it did not succeed.
pub fn json_of_run(cmd: &mut Command, json: &Path) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// A loopback port nobody listens on right now, over UDP (QUIC) or TCP (HTTP, metrics), and
/// never one this process has handed out before: ports asked for one after the other (a
/// topology's QUIC and metrics addresses) cannot collide when the kernel gives a just-released
/// port out again. Drawn below the kernel's ephemeral range: a port from inside it (what
/// binding port 0 gives) could be taken by any socket bound to port 0 meanwhile, such as another
/// test's QUIC client, between this call and the cluster's bind (a CI run lost a test to
/// "Address already in use" so).
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    assert!(
        ephemeral_low > LOWEST + 1000,
        "the ephemeral port range starts at {ephemeral_low}: no room below it"
    );
    let mut rng = rand::rng();
    for _ in 0..1000 {
        // A margin below the range: some callers use a block of ports above the one given.
        let port = rng.random_range(LOWEST..ephemeral_low - 100);
        if given.contains(&port)
            || std::net::UdpSocket::bind(("127.0.0.1", port)).is_err()
            || std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
        {
            continue;
        }
        given.push(port);
        return port;
    }
    panic!("no loopback port free for both UDP and TCP after 1000 tries");
}

/// Generates through the agent at `addr` as a development tenant (an agent without SEV-SNP
/// hardware is trusted), calling `on_token` with each id as it comes: the generated ids, or the
/// client's typed error. A worker thread drives the connection.
pub fn generate_streaming(
    tls: &TlsMaterial,
    addr: SocketAddr,
    api_key: &str,
    req: &talaria_wire::TenantRequest,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, talaria_cvm_agent::client::ClientError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let trust = talaria_cvm_agent::client::Trust::development();
    rt.block_on(talaria_cvm_agent::client::generate(
        tls,
        addr,
        &trust,
        req,
        api_key,
        |id, _| on_token(id),
    ))
    .map(|a| a.generation.ids)
}

/// [`generate_streaming`] without a callback: the ids, or the error's text.
pub fn ask_agent(
    tls: &TlsMaterial,
    addr: SocketAddr,
    api_key: &str,
    req: &talaria_wire::TenantRequest,
) -> Result<Vec<u32>, String> {
    generate_streaming(tls, addr, api_key, req, |_| {}).map_err(|e| e.to_string())
}

/// `GET path` over HTTPS from an agent's API at `addr`, trusting `ca`: the body, or the status
/// code alone (`"<code>"`) when it is not 200. Python's standard library is the client.
pub fn https_get(ca: &Path, addr: SocketAddr, path: &str) -> String {
    https(ca, addr, path, None)
}

/// `POST path` of JSON `body` with bearer `key`, as [`https_get`]; a stream of server-sent
/// events is read to its end.
pub fn https_post(ca: &Path, addr: SocketAddr, path: &str, key: &str, body: &str) -> String {
    https(ca, addr, path, Some((key, body)))
}

fn https(ca: &Path, addr: SocketAddr, path: &str, post: Option<(&str, &str)>) -> String {
    let request = match post {
        None => format!("'https://127.0.0.1:{}{path}'", addr.port()),
        Some((key, body)) => format!(
            "urllib.request.Request('https://127.0.0.1:{}{path}',data={body:?}.encode(),\
             headers={{'Authorization':'Bearer '+{key:?},'Content-Type':'application/json'}})",
            addr.port()
        ),
    };
    let script = format!(
        "import ssl,urllib.request,urllib.error\n\
         c=ssl.create_default_context(cafile={:?})\n\
         try:\n print(urllib.request.urlopen({request},context=c,timeout=120).read().decode())\n\
         except urllib.error.HTTPError as e:\n print(e.code)",
        ca.display().to_string(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `GET /metrics` of a Prometheus endpoint.
pub fn scrape(addr: SocketAddr) -> String {
    talaria_actors::metrics::scrape(addr).expect("metrics endpoint")
}

/// The value of the metric line `name` (e.g. `talaria_stage_calls_total`), 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    talaria_actors::metrics::value(text, name).unwrap_or(0.0)
}

/// A local topology over `model` with `stages` (`(name, "first-last", lm_head)`) and `tenants`,
/// on free ports.
pub fn topology(model: &Path, stages: &[(&str, &str, bool)], tenants: &[&str]) -> String {
    let mut t = format!(
        "[model]\nfile = \"{}\"\n[coordinator]\nlisten = \"127.0.0.1:{}\"\n",
        model.display(),
        free_port()
    );
    for (name, layers, lm_head) in stages {
        t += &format!(
            "[[stage]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{}\"\nlayers = \"{layers}\"\nlm_head = {lm_head}\nmetrics = \"127.0.0.1:{}\"\n",
            free_port(),
            free_port()
        );
    }
    for tenant in tenants {
        t += &format!(
            "[[agent]]\ntenant = \"{tenant}\"\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        );
    }
    t + "[tls]\ngenerate = true\n[admission]\nallow_insecure = true\n"
}

/// A running `talaria up`, stopped when dropped.
pub struct LocalCluster {
    child: Child,
    pub dir: tempfile::TempDir,
    pub info: serde_json::Value,
}

impl LocalCluster {
    /// Writes `topology` and starts the cluster; returns once every process is ready.
    pub fn start(topology: &str) -> Self {
        Self::start_with(topology, &[])
    }

    /// [`start`](Self::start) with more arguments for `talaria up`; `{dir}` in them stands
    /// for the cluster's own temporary folder.
    pub fn start_with(topology: &str, extra: &[&str]) -> Self {
        Self::start_with_env(topology, extra, &[])
    }

    /// [`start_with`](Self::start_with), with `env` set for the launcher and its children (a
    /// test fault, `talaria_gpu_node::FAULT_ENV`).
    pub fn start_with_env(topology: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let topo = dir.path().join("topology.toml");
        std::fs::write(&topo, topology).unwrap();
        let run = dir.path().join("run");
        let mut cmd = Command::new(bin("talaria"));
        cmd.args(["up", "--topology"])
            .arg(&topo)
            .arg("--run-dir")
            .arg(&run)
            .args(
                extra
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.path().display().to_string())),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // A test killed outright (a CI timeout, ^C) runs no Drop: the launcher is told by the
        // kernel instead when this thread goes, and stops its children as on SIGTERM.
        // SAFETY: prctl is async-signal-safe, and nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting talaria up");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with("ready") {
            let status = child.wait().unwrap();
            panic!("talaria up did not come up ({status}); stdout: {line:?}");
        }
        let info = std::fs::read_to_string(run.join("cluster.json")).unwrap();
        Self {
            child,
            info: serde_json::from_str(&info).unwrap(),
            dir,
        }
    }

    /// The run folder (`--cluster-dir` for `talaria generate --engine cluster`).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The TLS trust a tenant needs to reach the agent of `tenant`: the CA of the certificate
    /// that agent made at its start.
    pub fn agent_tls(&self, tenant: &str) -> TlsMaterial {
        let ca = self.info["agent_cas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p[0] == tenant)
            .unwrap_or_else(|| panic!("no agent of {tenant}"))[1]
            .as_str()
            .unwrap()
            .into();
        TlsMaterial {
            ca,
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ..self.tls()
        }
    }

    /// The API key `talaria up` made for `tenant` (its agent has an HTTPS API).
    pub fn api_key(&self, tenant: &str) -> String {
        let path = self.info["api_keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p[0] == tenant)
            .unwrap_or_else(|| panic!("no API key of {tenant}"))[1]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::read_to_string(path).unwrap()
    }

    /// The cluster's TLS material: its CA, and the certificate and key the cloud's own
    /// processes present (a test that plays a cloud process uses them).
    pub fn tls(&self) -> TlsMaterial {
        let ca: PathBuf = self.info["ca"].as_str().unwrap().into();
        let dir = ca.parent().unwrap().to_path_buf();
        TlsMaterial {
            ca,
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            server_name: self.info["server_name"].as_str().unwrap().into(),
        }
    }

    /// The topology as started.
    pub fn topology(&self) -> talaria_topology::Topology {
        talaria_topology::Topology::load(self.dir.path().join("topology.toml")).unwrap()
    }

    /// The process id of `name` now, as the launcher's `cluster.json` says (it changes when the
    /// launcher restarts a process).
    pub fn current_pid(&self, name: &str) -> u32 {
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.run_dir().join("cluster.json")).unwrap(),
        )
        .unwrap();
        pid_in(&info, name)
    }

    /// The process id of `name` (a stage name, `coordinator`, `agent-<tenant>`).
    pub fn pid(&self, name: &str) -> u32 {
        pid_in(&self.info, name)
    }
}

/// The pid of process `name` in a launcher's `cluster.json`.
fn pid_in(info: &serde_json::Value, name: &str) -> u32 {
    info["pids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == name)
        .unwrap_or_else(|| panic!("no process {name}"))[1]
        .as_u64()
        .unwrap() as u32
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test keeps its cluster's logs: the temporary folder goes with it.
            let keep = std::env::temp_dir()
                .join("talaria-failed-test-logs")
                .join(self.dir.path().file_name().unwrap_or_default());
            let logs = self.run_dir().join("logs");
            if std::fs::create_dir_all(&keep).is_ok() {
                for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                    let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
                }
                eprintln!("the cluster's logs are kept in {}", keep.display());
            }
        }
        // SIGTERM lets the launcher stop its children.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    talaria_actors::rss_bytes_of(pid).unwrap_or_else(|| panic!("no process {pid}"))
}

/// A raw peer on the cloud protocol: sends any bytes, decodes the answer's header.
pub struct RawPeer {
    pub rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    cert: Option<Vec<u8>>,
    /// Streams kept open on purpose.
    held: std::sync::Mutex<Vec<(quinn::SendStream, quinn::RecvStream)>>,
}

/// Which client certificate a [`RawPeer`] presents.
pub enum Who {
    /// The cluster's own certificate: a cloud process (what a gpu-node accepts).
    Cluster,
    /// A key and certificate of its own, made now (what an agent presents to the coordinator).
    OwnKey,
    /// None at all.
    Nobody,
}

impl RawPeer {
    /// Connects to `addr` (a coordinator or a gpu-node) with the cluster's own certificate.
    pub fn connect(tls: &TlsMaterial, addr: SocketAddr) -> Self {
        Self::connect_as(tls, addr, Who::Cluster)
    }

    /// Connects to `addr` presenting `who`'s certificate. A server that refuses the client
    /// certificate closes the connection after the handshake: requests then fail.
    pub fn connect_as(tls: &TlsMaterial, addr: SocketAddr, who: Who) -> Self {
        Self::try_connect_as(tls, addr, who).unwrap()
    }

    /// [`connect_as`](Self::connect_as), or why the handshake failed.
    pub fn try_connect_as(tls: &TlsMaterial, addr: SocketAddr, who: Who) -> Result<Self, String> {
        // A worker of its own drives the connection between requests: its keep-alives keep it
        // open while the test does other things (peers close a silent connection in ~2 s).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let identity = match who {
            Who::OwnKey => {
                Some(talaria_net::TenantIdentity::generate(&tls.server_name, &[]).unwrap())
            }
            _ => None,
        };
        let cert = identity.as_ref().map(|i| i.cert_der().to_vec());
        let (endpoint, conn) = rt.block_on(async {
            let endpoint = match (&who, &identity) {
                (Who::Cluster, _) => tls.cluster_client(talaria_wire::ALPN_CLOUD).unwrap(),
                (Who::OwnKey, Some(i)) => i.client(tls, talaria_wire::ALPN_CLOUD).unwrap(),
                _ => tls.client(talaria_wire::ALPN_CLOUD).unwrap(),
            };
            let conn = tls.connect(&endpoint, addr).await;
            (endpoint, conn)
        });
        let conn = conn.map_err(|e| e.to_string())?;
        Ok(Self {
            rt,
            endpoint,
            conn,
            cert,
            held: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Connects to an agent's tenant port (no client certificate, the tenant protocol).
    pub fn connect_tenant(tls: &TlsMaterial, addr: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (endpoint, conn) = rt.block_on(async {
            let endpoint = tls.client(talaria_wire::ALPN_TENANT).unwrap();
            let conn = tls.connect(&endpoint, addr).await.unwrap();
            (endpoint, conn)
        });
        Self {
            rt,
            endpoint,
            conn,
            cert: None,
            held: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The connection's path MTU (the largest datagram it sends) after `wait`, in which its
    /// MTU discovery runs.
    pub fn path_mtu_after(&self, wait: Duration) -> u16 {
        self.rt.block_on(async { tokio::time::sleep(wait).await });
        self.conn.stats().path.current_mtu
    }

    /// Sends `bytes` and `filler` zero bytes on a new stream, finished; the answer frame's
    /// header, decoded as a cloud `Reply` or a `TenantEvent`, in debug form (or why there was
    /// none).
    pub fn send_partial(&self, bytes: &[u8], filler: usize) -> String {
        self.rt.block_on(async {
            let Ok((mut send, mut recv)) = self.conn.open_bi().await else {
                return "no stream".into();
            };
            let _ = send.write_all(bytes).await;
            let _ = send.write_all(&vec![0; filler]).await;
            let _ = send.finish();
            match talaria_net::read_frame(&mut recv, 1 << 24).await {
                Ok(Some(answer)) => match frame::split::<Reply>(&answer) {
                    Ok((reply, _)) => format!("{reply:?}"),
                    Err(_) => format!("{:?}", frame::tenant_event(&answer)),
                },
                Ok(None) => "no answer".into(),
                Err(e) => e.to_string(),
            }
        })
    }

    /// Opens `streams` streams, each sending `bytes` and `filler` zero bytes and never
    /// finishing: frames that claim more than they carry, held open until the peer drops.
    pub fn hold_partial(&self, bytes: &[u8], filler: usize, streams: usize) {
        let mut held = self.held.lock().unwrap();
        self.rt.block_on(async {
            for _ in 0..streams {
                let Ok((mut send, recv)) = self.conn.open_bi().await else {
                    return;
                };
                let _ = send.write_all(bytes).await;
                let _ = send.write_all(&vec![0; filler]).await;
                held.push((send, recv));
            }
        });
    }

    /// The certificate this peer presented, when it made its own key.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert.clone().expect("a peer with its own key")
    }

    /// Sends `bytes` as they are (length prefix included) on a new stream; returns the answer.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(Reply, Vec<u8>), String> {
        self.rt.block_on(async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| e.to_string())?;
            // A peer may stop reading an oversize frame: a failed write is part of the test.
            let _ = send.write_all(bytes).await;
            let _ = send.finish();
            let answer = talaria_net::read_frame(&mut recv, 1 << 30)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no answer")?;
            let (reply, payload): (Reply, &[u8]) =
                frame::split(&answer).map_err(|e| e.to_string())?;
            Ok((reply, payload.to_vec()))
        })
    }

    /// Sends a well-formed request frame.
    pub fn request<B: serde::Serialize>(
        &self,
        head: &Request,
        body: Option<&B>,
    ) -> Result<(Reply, Vec<u8>), String> {
        let frame = frame::encode(head, body).unwrap();
        let mut bytes = (frame.len() as u32).to_le_bytes().to_vec();
        bytes.extend(frame);
        self.send_raw(&bytes)
    }

    /// The error a request was refused with (panics if it was served).
    pub fn refusal<B: serde::Serialize>(&self, head: &Request, body: Option<&B>) -> ErrorReply {
        match self.request(head, body).unwrap() {
            (Reply::Err(e), _) => e,
            (Reply::Ok { .. }, _) => panic!("{head:?} was served"),
        }
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"bye");
        let endpoint = self.endpoint.clone();
        self.rt.block_on(async move { endpoint.wait_idle().await });
    }
}

/// A TCP forwarder in the network's place between clients and `target`: it keeps, per
/// connection, every byte `target` sent back, which is what the cloud sees of an answer to a
/// tenant (TLS hides the bytes, not the records' lengths).
pub struct Wiretap {
    pub addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Wiretap {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub fn start(target: SocketAddr) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let (mut up_from, mut up_to) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_from, &mut up_to);
                    let _ = up_to.shutdown(std::net::Shutdown::Write);
                });
                let all = all.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    let mut buf = [0u8; 16 << 10];
                    while let Ok(n) = server.read(&mut buf) {
                        if n == 0 || client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        kept.extend_from_slice(&buf[..n]);
                    }
                    let _ = client.shutdown(std::net::Shutdown::Write);
                    all.lock().unwrap().push(kept);
                });
            }
        });
        Self { addr, seen }
    }

    /// What `target` sent on each connection that has ended since the last call, in the order
    /// they ended.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// A UDP forwarder in the network's place between QUIC clients and `target` (an agent's
/// tenant port): it relays every datagram both ways, each client on an upstream socket of its
/// own, and keeps the length of every datagram `target` sent, in order, which is all of the
/// answer an observer of an encrypted QUIC connection reads besides timing.
pub struct UdpWiretap {
    pub addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl UdpWiretap {
    /// Listens on a free loopback port and relays to `target`.
    pub fn start(target: SocketAddr) -> Self {
        use std::net::UdpSocket;
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = front.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = seen.clone();
        std::thread::spawn(move || {
            let mut upstreams: std::collections::HashMap<SocketAddr, UdpSocket> =
                std::collections::HashMap::new();
            let mut buf = vec![0u8; 64 << 10];
            while let Ok((n, client)) = front.recv_from(&mut buf) {
                let up = upstreams.entry(client).or_insert_with(|| {
                    let up = UdpSocket::bind("127.0.0.1:0").unwrap();
                    up.connect(target).unwrap();
                    let (back, front, all) = (
                        up.try_clone().unwrap(),
                        front.try_clone().unwrap(),
                        all.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = back.recv(&mut buf) {
                            all.lock().unwrap().push(n);
                            if front.send_to(&buf[..n], client).is_err() {
                                break;
                            }
                        }
                    });
                    up
                });
                let _ = up.send(&buf[..n]);
            }
        });
        Self { addr, seen }
    }

    /// The lengths of the datagrams `target` sent since the last call.
    pub fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}
