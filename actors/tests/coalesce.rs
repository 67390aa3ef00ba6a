//! The coalescer on real QUIC (loopback): calls of one op made together leave in one `Batch`
//! frame and each gets its own answer; a lone call leaves alone; calls of two ops leave apart;
//! no batch passes the stage's request limit or the sender's answer limit; a leader abandoned
//! while gathering still sends the calls that joined it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use talaria_actors::{BatchLimits, Coalescer};
use talaria_engine::{BlockOp, OpId};
use talaria_net::{ClientAuth, TlsMaterial};
use talaria_wire::frame;
use talaria_wire::{Reply, Request};

const ALPN: &[u8] = b"talaria-test";

const OP: OpId = OpId::LmHead;

/// A `Call` frame of session `n` for `op`, with `pad` bytes of payload (the echo server does
/// not read it).
fn call_of(n: u64, op: OpId, pad: usize) -> Arc<[u8]> {
    let head = Request::Call {
        session: n,
        op,
        seq: n,
    };
    let mut f = frame::encode::<_, ()>(&head, None).unwrap();
    f.resize(f.len() + pad, 0);
    f.into()
}

fn call(n: u64) -> Arc<[u8]> {
    call_of(n, OP, 0)
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
        let largest = Arc::new(AtomicUsize::new(0));
        let (f, c, l) = (frames.clone(), calls.clone(), largest.clone());
        tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (f, c, l) = (f.clone(), c.clone(), l.clone());
                tokio::spawn(async move {
                    let req = talaria_net::read_frame(&mut recv, 1 << 20)
                        .await
                        .unwrap()
                        .unwrap();
                    f.fetch_add(1, Ordering::SeqCst);
                    l.fetch_max(req.len(), Ordering::SeqCst);
                    let answer = match frame::split::<Request>(&req).unwrap() {
                        (Request::Batch { calls }, payload) => {
                            let parts = frame::unpack(payload, calls as usize).unwrap();
                            c.fetch_add(parts.len(), Ordering::SeqCst);
                            let answers: Vec<Vec<u8>> = parts.iter().map(|p| echo(p)).collect();
                            frame::encode_packed(
                                &Reply::Ok { compute_us: 0 },
                                answers.iter().map(Vec::as_slice),
                            )
                            .unwrap()
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
        let limits = BatchLimits {
            request: 1 << 20,
            answer: 1 << 20,
        };
        let co = Coalescer::new(conn.clone(), limits);
        let answer_of = |a: Vec<u8>| -> Vec<u8> {
            let (reply, body): (Reply, &[u8]) = frame::split(&a).unwrap();
            assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
            body.to_vec()
        };

        // Eight calls made together: one frame, each call's own answer.
        let answers = futures::future::join_all((0..8).map(|n| co.call(call(n), OP, 64))).await;
        for (n, a) in answers.into_iter().enumerate() {
            assert_eq!(answer_of(a.unwrap()), &call(n as u64)[..], "call {n}");
        }
        assert_eq!(
            (frames.load(Ordering::SeqCst), calls.load(Ordering::SeqCst)),
            (1, 8)
        );

        // A lone call leaves alone, as a plain frame.
        assert_eq!(
            answer_of(co.call(call(9), OP, 64).await.unwrap()),
            &call(9)[..]
        );
        assert_eq!(
            (frames.load(Ordering::SeqCst), calls.load(Ordering::SeqCst)),
            (2, 9)
        );

        // More calls than a batch may carry: several frames, every call answered.
        let many = talaria_wire::MAX_BATCH_CALLS + 6;
        let answers =
            futures::future::join_all((0..many as u64).map(|n| co.call(call(100 + n), OP, 64)))
                .await;
        for (n, a) in answers.into_iter().enumerate() {
            assert_eq!(answer_of(a.unwrap()), &call(100 + n as u64)[..]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 9 + many);
        assert!(frames.load(Ordering::SeqCst) >= 4, "{frames:?}");

        // Calls of two ops made together: one frame each.
        let before = frames.load(Ordering::SeqCst);
        let qkv = OpId::Block {
            layer: 0,
            op: BlockOp::Qkv,
        };
        let answers = futures::future::join_all((0..6u64).map(|n| {
            let op = if n % 2 == 0 { OP } else { qkv };
            let f = call_of(300 + n, op, 0);
            let co = &co;
            async move { (co.call(f.clone(), op, 64).await, f) }
        }))
        .await;
        for (a, f) in answers {
            assert_eq!(answer_of(a.unwrap()), &f[..]);
        }
        assert_eq!(frames.load(Ordering::SeqCst) - before, 2);

        // A stage that reads requests of at most 10 000 bytes: calls of 3 000 bytes go three to
        // a batch at most (with their prefixes and the header); those that find it full go
        // alone. Every call is answered.
        let small = Coalescer::new(
            conn.clone(),
            BatchLimits {
                request: 10_000,
                answer: 1 << 20,
            },
        );
        let (f0, c0) = (frames.load(Ordering::SeqCst), calls.load(Ordering::SeqCst));
        let answers = futures::future::join_all(
            (0..9u64).map(|n| small.call(call_of(400 + n, OP, 3_000), OP, 64)),
        )
        .await;
        assert!(answers.into_iter().all(|a| a.is_ok()));
        assert_eq!(calls.load(Ordering::SeqCst) - c0, 9);
        assert_eq!(frames.load(Ordering::SeqCst) - f0, 1 + 6);
        assert!(largest.load(Ordering::SeqCst) <= 10_000, "{largest:?}");
        // Nor past what the sender reads of an answer: answers of 400 bytes at most, in a limit
        // of 1 000, go two to a batch (the others alone).
        let tight = Coalescer::new(
            conn.clone(),
            BatchLimits {
                request: 1 << 20,
                answer: 1_000,
            },
        );
        let f0 = frames.load(Ordering::SeqCst);
        let answers =
            futures::future::join_all((0..4u64).map(|n| tight.call(call(500 + n), OP, 400))).await;
        assert!(answers.into_iter().all(|a| a.is_ok()));
        assert_eq!(frames.load(Ordering::SeqCst) - f0, 1 + 2);

        // A leader dropped while it gathers (a deadline ran out): the call that joined it is
        // still sent and answered, and the next call leads a batch of its own.
        let mut leader = Box::pin(co.call(call(200), OP, 64));
        let follower = co.call(call(201), OP, 64);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        let mut follower = Box::pin(follower);
        assert!(follower.as_mut().poll(&mut cx).is_pending());
        drop(leader);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), follower)
            .await
            .expect("answered, not left waiting")
            .expect("sent without its leader");
        assert_eq!(answer_of(answer), &call(201)[..]);
        assert_eq!(
            answer_of(co.call(call(202), OP, 64).await.unwrap()),
            &call(202)[..]
        );
    });
}
