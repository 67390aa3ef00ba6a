//! What an operator prepares before a multi-host cluster starts (the ansible roles run these on
//! the control host): the model cut into per-process shards, and the cluster's TLS material.
//! Both are idempotent — a second run rewrites nothing and says so — so a provisioning run that
//! repeats them reports no change.

use std::collections::{BTreeMap, HashSet};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use talaria_gguf::GgufFile;
use talaria_model_file::{Part, read_config};
use talaria_model_store as store;
use talaria_net::TlsMaterial;

#[derive(Debug, Args)]
pub struct ShardArgs {
    /// The whole model (default: the default model in the cache).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    /// A stage to cut, `NAME=FIRST-LAST`, or `NAME=FIRST-LAST:lm_head` for the stage that also
    /// serves the LM head; repeatable.
    #[arg(long = "stage", required = true)]
    pub stages: Vec<String>,
    /// Where to write `coordinator.gguf`, `<stage>.gguf` and `manifest.json`.
    #[arg(long)]
    pub out: PathBuf,
}

/// One shard, as `manifest.json` lists it.
#[derive(Debug, Serialize)]
struct ShardEntry {
    file: String,
    sha256: String,
    bytes: u64,
    tensors: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lm_head: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Manifest {
    source: PathBuf,
    source_sha256: String,
    /// By part: `coordinator` and each stage's name.
    parts: BTreeMap<String, ShardEntry>,
    /// The parts whose file this run wrote (new or different); empty when nothing changed.
    written: Vec<String>,
}

/// Parses `NAME=FIRST-LAST[:lm_head]`.
fn parse_stage(text: &str) -> Result<(String, Part)> {
    let bad = || format!("--stage {text:?}: expected NAME=FIRST-LAST or NAME=FIRST-LAST:lm_head");
    let (name, spec) = text.split_once('=').with_context(bad)?;
    let (range, lm_head) = match spec.strip_suffix(":lm_head") {
        Some(r) => (r, true),
        None => (spec, false),
    };
    let (a, b) = range.split_once('-').with_context(bad)?;
    let layers: RangeInclusive<usize> =
        a.parse().with_context(bad)?..=b.parse().with_context(bad)?;
    let safe = !name.is_empty()
        && name != "coordinator"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !safe {
        bail!(
            "--stage {text:?}: the name must be letters, digits, '-', '_' or '.', and not \"coordinator\""
        );
    }
    Ok((name.to_string(), Part::Stage { layers, lm_head }))
}

/// Writes `bytes` to `path` unless the file there already has exactly these contents (compared
/// by SHA-256); returns the hash and whether it wrote.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(String, bool)> {
    let tmp = path.with_extension("gguf.partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let sha = store::sha256_file(&tmp)?;
    if path.is_file() && store::sha256_file(path)? == sha {
        std::fs::remove_file(&tmp)?;
        return Ok((sha, false));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok((sha, true))
}

/// `talaria shard-model`: cuts the model into the coordinator's shard (tokenizer and embeddings)
/// and one shard per stage (its layers' projections and norm gains, the LM head if it serves
/// it); prints the manifest (JSON) and writes it beside them.
pub fn shard(args: ShardArgs) -> Result<()> {
    let source = crate::resolve_model(args.model_file)?;
    let source_sha256 = store::sha256_file(&source)?;
    let f = GgufFile::open(&source).with_context(|| format!("reading {}", source.display()))?;
    let config = read_config(&f)?;
    let mut parts = vec![("coordinator".to_string(), Part::Coordinator)];
    let mut names = HashSet::new();
    for s in &args.stages {
        let (name, part) = parse_stage(s)?;
        if !names.insert(name.clone()) {
            bail!("--stage {name}: given twice");
        }
        parts.push((name, part));
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let mut manifest = Manifest {
        source: source.clone(),
        source_sha256: source_sha256.clone(),
        parts: BTreeMap::new(),
        written: Vec::new(),
    };
    for (name, part) in parts {
        let shard = part
            .shard(&f, &config, &source_sha256)
            .with_context(|| format!("shard {name}"))?;
        let file = format!("{name}.gguf");
        let bytes = shard.to_bytes();
        let (sha256, wrote) = write_if_changed(&args.out.join(&file), &bytes)?;
        if wrote {
            manifest.written.push(name.clone());
        }
        let (layers, lm_head) = match &part {
            Part::Coordinator => (None, None),
            Part::Stage { layers, lm_head } => (
                Some(format!("{}-{}", layers.start(), layers.end())),
                Some(*lm_head),
            ),
        };
        manifest.parts.insert(
            name,
            ShardEntry {
                file,
                sha256,
                bytes: bytes.len() as u64,
                tensors: part.tensors(&f, &config).len(),
                layers,
                lm_head,
            },
        );
    }
    let text = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(args.out.join("manifest.json"), &text)?;
    println!("{text}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Where to write `ca.pem`, `cert.pem` and `key.pem`.
    #[arg(long)]
    pub out: PathBuf,
    /// The name in the servers' certificate (the topology's `tls.server_name`).
    #[arg(long, default_value = talaria_topology::DEFAULT_SERVER_NAME)]
    pub server_name: String,
    /// Another name the certificate is valid for (e.g. an agent's host name, for HTTPS clients of
    /// its API); repeatable.
    #[arg(long = "san")]
    pub extra_names: Vec<String>,
}

/// `talaria tls`: a CA and one server certificate for the cluster. Keeps material that is
/// already there (prints `kept`), so re-provisioning never rotates keys behind running
/// processes; delete the folder to rotate.
pub fn tls(args: TlsArgs) -> Result<()> {
    let (_, made) = TlsMaterial::load_or_generate(&args.out, &args.server_name, &args.extra_names)?;
    println!(
        "{} {}",
        if made { "generated" } else { "kept" },
        args.out.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Where to write the manifest (JSON).
    #[arg(long, default_value = "calibration/smollm2-135m.manifest.json")]
    pub out: PathBuf,
    #[arg(long)]
    pub model_file: Option<PathBuf>,
}

/// The model manifest of a model file: what a gpu-node serves for every op (both modes) and
/// what the coordinator provisions, as `talaria_cvm_agent::manifest` checks them.
pub fn model_manifest(path: &Path) -> Result<talaria_cvm_agent::manifest::ModelManifest> {
    use talaria_gpu_node::{CloudExecutor, LinearWeights};
    use talaria_wire::{BasisSpec, SetupRequest};
    let model_sha256 = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        std::io::copy(&mut f, &mut h)?;
        hex::encode(h.finalize())
    };
    let f = GgufFile::open(path)?;
    let p = talaria_model_file::read_provision(&f)?;
    let config = p.config.clone();
    let layers = 0..=config.n_layers.saturating_sub(1);
    let mut weights =
        LinearWeights::load_on(&f, &config, layers, true, talaria_topology::Backend::Cpu)?;
    weights.load_int(&f)?;
    drop(f);
    let cloud = CloudExecutor::new(weights, None);
    talaria_cvm_agent::manifest::ModelManifest::compute(&model_sha256, &p, &config, |op| {
        let reply = |integer| {
            cloud
                .setup(&SetupRequest {
                    session: 0,
                    op,
                    basis: BasisSpec::Identity,
                    f64: false,
                    integer,
                })
                .map(|r| r.r_pub)
                .map_err(|e| e.to_string())
        };
        Ok((reply(false)?, reply(true)?))
    })
    .map_err(anyhow::Error::msg)
}

/// `talaria manifest`: writes the model manifest the agent binary embeds.
pub fn manifest(args: ManifestArgs) -> Result<()> {
    let path = crate::resolve_model(args.model_file.clone())?;
    let m = model_manifest(&path)?;
    let mut json = serde_json::to_string_pretty(&m)?;
    json.push('\n');
    std::fs::write(&args.out, json).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{} (manifest sha256 {})", args.out.display(), m.sha256());
    Ok(())
}
