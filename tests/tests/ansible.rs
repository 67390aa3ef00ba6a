//! The ansible playbooks, run for real: `site.yml` on `ansible/inventory/local.yml` (four hosts
//! on this machine over the local connection, each with its own folder) brings a cluster up that
//! answers with the plain engine's greedy ids; a second run changes nothing; a corrupted weight
//! file on a host is put right (and the processes that depend on it restarted); `teardown.yml`
//! stops and removes everything. And `ansible-lint` passes on the whole folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use talaria_gguf::GgufFile;
use talaria_gpu_node::PlainEngine;
use talaria_tests::cluster::bin;
use talaria_tests::{golden_cases, ids, plain_greedy, real_model};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// The virtualenv with ansible-core and ansible-lint, made by scripts/lib.sh (once per run).
fn ansible_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let out = Command::new("bash")
            .arg("-c")
            .arg("source scripts/lib.sh && ensure_ansible && echo \"$TALARIA_ANSIBLE_VENV\"")
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "installing ansible (scripts/lib.sh ensure_ansible): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// An ansible tool of the virtualenv, run in `ansible/` with its configuration.
fn tool(name: &str) -> Command {
    let venv = ansible_venv();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![venv.join("bin")];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(venv.join("bin").join(name));
    cmd.current_dir(repo().join("ansible"))
        .env("PATH", std::env::join_paths(paths).unwrap())
        .env("ANSIBLE_CONFIG", repo().join("ansible/ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0");
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The end of a long output: where an ansible failure is.
fn tail(s: &str) -> &str {
    let cut = s.len().saturating_sub(6000);
    &s[s.ceil_char_boundary(cut)..]
}

/// A host's counters from the PLAY RECAP: `{"ok": 26, "changed": 0, "failed": 0, ...}`.
fn recap(out: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let start = out.find("PLAY RECAP").expect("a PLAY RECAP");
    out[start..]
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (host, counts) = l.split_once(" : ")?;
            let counts = counts
                .split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            Some((host.trim().to_string(), counts))
        })
        .collect()
}

const HOSTS: [&str; 4] = ["coord", "stage-0", "stage-1", "tenant-a"];
const AGENT: &str = "127.0.0.1:27420";

/// The local inventory's cluster under one temporary folder; torn down when dropped, even when
/// the test fails half-way.
struct Deployment {
    base: tempfile::TempDir,
}

impl Deployment {
    fn playbook(&self, book: &str) -> (Output, String) {
        let out = tool("ansible-playbook")
            .args(["-i", "inventory/local.yml", book])
            .arg("-e")
            .arg(format!("talaria_base={}", self.base.path().display()))
            .arg("-e")
            .arg(format!(
                "talaria_bin_src={}",
                bin("talaria").parent().unwrap().display()
            ))
            .output()
            .unwrap();
        let t = text(&out);
        (out, t)
    }

    /// Runs `book`, asserting it succeeded on every host; the recap.
    fn run(&self, book: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
        let started = std::time::Instant::now();
        let (out, t) = self.playbook(book);
        assert!(out.status.success(), "{book} failed:\n{}", tail(&t));
        let recap = recap(&t);
        eprintln!(
            "{book}: {:.1} s, changed {:?}",
            started.elapsed().as_secs_f64(),
            recap
                .iter()
                .map(|(h, c)| (h.as_str(), c["changed"]))
                .collect::<Vec<_>>()
        );
        for host in HOSTS {
            let c = recap
                .get(host)
                .unwrap_or_else(|| panic!("{host} in\n{}", tail(&t)));
            assert_eq!((c["failed"], c["unreachable"]), (0, 0), "{host}");
        }
        recap
    }

    fn root(&self, host: &str) -> PathBuf {
        self.base.path().join(host)
    }

