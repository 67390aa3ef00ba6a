//! What every process of a Talaria cluster shares at run time, and nothing more: serving framed
//! requests on QUIC streams (`serve_streams`), the answer frames and error replies every server
//! writes, the tenant API-key check, and the Prometheus metrics every binary exposes.
//!
//! Each process's own runtime lives in its binary's crate: the gpu-node's stage and shard
//! (`talaria_gpu_node::runtime`), the coordinator's router (`coordinator/src/router.rs`), the
//! cvm-agent's uplink, sessions and OpenAI API (`talaria_cvm_agent::{session, openai}`). So no
//! binary carries another process's actors.

mod coalesce;
mod doorway;
pub mod metrics;

pub use coalesce::{BatchLimits, Coalescer};
pub use doorway::{Doorway, Ticket};

use talaria_wire::frame::{self, FrameError};
use talaria_wire::{ErrorReply, Reply};

/// Whether `key` is one of the tenant's API keys, given their SHA-256. The key is hashed before
/// any comparison, so the time taken says nothing about how much of it matched.
pub fn key_accepted(keys: &[[u8; 32]], key: &str) -> bool {
    accepted_key(keys, key).is_some()
}

/// The SHA-256 of `key` when it is one of `keys`: who asks, for what is kept per key.
pub fn accepted_key(keys: &[[u8; 32]], key: &str) -> Option<[u8; 32]> {
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
    keys.contains(&digest).then_some(digest)
}

/// The message a panic carried (`panic!` with a literal or a formatted string), if it carried
/// one: what a thread that caught it, or a panic hook, can log.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

/// An answer frame carrying `payload` (already encoded).
pub fn ok_frame(compute_us: u64, payload: &[u8]) -> Vec<u8> {
    frame::encode_raw(&Reply::Ok { compute_us }, payload)
        .unwrap_or_else(|e| err_frame(&frame_error(&e)))
}

/// An answer frame carrying a typed error.
pub fn err_frame(e: &ErrorReply) -> Vec<u8> {
    // Encoding an enum of two strings into a Vec cannot fail.
    frame::encode::<_, ()>(&Reply::Err(e.clone()), None).unwrap_or_default()
}

/// The typed error of a frame problem.
pub fn frame_error(e: &FrameError) -> ErrorReply {
    ErrorReply::new(e.error_type(), e.to_string())
}

/// Serves every bidirectional stream of `conn` with `handle`: one request frame in, one answer
/// frame out, each read within `intake`'s bounds (this connection's: see
/// [`talaria_net::Intake::for_connection`]). Frames that cannot be read get a typed error
/// answer; the connection stays up.
pub async fn serve_streams<F, Fut>(conn: quinn::Connection, intake: talaria_net::Intake, handle: F)
where
    F: Fn(Vec<u8>) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = Vec<u8>> + 'static,
{
    let peer = conn.remote_address();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "connection closed: {e}");
                return;
            }
        };
        let (handle, intake) = (handle.clone(), intake.clone());
        actix_rt::spawn(async move {
            let answer = match talaria_net::read_frame_in(&mut recv, &intake).await {
                Ok(Some(frame)) => {
                    let answer = handle(frame).await;
                    // Taken last, when a large request's end has surely arrived: the stream is
                    // dropped (and would be stopped) only after the answer.
                    talaria_net::take_end(&mut recv);
                    answer
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%peer, error_type = e.error_type(), "refused a frame: {e}");
                    // Tell the peer to stop sending the rest of a refused frame.
                    let _ = recv.stop(0u32.into());
                    err_frame(&frame_error(&e))
                }
            };
            if let Err(e) = talaria_net::write_frame(&mut send, &answer).await {
                tracing::debug!(%peer, "answer not delivered: {e}");
                return;
            }
            let _ = send.finish();
        });
    }
}

