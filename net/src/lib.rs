//! QUIC (quinn, TLS 1.3 through rustls with the ring provider): endpoints, TLS material, and
//! frames on streams.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use talaria_wire::frame::{FrameError, check_len};

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Config(String),
    #[error("binding {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
}

/// The cluster's TLS material: a CA every peer trusts, and the certificate servers present.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The name servers' certificates carry and clients check.
    pub server_name: String,
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.into(),
        message: e.to_string(),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File {
            path: path.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.into(),
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed into place:
/// a reader sees the old file or the new one, never half of one. With `private` the file is
/// created readable by its owner only, from its first byte (no window in which it is not).
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let err = |p: &Path, e: std::io::Error| TlsError::File {
        path: p.into(),
        message: e.to_string(),
    };
    let name = path
        .file_name()
        .map_or_else(|| "tls".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(&tmp).map_err(|e| err(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))
}

/// A TLS 1.3 server configuration presenting `chain` with `key`, speaking `alpn`, admitting
/// clients as `auth` says (`roots`: the cluster CA, for [`ClientAuth::Cluster`]).
fn server_config_with(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
    auth: ClientAuth,
    roots: Option<rustls::RootCertStore>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (auth, roots) {
        (ClientAuth::Anyone, _) => builder.with_no_client_auth(),
        (ClientAuth::AnyCertificate, _) => {
            builder.with_client_cert_verifier(Arc::new(AnyClientCert(provider())))
        }
        (ClientAuth::Cluster, Some(roots)) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?,
        ),
        (ClientAuth::Cluster, None) => {
            return Err(TlsError::Config(
                "cluster client authentication needs the cluster's CA".into(),
            ));
        }
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Requires a client certificate and checks only that the client holds its key (the handshake
/// signature), not who issued it: the coordinator's check of agents, whose certificates are
/// made at their start and vouched for by their attestation, which must bind this very
/// certificate (`peer_cert_der`).
#[derive(Debug)]
struct AnyClientCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Who may connect to a server endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Anyone (a tenant reaching its agent: the agent's attestation is what the tenant checks).
    Anyone,
    /// Only a client presenting a certificate of the cluster's CA: the cloud's own processes
    /// (the coordinator dialling a gpu-node). Agents hold no such certificate.
    Cluster,
    /// Any client that proves it holds the key of the certificate it presents (agents dialling
    /// the coordinator; admission then requires the attested key to be that certificate).
    AnyCertificate,
}

/// A QUIC server endpoint on `addr` with `tls`. Where anyone may connect (`untrusted`), its
/// connections start with [`UNTRUSTED_RECEIVE_WINDOW`] and take datagrams of at most
/// [`UNTRUSTED_UDP_PAYLOAD`]; for the cluster's own peers, [`RECEIVE_WINDOW`] and
/// [`MAX_UDP_PAYLOAD`].
fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    untrusted: bool,
) -> Result<Endpoint, TlsError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let (window, payload) = if untrusted {
        (UNTRUSTED_RECEIVE_WINDOW, UNTRUSTED_UDP_PAYLOAD)
    } else {
        (RECEIVE_WINDOW, MAX_UDP_PAYLOAD)
    };
    config.transport_config(transport_with(window));
    server_socket(addr)
        .and_then(|socket| endpoint_on(socket, Some(config), payload))
        .map_err(|e| TlsError::Bind {
            addr,
            message: e.to_string(),
        })
}

/// A CA and a server certificate it signed, for `server_name` and `extra_names`, made in
/// memory: (CA PEM, certificate, its key).
fn make_certificate(
    server_name: &str,
    extra_names: &[String],
) -> Result<(String, rcgen::Certificate, rcgen::KeyPair), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let err = |e: rcgen::Error| TlsError::Config(e.to_string());
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Talaria local cluster CA");
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut names = vec![server_name.to_string()];
    names.extend(extra_names.iter().filter(|n| *n != server_name).cloned());
    let mut params = CertificateParams::new(names).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, server_name);
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(err)?;
    // The CA's key signs nothing else: it is dropped here, never stored.
    Ok((ca.pem(), cert, key))
}

