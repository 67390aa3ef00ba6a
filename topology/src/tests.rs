use super::*;

fn model_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), b"GGUF").unwrap();
    f
}

fn local(model: &Path, stages: &str) -> String {
    format!(
        r#"
[model]
file = "{}"
[coordinator]
listen = "127.0.0.1:7400"
{stages}
[[agent]]
tenant = "t"
listen = "127.0.0.1:7420"
[tls]
generate = true
"#,
        model.display()
    )
}

const TWO_STAGES: &str = r#"
[[stage]]
name = "a"
listen = "127.0.0.1:7410"
layers = "0-14"
[[stage]]
name = "b"
listen = "127.0.0.1:7411"
layers = "15-29"
lm_head = true
backend = "cuda:1"
"#;

fn problems(text: &str) -> Vec<Problem> {
    match Topology::parse(text, Path::new("t.toml")) {
        Err(e) => e.problems().to_vec(),
        Ok(_) => vec![],
    }
}

fn keys(text: &str) -> Vec<String> {
    problems(text).into_iter().map(|p| p.key).collect()
}

#[test]
fn a_good_topology_parses() {
    let m = model_file();
    let t = Topology::parse(&local(m.path(), TWO_STAGES), Path::new("t.toml")).unwrap();
    assert_eq!(t.stages.len(), 2);
    assert_eq!(t.stages[1].backend, Backend::Cuda(1));
    assert_eq!(t.stage_for(Some(14)), Some(0));
    assert_eq!(t.stage_for(Some(15)), Some(1));
    assert_eq!(t.stage_for(None), Some(1));
    assert_eq!(t.stage_for(Some(30)), None);
    t.check_layers(30).unwrap();
    assert_eq!(t.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES);
    assert!(!t.allow_insecure_agents);
}

#[test]
fn every_mistake_is_reported_with_its_key_path() {
    let m = model_file();
    let bad = r#"
[[stage]]
name = "a"
listen = "localhost"
layers = "0-16"
backend = "tpu"
[[stage]]
name = "a"
listen = "127.0.0.1:7400"
layers = "15-29"
"#;
    let k = keys(&local(m.path(), bad));
    for want in [
        "stage[0].listen",
        "stage[0].backend",
        "stage[1].name",
        "stage[1].listen",
        "stage[1].layers",
        "stage",
    ] {
        assert!(k.contains(&want.to_string()), "{want} missing from {k:?}");
    }
    // The overlap names the layers.
    let p = problems(&local(m.path(), bad));
    let overlap = p.iter().find(|p| p.key == "stage[1].layers").unwrap();
    assert!(overlap.message.contains("15-16"), "{}", overlap.message);
}

#[test]
fn missing_and_nonexistent_layers_are_found_against_the_model() {
    let m = model_file();
    let gap = TWO_STAGES.replace("\"15-29\"", "\"17-31\"");
    let t = Topology::parse(&local(m.path(), &gap), Path::new("t.toml")).unwrap();
    let e = t.check_layers(30).unwrap_err();
    let msgs: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
    assert!(msgs.iter().any(|m| m.contains("15-16")), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("stage[1].layers") && m.contains("31")),
        "{msgs:?}"
    );
}

#[test]
fn missing_model_file_unknown_keys_and_bad_tls_are_refused() {
    let text = local(Path::new("/nonexistent/model.gguf"), TWO_STAGES);
    assert_eq!(keys(&text), vec!["model.file"]);
    let typo = local(model_file().path(), TWO_STAGES).replace("[tls]", "[tls]\nsever_name = \"x\"");
    let e = Topology::parse(&typo, Path::new("t.toml")).unwrap_err();
    assert_eq!(e.error_type(), "topology_syntax");
    assert!(e.to_string().contains("sever_name"), "{e}");
    let m = model_file();
    let half = local(m.path(), TWO_STAGES).replace("generate = true", "ca = \"ca.pem\"");
    assert_eq!(keys(&half), vec!["tls"]);
    let remote = local(m.path(), TWO_STAGES).replace("127.0.0.1:7411", "10.0.0.2:7411");
    assert_eq!(keys(&remote), vec!["tls.generate"]);
    let remo = format!(
        "{}\n[remo]\nrank = \"1.5\"\nprecision = \"f16\"",
        local(m.path(), TWO_STAGES)
    );
    assert_eq!(keys(&remo), vec!["remo.rank", "remo.precision"]);
    // Values each parse but together are refused, at the key of the parameter at fault.
    for (section, key) in [
        ("precision = \"int\"\nrank = \"0.5\"", "remo.rank"),
        ("scale = 0.0\nprecision = \"f32\"", "remo.scale"),
        ("dummy_rows = 65", "remo.dummy_rows"),
        ("frac_bits = 61", "remo.frac_bits"),
        ("pad_rows = \"pow2:0\"", "remo.pad_rows"),
        ("prefill_chunk = 100", "remo.prefill_chunk"),
    ] {
        let text = format!("{}\n[remo]\n{section}", local(m.path(), TWO_STAGES));
        assert_eq!(keys(&text), vec![key], "{section}");
    }
}

