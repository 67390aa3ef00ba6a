//! The cluster as real processes on loopback: `talaria up` starts two gpu-node stages, the
//! coordinator and a cvm-agent; tenants and raw peers talk to them over real QUIC.

use std::process::Command;

use talaria_engine::{BlockOp, OpId, SamplingParams};
use talaria_gpu_node::PlainEngine;
use talaria_tests::cluster::{
    LocalCluster, RawPeer, Who, ask_agent, bin, metric, rss_bytes, scrape, topology,
};
use talaria_tests::{golden_cases, ids, plain_greedy, real_model};
use talaria_wire::{
    BasisSpec, MaskedCall, Prompt, Reply, Request, SetupRequest, TenantRequest, Tensor,
};

const STAGES: &[(&str, &str, bool)] = &[("stage-0", "0-14", false), ("stage-1", "15-29", true)];

fn greedy(prompt: Prompt, max_tokens: usize) -> TenantRequest {
    TenantRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: false,
        stop: Vec::new(),
        cache_salt: None,
    }
}

/// Generates through the agent of `tenant` with the library client.
fn ask(cluster: &LocalCluster, tenant: &str, req: &TenantRequest) -> Result<Vec<u32>, String> {
    ask_agent(
        &cluster.agent_tls(tenant),
        cluster.topology().agent(tenant).unwrap().listen,
        &cluster.api_key(tenant),
        req,
    )
}

fn op(layer: usize) -> OpId {
    OpId::Block {
        layer,
        op: BlockOp::AttnOut,
    }
}