/// An agent's tenant-facing identity: a key made in the agent's (CVM) memory at every start and
/// never written anywhere, and a certificate for it signed by a CA made and forgotten with it.
/// Only the certificate and that CA are published, for tenants' TLS clients; a tenant learns
/// that the key is the attested agent's from its report, which binds the certificate.
pub struct TenantIdentity {
    ca_pem: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl TenantIdentity {
    /// A new identity for `server_name` and `extra_names`.
    pub fn generate(server_name: &str, extra_names: &[String]) -> Result<Self, TlsError> {
        let (ca_pem, cert, key) = make_certificate(server_name, extra_names)?;
        Ok(Self {
            ca_pem,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Writes the public half into `dir`: `ca.pem` (what tenants trust) and `cert.pem`. A key
    /// file found there (an older agent's, or one planted by the host) is removed, since no
    /// agent reads one: `true` when there was one.
    pub fn publish(&self, dir: &Path) -> Result<bool, TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
            path: dir.into(),
            message: e.to_string(),
        })?;
        let stale = dir.join("key.pem");
        let removed = stale.exists();
        if removed {
            std::fs::remove_file(&stale).map_err(|e| TlsError::File {
                path: stale.clone(),
                message: e.to_string(),
            })?;
        }
        write_atomic(&dir.join("ca.pem"), self.ca_pem.as_bytes(), false)?;
        write_atomic(&dir.join("cert.pem"), self.cert_pem.as_bytes(), false)?;
        Ok(removed)
    }

    /// The certificate's DER: what the agent's attestation binds.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The TLS server configuration presenting this identity (QUIC and HTTPS alike).
    pub fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        server_config_with(
            vec![self.cert_der.clone().into()],
            self.key(),
            alpn,
            ClientAuth::Anyone,
            None,
        )
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// A client endpoint that trusts `cluster`'s CA and presents this identity as its client
    /// certificate (an agent dialling the coordinator: the key its admission binds is then the
    /// one this connection proves).
    pub fn client(&self, cluster: &TlsMaterial, alpn: &[u8]) -> Result<Endpoint, TlsError> {
        cluster.client_presenting(
            alpn,
            Some((vec![self.cert_der.clone().into()], self.key())),
            transport_batching_acks(),
        )
    }

    /// A server endpoint on `addr` speaking `alpn`, for anyone: its connections start with
    /// [`UNTRUSTED_RECEIVE_WINDOW`] ([`trust_connection`] widens one) and take datagrams of at
    /// most [`UNTRUSTED_UDP_PAYLOAD`].
    pub fn server(&self, addr: SocketAddr, alpn: &[u8]) -> Result<Endpoint, TlsError> {
        server_endpoint(addr, self.server_config(alpn)?, true)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The largest UDP payload an endpoint sends (after discovery) or accepts: what IPv6 allows.
const MAX_UDP_PAYLOAD: u16 = 65_527;

/// The largest UDP payload a server anyone may reach accepts (quinn's default, an Ethernet
/// path's). A peer's MTU discovery climbs no higher than the `max_udp_payload_size` this side
/// announces, and every probe is filled with one-byte PADDING frames, which quinn-proto 0.11
/// parses one at a time: a stranger reconnecting in a loop made loopback probes of up to 64 KiB
/// each, and parsing their padding took 81 % of the agent's event loop (`perf`, the flood
/// measured in `tests/tests/hostile.rs`).
pub const UNTRUSTED_UDP_PAYLOAD: u16 = 1472;

/// An endpoint on `socket` that accepts datagrams up to `max_payload` bytes ([`MAX_UDP_PAYLOAD`]
/// for the cluster's own peers: quinn's default of 1472 would cap what MTU discovery can find).
fn endpoint_on(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    max_payload: u16,
) -> std::io::Result<Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(max_payload)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    let socket = GsoLimit(runtime.wrap_udp_socket(socket)?);
    Endpoint::new_with_abstract_socket(config, server, Arc::new(socket), runtime)
}

/// The most bytes one UDP send may carry in all: an IPv4 datagram's 65,535 less its IP and UDP
/// headers (IPv6 allows 20 more; this is the bound for both).
const MAX_SEND_BYTES: usize = 65_535 - 20 - 8;

/// A UDP socket whose segmentation-offload sends never exceed [`MAX_SEND_BYTES`].
///
/// quinn batches up to ten datagrams of the path's MTU into one `sendmsg` (GSO) without
/// bounding their sum, and quinn-udp takes the kernel's `EMSGSIZE` for an MTU probe's and
/// reports the send as done. Once discovery finds a large MTU (loopback: 65,495 bytes), any
/// batch of two large datagrams — a 393 KB LM-head answer, or a few concurrent answers on one
/// connection — was silently dropped whole. Every such drop is a tail loss (a probe timeout
/// before it is resent) and a congestion event, and a few of them make quinn's black-hole
/// detection drop the path's MTU to 1,200 bytes for the rest of the connection. This splits
/// such a batch into sends of whole segments that fit.
#[derive(Debug)]
struct GsoLimit(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for GsoLimit {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if segment > 0 && transmit.contents.len() > MAX_SEND_BYTES => segment,
            _ => return self.0.try_send(transmit),
        };
        let per_send = (MAX_SEND_BYTES / segment).max(1) * segment;
        for (i, chunk) in transmit.contents.chunks(per_send).enumerate() {
            let part = quinn::udp::Transmit {
                contents: chunk,
                segment_size: (chunk.len() > segment).then_some(segment),
                ..transmit.clone()
            };
            match self.0.try_send(&part) {
                Ok(()) => {}
                // Nothing sent yet: quinn waits for the socket and tries the whole batch again.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch is out: the rest counts as lost (as a full socket buffer
                // would drop it), and QUIC's recovery resends it.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// The socket buffers asked for (the kernel caps them at `net.core.rmem_max`/`wmem_max`). A
/// busy process reads its socket late: with the kernel's ~208 KiB default, a burst of 64 KiB
/// datagrams (a set-up reply, a prefill) overflows it, the losses back QUIC's timers off, and a
/// live peer can go silent past the idle timeout.
const SOCKET_BUFFER: usize = 4 << 20;

fn udp_socket(addr: SocketAddr, dual_stack: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if dual_stack && addr.is_ipv6() {
        // Not fatal: IPv4 peers then need the IPv4 fallback.
        let _ = socket.set_only_v6(false);
    }
    // Not fatal: a host may allow less.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Whether this host grants the endpoints' receive buffers in full (the kernel caps them at
/// `net.core.rmem_max`), read back from a socket made as theirs are. Where it
/// does, loopback loses no datagram under the cluster's bursts; where it does not, it may.
pub fn full_socket_buffers() -> bool {
    let probe = || -> std::io::Result<bool> {
        let socket = socket2::Socket::from(udp_socket(
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
            false,
        )?);
        // Linux reports twice what it grants (the kernel's bookkeeping share). Only the receive
        // side loses datagrams: a full send buffer makes the sender wait.
        let reported = if cfg!(any(target_os = "linux", target_os = "android")) {
            2 * SOCKET_BUFFER
        } else {
            SOCKET_BUFFER
        };
        Ok(socket.recv_buffer_size()? >= reported)
    };
    probe().unwrap_or(false)
}

/// A UDP socket bound to `addr`; for an IPv6 address, dual-stack if the host allows it.
fn client_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    udp_socket(addr, true)
}

/// A server's UDP socket on `addr`.
fn server_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    udp_socket(addr, false)
}

/// How fast a dead peer is noticed: a connection with no packet from its peer for `idle` is
/// closed, and a keep-alive every `idle / 4` keeps a quiet but live one open. Set once per
/// process, before its endpoints are made ([`set_liveness`]); 2 s unless a topology says
/// otherwise.
static IDLE_TIMEOUT_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_IDLE_TIMEOUT.as_millis() as u64);

/// The default idle timeout: a SIGKILLed or SIGSTOPped peer is noticed within it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The most bidirectional streams a peer may have open on one connection at once. Each stream
/// is at most one request in flight; a session has one call in flight at a time, so this bounds
/// what a peer can make a server hold, not what an honest one needs.
pub const MAX_STREAMS: u32 = 256;

/// Sets the idle timeout of the endpoints this process makes from now on (at least 200 ms).
pub fn set_liveness(idle: Duration) {
    let ms = idle.as_millis().max(200) as u64;
    IDLE_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// The idle timeout endpoints of this process use.
pub fn idle_timeout() -> Duration {
    Duration::from_millis(IDLE_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// The most stream data a peer may have sent beyond what this side has read, per connection
/// and per stream.
pub const RECEIVE_WINDOW: u32 = 2 << 20;

/// The receive window of a connection to a server anyone may reach, until the server trusts its
/// peer ([`trust_connection`]): what waits unread on a connection is held in memory, and a
/// server of untrusted peers holds many connections (256 tenant connections at 2 MiB each were
/// 512 MiB of a stranger's bytes).
pub const UNTRUSTED_RECEIVE_WINDOW: u32 = 256 << 10;

/// Widens the receive window of `conn` to [`RECEIVE_WINDOW`]: its peer proved who it is (an
/// admitted agent, a tenant with an API key).
pub fn trust_connection(conn: &Connection) {
    conn.set_receive_window(RECEIVE_WINDOW.into());
}

fn transport() -> Arc<quinn::TransportConfig> {
    transport_with(RECEIVE_WINDOW)
}

/// [`transport`] with a connection receive window of `window` bytes.
fn transport_with(window: u32) -> Arc<quinn::TransportConfig> {
    Arc::new(transport_config(window, MAX_UDP_PAYLOAD))
}

/// The transport every endpoint of the project uses, with a connection receive window of
/// `window` bytes, sending datagrams of at most `max_payload` bytes.
fn transport_config(window: u32, max_payload: u16) -> quinn::TransportConfig {
    let idle = idle_timeout();
    let mut t = quinn::TransportConfig::default();
    // Flow control bounds what a peer can make this side buffer, whatever frame lengths it
    // claims, and what a peer can have in flight towards it: no more than the socket's receive
    // buffer takes (SOCKET_BUFFER). With 64 MiB a stage's burst of concurrent answers (sixteen
    // 393 KB LM-head rows) overflowed the coordinator's 4 MiB buffer and the kernel dropped
    // thousands of datagrams in the 64-session test; with 2 MiB none, and a prefill's frames
    // cross loopback as fast (`talaria bench --engine cluster`, f64-gemm: 49–51 prefill tok/s
    // either way). On a path of round-trip time T this allows at most 2 MiB / T per connection.
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(RECEIVE_WINDOW.into())
        .receive_window(window.into())
        .send_window(64 << 20)
        .keep_alive_interval(Some(idle / 4))
        // Masked rows are bulk data: on a path with a large MTU (loopback, jumbo frames) far
        // fewer, larger datagrams carry them. Discovery starts from the safe 1200 bytes and
        // only climbs as far as the path delivers (RFC 8899), so an Ethernet path stays at
        // ~1452.
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(max_payload);
            m
        }))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle).unwrap_or_else(
            |_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(2_000)),
        )));
    t
}

