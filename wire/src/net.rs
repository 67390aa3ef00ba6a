//! QUIC (quinn, TLS 1.3 through rustls with the ring provider): endpoints, TLS material, and
//! frames on streams.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::frame::{FrameError, check_len};

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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The largest UDP payload an endpoint sends (after discovery) or accepts: what IPv6 allows.
const MAX_UDP_PAYLOAD: u16 = 65_527;

/// An endpoint on `socket` that accepts datagrams up to [`MAX_UDP_PAYLOAD`] (quinn's default
/// of 1472 would cap what MTU discovery can find).
fn endpoint_on(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    Endpoint::new(config, server, socket, runtime)
}

/// A UDP socket bound to `addr`; for an IPv6 address, dual-stack if the host allows it.
fn client_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Not fatal: IPv4 peers then need the IPv4 fallback.
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4096u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((32u32 << 20).into())
        .receive_window((256u32 << 20).into())
        .send_window(256 << 20)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        // Masked rows are bulk data: on a path with a large MTU (loopback, jumbo frames) far
        // fewer, larger datagrams carry them. Discovery starts from the safe 1200 bytes and
        // only climbs as far as the path delivers (RFC 8899), so an Ethernet path stays at
        // ~1452.
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(MAX_UDP_PAYLOAD);
            m
        }))
        .max_idle_timeout(Some(
            Duration::from_secs(60)
                .try_into()
                .expect("60 s is a valid idle timeout"),
        ));
    Arc::new(t)
}

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
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let err = |e: rcgen::Error| TlsError::Config(e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
            path: dir.into(),
            message: e.to_string(),
        })?;
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
        let material = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            server_name: server_name.into(),
        };
        let write = |path: &Path, text: String| {
            std::fs::write(path, text).map_err(|e| TlsError::File {
                path: path.into(),
                message: e.to_string(),
            })
        };
        write(&material.ca, ca.pem())?;
        write(&material.cert, cert.pem())?;
        write(&material.key, key.serialize_pem())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&material.key, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| TlsError::File {
                    path: material.key.clone(),
                    message: e.to_string(),
                })?;
        }
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
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    /// A server endpoint on `addr` speaking `alpn`.
    pub fn server(&self, addr: SocketAddr, alpn: &[u8]) -> Result<Endpoint, TlsError> {
        let tls = self.server_config(alpn)?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport());
        std::net::UdpSocket::bind(addr)
            .and_then(|socket| endpoint_on(socket, Some(config)))
            .map_err(|e| TlsError::Bind {
                addr,
                message: e.to_string(),
            })
    }

    /// A client endpoint that trusts the cluster's CA and speaks `alpn`.
    pub fn client(&self, alpn: &[u8]) -> Result<Endpoint, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport());
        let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
        let any4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
        // Dual-stack where the host allows it, else IPv4.
        let mut endpoint = client_socket(any)
            .or_else(|_| client_socket(any4))
            .and_then(|socket| endpoint_on(socket, None))
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
/// `Ok(None)`: the stream ended cleanly before a frame began.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Malformed(format!(
                "stream ended inside a length prefix ({n} of 4 bytes)"
            )));
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(conn_err(e)),
    }
    let len = check_len(prefix, max)?;
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            FrameError::Malformed(format!("stream ended after {n} of {len} frame bytes"))
        }
        quinn::ReadExactError::ReadError(e) => conn_err(e),
    })?;
    Ok(Some(buf))
}

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
    read_frame(&mut recv, max).await?.ok_or_else(|| {
        FrameError::Connection("the peer closed the stream without an answer".into())
    })
}

/// The DER of the certificate the peer of `conn` presented (its first), if any.
pub fn peer_cert_der(conn: &Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| c.to_vec())
}
