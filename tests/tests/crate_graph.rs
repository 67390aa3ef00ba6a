//! The trust boundary at crate level, read from `cargo tree`: what each process's binary links.
//!
//! - the gpu-node (the cloud) links no ReMO and no agent code: it cannot hold a mask or a pad,
//!   and its build cannot grow a path to one;
//! - the cvm-agent links no model-file reader and no tensor library: it is never handed the
//!   weights' file format, only the provision the coordinator sends;
//! - the coordinator links no tensor library and no ReMO: it routes frames and provisions agents;
//! - ReMO, the CVM's pure computation, and the protocol it speaks (`talaria-wire`, sans I/O) link
//!   no network code: the QUIC endpoints are `talaria-net`.
//!
//! Each check has its power shown on the same graph: the crate it forbids is linked by some
//! other package, so a check that read the wrong tree would fail.

use std::collections::BTreeSet;
use std::process::Command;

/// The crate names package `p` links (normal dependencies, default features), itself included.
fn linked(p: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}", "-p", p])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {p}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(names.contains(p), "cargo tree -p {p} did not list {p}");
    names
}

/// The names in `names` that are `forbidden` or start with one of the `prefixes`.
fn offenders(names: &BTreeSet<String>, forbidden: &[&str], prefixes: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| forbidden.contains(&n.as_str()) || prefixes.iter().any(|p| n.starts_with(p)))
        .cloned()
        .collect()
}

#[test]
fn each_process_links_only_its_side_of_the_trust_boundary() {
    let gpu_node = linked("talaria-gpu-node");
    let agent = linked("talaria-cvm-agent");
    let coordinator = linked("talaria-coordinator");
    let remo = linked("talaria-remo");
    let wire = linked("talaria-wire");

    // (process, what it links, crates it must not link, name prefixes it must not link)
    type Case<'a> = (&'a str, &'a BTreeSet<String>, &'a [&'a str], &'a [&'a str]);
    let cases: [Case; 5] = [
        (
            "gpu-node",
            &gpu_node,
            &["talaria-remo", "talaria-cvm-agent"],
            &[],
        ),
        (
            "cvm-agent",
            &agent,
            &["talaria-gguf", "talaria-model-file", "talaria-gpu-node"],
            &["burn"],
        ),
        (
            "coordinator",
            &coordinator,
            &["talaria-remo", "talaria-cvm-agent", "talaria-gpu-node"],
            &["burn"],
        ),
        (
            "remo",
            &remo,
            &["talaria-net", "quinn", "rustls", "tokio"],
            &[],
        ),
        (
            "wire",
            &wire,
            &["talaria-net", "quinn", "rustls", "tokio"],
            &[],
        ),
    ];
    for (who, names, forbidden, prefixes) in cases {
        let bad = offenders(names, forbidden, prefixes);
        assert!(bad.is_empty(), "the {who} links {bad:?}");
    }

    // Power: every forbidden crate is linked by some package of the same graph, so each check
    // above reads a tree where the crate could have appeared.
    let talaria = linked("talaria");
    for (name, by) in [
        ("talaria-remo", &agent),
        ("talaria-cvm-agent", &talaria),
        ("talaria-gguf", &gpu_node),
        ("talaria-model-file", &coordinator),
        ("talaria-gpu-node", &talaria),
        ("talaria-net", &agent),
        ("quinn", &agent),
        ("rustls", &coordinator),
        ("tokio", &gpu_node),
    ] {
        assert!(
            by.contains(name),
            "control: {name} is linked nowhere checked"
        );
    }
    assert!(
        !offenders(&gpu_node, &[], &["burn"]).is_empty(),
        "control: the gpu-node links burn"
    );
}