/// [`transport`] for a client whose calls go to a port anyone may reach (an agent's link to its
/// coordinator), where every datagram is at most [`UNTRUSTED_UDP_PAYLOAD`] bytes: a decode
/// request is then four to nine datagrams, and asked by quinn's default to acknowledge every
/// other ack-eliciting one at once, the coordinator sent an ACK-only datagram back for nearly
/// every call, one more send for it and one more wake-up of the agent. This side asks its peer,
/// by QUIC's ACK frequency extension, to wait for up to [`ACK_ELICITING_THRESHOLD`] of them, so
/// the ACK rides with the call's answer.
///
/// A peer that waits must not make the sender wait: with fewer datagrams in flight than the
/// threshold and the congestion window full, nothing would be acknowledged before the peer's
/// maximum ACK delay (25 ms). So the initial window holds one more datagram than the threshold
/// ([`BATCHED_ACKS_INITIAL_WINDOW`]; quinn's default, 12 000 bytes, holds eight of 1472 bytes),
/// and this side's datagrams stay at 1472 bytes whatever its peer announces. After a congestion
/// event (a loss, an ECN mark) the window may fall below that; a flight that then fills it waits
/// for the delay, but is not app-limited, so its ACK grows the window again (Cubic's congestion
/// avoidance, or slow start after persistent congestion): one to about four waits of 25 ms
/// with a datacenter's round trip. Tail-loss probes ask for an immediate ACK, so batching never
/// delays loss recovery. The delay keeps its default: a shorter one shortens the sender's probe
/// timeout below how long a process of a loaded 2-core host may wait for a core. The cluster's
/// own links (datagrams of up to 64 KiB, whose windows may hold only two of them) keep quinn's
/// default.
fn transport_batching_acks() -> Arc<quinn::TransportConfig> {
    let mut t = transport_config(RECEIVE_WINDOW, UNTRUSTED_UDP_PAYLOAD);
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(BATCHED_ACKS_INITIAL_WINDOW);
    t.ack_frequency_config(Some(acks))
        .congestion_controller_factory(Arc::new(cubic));
    Arc::new(t)
}