/// The `[remo]` section arrives typed: the agents' configuration and whether the gpu-nodes load
/// the integer weights are one value, so they cannot disagree.
#[test]
fn the_remo_section_is_typed_with_the_defaults_of_its_precision() {
    let m = model_file();
    let read = |section: &str| {
        let text = format!("{}\n[remo]\n{section}", local(m.path(), TWO_STAGES));
        Topology::parse(&text, Path::new("t.toml")).unwrap().remo
    };
    let default = read("");
    assert_eq!(default.config, RemoConfig::default());
    assert!(default.integer_mode() && !default.tenant_accepts_below_floor);
    let float = read("precision = \"f64-gemm\"\npad_rows = \"pow2:64\"\nrank = \"full\"");
    assert!(!float.integer_mode());
    assert_eq!(float.config.precision, talaria_params::Precision::F64Gemm);
    assert_eq!(float.config.dummy_rows, talaria_params::FLOOR_DUMMY_ROWS);
    assert_eq!(float.config.pad_rows, talaria_params::PadRows::Pow2(64));
    assert_eq!(
        read("dummy_rows = 0\nprecision = \"f32\"")
            .config
            .dummy_rows,
        0
    );
}

#[test]
fn the_example_files_are_valid_apart_from_files_this_machine_lacks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for name in ["local.toml", "multi-host.toml"] {
        match Topology::load(dir.join(name)) {
            Ok(t) => t.check_layers(30).unwrap(),
            Err(e) => {
                assert!(!e.problems().is_empty(), "{name}: {e}");
                for p in e.problems() {
                    assert!(p.message.contains("does not exist"), "{name}: {p}");
                }
            }
        }
    }
}

#[test]
fn each_process_needs_only_the_files_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let shard = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, b"GGUF").unwrap();
        p
    };
    let (coord, a) = (shard("coordinator.gguf"), shard("a.gguf"));
    // Every process has a shard but stage b; the whole model is nowhere.
    let text = local(Path::new("/nonexistent/model.gguf"), TWO_STAGES)
        .replace(
            "listen = \"127.0.0.1:7400\"",
            &format!(
                "listen = \"127.0.0.1:7400\"\nweights = \"{}\"",
                coord.display()
            ),
        )
        .replace(
            "layers = \"0-14\"",
            &format!("layers = \"0-14\"\nweights = \"{}\"", a.display()),
        );
    let at = |role| match Topology::parse_for(&text, Path::new("t.toml"), role) {
        Ok(_) => vec![],
        Err(e) => e.problems().iter().map(|p| p.key.clone()).collect(),
    };
    assert_eq!(at(Role::Agent("t")), Vec::<String>::new());
    assert_eq!(at(Role::Coordinator), Vec::<String>::new());
    assert_eq!(at(Role::Stage("a")), Vec::<String>::new());
    // Stage b has no shard: it reads the model file, which is missing.
    assert_eq!(at(Role::Stage("b")), vec!["model.file"]);
    assert_eq!(at(Role::All), vec!["model.file"]);
    let t = Topology::parse_for(&text, Path::new("t.toml"), Role::Stage("a")).unwrap();
    assert_eq!(t.coordinator_file(), coord);
    assert_eq!(t.stage_file(&t.stages[0]), a);
    assert_eq!(
        t.stage_file(&t.stages[1]),
        Path::new("/nonexistent/model.gguf")
    );
    // A shard that is named but missing is reported under its own key.
    std::fs::remove_file(&a).unwrap();
    assert_eq!(at(Role::Stage("a")), vec!["stage[0].weights"]);
    assert_eq!(at(Role::Agent("t")), Vec::<String>::new());
}

