//! The trust model against the cloud operator, with real processes on loopback: what the
//! operator's topology may not weaken, and what a tenant's verifier catches before its prompt
//! leaves.

use std::path::Path;
use std::process::{Command, Output};

use talaria_tests::cluster::{LocalCluster, bin, topology};
use talaria_tests::real_model;

const ONE_STAGE: &[(&str, &str, bool)] = &[("only", "0-29", true)];

fn up_fails(text: &str, dir: &Path) -> String {
    let path = dir.join("topology.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(bin("talaria"))
        .args(["up", "--topology"])
        .arg(&path)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["--ready-timeout-s", "120"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a cluster below the floor came up");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn talaria(cluster: &LocalCluster, args: &[&str]) -> Output {
    Command::new(bin("talaria"))
        .args(args)
        .arg("--cluster-dir")
        .arg(cluster.run_dir())
        .output()
        .unwrap()
}

#[test]
fn an_agent_below_the_floor_does_not_start_and_its_tenant_refuses_it_unless_it_chose_so() {
    let model = real_model();
    // 1. The operator's topology switches masking off, or sets a float σ of 1: the agent does
    //    not start, with a typed error that names every reason.
    for (remo, why) in [
        ("enabled = false", "masking is off"),
        (
            "precision = \"f64-gemm\"\nscale = 1.0",
            "σ = 1 is below the floor",
        ),
        ("precision = \"f64-gemm\"\nshuffle = false", "not shuffled"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = topology(&model, ONE_STAGE, &["t"]) + &format!("[remo]\n{remo}\n");
        let err = up_fails(&text, dir.path());
        assert!(err.contains("agent-t exited"), "{remo}: {err}");
        assert!(
            err.contains("remo_below_floor") && err.contains(why),
            "{remo}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }

    // An HTTPS API is never served below the floor, accepted or not: its clients never see the
    // claims, so they cannot accept less.
    let dir = tempfile::tempdir().unwrap();
    let text = topology(&model, ONE_STAGE, &["t"]).replacen(
        "tenant = \"t\"\n",
        &format!(
            "tenant = \"t\"\nhttp = \"127.0.0.1:{}\"\n",
            talaria_tests::cluster::free_port()
        ),
        1,
    ) + "[remo]\nenabled = false\ntenant_accepts_below_floor = true\n";
    let err = up_fails(&text, dir.path());
    assert!(
        err.contains("remo_below_floor") && err.contains("HTTPS API"),
        "{err}"
    );

    // 2. The topology also says the tenant accepted it: the agent starts, but its attestation
    //    binds the configuration it runs with, and a tenant that did not choose less refuses
    //    before its prompt leaves.
    let text = topology(&model, ONE_STAGE, &["t"])
        + "[remo]\nenabled = false\ntenant_accepts_below_floor = true\n";
    let cluster = LocalCluster::start(&text);
    let secret = "the launch code is 0451";
    let o = talaria(
        &cluster,
        &[
            "generate",
            "--engine",
            "cluster",
            "--allow-insecure-agent",
            "--prompt",
            secret,
            "--max-tokens",
            "2",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "sent a prompt to a plaintext agent");
    assert!(
        err.contains("remo_below_floor") && err.contains("masking is off"),
        "{err}"
    );
    let o = talaria(&cluster, &["verify", "--allow-insecure-agent"]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trusted"], false, "{v}");
    assert_eq!(v["error_type"], "remo_below_floor", "{v}");
    // The agent never saw the prompt: nothing of it reached any log.
    for log in std::fs::read_dir(cluster.run_dir().join("logs")).unwrap() {
        let text = std::fs::read_to_string(log.unwrap().path()).unwrap();
        assert!(!text.contains("0451"), "{text}");
    }

    // 3. The tenant's explicit choice (the attack suite's plaintext control): accepted, and
    //    what it runs with is shown.
    let o = talaria(
        &cluster,
        &["verify", "--allow-insecure-agent", "--accept-below-floor"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trusted"], true, "{v}");
    assert_eq!(v["claims"]["tenant"], "t", "{v}");
    assert_eq!(v["claims"]["remo"]["enabled"], false, "{v}");
    let o = talaria(
        &cluster,
        &[
            "generate",
            "--engine",
            "cluster",
            "--allow-insecure-agent",
            "--accept-below-floor",
            "--prompt-ids",
            "504,3458",
            "--max-tokens",
            "2",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ReMO OFF") && err.contains("below the floor"),
        "{err}"
    );
}

#[test]
fn a_key_planted_on_the_agents_host_is_never_used_and_the_attestation_binds_what_runs() {
    let model = real_model();
    // The host plants TLS material where the agent publishes its certificate, hoping the agent
    // serves with a key the host knows.
    let dir = tempfile::tempdir().unwrap();
    let planted_dir = dir.path().join("agent-tls");
    let planted =
        talaria_net::TlsMaterial::generate(&planted_dir, talaria_topology::DEFAULT_SERVER_NAME)
            .unwrap();
    let planted_ca = dir.path().join("planted-ca.pem");
    std::fs::copy(&planted.ca, &planted_ca).unwrap();
    let planted_cert = std::fs::read(&planted.cert).unwrap();
    let text = topology(&model, ONE_STAGE, &["t"]).replacen(
        "tenant = \"t\"\n",
        &format!(
            "tenant = \"t\"\ntenant_tls = \"{}\"\n",
            planted_dir.display()
        ),
        1,
    );
    let cluster = LocalCluster::start(&text);
    // The agent made its own key: the planted key file is gone, the certificate is new.
    assert!(!planted_dir.join("key.pem").exists());
    assert_ne!(
        std::fs::read(planted_dir.join("cert.pem")).unwrap(),
        planted_cert
    );
    let addr = cluster.topology().agent("t").unwrap().listen.to_string();
    let verify = |ca: &Path| {
        Command::new(bin("talaria"))
            .args(["verify", "--allow-insecure-agent", "--agent", &addr, "--ca"])
            .arg(ca)
            .output()
            .unwrap()
    };
    // A client that trusts the planted CA does not get through: the agent does not hold the
    // planted key.
    let o = verify(&planted_ca);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("certificate"), "{v}");
    // Through the published certificate it does, and the attestation states the default
    // protection: the integer one-time pad.
    let o = verify(&planted_dir.join("ca.pem"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["claims"]["tenant"], "t", "{v}");
    assert_eq!(v["claims"]["remo"]["enabled"], true, "{v}");
    assert_eq!(v["claims"]["remo"]["precision"], "int", "{v}");
    // And which model, exactly: the manifest the agent checks the cloud's weights against.
    let manifest = talaria_cvm_agent::manifest::ModelManifest::embedded().unwrap();
    assert_eq!(
        v["claims"]["model_manifest_sha256"],
        manifest.sha256(),
        "{v}"
    );
    // Generation needs the tenant's API key on the QUIC protocol too: a wrong one is refused,
    // the one `talaria up` made for the tenant (cluster.json) is served.
    let generate = |key: Option<&str>| {
        let mut c = Command::new(bin("talaria"));
        c.args([
            "generate",
            "--engine",
            "cluster",
            "--allow-insecure-agent",
            "--prompt-ids",
            "504,3458",
            "--max-tokens",
            "1",
            "--cluster-dir",
        ])
        .arg(cluster.run_dir());
        match key {
            Some(k) => c.env("TALARIA_API_KEY", k),
            None => c.env_remove("TALARIA_API_KEY"),
        };
        c.output().unwrap()
    };
    let o = generate(Some("tk-hunter2-wrong"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid_api_key"), "{err}");
    let o = generate(None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A tenant that requires more than the floor says so, and is refused otherwise.
    let ca = planted_dir.join("ca.pem");
    let expect = |extra: &[&str]| {
        Command::new(bin("talaria"))
            .args(["verify", "--allow-insecure-agent", "--agent", &addr, "--ca"])
            .arg(&ca)
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(
        expect(&["--expect-tenant", "t", "--expect-precision", "int"])
            .status
            .success()
    );
    let other_key = "ab".repeat(32);
    for wrong in [
        &["--expect-tenant", "someone-else"][..],
        &["--expect-precision", "f64-gemm"][..],
        &["--expect-api-key-sha256", other_key.as_str()][..],
    ] {
        let o = expect(wrong);
        assert!(!o.status.success(), "{wrong:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["error_type"], "attestation_claims", "{wrong:?}: {v}");
    }
}

#[test]
fn the_embedded_manifest_pins_the_model_and_scaled_weights_are_refused() {
    use talaria_cvm_agent::manifest::{EMBEDDED, ModelManifest};
    use talaria_engine::{BlockOp, OpId};
    use talaria_gpu_node::{CloudExecutor, LinearWeights};
    use talaria_wire::{BasisSpec, RPub, SetupRequest, Tensor};
    let model = real_model();
    // `talaria manifest` on the real model writes exactly the manifest the agent embeds.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("manifest.json");
    let o = Command::new(bin("talaria"))
        .args(["manifest", "--model-file"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), EMBEDDED);
    let manifest = ModelManifest::embedded().unwrap();

    // What a real gpu-node serves passes; the scaling attack (V scaled by c = 2: the answers
    // stay the same if attn_out is scaled by 1/c, but the float masks are then c-fold weaker)
    // does not, in either mode.
    let f = talaria_gguf::GgufFile::open(&model).unwrap();
    let p = talaria_model_file::read_provision(&f).unwrap();
    let config = p.config.clone();
    let mut weights =
        LinearWeights::load_on(&f, &config, 0..=0, false, talaria_topology::Backend::Cpu).unwrap();
    weights.load_int(&f).unwrap();
    let cloud = CloudExecutor::new(weights, None);
    let qkv = OpId::Block {
        layer: 0,
        op: BlockOp::Qkv,
    };
    for integer in [false, true] {
        let mut reply = cloud
            .setup(&SetupRequest {
                session: 1,
                op: qkv,
                basis: BasisSpec::Identity,
                f64: false,
                integer,
            })
            .unwrap();
        manifest.check_setup(qkv, &reply).unwrap();
        match &mut reply.r_pub {
            RPub::Float(Tensor::F32 { cols, data, .. }) => {
                // The last d_kv columns of each row are V's.
                let v = config.n_kv_heads * config.head_dim;
                for row in data.chunks_mut(*cols) {
                    row[*cols - v..].iter_mut().for_each(|w| *w *= 2.0);
                }
            }
            RPub::Int(w) => w.scales = w.scales.iter().map(|s| s.wrapping_mul(2)).collect(),
            other => panic!("unexpected {other:?}"),
        }
        let e = manifest.check_setup(qkv, &reply).unwrap_err();
        assert_eq!(e.error_type(), "model_manifest", "{e}");
    }
    // The provision is pinned too: one embedding value changed is refused.
    let mut provision = p;
    manifest.check_provision(&provision).unwrap();
    provision.embeddings[12_345] *= 2.0;
    assert!(manifest.check_provision(&provision).is_err());
}

/// A copy of the model file in `dir` whose layer-0 V weights are scaled by 2 (every Q4_1 or
/// Q8_0 block's scale, and Q4_1's minimum, doubled exactly): what a cloud that edits its own
/// files would serve to weaken the float masks.
fn model_with_scaled_v(dir: &Path) -> std::path::PathBuf {
    let model = real_model();
    let mut bytes = std::fs::read(&model).unwrap();
    let (start, len, block, halves) = {
        let f = talaria_gguf::GgufFile::open(&model).unwrap();
        let name = "blk.0.attn_v.weight";
        let (block, halves) = match f.tensor(name).unwrap().ty {
            talaria_gguf::GgmlType::Q4_1 => (20, 2),
            talaria_gguf::GgmlType::Q8_0 => (34, 1),
            other => panic!("{name} is {other:?}"),
        };
        let t = f.tensor_bytes(name).unwrap();
        let head = &t[..256];
        let start = bytes.windows(256).position(|w| w == head).unwrap();
        (start, t.len(), block, halves)
    };
    for b in bytes[start..start + len].chunks_mut(block) {
        for h in 0..halves {
            let v = u16::from_le_bytes([b[2 * h], b[2 * h + 1]]);
            let exp = (v >> 10) & 0x1f;
            if exp != 0 && exp < 30 {
                b[2 * h..2 * h + 2].copy_from_slice(&(v + 0x0400).to_le_bytes());
            }
        }
    }
    let path = dir.join("scaled.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_cloud_serving_scaled_weights_is_refused_before_the_prompt_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let scaled = model_with_scaled_v(dir.path());
    let text = topology(&scaled, ONE_STAGE, &["t"]);
    let cluster = LocalCluster::start(&text);
    // The provision (embeddings, tokenizer) is unchanged, so the agent is admitted; its
    // warm-up, before any tenant, meets the scaled layer-0 weight and refuses it, typed.
    let log = || std::fs::read_to_string(cluster.run_dir().join("logs/agent-t.log")).unwrap();
    assert!(log().contains("warm-up failed"), "{}", log());
    let at_start = log().matches("model_manifest").count();
    assert!(at_start > 0, "{}", log());
    // A tenant's session sets up again and is refused the same way, before any row of the
    // prompt is masked and sent.
    let o = talaria(
        &cluster,
        &[
            "generate",
            "--engine",
            "cluster",
            "--allow-insecure-agent",
            "--prompt-ids",
            "504,3458",
            "--max-tokens",
            "2",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "served through scaled weights");
    assert!(err.contains("model_manifest"), "{err}");
    assert!(
        log().matches("model_manifest").count() > at_start,
        "the tenant's session was refused too: {}",
        log()
    );
}

#[test]
fn a_peer_of_another_cloud_protocol_version_fails_the_handshake() {
    // Version 3 read an integer weight's codes in input pairs across all columns; version 4
    // stores them by tiles of 64 columns. A peer of one version must not read the other's
    // weights: the ALPN differs, and the handshake fails before any frame.
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = talaria_net::TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server = tls
            .server(
                "127.0.0.1:0".parse().unwrap(),
                talaria_wire::ALPN_CLOUD,
                talaria_net::ClientAuth::Anyone,
            )
            .expect("server");
        let addr = server.local_addr().expect("address");
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        for (alpn, speaks) in [
            (b"talaria-cloud/3".as_slice(), false),
            (talaria_wire::ALPN_CLOUD, true),
        ] {
            let client = tls.client(alpn).expect("client");
            let conn = tls.connect(&client, addr).await;
            assert_eq!(
                conn.is_ok(),
                speaks,
                "{}: {:?}",
                String::from_utf8_lossy(alpn),
                conn.err()
            );
        }
    });
}