/// How many ack-eliciting datagrams the coordinator may receive from an agent before it must
/// acknowledge them at once (quinn's default is 1): the largest decode request of the model's
/// ops (`down`, 1536 values of 8 bytes) is nine datagrams of [`UNTRUSTED_UDP_PAYLOAD`] bytes.
pub const ACK_ELICITING_THRESHOLD: u32 = 9;

/// The initial congestion window of an agent's link to its coordinator: quinn sends a datagram while
/// what is in flight plus it stays below the window, so this lets `ACK_ELICITING_THRESHOLD + 1`
/// datagrams of [`UNTRUSTED_UDP_PAYLOAD`] bytes fly, the last of which the peer acknowledges at
/// once.
pub const BATCHED_ACKS_INITIAL_WINDOW: u64 =
    (ACK_ELICITING_THRESHOLD as u64 + 2) * UNTRUSTED_UDP_PAYLOAD as u64;

const _: () = assert!(
    (ACK_ELICITING_THRESHOLD as u64 + 1) * (UNTRUSTED_UDP_PAYLOAD as u64)
        < BATCHED_ACKS_INITIAL_WINDOW
);

impl TlsMaterial {
    /// Generates a CA and a server certificate for `server_name` into `dir` (a local cluster:
    /// also valid for the loopback names an HTTPS client of an agent's API reaches it by).
    pub fn generate(dir: &Path, server_name: &str) -> Result<Self, TlsError> {
        Self::generate_with(dir, server_name, &["localhost".into(), "127.0.0.1".into()])
    }

