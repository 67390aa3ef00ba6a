//! Serving many tenants: the OpenAI-compatible API driven by the official `openai` Python client,
//! and 64 concurrent sessions of 4 tenants whose masked rows the gpu-nodes batch together — each
//! answer must reach its own session, equal to the plain engine's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use talaria_engine::{ChatMessage, SamplingParams, chat_prompt};
use talaria_gpu_node::PlainEngine;
use talaria_tests::cluster::{
    LocalCluster, UdpWiretap, Wiretap, ask_agent, free_port, https_get, https_post, metric, scrape,
};
use talaria_tests::{plain_greedy, real_model, repo_root};
use talaria_wire::{Prompt, TenantEvent, TenantRequest, frame};

/// The text the agent answers for generated `ids` (end-of-sequence left out).
fn text_of(plain: &PlainEngine, ids: &[u32]) -> String {
    let eos = plain.tokenizer.eos();
    let shown: Vec<u32> = ids.iter().copied().filter(|&i| i != eos).collect();
    plain.tokenizer.decode(&shown).unwrap()
}

struct Tenant {
    name: String,
    http: Option<u16>,
    max_sessions: usize,
}

/// Two stages with `/metrics`, `tenants`, and a small mask pool (sessions open faster); the
/// stages' metrics addresses, then the coordinator's.
fn serving_topology(tenants: &[Tenant]) -> (String, Vec<SocketAddr>, SocketAddr) {
    let metrics: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let coordinator_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut t = format!(
        "[model]\nfile = \"{}\"\n[coordinator]\nlisten = \"127.0.0.1:{}\"\nmetrics = \"{coordinator_metrics}\"\n",
        real_model().display(),
        free_port()
    );
    for (i, (layers, head)) in [("0-14", false), ("15-29", true)].iter().enumerate() {
        t += &format!(
            "[[stage]]\nname = \"stage-{i}\"\nlisten = \"127.0.0.1:{}\"\nlayers = \"{layers}\"\n\
             lm_head = {head}\nmetrics = \"{}\"\n",
            free_port(),
            metrics[i]
        );
    }
    for a in tenants {
        t += &format!(
            "[[agent]]\ntenant = \"{}\"\nlisten = \"127.0.0.1:{}\"\nmax_sessions = {}\n",
            a.name,
            free_port(),
            a.max_sessions
        );
        if let Some(port) = a.http {
            t += &format!(
                "http = \"127.0.0.1:{port}\"\napi_key_sha256 = [\"{SECOND_KEY_SHA256}\"]\n"
            );
        }
    }
    t += "[remo]\npool = 4\n[tls]\ngenerate = true\n[admission]\nallow_insecure = true\n";
    (t, metrics, coordinator_metrics)
}

/// A second API key of each tenant with an HTTPS API (beside the one `talaria up` makes): another
/// principal, whose requests never reuse the first one's cached conversations.
const SECOND_KEY: &str = "second-principal-key";
/// Its SHA-256, as the topology lists it.
const SECOND_KEY_SHA256: &str = "e8b2f834a5bfd4f73113d0ecb215b476699888cb81a5b3888368befb5a206425";