/// Adds what `conn` lost of the datagrams this side sent, and its black-hole fallbacks, to
/// `lost` and `black_holes`, every second and once more when it closes.
pub async fn count_path_losses(
    conn: quinn::Connection,
    lost: &'static prometheus::IntCounter,
    black_holes: &'static prometheus::IntCounter,
) {
    let peer = conn.remote_address().to_string();
    let mut seen = PathSeen::default();
    // Exported (as 0) from the start, not at the first second's read.
    lost.inc_by(0);
    black_holes.inc_by(0);
    loop {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(1), conn.closed())
            .await
            .is_ok();
        let delta = seen.read(&conn, &peer);
        lost.inc_by(delta.lost);
        black_holes.inc_by(delta.black_holes);
        if closed {
            return;
        }
    }
}

/// A connection's path statistics as last read: what quinn counts of this side's sends (it
/// sees the sender's losses only, so each side reports its own).
#[derive(Debug, Default, Clone, Copy)]
pub struct PathSeen {
    lost: u64,
    black_holes: u64,
    mtu: u16,
}

/// What changed on a path since the last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathDelta {
    /// Datagrams this side sent that were declared lost since the last read.
    pub lost: u64,
    /// Black-hole fallbacks (to 1,200-byte datagrams) since the last read.
    pub black_holes: u64,
    /// The path's MTU now.
    pub mtu: u16,
}

impl PathSeen {
    /// Reads `conn`'s path: what changed since the last read. A fall of the MTU or a black-hole
    /// fallback (quinn's answer to lost large datagrams) is logged, naming `peer`.
    pub fn read(&mut self, conn: &quinn::Connection, peer: &str) -> PathDelta {
        let path = conn.stats().path;
        let delta = PathDelta {
            lost: path.lost_packets.saturating_sub(self.lost),
            black_holes: path.black_holes_detected.saturating_sub(self.black_holes),
            mtu: path.current_mtu,
        };
        if delta.black_holes > 0 || path.current_mtu < self.mtu {
            tracing::warn!(
                %peer,
                from = self.mtu,
                to = path.current_mtu,
                lost = path.lost_packets,
                black_holes = path.black_holes_detected,
                "the path now carries smaller datagrams: it dropped large ones"
            );
        }
        *self = PathSeen {
            lost: path.lost_packets,
            black_holes: path.black_holes_detected,
            mtu: path.current_mtu,
        };
        delta
    }
}

/// The cluster's TLS material as the topology names it: its files, or for a generated set,
/// the directory the launcher generated it into.
pub fn tls_material(
    topology: &talaria_topology::Topology,
    generated_dir: Option<&std::path::Path>,
) -> Result<talaria_net::TlsMaterial, String> {
    let (ca, cert, key) = match (&topology.tls, generated_dir) {
        (talaria_topology::TlsSource::Files { ca, cert, key }, _) => {
            (ca.clone(), cert.clone(), key.clone())
        }
        (talaria_topology::TlsSource::Generate, Some(dir)) => (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        ),
        (talaria_topology::TlsSource::Generate, None) => {
            return Err(
                "the topology's TLS material is generated by `talaria up`: pass --tls-dir".into(),
            );
        }
    };
    Ok(talaria_net::TlsMaterial {
        ca,
        cert,
        key,
        server_name: topology.server_name.clone(),
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    rss_bytes_of(std::process::id())
}

/// Resident memory of process `pid` in bytes (Linux; `None` elsewhere or when it is gone).
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn a_panic_message_is_read_from_literals_and_formatted_strings_only() {
        let caught = |f: fn()| std::panic::catch_unwind(f).expect_err("it panics");
        assert_eq!(
            panic_message(caught(|| panic!("a literal")).as_ref()),
            Some("a literal")
        );
        let n = 7;
        let formatted =
            std::panic::catch_unwind(move || panic!("formatted {n}")).expect_err("it panics");
        assert_eq!(panic_message(formatted.as_ref()), Some("formatted 7"));
        let other = caught(|| std::panic::panic_any(42u32));
        assert_eq!(panic_message(other.as_ref()), None);
    }
}