    /// Generates a CA and a server certificate for `server_name` and `extra_names` into `dir`;
    /// the key file is readable by its owner only.
    pub fn generate_with(
        dir: &Path,
        server_name: &str,
        extra_names: &[String],
    ) -> Result<Self, TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
            path: dir.into(),
            message: e.to_string(),
        })?;
        let (ca, cert, key) = make_certificate(server_name, extra_names)?;
        let material = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            server_name: server_name.into(),
        };
        write_atomic(&material.key, key.serialize_pem().as_bytes(), true)?;
        write_atomic(&material.ca, ca.as_bytes(), false)?;
        write_atomic(&material.cert, cert.pem().as_bytes(), false)?;
        Ok(material)
    }

    /// The material in `dir` if it holds all of it; else, if it holds none, a new CA and
    /// certificate for `server_name` and `extra_names` made there (`true`: made now). Part of it
    /// is an error: a key is never silently replaced.
    pub fn load_or_generate(
        dir: &Path,
        server_name: &str,
        extra_names: &[String],
    ) -> Result<(Self, bool), TlsError> {
        let material = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            server_name: server_name.into(),
        };
        let present = [&material.ca, &material.cert, &material.key]
            .iter()
            .filter(|p| p.is_file())
            .count();
        match present {
            3 => Ok((material, false)),
            0 => Ok((Self::generate_with(dir, server_name, extra_names)?, true)),
            _ => Err(TlsError::File {
                path: dir.into(),
                message: "holds only part of the TLS material (ca.pem, cert.pem, key.pem): \
                          remove it to make new material"
                    .into(),
            }),
        }
    }

    /// The DER of the certificate servers present (the first of the chain): what an agent's
    /// attestation binds.
    pub fn cert_der(&self) -> Result<Vec<u8>, TlsError> {
        Ok(certs(&self.cert)?.remove(0).to_vec())
    }

    /// The TLS 1.3 server configuration presenting this certificate and speaking `alpn`
    /// (also what the agent's HTTPS API serves with: one key, one attestation binding).
    pub fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let chain = certs(&self.cert)?;
        let key_pem = read_file(&self.key)?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| TlsError::File {
                path: self.key.clone(),
                message: "no PEM private key in it".into(),
            })?;
        server_config_with(chain, key, alpn, ClientAuth::Anyone, None)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        Ok(roots)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let key_pem = read_file(&self.key)?;
        rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| TlsError::File {
                path: self.key.clone(),
                message: "no PEM private key in it".into(),
            })
    }

    /// A server endpoint on `addr` speaking `alpn`, admitting clients as `auth` says.
    pub fn server(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
        auth: ClientAuth,
    ) -> Result<Endpoint, TlsError> {
        let roots = (auth == ClientAuth::Cluster)
            .then(|| self.roots())
            .transpose()?;
        let tls = server_config_with(certs(&self.cert)?, self.private_key()?, alpn, auth, roots)?;
        let untrusted = match auth {
            ClientAuth::Cluster => false,
            ClientAuth::Anyone | ClientAuth::AnyCertificate => true,
        };
        server_endpoint(addr, tls, untrusted)
    }

    /// A client endpoint that trusts the cluster's CA, speaks `alpn`, and presents the
    /// cluster's certificate (a cloud process dialling another: the coordinator to a gpu-node).
    pub fn cluster_client(&self, alpn: &[u8]) -> Result<Endpoint, TlsError> {
        self.client_presenting(
            alpn,
            Some((certs(&self.cert)?, self.private_key()?)),
            transport(),
        )
    }

    /// A client endpoint that trusts the cluster's CA and speaks `alpn`, presenting no client
    /// certificate (a tenant dialling an agent).
    pub fn client(&self, alpn: &[u8]) -> Result<Endpoint, TlsError> {
        self.client_presenting(alpn, None, transport())
    }

    /// A client endpoint that trusts the CA, presents `identity` (chain, key) if given, and
    /// dials with `transport`.
    #[allow(clippy::type_complexity)]
    fn client_presenting(
        &self,
        alpn: &[u8],
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<Endpoint, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?);
        let mut tls = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(e.to_string()))?,
        };
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
        let any4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
        // Dual-stack where the host allows it, else IPv4.
        let mut endpoint = client_socket(any)
            .or_else(|_| client_socket(any4))
            .and_then(|socket| endpoint_on(socket, None, MAX_UDP_PAYLOAD))
            .map_err(|e| TlsError::Bind {
                addr: any4,
                message: e.to_string(),
            })?;
        endpoint.set_default_client_config(config);
        Ok(endpoint)
    }

    /// Connects `endpoint` to `addr`, checking the server's certificate against the cluster's
    /// server name.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        addr: SocketAddr,
    ) -> Result<Connection, FrameError> {
        let connecting = endpoint
            .connect(addr, &self.server_name)
            .map_err(|e| FrameError::Connection(format!("{addr}: {e}")))?;
        connecting
            .await
            .map_err(|e| FrameError::Connection(format!("{addr}: {e}")))
    }
}