fn python() -> PathBuf {
    std::env::var_os("TALARIA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// A cluster of one tenant, `tenant-a`, whose agent serves the HTTPS API; its port.
fn https_tenant_cluster() -> (LocalCluster, u16) {
    let port = free_port();
    let (topology, _, _) = serving_topology(&[Tenant {
        name: "tenant-a".into(),
        http: Some(port),
        max_sessions: 4,
    }]);
    (LocalCluster::start(&topology), port)
}

#[test]
fn the_openai_client_gets_the_plain_engines_greedy_answer_streamed_and_whole() {
    let (cluster, port) = https_tenant_cluster();
    let question = "What is the capital of France?";
    let completion = "The three primary colours are";
    let max_tokens = 12;

    // The tenant verifies the agent first and keeps the CA of the certificate it attested: its
    // HTTPS client trusts that copy, not the file on the agent's host.
    let ca = cluster.dir.path().join("attested-ca.pem");
    let verified = Command::new(talaria_tests::cluster::bin("talaria"))
        .args(["verify", "--allow-insecure-agent", "--cluster-dir"])
        .arg(cluster.run_dir())
        .arg("--save-ca")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    // Before its first request the agent has set every op up and made Freivalds' vectors for
    // each (its warm-up): no tenant's request pays for them.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let metrics = https_get(&ca, addr, "/metrics");
    let config = talaria_model_file::read_config(
        &talaria_gguf::GgufFile::open(real_model()).expect("the real model"),
    )
    .expect("its configuration");
    let ops = talaria_cvm_agent::all_ops(&config).len();
    assert_eq!(metric(&metrics, "talaria_agent_requests_total"), 0.0);
    assert_eq!(metric(&metrics, "talaria_agent_checked_ops"), ops as f64);
    assert!(metric(&metrics, "talaria_agent_warm_up_seconds") > 0.0);
    let out = Command::new(python())
        .arg(repo_root().join("tests/python/openai_client.py"))
        .arg(format!("https://127.0.0.1:{port}/v1"))
        .arg(&ca)
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .arg(question)
        .arg(max_tokens.to_string())
        .arg(completion)
        .arg(cluster.api_key("tenant-a"))
        .output()
        .expect("running the openai client (scripts/test.sh installs it in .venv)");
    assert!(
        out.status.success(),
        "openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Its requests made no Freivalds vectors: they use the warm-up's.
    let metrics = https_get(&ca, addr, "/metrics");
    assert!(metric(&metrics, "talaria_agent_requests_total") > 0.0);
    assert_eq!(
        metric(&metrics, "talaria_agent_check_vectors_made_total"),
        0.0
    );
    // One request at a time: its worker sent its calls and waited for their answers itself,
    // driving the uplink's event loop (`net_loop`), with no hand-off to another thread.
    let by_worker = metric(
        &metrics,
        "talaria_agent_uplink_calls_total{driver=\"worker\"}",
    );
    let by_uplink = metric(
        &metrics,
        "talaria_agent_uplink_calls_total{driver=\"uplink\"}",
    );
    eprintln!("uplink calls driven by the worker {by_worker}, by the uplink's thread {by_uplink}");
    assert!(by_worker > by_uplink, "{by_worker} {by_uplink}");

    let mut plain = PlainEngine::load(real_model()).unwrap();
    let chat_ids = plain
        .tokenizer
        .encode(&chat_prompt(&[ChatMessage {
            role: "user".into(),
            content: question.into(),
        }]))
        .unwrap();
    let prompt_len = chat_ids.len();
    let want_chat = plain_greedy(&mut plain, chat_ids, max_tokens);
    let raw_ids = plain.tokenizer.encode(completion).unwrap();
    let want_completion = plain_greedy(&mut plain, raw_ids, max_tokens);

    assert_eq!(
        got["models"],
        serde_json::json!(["SmolLM2-135M-Instruct.Q4_1"])
    );
    let chat_text = text_of(&plain, &want_chat);
    assert!(chat_text.contains("Paris"), "{chat_text:?}");
    for key in ["chat", "chat_stream"] {
        assert_eq!(got[key]["text"], chat_text.as_str(), "{key}: {got}");
        assert_eq!(got[key]["finish_reason"], "stop", "{key}");
        assert_eq!(got[key]["usage"]["prompt_tokens"], prompt_len, "{key}");
        assert_eq!(
            got[key]["usage"]["completion_tokens"],
            want_chat.len(),
            "{key}"
        );
    }
    assert!(got["chat_stream"]["chunks"].as_u64().unwrap() > 1, "{got}");
    // The first chat ran its whole prompt; the second, the same prompt with the same key, reused
    // all of it but the last token from the conversation cache, and answered the same.
    let cached =
        |v: &serde_json::Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].clone();
    assert_eq!(cached(&got["chat"]), 0, "{got}");
    assert_eq!(cached(&got["chat_stream"]), prompt_len - 1, "{got}");
    assert_conversation_cache_is_per_key_and_exact(&cluster, &ca, port, question, &chat_text);
    let completion_text = text_of(&plain, &want_completion);
    assert!(!completion_text.is_empty());
    assert_eq!(got["completion"]["text"], completion_text.as_str(), "{got}");
    assert_eq!(got["completion_stream"]["text"], completion_text.as_str());
    assert_eq!(
        got["wrong_model"],
        serde_json::json!({"status": 404, "code": "model_not_found"})
    );
    // Malformed requests carrying a secret: refused in the OpenAI shape, and the secret is in
    // no log of the cluster (errors name the field, never its value).
    for (name, status) in [("role", 400), ("json", 400), ("model", 404), ("part", 400)] {
        assert_eq!(got["bad"][name]["status"], status, "{name}: {got}");
    }
    // Only the tenant's API key opens the API.
    for name in ["no_key", "wrong_key"] {
        assert_eq!(
            got["bad"][name],
            serde_json::json!({"status": 401, "code": "invalid_api_key"}),
            "{name}"
        );
    }
    for log in std::fs::read_dir(cluster.run_dir().join("logs")).unwrap() {
        let log = log.unwrap().path();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("hunter2"), "{}: {text}", log.display());
    }
    // The agent's metrics say where its mask pairs came from: its sessions share one pool
    // (4 pairs per op here), so later generations start on pairs made ahead.
    let text = got["metrics"].as_str().unwrap();
    let pool = metric(text, "talaria_agent_mask_pairs_total{source=\"pool\"}");
    let spot = metric(
        text,
        "talaria_agent_mask_pairs_total{source=\"on_the_spot\"}",
    );
    assert!(pool > 0.0 && spot > 0.0, "pool {pool}, on the spot {spot}");
    let ready = metric(text, "talaria_agent_mask_pool_ready");
    assert!(text.contains("\ntalaria_agent_mask_pool_ready "), "{text}");
    assert!(
        (0.0..=4.0 * 121.0).contains(&ready),
        "{ready} pairs ready in pools of 4 for 121 ops"
    );
    // The agent counts what its own requests lost on its uplink (quinn sees losses on the
    // sender's side only): none on loopback where the kernel grants the 4 MiB buffers, and no
    // fall back to small datagrams.
    for name in [
        "talaria_agent_link_datagrams_lost_total",
        "talaria_agent_link_black_holes_total",
    ] {
        assert!(
            text.contains(&format!("\n{name} ")),
            "{name} missing: {text}"
        );
    }
    assert_eq!(metric(text, "talaria_agent_link_black_holes_total"), 0.0);
    let lost = metric(text, "talaria_agent_link_datagrams_lost_total");
    assert!(
        !talaria_net::full_socket_buffers() || lost == 0.0,
        "{lost} request datagrams lost on loopback"
    );
}

#[test]
fn sixty_four_concurrent_sessions_of_four_tenants_are_batched_and_each_gets_its_own_answer() {
    const TENANTS: usize = 4;
    const SESSIONS: usize = 16;
    const MAX_TOKENS: usize = 4;
    // Each agent runs 8 generations at once: the other 8 of its tenant wait in line.
    let tenants: Vec<Tenant> = (0..TENANTS)
        .map(|i| Tenant {
            name: format!("tenant-{i}"),
            http: None,
            max_sessions: 8,
        })
        .collect();
    let (topology, metrics, coordinator_metrics) = serving_topology(&tenants);
    let cluster = LocalCluster::start(&topology);
    let topo = cluster.topology();
    // 64 different prompts, and what the plain engine answers to each.
    let mut plain = PlainEngine::load(real_model()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..TENANTS * SESSIONS)
        .map(|i| {
            // The continuation carries the numbers on: every session's answer is its own.
            let a = 100 + 7 * i;
            let text = format!("Count on: {a}, {}, {},", a + 1, a + 2);
            plain.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| plain_greedy(&mut plain, p.clone(), MAX_TOKENS))
        .collect();
    let distinct: std::collections::HashSet<&Vec<u32>> = want.iter().collect();
    assert!(
        distinct.len() >= 48,
        "answers too alike to tell sessions apart"
    );

    let got: Vec<Result<Vec<u32>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let agent = &topo.agents[i / SESSIONS];
                let (addr, tls) = (agent.listen, cluster.agent_tls(&agent.tenant));
                let key = cluster.api_key(&agent.tenant);
                s.spawn(move || {
                    let req = TenantRequest {
                        prompt: Prompt::Ids(prompt.clone()),
                        max_tokens: MAX_TOKENS,
                        sampling: SamplingParams::default(),
                        ignore_eos: false,
                        stop: Vec::new(),
                        cache_salt: None,
                    };
                    ask_agent(&tls, addr, &key, &req)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.as_ref(), Ok(w), "session {i} of tenant {}", i / SESSIONS);
    }

    // The gpu-nodes did batch: some GEMMs carried rows of several sessions and tenants.
    for &addr in &metrics {
        let text = scrape(addr);
        let calls = metric(&text, "talaria_stage_calls_total");
        let batches = metric(&text, "talaria_stage_batch_calls_count");
        let multi_tenant = metric(&text, "talaria_stage_batch_tenants_count")
            - metric(&text, "talaria_stage_batch_tenants_bucket{le=\"1\"}");
        eprintln!(
            "stage {addr}: {calls} calls in {batches} batches, {multi_tenant} of them with several tenants"
        );
        assert!(calls > batches, "no batch held more than one call");
        assert!(multi_tenant > 0.0, "no batch mixed tenants");
        assert_eq!(metric(&text, "talaria_stage_sessions"), 0.0);
    }

    // Sixty-four sessions' prefills (multi-datagram requests) and answers crossed the links
    // between the coordinator and the stages, and the links still carry loopback's large
    // datagrams: a segmentation-offload batch larger than one IP datagram was refused by the
    // kernel and lost whole, and a few such losses dropped a path to 1,200 bytes. Each side
    // counts its own sends' losses (the coordinator per stage link, each stage for its answers).
    // Loopback loses nothing unless a receive buffer overflows, so losses are asserted only where
    // the kernel grants the endpoints' 4 MiB buffers.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let big_buffers = talaria_net::full_socket_buffers();
    let text = scrape(coordinator_metrics);
    for stage in ["stage-0", "stage-1"] {
        let label = format!("{{stage=\"{stage}\"}}");
        let lost = metric(
            &text,
            &format!("talaria_router_link_datagrams_lost_total{label}"),
        );
        let mtu = metric(&text, &format!("talaria_router_link_mtu_bytes{label}"));
        assert!(mtu > 60_000.0, "{stage}: path MTU {mtu}");
        assert!(
            !big_buffers || lost == 0.0,
            "{stage}: {lost} datagrams lost on loopback"
        );
    }
    for &addr in &metrics {
        let text = scrape(addr);
        let black_holes = metric(&text, "talaria_stage_link_black_holes_total");
        let lost = metric(&text, "talaria_stage_link_datagrams_lost_total");
        assert_eq!(
            black_holes, 0.0,
            "stage {addr}: a path fell back to small datagrams"
        );
        assert!(
            !big_buffers || lost == 0.0,
            "stage {addr}: {lost} answer datagrams lost"
        );
    }
}

/// The network's view of a streamed answer: the cloud carries the tenant's packets and reads
/// every TLS record's length. Unpadded, one event is a constant envelope plus one token's text,
/// and the cloud, which owns the model, tells which of four questions was asked by comparing
/// the record lengths with the answers it predicts for each (its power, on the tenant's own
/// opt-out). Padded, the default, every record is whole events of one size.
#[test]
fn the_network_reads_token_lengths_from_an_unpadded_stream_and_nothing_from_the_default() {
    let (cluster, port) = https_tenant_cluster();
    let tap = Wiretap::start(SocketAddr::from(([127, 0, 0, 1], port)));
    let ca = cluster.agent_tls("tenant-a").ca;
    let key = cluster.api_key("tenant-a");
    let questions = [
        "Explain how a bicycle works.",
        "Write a short poem about the sea.",
        "List three uses of copper.",
        "Why is the sky blue?",
    ];
    let max_tokens = 8;

    // The attacker's guesses: the model's greedy answer to each question, as the length of the
    // JSON text of each event the agent would stream.
    let mut plain = PlainEngine::load(real_model()).unwrap();
    let answers: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let ids = plain
                .tokenizer
                .encode(&chat_prompt(&[ChatMessage {
                    role: "user".into(),
                    content: (*q).into(),
                }]))
                .unwrap();
            plain_greedy(&mut plain, ids, max_tokens)
        })
        .collect();
    let guesses: Vec<Vec<usize>> = answers
        .iter()
        .map(|answer| {
            let mut stream = plain.tokenizer.decode_stream();
            answer
                .iter()
                .filter_map(|&id| stream.step(id).unwrap())
                .filter(|piece| !piece.is_empty())
                .map(|piece| serde_json::to_string(&piece).unwrap().len() - 2)
                .collect()
        })
        .collect();
    // Padded is the default: the request names no stream options; unpadded is its opt-out.
    let streamed = |question: &str, padded: bool| -> Vec<usize> {
        let mut body = serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}], "stream": true,
        });
        if !padded {
            body["stream_options"] = serde_json::json!({"include_obfuscation": false});
        }
        let sse = https_post(
            &ca,
            tap.addr,
            "/v1/chat/completions",
            &key,
            &body.to_string(),
        );
        assert!(sse.ends_with("data: [DONE]"), "{sse}");
        let seen = tap.take();
        assert_eq!(seen.len(), 1, "one connection");
        talaria_attacks::stream::records(&seen[0])
    };

    // A whole answer (`stream: false`): its records after the handshake flight.
    let whole = |question: &str| -> Vec<usize> {
        let body = serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}],
        });
        let out = https_post(
            &ca,
            tap.addr,
            "/v1/chat/completions",
            &key,
            &body.to_string(),
        );
        let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            answer["choices"][0]["message"]["content"].is_string(),
            "{out}"
        );
        let seen = tap.take();
        assert_eq!(seen.len(), 1, "one connection");
        talaria_attacks::stream::records(&seen[0])[1..].to_vec()
    };
    // Answers of different lengths, padded to one bucket: the same records.
    let wholes: Vec<Vec<usize>> = questions.iter().map(|q| whole(q)).collect();
    assert!(wholes.windows(2).all(|w| w[0] == w[1]), "{wholes:?}");

    let mut named = 0;
    let mut padded_views = Vec::new();
    for (asked, question) in questions.iter().enumerate() {
        let open = streamed(question, false);
        let fit = talaria_attacks::stream::fit(&open, &guesses[asked]);
        // Every event is a record of its own but the last, which goes out with the end of the
        // answer when both are ready at once.
        assert!(
            fit.matched + 1 >= fit.events,
            "{} of {} events' lengths: {open:?}",
            fit.matched,
            fit.events
        );
        assert_eq!(
            talaria_attacks::stream::identify(&open, &guesses),
            Some(asked),
            "unpadded, the question is read off the record lengths"
        );
        let padded = streamed(question, true);
        if talaria_attacks::stream::identify(&padded, &guesses) == Some(asked) {
            named += 1;
        }
        padded_views.push(padded);
    }
    assert!(named <= 1, "{named} of 4 named through padding");
    // Padded, every record that carries events is a whole number of them, whatever their text:
    // each event is a chunk of `PAD_BUCKET` bytes and 7 of HTTP framing, the record adds TLS's
    // 17 (type and tag), and the answer's last record may end the chunked body (5 bytes). How
    // many events share a record is timing (the last ones go out together).
    // Around the answer's records: the server's handshake flight (its length varies with the
    // DER of its signature), its session tickets before the first event, and its closing alert
    // (2 bytes and TLS's 17) after the last.
    let event = talaria_cvm_agent::openai::PAD_BUCKET + 7;
    let answer = |view: &Vec<usize>| -> Vec<usize> {
        let first = view
            .iter()
            .skip(1)
            .position(|&r| r >= event)
            .map_or(0, |i| i + 1);
        let end = view.len() - usize::from(view.last() == Some(&19));
        view[first..end].to_vec()
    };
    for view in &padded_views {
        for &r in &answer(view) {
            assert!(
                r >= event && [0, 5].contains(&((r - 17) % event)),
                "a record of {r} bytes is not whole events: {padded_views:?}"
            );
        }
    }
    // One event per decode pass (a pass that streams no text sends a padded comment), the
    // role's before them and three after: the text held back to the end, the finish, [DONE].
    for view in &padded_views {
        let events: usize = answer(view).iter().map(|r| r / event).sum();
        assert_eq!(events, 1 + max_tokens + 3, "{padded_views:?}");
    }

    // The QUIC tenant protocol, through a UDP relay in the network's place: it reads every
    // datagram's length. One `Token` event per decode pass, each its own frame, unpadded a
    // constant envelope plus the token's id and text.
    let unpadded = |ids: &[u32]| -> Vec<usize> {
        let mut stream = plain.tokenizer.decode_stream();
        ids.iter()
            .map(|&id| {
                let piece = stream.step(id).unwrap();
                frame::encode(&TenantEvent::Token { id, piece }, None::<&()>)
                    .unwrap()
                    .len()
            })
            .collect()
    };
    let quic_guesses: Vec<Vec<usize>> = answers.iter().map(|a| unpadded(a)).collect();
    // Its power: were the events unpadded, their datagrams (a constant QUIC overhead each)
    // would name every question.
    for (asked, guess) in quic_guesses.iter().enumerate() {
        let wire: Vec<usize> = guess.iter().map(|l| 40 + l).collect();
        assert_eq!(
            talaria_attacks::stream::identify(&wire, &quic_guesses),
            Some(asked)
        );
    }
    let relay = UdpWiretap::start(cluster.topology().agent("tenant-a").unwrap().listen);
    let tls = cluster.agent_tls("tenant-a");
    let mut named = 0;
    let mut views = Vec::new();
    for (asked, question) in questions.iter().enumerate() {
        let req = TenantRequest {
            prompt: Prompt::Text {
                text: (*question).into(),
                chat: true,
            },
            max_tokens,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            stop: Vec::new(),
            cache_salt: Some(format!("quic {asked}")),
        };
        let ids = ask_agent(&tls, relay.addr, &key, &req).unwrap();
        assert_eq!(ids, answers[asked], "{question}");
        let seen = relay.take();
        // The attacker drops bare acknowledgements (at most 40 bytes here; an event's datagram
        // is larger even unpadded), which would break the run of event datagrams.
        let records: Vec<usize> = seen.iter().copied().filter(|&l| l > 40).collect();
        if talaria_attacks::stream::identify(&records, &quic_guesses) == Some(asked) {
            named += 1;
        }
        views.push(seen);
    }
    assert!(named <= 1, "{named} of 4 named through QUIC: {views:?}");
    // What the relay sees of an answer: one datagram per event, each one bucket and QUIC's
    // overhead whatever the token, the last possibly sharing a datagram with the end of the
    // `Done` that follows at once; around them the handshake, loopback's path-MTU probes, the
    // `Done`'s 64 KiB and bare acknowledgements. The overhead moves by a few bytes with QUIC's
    // own state (the packet number's and the stream offset's encodings, an acknowledgement
    // riding along: 290 to 300 bytes on the CI host, 298 on a quiet one), never by a token's
    // length. Unpadded, events would be datagrams of 40 to 60 bytes.
    let bucket = talaria_wire::TENANT_EVENT_BUCKET;
    let one_bucket = |l: &usize| (bucket..2 * bucket).contains(l);
    let carries_event = |l: &usize| (bucket..bucket + 64).contains(l);
    for (view, answer) in views.iter().zip(&answers) {
        let events = view.iter().filter(|l| carries_event(l)).count();
        assert!(
            events + 1 >= answer.len() && events <= answer.len(),
            "{events} event datagrams for {} tokens: {views:?}",
            answer.len()
        );
        for (i, l) in view.iter().enumerate() {
            assert!(
                !one_bucket(l) || carries_event(l) || view[i - 1] > 60 << 10,
                "a datagram of {l} bytes: {views:?}"
            );
        }
    }
}

