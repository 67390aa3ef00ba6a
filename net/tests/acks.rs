//! Real QUIC on loopback, through the endpoints the cluster's processes use: an agent's call to
//! the coordinator whose request is several datagrams is acknowledged by its answer, not by a
//! datagram of its own, and a fresh connection's first such request does not wait for an ACK.
//!
//! Regression: the coordinator's agent port takes datagrams of at most 1472 bytes
//! (`UNTRUSTED_UDP_PAYLOAD`), so an agent's decode request (4.7 to 12.6 KB) is four to nine
//! datagrams. Asked by quinn's default to acknowledge every other ack-eliciting datagram at once,
//! the coordinator sent an ACK-only datagram back for nearly every call: one more send on its side
//! and one more wake-up on the agent's (`strace` of a cluster: 645 40-byte datagrams among 1304
//! sent to the agent).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use talaria_net::{ClientAuth, TenantIdentity, TlsMaterial};

const ALPN: &[u8] = b"talaria-test";
/// A decode request of the model's `down` op: 1536 values of 8 bytes, nine datagrams of 1472.
const REQUEST: usize = 1536 * 8;
/// An answer small enough to be one datagram on any path.
const ANSWER: usize = 512;
const WARM_UP: u64 = 20;
const CALLS: u64 = 200;
const FRESH: usize = 8;
/// Most of the 25 ms a peer may hold an ACK back.
const WAITED: Duration = Duration::from_millis(20);

#[test]
fn an_agents_request_of_many_datagrams_is_acknowledged_by_its_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS material");
    let identity = TenantIdentity::generate("agent", &[]).expect("agent identity");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // As the coordinator's agent port: anyone holding a key may connect.
        let server = tls
            .server(
                "127.0.0.1:0".parse().unwrap(),
                ALPN,
                ClientAuth::AnyCertificate,
            )
            .expect("server endpoint");
        let addr: SocketAddr = server.local_addr().expect("server address");
        // Answers every stream of every connection; hands each connection to the test.
        let (conns_tx, mut conns) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let conn = incoming.await.expect("handshake");
                let _ = conns_tx.send(conn.clone());
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let frame = talaria_net::read_frame(&mut recv, REQUEST + 16).await;
                        assert!(matches!(frame, Ok(Some(_))), "{frame:?}");
                        // As the coordinator's `serve_streams` does: no STOP_SENDING after.
                        talaria_net::take_end(&mut recv);
                        talaria_net::write_frame(&mut send, &[3u8; ANSWER])
                            .await
                            .expect("answer");
                        let _ = send.finish();
                    }
                });
            }
        });
        let call = |conn: &quinn::Connection, bytes: usize| {
            let conn = conn.clone();
            async move {
                let answer = talaria_net::request(&conn, &vec![5u8; bytes], ANSWER + 16)
                    .await
                    .expect("answer");
                assert_eq!(answer.len(), ANSWER);
            }
        };

        // Datagrams the server sends a call, over CALLS calls after a warm-up, from a client
        // made by `client`.
        let mut per_call = async |client: quinn::Endpoint| {
            let conn = tls.connect(&client, addr).await.expect("connect");
            let served = conns.recv().await.expect("the server's connection");
            for _ in 0..WARM_UP {
                call(&conn, REQUEST).await;
            }
            let (server0, client0) = (served.stats(), conn.stats());
            for _ in 0..CALLS {
                call(&conn, REQUEST).await;
            }
            let (server1, client1) = (served.stats(), conn.stats());
            let sent = |a: u64, b: u64| (b - a) as f64 / CALLS as f64;
            let client_sent = sent(client0.udp_tx.datagrams, client1.udp_tx.datagrams);
            // The request did cross as many datagrams (else this would test nothing).
            assert!(
                client_sent >= 9.0,
                "a request took {client_sent:.2} datagrams: the path was not Ethernet-sized"
            );
            sent(server0.udp_tx.datagrams, server1.udp_tx.datagrams)
        };

        // The agent's client (its identity, dialling the coordinator): one datagram back a
        // call, the answer, with the ACK riding in it. The margin is for a loaded host, where
        // an answer may leave after the 25 ms the peer waits before an ACK of its own.
        let agent = per_call(identity.client(&tls, ALPN).expect("agent client")).await;
        assert!(
            agent <= 1.3,
            "the server sent {agent:.2} datagrams a call to the agent's client"
        );
        // The control, a client with quinn's default (the cluster's own, presenting its
        // certificate): an ACK-only datagram, then the answer.
        let default = per_call(tls.cluster_client(ALPN).expect("cluster client")).await;
        assert!(
            default >= 1.7,
            "with quinn's default the server sent {default:.2} datagrams a call: the test no \
             longer sees the ACKs it is about"
        );

        // A fresh connection's first request of nine datagrams, once MTU discovery is done
        // (small pings: the congestion window does not grow while the sender has
        // less to send than it allows). With quinn's initial window (12 000 bytes) eight of the
        // nine fly, the server waits 25 ms for more before it acknowledges them, and the ninth
        // waits for that ACK: two ACK frames back, one alone and one with the answer.
        let client = identity.client(&tls, ALPN).expect("agent client");
        let mut waited = 0;
        for _ in 0..FRESH {
            let conn = tls.connect(&client, addr).await.expect("connect");
            let served = conns.recv().await.expect("the server's connection");
            let t0 = Instant::now();
            while conn.stats().path.current_mtu < 1472 {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "MTU discovery did not climb"
                );
                call(&conn, 16).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Waiting shows twice: an ACK of its own before the answer's, and the 25 ms.
            let before = served.stats().frame_tx.acks;
            let t0 = Instant::now();
            call(&conn, REQUEST).await;
            if served.stats().frame_tx.acks - before > 1 && t0.elapsed() >= WAITED {
                waited += 1;
            }
            conn.close(0u32.into(), b"done");
        }
        assert!(
            waited <= 1,
            "{waited} of {FRESH} fresh connections' first request waited for an ACK"
        );
    });
}