fn conn_err(e: impl std::fmt::Display) -> FrameError {
    FrameError::Connection(e.to_string())
}

/// Reads one length-prefixed frame, refusing one longer than `max` before reading its body.
/// Memory grows with the bytes that actually arrive, never with what the prefix claims: a peer
/// that announces a large frame and sends little of it holds little.
/// `Ok(None)`: the stream ended cleanly before a frame began.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    if !read_prefix(recv, &mut prefix).await? {
        return Ok(None);
    }
    let len = check_len(prefix, max)?;
    read_body(recv, len).await.map(Some)
}

/// Reads a frame's length prefix into `prefix`; `false` where the stream ended cleanly first.
async fn read_prefix(recv: &mut RecvStream, prefix: &mut [u8; 4]) -> Result<bool, FrameError> {
    match recv.read_exact(prefix).await {
        Ok(()) => Ok(true),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(false),
        Err(quinn::ReadExactError::FinishedEarly(n)) => Err(FrameError::Malformed(format!(
            "stream ended inside a length prefix ({n} of 4 bytes)"
        ))),
        Err(quinn::ReadExactError::ReadError(e)) => Err(conn_err(e)),
    }
}

/// Reads a frame's `len` bytes after its prefix, growing the buffer as they arrive.
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let want = (len - buf.len()).min(READ_CHUNK);
        match recv.read_chunk(want, true).await.map_err(conn_err)? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => {
                return Err(FrameError::Malformed(format!(
                    "stream ended after {} of {len} frame bytes",
                    buf.len()
                )));
            }
        }
    }
    Ok(buf)
}