#[test]
fn the_cluster_answers_like_the_plain_engine_and_refuses_bad_input_per_request() {
    let model = real_model();
    let cluster = LocalCluster::start(&topology(&model, STAGES, &["tenant-a"]));
    let topo = cluster.topology();
    let fixtures = talaria_tests::repo_root().join("attestation/fixtures");

    // 1. Through the CLI, the greedy ids of the golden prompts equal the reference's (which the
    //    plain engine reproduces: tests/real_model.rs).
    let cases = golden_cases();
    for case in cases.iter().take(3) {
        let prompt_ids: Vec<String> = case.prompt_ids.iter().map(|i| i.to_string()).collect();
        let out = Command::new(bin("talaria"))
            .args([
                "generate",
                "--engine",
                "cluster",
                "--allow-insecure-agent",
                "--json",
            ])
            .arg("--prompt-ids")
            .arg(prompt_ids.join(","))
            .args(["--max-tokens", &case.max_tokens.to_string()])
            .arg("--cluster-dir")
            .arg(cluster.run_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&json["ids"]), case.ids, "prompt {}", case.name);
        assert_eq!(json["engine"], "cluster");
        let latency = &json["latency"];
        assert!(
            latency["gpu_compute_s"].as_f64().unwrap() > 0.0,
            "{latency}"
        );
        assert!(latency["calls"].as_u64().unwrap() >= 121, "{latency}");
    }

    // 2. A chat prompt as text: the agent tokenizes and templates it like the plain engine.
    let mut plain = PlainEngine::load(&model).unwrap();
    let text = "What is the capital of France?";
    let prompt_ids = plain
        .tokenizer
        .encode(&talaria_engine::chat_prompt(&[
            talaria_engine::ChatMessage {
                role: "user".into(),
                content: text.into(),
            },
        ]))
        .unwrap();
    let want = plain_greedy(&mut plain, prompt_ids, 16);
    let chat = greedy(
        Prompt::Text {
            text: text.into(),
            chat: true,
        },
        16,
    );
    assert_eq!(ask(&cluster, "tenant-a", &chat).unwrap(), want);

    // 2b. The conversation cache's benchmark, short: the next turn of a chat reuses the first
    //     turn's keys and values, and answers what the same turn run cold answers.
    let out = Command::new(bin("talaria"))
        .args(["bench-chat", "--allow-insecure-agent"])
        .args(["--history-tokens", "100", "--gen-tokens", "4"])
        .arg("--model-file")
        .arg(&model)
        .arg("--cluster-dir")
        .arg(cluster.run_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bench: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = bench["first"]["prompt_tokens"].as_u64().unwrap();
    assert!(first >= 100, "{bench}");
    assert_eq!(bench["first"]["cached_tokens"], 0, "{bench}");
    assert!(
        bench["second_warm"]["cached_tokens"].as_u64().unwrap() >= first,
        "{bench}"
    );
    assert_eq!(bench["second_cold"]["cached_tokens"], 0, "{bench}");
    assert_eq!(bench["same_answer"], true, "{bench}");

    // 3. Only the cluster's own processes reach a gpu-node: a peer with a key of its own (an
    //    agent, a tenant) or with none cannot open a session there, so it can neither fetch a
    //    stage's `R_pub = W` nor close anyone's session.
    let tls = cluster.tls();
    for who in [Who::OwnKey, Who::Nobody] {
        let open = Request::StageOpen {
            session: 7,
            tenant: "tenant-a".into(),
        };
        if let Ok(outsider) = RawPeer::try_connect_as(&tls, topo.stages[0].listen, who) {
            let answer = outsider.request::<()>(&open, None);
            assert!(answer.is_err(), "a stage served an outsider: {answer:?}");
        }
    }
    // Each gpu-node serves its own layers and refuses the others'.
    for (i, stage) in topo.stages.iter().enumerate() {
        let peer = RawPeer::connect(&tls, stage.listen);
        let session = 1_000_000 + i as u64;
        let open = Request::StageOpen {
            session,
            tenant: "probe".into(),
        };
        assert!(matches!(
            peer.request::<()>(&open, None).unwrap().0,
            Reply::Ok { .. }
        ));
        for layer in [0, 14, 15, 29] {
            let req = SetupRequest {
                session,
                op: op(layer),
                basis: BasisSpec::Identity,
                f64: false,
                integer: false,
            };
            let head = Request::Setup {
                session,
                op: req.op,
            };
            let answer = peer.request(&head, Some(&req)).unwrap().0;
            if stage.owns_layer(layer) {
                assert!(
                    matches!(answer, Reply::Ok { .. }),
                    "{} layer {layer}: {answer:?}",
                    stage.name
                );
            } else {
                let Reply::Err(e) = answer else {
                    panic!("{} served layer {layer}", stage.name)
                };
                assert_eq!(
                    e.error_type, "layer_not_owned",
                    "{} layer {layer}",
                    stage.name
                );
            }
        }
        // The LM head lives on one stage only.
        let head_req = SetupRequest {
            session,
            op: OpId::LmHead,
            basis: BasisSpec::Identity,
            f64: false,
            integer: false,
        };
        let answer = peer
            .request(
                &Request::Setup {
                    session,
                    op: OpId::LmHead,
                },
                Some(&head_req),
            )
            .unwrap()
            .0;
        assert_eq!(
            matches!(answer, Reply::Ok { .. }),
            stage.lm_head,
            "{}: {answer:?}",
            stage.name
        );
        batch_frames_are_answered_call_by_call(&peer, session, stage);
        let rss = rss_bytes(cluster.pid(&stage.name));
        eprintln!("{}: RSS {:.0} MB", stage.name, rss as f64 / 1e6);
    }
    eprintln!(
        "agent: RSS {:.0} MB",
        rss_bytes(cluster.pid("agent-tenant-a")) as f64 / 1e6
    );
    eprintln!(
        "coordinator: RSS {:.0} MB",
        rss_bytes(cluster.pid("coordinator")) as f64 / 1e6
    );

    // 4. Bad input on the coordinator while a good session runs: each bad request gets its
    //    typed error, and the good session's answer is unharmed.
    let good = {
        let cluster_tls = cluster.agent_tls("tenant-a");
        let key = cluster.api_key("tenant-a");
        let addr = topo.agent("tenant-a").unwrap().listen;
        let req = greedy(Prompt::Ids(cases[0].prompt_ids.clone()), 32);
        std::thread::spawn(move || ask_agent(&cluster_tls, addr, &key, &req))
    };
    let intruder = RawPeer::connect_as(&tls, topo.coordinator, Who::OwnKey);
    let bystander = RawPeer::connect_as(&tls, topo.coordinator, Who::OwnKey);
    let insecure = talaria_wire::frame::encode::<_, ()>(
        &talaria_attestation::Evidence::Insecure {
            reason: "test".into(),
        },
        None,
    )
    .unwrap();
    let hello_with = |tenant: &str, evidence: &[u8], key: Vec<u8>| Request::Hello {
        tenant: tenant.into(),
        agent: "test".into(),
        evidence: evidence.to_vec(),
        key,
    };
    let hello = |tenant: &str, evidence: &[u8]| hello_with(tenant, evidence, intruder.cert_der());
    let challenge = |peer: &RawPeer| {
        assert!(matches!(
            peer.request::<()>(&Request::Challenge, None).unwrap().0,
            Reply::Ok { .. }
        ))
    };
    // Before Hello nothing is served; Hello needs a fresh Challenge first.
    let e = intruder.refusal::<()>(&Request::OpenSession, None);
    assert_eq!(e.error_type, "not_admitted");
    let e = intruder.refusal::<()>(&hello("tenant-a", &insecure), None);
    assert_eq!(e.error_type, "attestation_binding");
    // A real SEV-SNP report, for which this coordinator has no AMD root provisioned, is refused.
    let snp = talaria_wire::frame::encode::<_, ()>(
        &talaria_attestation::Evidence::Snp {
            report: talaria_tests::hex_file(&fixtures.join("report_milan.hex")),
            vcek_der: std::fs::read(fixtures.join("vcek_milan.der")).unwrap(),
        },
        None,
    )
    .unwrap();
    challenge(&intruder);
    let e = intruder.refusal::<()>(&hello("tenant-a", &snp), None);
    assert_eq!(e.error_type, "attestation_provisioning", "{e}");
    // Garbage evidence is a typed refusal too.
    challenge(&intruder);
    let e = intruder.refusal::<()>(&hello("tenant-a", &[0xff, 0xff]), None);
    assert_eq!(e.error_type, "attestation_malformed", "{e}");
    // A tenant the topology does not name is refused, even where insecure agents are allowed.
    challenge(&intruder);
    let e = intruder.refusal::<()>(&hello("tenant-zzz", &insecure), None);
    assert_eq!(e.error_type, "unknown_tenant", "{e}");
    assert!(!e.message.contains("tenant-zzz"), "{e}");
    // The attested key must be the certificate this connection presented: a Hello naming
    // another key (a relayed one) is refused, even for an insecure agent.
    challenge(&intruder);
    let e = intruder.refusal::<()>(
        &hello_with("tenant-a", &insecure, bystander.cert_der()),
        None,
    );
    assert_eq!(e.error_type, "attestation_binding", "{e}");
    // This topology allows insecure agents: with a fresh challenge each connection is admitted
    // as the topology's tenant, binding its own key.
    for peer in [&intruder, &bystander] {
        challenge(peer);
        let own = hello_with("tenant-a", &insecure, peer.cert_der());
        assert!(matches!(
            peer.request::<()>(&own, None).unwrap().0,
            Reply::Ok { .. }
        ));
    }
    // A tenant holds at most its cap of open sessions; closing one makes room again. (The
    // tenant's own agent may hold one of them: its good session runs meanwhile.)
    let try_open = |peer: &RawPeer| -> Result<u64, talaria_wire::ErrorReply> {
        match peer.request::<()>(&Request::OpenSession, None).unwrap() {
            (Reply::Ok { .. }, payload) => Ok(talaria_wire::frame::body(&payload).unwrap()),
            (Reply::Err(e), _) => Err(e),
        }
    };
    let open = |peer: &RawPeer| try_open(peer).unwrap();
    let close = |peer: &RawPeer, session: u64| {
        let (reply, _) = peer
            .request::<()>(&Request::CloseSession { session }, None)
            .unwrap();
        assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
    };
    let cap = talaria_topology::DEFAULT_MAX_SESSIONS;
    let mut mine = Vec::new();
    let e = loop {
        match try_open(&intruder) {
            Ok(s) => mine.push(s),
            Err(e) => break e,
        }
        assert!(mine.len() <= cap, "more than {cap} sessions open");
    };
    assert_eq!(e.error_type, "too_many_sessions", "{e}");
    assert!(
        mine.len() + 1 >= cap,
        "{} sessions before the cap",
        mine.len()
    );
    // Session ids are random: none is guessable from another.
    assert!(mine.iter().all(|&s| s > 1 << 20), "{mine:?}");
    close(&intruder, mine[0]);
    let again = open(&intruder);
    for session in mine[1..].iter().copied().chain([again]) {
        close(&intruder, session);
    }
    // Garbage: a length prefix and bytes that decode as no request.
    let (reply, _) = intruder
        .send_raw(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    assert!(
        matches!(&reply, Reply::Err(e) if e.error_type == "malformed_frame"),
        "{reply:?}"
    );
    // A length prefix over the limit is refused before its body is read.
    let mut oversize = (u32::MAX).to_le_bytes().to_vec();
    oversize.extend([0u8; 1024]);
    let (reply, _) = intruder.send_raw(&oversize).unwrap();
    assert!(
        matches!(&reply, Reply::Err(e) if e.error_type == "frame_too_large"),
        "{reply:?}"
    );
    // A call for a session that does not exist.
    let call = MaskedCall {
        session: 424_242,
        seq: 1,
        op: op(3),
        x: Tensor::F32 {
            rows: 1,
            cols: 576,
            data: vec![0.5; 576],
        },
    };
    let head = Request::Call {
        session: call.session,
        op: call.op,
        seq: 1,
    };
    assert_eq!(
        intruder.refusal(&head, Some(&call)).error_type,
        "unknown_session"
    );
    // Another connection's session reads as unknown too.
    let (reply, payload) = bystander
        .request::<()>(&Request::OpenSession, None)
        .unwrap();
    assert!(matches!(reply, Reply::Ok { .. }));
    let theirs: u64 = talaria_wire::frame::body(&payload).unwrap();
    let steal = MaskedCall {
        session: theirs,
        ..call.clone()
    };
    let head = Request::Call {
        session: theirs,
        op: steal.op,
        seq: 1,
    };
    assert_eq!(
        intruder.refusal(&head, Some(&steal)).error_type,
        "unknown_session"
    );
    // The owner gets a shape error for a wrong-width tensor, typed, from the gpu-node.
    let wrong = MaskedCall {
        session: theirs,
        x: Tensor::F32 {
            rows: 1,
            cols: 5,
            data: vec![1.0; 5],
        },
        ..call.clone()
    };
    let e = bystander.refusal(&head, Some(&wrong));
    assert_eq!(e.error_type, "shape", "{e}");
    // A batch frame is the coordinator's to send: an agent's would carry calls past the check
    // that their sessions are its own.
    let smuggled = talaria_wire::frame::encode(&head, Some(&steal)).unwrap();
    let mut batch =
        talaria_wire::frame::encode_packed(&Request::Batch { calls: 1 }, [&smuggled[..]]).unwrap();
    batch.splice(0..0, (batch.len() as u32).to_le_bytes());
    let (reply, _) = intruder.send_raw(&batch).unwrap();
    assert!(
        matches!(&reply, Reply::Err(e) if e.error_type == "unexpected_request"),
        "{reply:?}"
    );
    // A header and a payload that disagree.
    let e = bystander.refusal(
        &Request::Call {
            session: theirs,
            op: op(4),
            seq: 1,
        },
        Some(&steal),
    );
    assert_eq!(e.error_type, "bad_request", "{e}");

    let good = good.join().unwrap().expect("the good session completes");
    assert_eq!(good, cases[0].ids);
    drop((intruder, bystander));

    // 5. The cluster is still healthy afterwards.
    let again = ask(&cluster, "tenant-a", &chat).unwrap();
    assert_eq!(again, want);

    // 6. The tenant verifies the agent before sending anything: an agent without SEV-SNP
    //    hardware is refused unless the tenant opts in.
    let verify = |extra: &[&str]| {
        Command::new(bin("talaria"))
            .arg("verify")
            .args(extra)
            .arg("--cluster-dir")
            .arg(cluster.run_dir())
            .output()
            .unwrap()
    };
    let out = verify(&[]);
    assert!(!out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["trusted"], false);
    assert_eq!(json["error_type"], "attestation_required");
    let out = verify(&["--allow-insecure-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json["trusted"].clone(), json["insecure"].clone()),
        (true.into(), true.into())
    );
    // A tenant that expects a measured SEV-SNP image does not send its prompt to this agent.
    let out = Command::new(bin("talaria"))
        .args([
            "generate", "--engine", "cluster", "--prompt", "secret", "--json",
        ])
        .arg("--cluster-dir")
        .arg(cluster.run_dir())
        .arg("--ark")
        .arg(fixtures.join("ark.pem"))
        .arg("--ask")
        .arg(fixtures.join("ask.pem"))
        .args(["--measurement", &"ab".repeat(48)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not trusted") && err.contains("insecure"),
        "{err}"
    );
}

/// A `Batch` frame of calls to `stage`, as the coordinator packs them, from a peer with the
/// cluster's certificate that opened `session` there: each call is admitted and answered on its
/// own, in order, and a batch that cannot be read is refused whole, leaving the stage serving.
fn batch_frames_are_answered_call_by_call(
    peer: &RawPeer,
    session: u64,
    stage: &talaria_topology::Stage,
) {
    use talaria_wire::frame;
    let layer = if stage.owns_layer(0) { 0 } else { 15 };
    let other = if stage.owns_layer(0) { 15 } else { 0 };
    let call_frame = |session: u64, layer: usize, cols: usize| {
        let call = MaskedCall {
            session,
            seq: 9,
            op: op(layer),
            x: Tensor::U64 {
                rows: 1,
                cols,
                data: (0..cols as u64)
                    .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .collect(),
            },
        };
        let head = Request::Call {
            session,
            op: call.op,
            seq: 9,
        };
        frame::encode(&head, Some(&call)).unwrap()
    };
    let prefixed = |body: Vec<u8>| {
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend(body);
        bytes
    };
    let good = call_frame(session, layer, 576);
    let (reply, alone) = peer.send_raw(&prefixed(good.clone())).unwrap();
    assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
    let opens = frame::encode::<_, ()>(
        &Request::StageOpen {
            session: 31_337,
            tenant: "smuggled".into(),
        },
        None,
    )
    .unwrap();
    let calls: Vec<(Vec<u8>, Option<&str>)> = vec![
        (good.clone(), None),
        (call_frame(424_242, layer, 576), Some("unknown_session")),
        (opens, Some("unexpected_request")),
        (vec![0xff; 4], Some("malformed_frame")),
        (call_frame(session, layer, 5), Some("shape")),
        (call_frame(session, other, 576), Some("layer_not_owned")),
        (good.clone(), None),
    ];
    let head = Request::Batch {
        calls: calls.len() as u32,
    };
    let batch = frame::encode_packed(&head, calls.iter().map(|(f, _)| &f[..])).unwrap();
    let (reply, payload) = peer.send_raw(&prefixed(batch)).unwrap();
    assert!(
        matches!(reply, Reply::Ok { .. }),
        "{}: {reply:?}",
        stage.name
    );
    let answers = frame::unpack(&payload, calls.len()).unwrap();
    for ((_, want), answer) in calls.iter().zip(&answers) {
        let (reply, body): (Reply, &[u8]) = frame::split(answer).unwrap();
        match (want, reply) {
            // Served in a batch, the product is the one served alone, bit for bit.
            (None, Reply::Ok { .. }) => assert_eq!(body, &alone[..], "{}", stage.name),
            (Some(want), Reply::Err(e)) => assert_eq!(&e.error_type, want, "{}", stage.name),
            (want, reply) => panic!("{}: {reply:?}, expected {want:?}", stage.name),
        }
    }
    // The StageOpen inside the batch opened nothing.
    let e = peer.refusal(
        &Request::Call {
            session: 31_337,
            op: op(layer),
            seq: 1,
        },
        Some(&MaskedCall {
            session: 31_337,
            seq: 1,
            op: op(layer),
            x: Tensor::U64 {
                rows: 1,
                cols: 576,
                data: vec![1; 576],
            },
        }),
    );
    assert_eq!(e.error_type, "unknown_session", "{}", stage.name);
    // A batch that says more calls than it holds, or more than a batch may carry: refused whole.
    for (count, frames) in [(3, 2), (65, 65)] {
        let bad = frame::encode_packed(
            &Request::Batch { calls: count },
            std::iter::repeat_n(&good[..], frames),
        )
        .unwrap();
        let (reply, _) = peer.send_raw(&prefixed(bad)).unwrap();
        assert!(
            matches!(&reply, Reply::Err(e) if e.error_type == "malformed_frame"),
            "{}: {reply:?}",
            stage.name
        );
    }
    let (reply, again) = peer.send_raw(&prefixed(good)).unwrap();
    assert!(
        matches!(reply, Reply::Ok { .. }) && again == alone,
        "{reply:?}"
    );
}

#[test]
fn a_cluster_in_the_integer_mode_answers_like_the_plain_engine() {
    let model = real_model();
    let text = topology(&model, STAGES, &["tenant-i"]) + "[remo]\nprecision = \"int\"\n";
    let cluster = LocalCluster::start_with(&text, &["--tap", "{dir}/tap"]);
    let case = &golden_cases()[0];
    let got = ask(
        &cluster,
        "tenant-i",
        &greedy(Prompt::Ids(case.prompt_ids.clone()), case.max_tokens),
    )
    .unwrap();
    assert_eq!(got, case.ids, "prompt {}", case.name);
    // Each stage's tap holds what that gpu-node saw: uint64 residues, and besides the values
    // whose session it was, when each call arrived and how large its frame was.
    for stage in ["stage-0", "stage-1"] {
        let path = cluster
            .dir
            .path()
            .join("tap")
            .join(stage)
            .join("index.json");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let events = index["events"].as_array().unwrap();
        // Two sessions of the tenant: the agent's warm-up (set-ups, no call) and the request.
        let opens: Vec<_> = events.iter().filter(|e| e["kind"] == "open").collect();
        assert_eq!(opens.len(), 2, "{stage}: {opens:?}");
        assert!(opens.iter().all(|o| o["tenant"] == "tenant-i"), "{stage}");
        let open = opens[1];
        // Every set-up was the warm-up's: the request's session set nothing up.
        let setups: Vec<_> = events.iter().filter(|e| e["kind"] == "setup").collect();
        // A stage of 15 layers, the LM head on stage-1.
        let ops = 4 * 15 + usize::from(stage == "stage-1");
        assert_eq!(setups.len(), ops, "{stage}");
        assert!(
            setups.iter().all(|s| s["session"] == opens[0]["session"]),
            "{stage}: {setups:?}"
        );
        let calls: Vec<_> = events.iter().filter(|e| e["kind"] == "call").collect();
        // One call per op per pass.
        assert!(
            calls.len() >= ops && calls.len() % ops == 0,
            "{stage}: {} calls",
            calls.len()
        );
        let mut last = 0;
        for c in &calls {
            assert_eq!(c["session"], open["session"], "{stage}: {c}");
            assert_eq!(c["dtype"], "uint64", "{stage}: {c}");
            let values = c["rows"].as_u64().unwrap() * c["cols"].as_u64().unwrap();
            let bytes = c["frame_bytes"].as_u64().unwrap();
            assert!(
                bytes >= 8 * values && bytes < 8 * values + 256,
                "{stage}: {c}"
            );
            let t = c["t_us"].as_u64().unwrap();
            assert!(t >= last, "{stage}: arrival times go back: {c}");
            last = t;
        }
    }
    // With one session live, each stage computed its calls on its event loop (no hand-off to
    // the shard's worker and back), and only its calls.
    for stage in &cluster.topology().stages {
        let text = scrape(stage.metrics.unwrap());
        let calls = metric(&text, "talaria_stage_calls_total");
        let on_loop = metric(&text, "talaria_stage_event_loop_calls_total");
        eprintln!(
            "{}: {on_loop} of {calls} calls on the event loop",
            stage.name
        );
        assert!(
            on_loop > 0.0 && on_loop <= calls,
            "{}: {on_loop} of {calls} calls on the event loop",
            stage.name
        );
    }
    // Each stage loaded the integer form of its own layers.
    for stage in ["stage-0", "stage-1"] {
        let log = std::fs::read_to_string(cluster.run_dir().join(format!("logs/{stage}.log")))
            .unwrap_or_default();
        assert!(log.contains("integer weights loaded"), "{stage}: {log}");
    }
}

#[test]
fn a_bad_topology_is_refused_with_key_paths_before_anything_starts() {
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    let bad = topology(
        &model,
        &[("a", "0-20", false), ("b", "18-28", true)],
        &["t"],
    )
    .replace(
        "layers = \"0-20\"",
        "layers = \"0-20\"\nbackend = \"tpu:0\"",
    );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(bin("talaria"))
        .args(["up", "--topology"])
        .arg(&path)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage[0].backend"), "{err}");
    assert!(
        err.contains("stage[1].layers") && err.contains("18-20"),
        "{err}"
    );
    // Nothing was started.
    assert!(!dir.path().join("run/logs").exists(), "{err}");
    // Coverage is checked against the model once the file parses.
    let gap = topology(
        &model,
        &[("a", "0-10", false), ("b", "12-29", true)],
        &["t"],
    );
    // `talaria up` on `text`, which must fail: what it said.
    let refused = |text: String| -> String {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin("talaria"))
            .args(["up", "--topology"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(gap);
    assert!(err.contains("no stage serves layer(s) 11"), "{err}");
    // The model's name is in every event an agent streams: the cloud's topology may not stretch
    // it to move where the padding's bucket overflows.
    let long = dir.path().join(format!("{}.gguf", "m".repeat(65)));
    std::os::unix::fs::symlink(&model, &long).unwrap();
    let accented = dir.path().join("modèle.gguf");
    std::os::unix::fs::symlink(&model, &accented).unwrap();
    for name in [long, accented] {
        let err = refused(topology(&name, &[("only", "0-29", true)], &["t"]));
        assert!(
            err.contains("model.file") && err.contains("at most 64 bytes of letters"),
            "{err}"
        );
    }
}

#[test]
fn agents_without_hardware_are_not_admitted_unless_the_topology_allows_it() {
    let model = real_model();
    let strict = topology(&model, &[("only", "0-29", true)], &["t"])
        .replace("allow_insecure = true", "allow_insecure = false");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strict.toml");
    std::fs::write(&path, strict).unwrap();
    let out = Command::new(bin("talaria"))
        .args(["up", "--topology"])
        .arg(&path)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["--ready-timeout-s", "120"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The agent, started without --insecure-no-attestation, finds no SEV-SNP guest device and
    // stops; nothing was admitted.
    assert!(err.contains("agent-t exited"), "{err}");
    // The launcher shows the agent's error, not a backtrace.
    assert!(
        err.contains("Error: attestation_provisioning") && err.contains("sev-guest"),
        "{err}"
    );
    let log = std::fs::read_to_string(dir.path().join("run/logs/agent-t.log")).unwrap();
    assert!(
        log.contains("sev-guest") && log.contains("--insecure-no-attestation"),
        "{log}"
    );
}
