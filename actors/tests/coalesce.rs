//! The coalescer on real QUIC (loopback): calls made together leave in one `Batch` frame and
//! each gets its own answer; a lone call leaves alone; a leader abandoned while gathering
//! answers the calls that joined it with an error and leaves the next call free to lead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use talaria_actors::Coalescer;
use talaria_net::{ClientAuth, TlsMaterial};
use talaria_wire::frame;
use talaria_wire::{Reply, Request};

const ALPN: &[u8] = b"talaria-test";

/// A `Call` frame of session `n` (no payload: the echo server does not read it).
fn call(n: u64) -> Arc<[u8]> {
    frame::encode::<_, ()>(
        &Request::Call {
            session: n,
            op: talaria_engine::OpId::LmHead,
            seq: n,
        },
        None,
    )
    .unwrap()
    .into()
}

/// An answer frame carrying `frame` back.
fn echo(frame: &[u8]) -> Vec<u8> {
    talaria_actors::ok_frame(0, frame)
}

#[test]
fn calls_made_together_share_a_frame_and_each_gets_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsMaterial::generate(dir.path(), "talaria-test").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = tls
            .server("127.0.0.1:0".parse().unwrap(), ALPN, ClientAuth::Anyone)
            .unwrap();
        let addr = server.local_addr().unwrap();
        // Frames received, and calls in them: a batch is answered call by call (echoes).
        let frames = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let (f, c) = (frames.clone(), calls.clone());
        tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (f, c) = (f.clone(), c.clone());
                tokio::spawn(async move {
                    let req = talaria_net::read_frame(&mut recv, 1 << 20)
                        .await
                        .unwrap()
                        .unwrap();
                    f.fetch_add(1, Ordering::SeqCst);
                    let answer = match frame::split::<Request>(&req).unwrap() {
                        (Request::Batch { calls }, payload) => {
                            let parts = frame::unpack(payload, calls as usize).unwrap();
                            c.fetch_add(parts.len(), Ordering::SeqCst);
                            let answers: Vec<Vec<u8>> = parts.iter().map(|p| echo(p)).collect();
                            talaria_actors::ok_frame(
                                0,
                                &frame::pack(answers.iter().map(Vec::as_slice)).unwrap(),
                            )
                        }
                        _ => {
                            c.fetch_add(1, Ordering::SeqCst);
                            echo(&req)
                        }
                    };
                    talaria_net::write_frame(&mut send, &answer).await.unwrap();
                    let _ = send.finish();
                });
            }
        });
        let client = tls.client(ALPN).unwrap();
        let conn = tls.connect(&client, addr).await.unwrap();
        let co = Coalescer::new(conn, 1 << 20);
        let answer_of = |a: Vec<u8>| -> Vec<u8> {
            let (reply, body): (Reply, &[u8]) = frame::split(&a).unwrap();
            assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
            body.to_vec()
        };

        // Eight calls made together: one frame, each call's own answer.
        let answers = futures::future::join_all((0..8).map(|n| co.call(call(n)))).await;
        for (n, a) in answers.into_iter().enumerate() {
            assert_eq!(answer_of(a.unwrap()), &call(n as u64)[..], "call {n}");
        }
        assert_eq!(
            (frames.load(Ordering::SeqCst), calls.load(Ordering::SeqCst)),
            (1, 8)
        );

        // A lone call leaves alone, as a plain frame.
        assert_eq!(answer_of(co.call(call(9)).await.unwrap()), &call(9)[..]);
        assert_eq!(
            (frames.load(Ordering::SeqCst), calls.load(Ordering::SeqCst)),
            (2, 9)
        );

        // More calls than a batch may carry: several frames, every call answered.
        let many = talaria_wire::MAX_BATCH_CALLS + 6;
        let answers =
            futures::future::join_all((0..many as u64).map(|n| co.call(call(100 + n)))).await;
        for (n, a) in answers.into_iter().enumerate() {
            assert_eq!(answer_of(a.unwrap()), &call(100 + n as u64)[..]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 9 + many);
        assert!(frames.load(Ordering::SeqCst) >= 4, "{frames:?}");

        // A leader dropped while it gathers (a deadline ran out): the call that joined it gets
        // an error, not a wait without end, and the next call leads a batch of its own.
        let mut leader = Box::pin(co.call(call(200)));
        let follower = co.call(call(201));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        let mut follower = Box::pin(follower);
        assert!(follower.as_mut().poll(&mut cx).is_pending());
        drop(leader);
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), follower)
            .await
            .expect("answered, not left waiting")
            .expect_err("its leader is gone");
        assert_eq!(e.error_type(), "connection");
        assert_eq!(answer_of(co.call(call(202)).await.unwrap()), &call(202)[..]);
    });
}
