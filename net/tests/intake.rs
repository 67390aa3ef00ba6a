//! Real QUIC on loopback: what a server reading through an [`Intake`] lets a peer make it hold.
//! A frame that stalls before its last byte is refused when its deadline passes; a frame that
//! finds the budget taken by a stalled one waits for that deadline, and is read then; a limit
//! raised while serving lets larger frames in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use talaria_net::{ClientAuth, Intake, TlsMaterial};
use talaria_wire::frame::FrameError;

const ALPN: &[u8] = b"talaria-test";
const DEADLINE: Duration = Duration::from_millis(600);

/// Serves one connection: each stream's frame read through the connection's `intake`, the
/// outcome sent back as the error type (or `ok` and the frame's length).
async fn serve(server: quinn::Endpoint, intake: Intake) {
    let conn = server
        .accept()
        .await
        .expect("incoming")
        .await
        .expect("handshake");
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let intake = intake.clone();
        tokio::spawn(async move {
            let outcome = match talaria_net::read_frame_in(&mut recv, &intake).await {
                Ok(Some(f)) => format!("ok {}", f.len()),
                Ok(None) => "none".into(),
                Err(e) => e.error_type().to_string(),
            };
            let _ = recv.stop(0u32.into());
            let _ = talaria_net::write_frame(&mut send, outcome.as_bytes()).await;
            let _ = send.finish();
        });
    }
}

/// Sends `prefix_len` as a frame's length and `body` bytes of it (all of it, or fewer: then
/// the stream stalls), and returns the server's outcome and when it came.
async fn send(conn: &quinn::Connection, prefix_len: u32, body: usize) -> (String, Duration) {
    let t0 = Instant::now();
    let (mut tx, mut rx) = conn.open_bi().await.expect("stream");
    tx.write_all(&prefix_len.to_le_bytes())
        .await
        .expect("prefix");
    tx.write_all(&vec![1u8; body]).await.expect("body");
    let answer = talaria_net::read_frame(&mut rx, 1 << 10)
        .await
        .expect("an answer")
        .expect("a frame");
    drop(tx);
    (String::from_utf8(answer).expect("text"), t0.elapsed())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_stalled_frame_is_refused_at_its_deadline_and_holds_its_connections_budget_till_then() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS material");
    runtime().block_on(async {
        let server = tls
            .server("127.0.0.1:0".parse().unwrap(), ALPN, ClientAuth::Anyone)
            .expect("server endpoint");
        let addr: SocketAddr = server.local_addr().expect("server address");
        // Room for one 10 000-byte frame at a time on the connection.
        let intake = Intake::new(20_000, DEADLINE)
            .with_own_budget(15_000)
            .for_connection();
        tokio::spawn(serve(server, intake));
        let client = tls.client(ALPN).expect("client endpoint");
        let conn = tls.connect(&client, addr).await.expect("connect");

        // A whole frame is read.
        let (outcome, _) = send(&conn, 10_000, 10_000).await;
        assert_eq!(outcome, "ok 10000");
        // One frame stalls one byte short, holding 10 000 bytes of the budget; a second,
        // sent whole just after, finds no room: it waits until the first is refused at its
        // deadline, and is read then.
        let stalled = send(&conn, 10_000, 9_999);
        let waiting = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send(&conn, 10_000, 10_000).await
        };
        let ((stalled, t_stalled), (waiting, t_waiting)) = tokio::join!(stalled, waiting);
        assert_eq!(stalled, "deadline_exceeded");
        assert_eq!(waiting, "ok 10000");
        let early = Duration::from_millis(150);
        assert!(
            t_stalled >= DEADLINE - early && t_stalled < DEADLINE * 4,
            "refused after {t_stalled:?} (deadline {DEADLINE:?})"
        );
        assert!(
            t_waiting + Duration::from_millis(100) >= DEADLINE - early,
            "read after {t_waiting:?}: it did not wait for the stalled frame's deadline"
        );
        // The budget is whole again: a frame is read at once.
        let (outcome, t) = send(&conn, 10_000, 10_000).await;
        assert_eq!(outcome, "ok 10000");
        assert!(t < DEADLINE, "{t:?}");
        // Too large a frame is refused from its prefix, before its deadline.
        let (outcome, t) = send(&conn, 30_000, 0).await;
        assert_eq!(
            outcome,
            FrameError::TooLarge { len: 0, max: 0 }.error_type()
        );
        assert!(t < DEADLINE, "{t:?}");
    });
}

#[test]
fn a_raised_limit_lets_larger_frames_in_and_the_shared_budget_spans_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS material");
    runtime().block_on(async {
        let port = Intake::new(1_000, DEADLINE).with_shared_budget(15_000);
        let (a, b) = (port.for_connection(), port.for_connection());
        let mut addrs = Vec::new();
        for intake in [a.clone(), b.clone()] {
            let server = tls
                .server("127.0.0.1:0".parse().unwrap(), ALPN, ClientAuth::Anyone)
                .expect("server endpoint");
            addrs.push(server.local_addr().expect("server address"));
            tokio::spawn(serve(server, intake));
        }
        let client = tls.client(ALPN).expect("client endpoint");
        let (ca, cb) = (
            tls.connect(&client, addrs[0]).await.expect("connect a"),
            tls.connect(&client, addrs[1]).await.expect("connect b"),
        );
        assert_eq!(send(&ca, 10_000, 0).await.0, "frame_too_large");
        // Raising one connection's limit leaves the other's as it was.
        a.set_limit(20_000);
        assert_eq!(send(&ca, 10_000, 10_000).await.0, "ok 10000");
        assert_eq!(send(&cb, 10_000, 0).await.0, "frame_too_large");
        b.set_limit(20_000);
        // A frame stalled on one connection holds its bytes of the budget both share: what
        // fits beside it is read at once, what does not waits for its deadline.
        for (other_len, waits) in [(800, false), (10_000, true)] {
            let stalled = send(&ca, 10_000, 9_999);
            let other = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                send(&cb, other_len, other_len as usize).await
            };
            let ((stalled, _), (other, t)) = tokio::join!(stalled, other);
            assert_eq!(stalled, "deadline_exceeded");
            assert_eq!(other, format!("ok {other_len}"));
            let waited = t + Duration::from_millis(100) >= DEADLINE - Duration::from_millis(150);
            assert_eq!(
                waited, waits,
                "{other_len} bytes beside the stalled 10 000 of 15 000 read after {t:?}"
            );
        }
    });
}