/// The longest a request frame of the cluster may take to arrive whole ([`Intake`]): a call of
/// the largest prefill is about 100 MB, a second on a 1 Gbit/s link.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// What a server lets its peers make it hold while their request frames arrive, for frames it
/// reads with [`read_frame_in`].
///
/// [`read_frame`] keeps memory to the bytes that actually arrive, but a peer decides how many
/// arrive: one that sends all of a large frame but its last byte, on every stream it may open,
/// would otherwise hold that much for as long as it likes. An intake bounds it three ways:
/// - the largest frame, which its owner may change while it serves (a coordinator raises it
///   when a peer is admitted);
/// - bytes of unfinished frames at once, per connection (`own`) and across every connection
///   that shares `shared`: a frame's body is read only once its whole length is reserved in
///   both, and stays reserved until it is read;
/// - a deadline for each frame, from its stream's first byte awaited to its last one read,
///   waiting for a reservation included.
#[derive(Debug, Clone)]
pub struct Intake {
    limit: Arc<AtomicUsize>,
    /// (The budget, its size.)
    own: Option<(Arc<Semaphore>, usize)>,
    /// Set when the connection's budget no longer applies ([`lift_own_budget`](Self::lift_own_budget)).
    own_lifted: Arc<AtomicBool>,
    shared: Option<(Arc<Semaphore>, usize)>,
    deadline: Duration,
}

impl Intake {
    /// Frames of at most `limit` bytes, each read within `deadline`; no budget of bytes.
    pub fn new(limit: usize, deadline: Duration) -> Self {
        Self {
            limit: Arc::new(AtomicUsize::new(limit)),
            own: None,
            own_lifted: Arc::new(AtomicBool::new(false)),
            shared: None,
            deadline,
        }
    }

    /// The same, with at most `bytes` of unfinished frames on each connection it serves (each
    /// connection's intake is made with [`for_connection`](Self::for_connection)).
    pub fn with_own_budget(mut self, bytes: usize) -> Self {
        self.own = Some((Arc::new(Semaphore::new(bytes)), bytes));
        self
    }

    /// The same, with at most `bytes` of unfinished frames across every connection whose
    /// intake comes from this one.
    pub fn with_shared_budget(mut self, bytes: usize) -> Self {
        self.shared = Some((Arc::new(Semaphore::new(bytes)), bytes));
        self
    }

    /// The intake of one more connection: a fresh budget of its own and a limit of its own
    /// (so that one connection's can be raised alone), the shared budget shared.
    pub fn for_connection(&self) -> Self {
        Self {
            limit: Arc::new(AtomicUsize::new(self.limit())),
            own: self
                .own
                .as_ref()
                .map(|&(_, bytes)| (Arc::new(Semaphore::new(bytes)), bytes)),
            own_lifted: Arc::new(AtomicBool::new(false)),
            shared: self.shared.clone(),
            deadline: self.deadline,
        }
    }

    /// The largest frame read now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Reads frames of at most `limit` bytes from now on.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Frames on this connection no longer need room in its own budget (the shared one still
    /// applies): for a peer trusted from now on, such as an admitted agent.
    pub fn lift_own_budget(&self) {
        self.own_lifted.store(true, Ordering::Release);
    }

