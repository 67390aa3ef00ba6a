//! Real QUIC on loopback, through the endpoints the cluster's processes use: concurrent large
//! answers on one connection after MTU discovery has found loopback's 64 KiB datagrams.
//!
//! Regression: quinn batched up to ten MTU-sized datagrams into one segmentation-offload send
//! without bounding their sum; the kernel refused the oversized batch with `EMSGSIZE` and
//! quinn-udp reported it sent. Every such batch was lost whole, so concurrent answers on one
//! connection stalled on probe timeouts, and black-hole detection dropped the path to 1,200-byte
//! datagrams. The synthetic load's four sessions ran at 0.35× one session.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use talaria_net::{ClientAuth, TlsMaterial};

const ALPN: &[u8] = b"talaria-test";
/// An LM-head answer's size (one row of 49,152 u64).
const ANSWER: usize = 393_216;

#[test]
fn concurrent_large_answers_lose_no_datagram_and_keep_the_mtu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS material");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server = tls
            .server("127.0.0.1:0".parse().unwrap(), ALPN, ClientAuth::Cluster)
            .expect("server endpoint");
        let addr: SocketAddr = server.local_addr().expect("server address");
        // Answers every stream with ANSWER bytes, and reports its side's statistics at the end.
        let served = tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let answers = conn.clone();
            let serving = tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = answers.accept_bi().await {
                    tokio::spawn(async move {
                        let frame = talaria_net::read_frame(&mut recv, 1 << 10).await;
                        assert!(matches!(frame, Ok(Some(_))), "request: {frame:?}");
                        talaria_net::write_frame(&mut send, &vec![7u8; ANSWER])
                            .await
                            .expect("answer");
                        let _ = send.finish();
                    });
                }
            });
            conn.closed().await;
            serving.abort();
            conn.stats()
        });

        // The cluster's own link (a coordinator's to a gpu-node): servers anyone may reach keep
        // a peer's datagrams to 1472 bytes (`UNTRUSTED_UDP_PAYLOAD`).
        let client = tls.cluster_client(ALPN).expect("client endpoint");
        let conn = tls.connect(&client, addr).await.expect("connect");
        // Discovery climbs to loopback's MTU within a few round trips.
        let t0 = Instant::now();
        while conn.stats().path.current_mtu < 60_000 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "MTU discovery did not climb"
            );
            talaria_net::request(&conn, b"ping", ANSWER + 16)
                .await
                .expect("warm-up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Rounds of eight concurrent requests on the one connection.
        for _ in 0..10 {
            let answers = futures::future::join_all(
                (0..8).map(|_| talaria_net::request(&conn, b"call", ANSWER + 16)),
            )
            .await;
            for a in answers {
                assert_eq!(a.expect("answer").len(), ANSWER);
            }
        }
        conn.close(0u32.into(), b"done");
        let stats = served.await.expect("server task");
        // The bug's signature: large datagrams lost, then the path's fallback to 1,200 bytes.
        assert_eq!(
            stats.path.black_holes_detected, 0,
            "the server's path fell back to small datagrams: {:?}",
            stats.path
        );
        assert!(
            stats.path.current_mtu >= 60_000,
            "the server's path MTU fell to {}",
            stats.path.current_mtu
        );
        // Loopback loses nothing unless a receive buffer overflows: where the kernel grants the
        // endpoints' 4 MiB buffers, no loss at all.
        if talaria_net::full_socket_buffers() {
            assert_eq!(
                stats.path.lost_packets, 0,
                "the server's answers lost datagrams on loopback: {:?}",
                stats.path
            );
        }
        assert!(stats.udp_tx.bytes > 80 * ANSWER as u64);
    });
}
