//! Real QUIC on loopback, through the endpoints the cluster's processes use: a call whose
//! request is several datagrams is acknowledged by its answer, not by a datagram of its own.
//!
//! Regression: a port anyone may reach takes datagrams of at most 1472 bytes
//! (`UNTRUSTED_UDP_PAYLOAD`), so an agent's decode request to the coordinator (4.7 to 12.6 KB)
//! is four to nine datagrams. Asked by quinn's default to acknowledge every other ack-eliciting
//! datagram at once, the coordinator sent an ACK-only datagram back for nearly every call: one
//! more send on its side and one more wake-up on the agent's (`strace` of a cluster: 645
//! 40-byte datagrams among 1304 sent to the agent).

use std::net::SocketAddr;

use talaria_net::{ClientAuth, TlsMaterial};

const ALPN: &[u8] = b"talaria-test";
/// A decode request of the model's `down` op: 1536 values of 8 bytes, nine datagrams of 1472.
const REQUEST: usize = 1536 * 8;
/// Its answer: 576 values of 8 bytes.
const ANSWER: usize = 576 * 8;
const WARM_UP: u64 = 20;
const CALLS: u64 = 200;

#[test]
fn a_request_of_many_datagrams_is_acknowledged_by_its_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS material");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // A port anyone may reach, as the coordinator's agent port and the tenant port are.
        let server = tls
            .server("127.0.0.1:0".parse().unwrap(), ALPN, ClientAuth::Anyone)
            .expect("server endpoint");
        let addr: SocketAddr = server.local_addr().expect("server address");
        let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let _ = conn_tx.send(conn.clone());
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let frame = talaria_net::read_frame(&mut recv, REQUEST + 16).await;
                assert!(matches!(frame, Ok(Some(ref f)) if f.len() == REQUEST));
                talaria_net::write_frame(&mut send, &[3u8; ANSWER])
                    .await
                    .expect("answer");
                let _ = send.finish();
            }
        });

        let client = tls.client(ALPN).expect("client endpoint");
        let conn = tls.connect(&client, addr).await.expect("connect");
        let served = conn_rx.await.expect("the server's connection");
        let call = || async {
            let answer = talaria_net::request(&conn, &[5u8; REQUEST], ANSWER + 16)
                .await
                .expect("answer");
            assert_eq!(answer.len(), ANSWER);
        };
        for _ in 0..WARM_UP {
            call().await;
        }
        let (server0, client0) = (served.stats(), conn.stats());
        for _ in 0..CALLS {
            call().await;
        }
        let (server1, client1) = (served.stats(), conn.stats());

        let per_call = |a: u64, b: u64| (b - a) as f64 / CALLS as f64;
        let server_sent = per_call(server0.udp_tx.datagrams, server1.udp_tx.datagrams);
        let client_sent = per_call(client0.udp_tx.datagrams, client1.udp_tx.datagrams);
        // The request did cross as many datagrams (else this would test nothing).
        assert!(
            client_sent >= 9.0,
            "a request took {client_sent:.2} datagrams: the path was not Ethernet-sized"
        );
        // One datagram back a call, its answer, with the ACK riding in it. Before the fix: 2.0
        // (an ACK-only datagram, then the answer). The margin is for a loaded host, where an
        // answer may leave after the 25 ms the peer waits before an ACK of its own.
        assert!(
            server_sent <= 1.3,
            "the server sent {server_sent:.2} datagrams a call ({} ACK frames in {CALLS} calls)",
            server1.frame_tx.acks - server0.frame_tx.acks
        );
    });
}