/// Through the agent's HTTPS API: the same prompt under another API key reuses nothing of the
/// first key's conversations and answers the same; the first key's next turn reuses its history
/// (question and answer) and answers what the same turn run cold (a fresh `cache_salt`) answers.
fn assert_conversation_cache_is_per_key_and_exact(
    cluster: &LocalCluster,
    ca: &std::path::Path,
    port: u16,
    question: &str,
    first_answer: &str,
) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let key = cluster.api_key("tenant-a");
    let chat = |key: &str, messages: serde_json::Value, salt: Option<&str>| -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1", "messages": messages,
            "max_tokens": 12, "temperature": 0,
        });
        if let Some(salt) = salt {
            body["cache_salt"] = salt.into();
        }
        let out = https_post(ca, addr, "/v1/chat/completions", key, &body.to_string());
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out}"))
    };
    let text = |v: &serde_json::Value| v["choices"][0]["message"]["content"].clone();
    let cached = |v: &serde_json::Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cached_tokens: {v}"))
    };
    let first = serde_json::json!([{"role": "user", "content": question}]);
    let other = chat(SECOND_KEY, first, None);
    assert_eq!(cached(&other), 0, "another key reuses nothing: {other}");
    assert_eq!(text(&other), first_answer);

    let history = serde_json::json!([
        {"role": "user", "content": question},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And the capital of Italy?"},
    ]);
    let warm = chat(&key, history.clone(), None);
    let cold = chat(&key, history, Some("a salt of its own"));
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached(&warm) > prompt / 2,
        "the next turn reuses its history: {warm}"
    );
    assert_eq!(cached(&cold), 0, "a fresh salt reuses nothing: {cold}");
    assert_eq!(text(&warm), text(&cold), "{warm} / {cold}");
    let metrics = https_get(ca, addr, "/metrics");
    let hits = metric(
        &metrics,
        "talaria_agent_prefix_cache_lookups_total{result=\"hit\"}",
    );
    assert!(hits >= 3.0, "{hits} hits");
    assert!(metric(&metrics, "talaria_agent_prefix_cache_bytes") > 0.0);
}