#[test]
fn an_agent_needs_only_the_clusters_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let m = model_file();
    let text = local(m.path(), TWO_STAGES).replace(
        "generate = true",
        &format!(
            "ca = \"{}\"\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"",
            ca.display()
        ),
    );
    let own = text.replace(
        "listen = \"127.0.0.1:7420\"",
        "listen = \"127.0.0.1:7420\"\ntenant_tls = \"agent-tls\"",
    );
    let at = |text: &str, role| match Topology::parse_for(text, Path::new("/etc/t.toml"), role) {
        Ok(t) => Ok(t),
        Err(e) => Err(e
            .problems()
            .iter()
            .map(|p| p.key.clone())
            .collect::<Vec<_>>()),
    };
    let t = at(&own, Role::Agent("t")).unwrap();
    assert_eq!(
        t.agents[0].tenant_tls.as_deref(),
        Some(Path::new("/etc/agent-tls"))
    );
    // Every agent serves with a key of its own (made in memory): without `tenant_tls` too, it
    // needs only the CA, never the cluster's certificate and key.
    assert!(at(&text, Role::Agent("t")).is_ok());
    // The servers always need them.
    assert_eq!(
        at(&own, Role::Stage("a")).unwrap_err(),
        ["tls.cert", "tls.key"]
    );
}

#[test]
fn stages_with_the_same_part_are_replicas_and_mere_overlaps_are_refused() {
    let m = model_file();
    let replicas = format!(
        "{TWO_STAGES}[[stage]]\nname = \"b2\"\nlisten = \"127.0.0.1:7412\"\nlayers = \"15-29\"\nlm_head = true\n"
    );
    let t = Topology::parse(&local(m.path(), &replicas), Path::new("t.toml")).unwrap();
    assert_eq!(t.parts(), vec![vec![0], vec![1, 2]]);
    // The same layers without the LM head is another part overlapping it; so are layers that
    // only overlap.
    let overlap = format!(
        "{TWO_STAGES}[[stage]]\nname = \"c\"\nlisten = \"127.0.0.1:7412\"\nlayers = \"15-29\"\n"
    );
    assert_eq!(keys(&local(m.path(), &overlap)), ["stage[2].layers"]);
    let partial = format!(
        "{TWO_STAGES}[[stage]]\nname = \"c\"\nlisten = \"127.0.0.1:7412\"\nlayers = \"10-20\"\nlm_head = true\n"
    );
    let k = keys(&local(m.path(), &partial));
    assert!(k.contains(&"stage[2].layers".to_string()), "{k:?}");
    assert!(k.contains(&"stage".to_string()), "two LM-head parts: {k:?}");
}

#[test]
fn deadlines_and_waiting_lists_default_and_are_checked() {
    let m = model_file();
    let t = Topology::parse(&local(m.path(), TWO_STAGES), Path::new("t.toml")).unwrap();
    assert_eq!(t.deadlines, Deadlines::default());
    assert_eq!(t.deadlines.idle, Duration::from_secs(2));
    assert_eq!(t.agents[0].max_waiting, DEFAULT_MAX_WAITING);
    let custom = format!(
        "{}[deadlines]\ncall_ms = 1500\nsetup_ms = 3000\nidle_timeout_ms = 500\n",
        local(m.path(), TWO_STAGES)
    );
    let t = Topology::parse(&custom, Path::new("t.toml")).unwrap();
    assert_eq!(t.deadlines.call, Duration::from_millis(1500));
    assert_eq!(t.deadlines.idle, Duration::from_millis(500));
    let bad = format!(
        "{}[deadlines]\ncall_ms = 10\nsetup_ms = 5\nidle_timeout_ms = 50\n",
        local(m.path(), TWO_STAGES)
    );
    assert_eq!(
        keys(&bad),
        [
            "deadlines.call_ms",
            "deadlines.setup_ms",
            "deadlines.idle_timeout_ms"
        ]
    );
}

#[test]
fn the_conversation_cache_budget_defaults_and_is_bounded() {
    let m = model_file();
    let t = Topology::parse(&local(m.path(), TWO_STAGES), Path::new("t.toml")).unwrap();
    assert_eq!(
        t.agents[0].conversation_cache_bytes,
        DEFAULT_CONVERSATION_CACHE_MIB << 20
    );
    let with = |line: &str| {
        local(m.path(), TWO_STAGES).replace(
            "listen = \"127.0.0.1:7420\"\n",
            &format!("listen = \"127.0.0.1:7420\"\n{line}\n"),
        )
    };
    let off = Topology::parse(&with("conversation_cache_mib = 0"), Path::new("t.toml")).unwrap();
    assert_eq!(off.agents[0].conversation_cache_bytes, 0);
    assert_eq!(
        keys(&with("conversation_cache_mib = 1048577")),
        ["agent[0].conversation_cache_mib"]
    );
    assert!(Topology::parse(&with("conversation_cache_mib = -1"), Path::new("t.toml")).is_err());
}