    /// Reserves `len` bytes in each budget, waiting for room. A frame larger than a budget
    /// reserves all of it.
    async fn reserve(&self, len: usize) -> Result<Vec<OwnedSemaphorePermit>, FrameError> {
        let own = self
            .own
            .as_ref()
            .filter(|_| !self.own_lifted.load(Ordering::Acquire));
        let mut held = Vec::with_capacity(2);
        for (budget, bytes) in [own, self.shared.as_ref()].into_iter().flatten() {
            let n = u32::try_from(len.min(*bytes)).unwrap_or(u32::MAX);
            // The budgets are never closed.
            let permit = budget
                .clone()
                .acquire_many_owned(n)
                .await
                .map_err(|e| FrameError::Connection(e.to_string()))?;
            held.push(permit);
        }
        Ok(held)
    }
}

/// Reads one length-prefixed frame within `intake`'s bounds ([`Intake`]): too large a frame is
/// refused from its prefix as [`read_frame`] does; one that does not arrive whole by its
/// deadline, waiting for room in the budgets included, is refused as `deadline_exceeded`.
/// Frames wait for room in the order they asked for it, so a frame waits at most for those that
/// asked before it, each held at most until its own (earlier) deadline.
/// `Ok(None)`: the stream ended cleanly before a frame began.
pub async fn read_frame_in(
    recv: &mut RecvStream,
    intake: &Intake,
) -> Result<Option<Vec<u8>>, FrameError> {
    let deadline = intake.deadline;
    // How far the frame got, for the error.
    let mut waiting_for_room = None;
    let read = async {
        let mut prefix = [0u8; 4];
        if !read_prefix(recv, &mut prefix).await? {
            return Ok(None);
        }
        let len = check_len(prefix, intake.limit())?;
        waiting_for_room = Some(len);
        let reserved = intake.reserve(len).await?;
        waiting_for_room = None;
        let frame = read_body(recv, len).await?;
        drop(reserved);
        Ok(Some(frame))
    };
    let outcome = tokio::time::timeout(deadline, read).await;
    outcome.unwrap_or_else(|_| {
        Err(FrameError::TimedOut(match waiting_for_room {
            Some(len) => format!("no room for a frame of {len} bytes within {deadline:?}"),
            None => format!("a frame must arrive whole within {deadline:?}"),
        }))
    })
}

/// The most bytes taken from a stream at once while reading a frame.
const READ_CHUNK: usize = 1 << 20;

/// Writes one length-prefixed frame.
pub async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(frame.len())
        .map_err(|_| FrameError::TooLarge {
            len: frame.len() as u64,
            max: u32::MAX as usize,
        })?
        .to_le_bytes();
    send.write_all(&len).await.map_err(conn_err)?;
    send.write_all(frame).await.map_err(conn_err)
}

/// One request on its own stream: sends `frame`, returns the answer frame.
pub async fn request(conn: &Connection, frame: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    write_frame(&mut send, frame).await?;
    send.finish().map_err(conn_err)?;
    let answer = read_frame(&mut recv, max).await?.ok_or_else(|| {
        FrameError::Connection("the peer closed the stream without an answer".into())
    })?;
    take_end(&mut recv);
    Ok(answer)
}

/// Takes the end of a one-frame stream whose frame was read, when it has already arrived (the
/// peer finishes right after its frame, so the end usually comes in the frame's last packet);
/// never waits. A receive stream dropped before its end was read makes quinn tell the peer to
/// stop sending (a STOP_SENDING frame): one more packet each way, and a wake-up of the peer,
/// on every request. Whatever else is there (a second frame, which the protocol does not have)
/// is left unread, and the stream is stopped as before.
pub fn take_end(recv: &mut RecvStream) {
    use std::future::Future;
    let read = std::pin::pin!(recv.read_chunk(1, true));
    let _ = read.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
}

/// The DER of the certificate the peer of `conn` presented (its first), if any.
pub fn peer_cert_der(conn: &Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| c.to_vec())
}