/// `talaria bench-hop`, short: every case of the transport's floor runs over real QUIC (one hop
/// and through the relay, a stream per call and one stream, with and without the worker
/// threads' hand-offs), every answer arrives whole (the bench refuses a short one), and each
/// role's thread is accounted.
#[test]
fn the_transport_floor_bench_runs_every_case_over_real_quic() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("hop.json");
    let report = talaria_tests::cluster::json_of_run(
        Command::new(talaria_tests::cluster::bin("talaria"))
            .args(["bench-hop", "--calls", "40", "--out"])
            .arg(&json),
        &json,
    );
    let cases = report["cases"].as_array().unwrap();
    // Two payloads × two path lengths × three ways of calling.
    assert_eq!(cases.len(), 12, "{report}");
    for case in cases {
        let us = case["us_per_call"].as_f64().unwrap();
        assert!(us.is_finite() && us > 0.0, "{case}");
        let mut roles: Vec<&str> = case["cpu_us_per_call"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        roles.sort_unstable();
        let mut want = vec!["client", "server"];
        if case["hops"] == 2 {
            want.push("relay");
        }
        if case["handoffs"] == true {
            want.extend(["caller", "server-worker"]);
        }
        want.sort_unstable();
        assert_eq!(roles, want, "{case}");
        // Every call is at least a datagram each way on the client's connection.
        let traffic = &case["client_per_call"];
        for way in ["datagrams_sent", "datagrams_received"] {
            let per_call = traffic[way].as_f64().unwrap();
            assert!(per_call >= 1.0, "{way} {per_call}: {case}");
        }
    }
}