    /// The pid of each service, from its pid file.
    fn pids(&self) -> BTreeMap<String, u32> {
        let mut pids = BTreeMap::new();
        for host in HOSTS {
            let Ok(dir) = std::fs::read_dir(self.root(host).join("run")) else {
                continue;
            };
            for e in dir.flatten() {
                let pid = std::fs::read_to_string(e.path()).unwrap_or_default();
                if let Ok(pid) = pid.trim().parse() {
                    pids.insert(e.file_name().to_string_lossy().into_owned(), pid);
                }
            }
        }
        pids
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let pids = self.pids();
        if !pids.is_empty() {
            let _ = self.playbook("teardown.yml");
            for pid in self.pids().values() {
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Every `.gguf` under `dir`, as paths relative to it.
fn gguf_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "gguf") {
                found.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// The block layers whose tensors a shard holds, and whether it holds the token embeddings.
fn held(path: &Path) -> (std::collections::BTreeSet<usize>, bool) {
    let f = GgufFile::open(path).unwrap();
    let layers = f
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse().ok())
        .collect();
    (layers, f.has_tensor("token_embd.weight"))
}

/// The CA of the certificate the agent made itself (public; its key stays on the agent's host).
fn agent_ca(dep: &Deployment) -> PathBuf {
    dep.root("tenant-a").join("etc/tenant-tls/tenant-a/ca.pem")
}

/// Asks the agent through the CLI, as a tenant would, trusting `ca`.
fn generate(ca: &Path, prompt_ids: &[u32], max_tokens: usize) -> Output {
    let prompt: Vec<String> = prompt_ids.iter().map(|i| i.to_string()).collect();
    Command::new(bin("talaria"))
        .args(["generate", "--engine", "cluster", "--agent", AGENT])
        .arg("--ca")
        .arg(ca)
        .args(["--allow-insecure-agent", "--json", "--prompt-ids"])
        .arg(prompt.join(","))
        .args(["--max-tokens", &max_tokens.to_string()])
        // The local inventory's example key (its hash is the tenant's `talaria_api_key_sha256`).
        .env("TALARIA_API_KEY", "tk-local-example-not-secret")
        .output()
        .unwrap()
}

/// The agent's greedy ids through the CLI.
fn ask(dep: &Deployment, prompt_ids: &[u32], max_tokens: usize) -> Vec<u32> {
    let out = generate(&agent_ca(dep), prompt_ids, max_tokens);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    ids(&json["ids"])
}

#[test]
fn ansible_lint_passes() {
    let out = tool("ansible-lint").output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "ansible-lint:\n{}", tail(&t));
    assert!(
        t.contains("Profile 'production' was required, and it passed"),
        "{t}"
    );
}

#[test]
fn the_playbook_brings_up_a_cluster_that_answers_keeps_still_and_tears_down() {
    let dep = Deployment {
        base: tempfile::tempdir().unwrap(),
    };
    let model = real_model();
    let cases = golden_cases();
    let mut plain = PlainEngine::load(&model).unwrap();
    let expected: Vec<Vec<u32>> = cases
        .iter()
        .take(2)
        .map(|c| plain_greedy(&mut plain, c.prompt_ids.clone(), c.max_tokens))
        .collect();
    drop(plain);

    // 1. Up: every host changed, every service running.
    let first = dep.run("site.yml");
    for host in HOSTS {
        assert!(first[host]["changed"] > 0, "{host}: {first:?}");
    }
    let pids = dep.pids();
    assert_eq!(
        pids.keys().collect::<Vec<_>>(),
        [
            "talaria-agent-tenant-a.pid",
            "talaria-coordinator.pid",
            "talaria-gpu-stage-0.pid",
            "talaria-gpu-stage-1.pid"
        ]
    );
    assert!(pids.values().all(|&p| alive(p)), "{pids:?}");
    // The units run here by pid file are the ones systemd would run: check them as systemd does.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        for host in HOSTS {
            for unit in std::fs::read_dir(dep.root(host).join("services")).unwrap() {
                let unit = unit.unwrap().path();
                let out = Command::new("systemd-analyze")
                    .arg("verify")
                    .arg(&unit)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}: {}", unit.display(), text(&out));
            }
        }
    } else {
        eprintln!("no systemd-analyze here: the service units are not verified");
    }

    // 2. Each host holds only its part of the model; the agent's none at all.
    assert_eq!(gguf_files(&dep.root("coord")), ["weights/coordinator.gguf"]);
    assert_eq!(gguf_files(&dep.root("stage-0")), ["weights/stage-0.gguf"]);
    assert_eq!(gguf_files(&dep.root("stage-1")), ["weights/stage-1.gguf"]);
    assert_eq!(gguf_files(&dep.root("tenant-a")), Vec::<String>::new());
    let (layers, embd) = held(&dep.root("stage-0").join("weights/stage-0.gguf"));
    assert_eq!((layers, embd), ((0..=14).collect(), false));
    // The LM head is tied to the embeddings: the last stage holds them as its LM head.
    let (layers, embd) = held(&dep.root("stage-1").join("weights/stage-1.gguf"));
    assert_eq!((layers, embd), ((15..=29).collect(), true));
    let (layers, embd) = held(&dep.root("coord").join("weights/coordinator.gguf"));
    assert!(layers.is_empty() && embd);
    // The cluster's key is on the cloud's hosts only; the agent's own key is on no disk at all
    // (made in its memory at every start): its folder holds the public certificate only.
    let files = |host: &str, dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dep.root(host).join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    for host in ["coord", "stage-0", "stage-1"] {
        assert_eq!(
            files(host, "etc/tls"),
            ["ca.pem", "cert.pem", "key.pem"],
            "{host}"
        );
        assert!(files(host, "etc/tenant-tls").is_empty(), "{host}");
    }
    assert_eq!(files("tenant-a", "etc/tls"), ["ca.pem"]);
    assert_eq!(
        files("tenant-a", "etc/tenant-tls/tenant-a"),
        ["ca.pem", "cert.pem"]
    );
    let agent_cert = std::fs::read(
        dep.root("tenant-a")
            .join("etc/tenant-tls/tenant-a/cert.pem"),
    )
    .unwrap();
    // A tenant that trusts the cluster's CA cannot reach the agent: its certificate is its own.
    let case = &cases[0];
    let out = generate(
        &dep.root("coord").join("etc/tls/ca.pem"),
        &case.prompt_ids,
        1,
    );
    assert!(!out.status.success(), "{}", text(&out));

    // The agent's attestation states what protects the tenant: the integer default, and only
    // the tenant's own API key (by hash, from the inventory).
    let out = Command::new(bin("talaria"))
        .args(["verify", "--agent", AGENT, "--allow-insecure-agent", "--ca"])
        .arg(agent_ca(&dep))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["claims"]["remo"]["precision"], "int", "{v}");
    assert_eq!(
        v["claims"]["api_key_sha256"],
        serde_json::json!(["bda8a5ccaa95b2155ef0471bdab6f4e10cae39299e0474a0f2d7113fe1fb7da0"]),
        "{v}"
    );

    // 3. It answers with the plain engine's greedy ids.
    for (case, want) in cases.iter().zip(&expected) {
        assert_eq!(
            &ask(&dep, &case.prompt_ids, case.max_tokens),
            want,
            "prompt {}",
            case.name
        );
    }

    // 4. A second run changes nothing and restarts nothing.
    let second = dep.run("site.yml");
    for host in HOSTS {
        assert_eq!(second[host]["changed"], 0, "{host}: {second:?}");
    }
    assert_eq!(dep.pids(), pids);

    // 5. A stage's weights corrupted on its host: the next run restores them from the verified
    //    shard, restarts that stage and, in order, the coordinator and the agent that depend on
    //    it; the other stage is left running.
    let shard = dep.root("stage-0").join("weights/stage-0.gguf");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&shard, bytes).unwrap();
    let third = dep.run("site.yml");
    assert!(third["stage-0"]["changed"] > 0, "{third:?}");
    assert_eq!(third["stage-1"]["changed"], 0, "{third:?}");
    let after = dep.pids();
    for (name, restarted) in [
        ("talaria-gpu-stage-0.pid", true),
        ("talaria-gpu-stage-1.pid", false),
        ("talaria-coordinator.pid", true),
        ("talaria-agent-tenant-a.pid", true),
    ] {
        assert_eq!(after[name] != pids[name], restarted, "{name}");
        assert!(alive(after[name]), "{name}");
    }
    assert_eq!(ask(&dep, &case.prompt_ids, case.max_tokens), expected[0]);
    // The restarted agent made a new key (and the tenant above reached it through the new
    // certificate it published).
    assert_ne!(
        std::fs::read(
            dep.root("tenant-a")
                .join("etc/tenant-tls/tenant-a/cert.pem")
        )
        .unwrap(),
        agent_cert
    );

    // 6. Teardown: every process stopped, every host's folder gone; a second teardown is a no-op.
    dep.run("teardown.yml");
    assert!(after.values().all(|&p| !alive(p)), "{after:?}");
    for host in HOSTS {
        assert!(!dep.root(host).exists(), "{host}");
    }
    let again = dep.run("teardown.yml");
    for host in HOSTS {
        assert_eq!(again[host]["changed"], 0, "{host}: {again:?}");
    }
}