/// `talaria load --synthetic`, short: sessions of different tenants, opened on the gpu-nodes
/// directly with no CVM work, are served in shared GEMMs, and every decode step of every session
/// is answered.
#[test]
fn the_synthetic_load_batches_the_calls_of_different_tenants_together() {
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("synthetic.json");
    let report = talaria_tests::cluster::json_of_run(
        Command::new(talaria_tests::cluster::bin("talaria"))
            .args([
                "load",
                "--synthetic",
                "--tenants",
                "1,4",
                "--gen-tokens",
                "2",
                "--rounds",
                "2",
            ])
            .arg("--base-port")
            .arg(free_port().to_string())
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--json")
            .arg(&json)
            .env("TALARIA_HOME", model.parent().unwrap()),
        &json,
    );
    let steps = report["synthetic"].as_array().unwrap();
    // Two rounds of the list, interleaved: 1, 4, 1, 4.
    assert_eq!(steps.len(), 4, "{report}");
    for (step, (round, sessions)) in steps.iter().zip([(0, 1), (0, 4), (1, 1), (1, 4)]) {
        assert_eq!(step["round"], round, "{step}");
        assert_eq!(step["sessions"], sessions, "{step}");
        assert_eq!(step["tokens"], 2 * sessions, "{step}");
    }
    let rate = |i: usize| steps[i]["tokens_per_s"].as_f64().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    for (four, one) in [(1, 0), (3, 2)] {
        let step = &steps[four];
        for stage in step["batches"].as_array().unwrap() {
            // Four sessions of four tenants in step: most GEMMs carry several of them.
            let calls = stage["calls_per_batch"]["mean"].as_f64().unwrap();
            let tenants = stage["tenants_per_batch"]["mean"].as_f64().unwrap();
            assert!(calls > 1.5 && tenants > 1.5, "{stage}");
        }
        // The driver forwards as the coordinator does: the calls of one op that wait together
        // leave in one frame.
        for stage in step["batches"].as_array().unwrap() {
            let per_frame = stage["calls_per_frame"]["mean"].as_f64().unwrap();
            assert!(per_frame > 1.5, "{stage}");
            // A frame with every live session's call, small, is computed on the stage's event
            // loop when its worker is idle: nothing else can join the batch.
            let on_loop = stage["calls_on_event_loop"].as_u64().unwrap();
            assert!(on_loop > 0, "{stage}");
        }
        // Each step's ratio is against its own round's one session.
        let ratio = step["speedup_vs_one_session"].as_f64().unwrap();
        assert!(close(ratio, rate(four) / rate(one)), "{step}");
    }
    // Each count's median over its steps, every round's ratio, and the ratio of the medians.
    // A lone session's calls go alone, each on its own stream.
    for one in [&steps[0], &steps[2]] {
        for stage in one["batches"].as_array().unwrap() {
            assert_eq!(
                stage["calls_per_frame"]["mean"].as_f64(),
                Some(1.0),
                "{stage}"
            );
        }
    }
    let medians = report["synthetic_medians"].as_array().unwrap();
    assert_eq!(medians.len(), 2, "{report}");
    let (one, four) = (&medians[0], &medians[1]);
    assert_eq!(
        (one["sessions"].as_u64(), one["steps"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (four["sessions"].as_u64(), four["steps"].as_u64()),
        (Some(4), Some(2))
    );
    let by_round: Vec<f64> = four["speedups_by_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    assert_eq!(by_round.len(), 2, "{four}");
    assert!(close(by_round[0], rate(1) / rate(0)) && close(by_round[1], rate(3) / rate(2)));
    let median_one = (rate(0) + rate(2)) / 2.0;
    let median_four = (rate(1) + rate(3)) / 2.0;
    assert!(close(one["tokens_per_s"].as_f64().unwrap(), median_one));
    assert!(close(four["tokens_per_s"].as_f64().unwrap(), median_four));
    let ratio = four["speedup_vs_one_session"].as_f64().unwrap();
    assert!(close(ratio, median_four / median_one), "{four}");
    // Concurrent answers on one connection lose nothing on loopback (they were lost whole in
    // segmentation-offload batches larger than one IP datagram, and four sessions then ran
    // slower than one), where the kernel grants the endpoints' 4 MiB buffers.
    if talaria_net::full_socket_buffers() {
        for step in steps {
            assert_eq!(step["answer_datagrams_lost"], 0, "{step}");
        }
    }
}
