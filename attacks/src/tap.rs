//! Reading a tap directory (`docs/tap-format.md`): the cloud's view and the public parameters,
//! nothing else. `truth.json`, which an experiment may leave beside a tap, is never read here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use talaria_engine::{ModelConfig, OpId};
use talaria_gpu_node::{TAP_FORMAT, TapEvent, TapIndex};
use talaria_params::RemoConfig;

use crate::{AttackError, read_versioned};

/// The tap's file of public parameters, written beside `index.json` by whoever runs the cloud:
/// the ReMO configuration is public (the coordinator's topology carries it).
pub const PUBLIC_FILE: &str = "public.json";

/// What the cloud knows about the protocol besides what it receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Public {
    pub format: String,
    pub remo: RemoConfig,
    /// How the float modes drew their masks (absent in taps written before the grid masks).
    #[serde(default)]
    pub masks: MaskFamily,
}

/// The public algorithm of the float modes' masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskFamily {
    /// `fl(σ·ρ_op·z)` for an f64 normal `z`, added to the row in the mode's arithmetic: what
    /// the float modes drew before the grid masks.
    #[default]
    ScaledGaussian,
    /// Integer multiples of a power-of-two grid, added exactly to the row rounded to the grid
    /// (`talaria_remo::grid`): what the float modes draw now.
    Grid,
}

impl Public {
    pub const FORMAT: &'static str = "talaria-public-1";

    /// Writes `public.json` into a tap directory.
    pub fn write(dir: &Path, remo: &RemoConfig) -> Result<(), AttackError> {
        let public = Public {
            format: Self::FORMAT.into(),
            remo: remo.clone(),
            masks: MaskFamily::Grid,
        };
        let path = dir.join(PUBLIC_FILE);
        std::fs::create_dir_all(dir).map_err(AttackError::io(dir))?;
        let json = serde_json::to_vec_pretty(&public).map_err(AttackError::json(&path))?;
        std::fs::write(&path, json).map_err(AttackError::io(&path))
    }

    /// Whether rows of a call arrive in position order: masking off (no shuffle, no dummies),
    /// or shuffling off (dummies are appended after the real rows).
    pub fn ordered(&self) -> bool {
        !self.remo.enabled || !self.remo.shuffle
    }

    /// Rows of a call that carry real positions, given the rows received.
    pub fn real_rows(&self, rows: usize) -> usize {
        if self.remo.enabled {
            rows.saturating_sub(self.remo.dummy_rows)
        } else {
            rows
        }
    }
}

/// A row-major matrix of f64 values.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// One recorded call.
#[derive(Debug, Clone)]
pub struct CallRef {
    pub seq: u64,
    pub op: OpId,
    pub rows: usize,
    pub cols: usize,
    pub file: PathBuf,
    /// Arrival at the stage, µs since its tap started (taps of one cluster start together,
    /// within the stages' start-up skew).
    pub t_us: Option<u64>,
    /// The request frame's length; `None` in process or in older taps.
    pub frame_bytes: Option<usize>,
}

/// The events of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionTap {
    pub id: u64,
    /// The tenant the coordinator named when it opened the session (cluster taps only).
    pub tenant: Option<String>,
    calls: BTreeMap<u64, CallRef>,
    bases: HashMap<OpId, PathBuf>,
}

impl SessionTap {
    /// The session's complete forward passes, in order, each one call per op in forward order:
    /// the prefill (the prompt's rows) first, then one pass per generated token but the last.
    pub fn passes(
        &self,
        config: &ModelConfig,
    ) -> Result<Vec<BTreeMap<OpId, CallRef>>, AttackError> {
        let ops = 4 * config.n_layers + 1;
        let calls: Vec<&CallRef> = self.calls.values().collect();
        if calls.len() < ops {
            return Err(AttackError::Format(format!(
                "session {} has {} calls, a forward pass makes {ops}",
                self.id,
                calls.len()
            )));
        }
        let mut out = Vec::new();
        for chunk in calls.chunks_exact(ops) {
            let mut pass = BTreeMap::new();
            for c in chunk {
                if pass.insert(c.op, (*c).clone()).is_some() {
                    return Err(AttackError::Format(format!(
                        "session {}: {} twice in one forward pass (call {})",
                        self.id, c.op, c.seq
                    )));
                }
            }
            out.push(pass);
        }
        Ok(out)
    }

    /// The session's calls, in order.
    pub fn calls(&self) -> impl Iterator<Item = &CallRef> {
        self.calls.values()
    }

    /// The file of an op's public basis (`None` for the identity basis, or no masking).
    pub fn basis(&self, op: OpId) -> Option<&Path> {
        self.bases.get(&op).map(PathBuf::as_path)
    }
}

/// A tap directory, opened.
#[derive(Debug, Clone)]
pub struct Tap {
    pub dir: PathBuf,
    pub public: Public,
    sessions: BTreeMap<u64, SessionTap>,
}

/// A file named by the index, kept inside the tap directory.
fn inside(dir: &Path, name: &str) -> Result<PathBuf, AttackError> {
    let p = Path::new(name);
    if p.components().count() != 1 || p.is_absolute() {
        return Err(AttackError::Format(format!(
            "file {name:?} is not a plain name inside the tap"
        )));
    }
    Ok(dir.join(p))
}

impl Tap {
    /// Opens a tap: `index.json` and `public.json`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, AttackError> {
        let dir = dir.into();
        let index: TapIndex = read_versioned(&dir.join("index.json"), TAP_FORMAT)?;
        let public: Public = read_versioned(&dir.join(PUBLIC_FILE), Public::FORMAT)?;
        let mut sessions: BTreeMap<u64, SessionTap> = BTreeMap::new();
        for e in index.events {
            match e {
                TapEvent::Open {
                    session, tenant, ..
                } => {
                    sessions.entry(session).or_default().tenant = Some(tenant);
                }
                TapEvent::Setup {
                    session,
                    op,
                    basis_file,
                    ..
                } => {
                    if let Some(f) = basis_file {
                        let s = sessions.entry(session).or_default();
                        s.bases.insert(op, inside(&dir, &f)?);
                    }
                }
                TapEvent::Call {
                    session,
                    seq,
                    op,
                    rows,
                    cols,
                    file,
                    t_us,
                    frame_bytes,
                    ..
                } => {
                    let call = CallRef {
                        seq,
                        op,
                        rows,
                        cols,
                        file: inside(&dir, &file)?,
                        t_us,
                        frame_bytes,
                    };
                    let s = sessions.entry(session).or_default();
                    s.id = session;
                    if s.calls.insert(seq, call).is_some() {
                        return Err(AttackError::Format(format!(
                            "session {session}: call {seq} recorded twice"
                        )));
                    }
                }
            }
        }
        sessions.retain(|_, s| !s.calls.is_empty());
        Ok(Self {
            dir,
            public,
            sessions,
        })
    }

    /// The sessions recorded, by id.
    pub fn sessions(&self) -> impl Iterator<Item = &SessionTap> {
        self.sessions.values()
    }
}

/// A row-major matrix of the integer mode's residues modulo 2^64, bit for bit.
#[derive(Debug, Clone)]
pub struct Residues {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u64>,
}

impl Residues {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[u64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// The element types a tap's `.npy` files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    U64,
}

/// A `.npy` file whose header was checked: its dtype, shape, and bytes with the data from
/// `start` on, exactly `rows · cols` elements long.
struct Npy {
    dtype: Dtype,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
    start: usize,
}

impl Npy {
    fn body(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Reads a 2-D little-endian f32, f64 or u64 `.npy` (format 1.0 or 2.0, C order) and checks its
/// header against its size.
fn read_npy_raw(path: &Path) -> Result<Npy, AttackError> {
    let bytes = std::fs::read(path).map_err(AttackError::io(path))?;
    let bad = |why: &str| AttackError::Format(format!("{}: {why}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let dtype = if header.contains("'<f4'") {
        Dtype::F32
    } else if header.contains("'<f8'") {
        Dtype::F64
    } else if header.contains("'<u8'") {
        Dtype::U64
    } else {
        return Err(bad("dtype is neither <f4, <f8 nor <u8"));
    };
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let [rows, cols] = dims[..] else {
        return Err(bad("not a matrix"));
    };
    let width = if dtype == Dtype::F32 { 4 } else { 8 };
    let data_len = bytes.len() - (start + hlen);
    if rows.checked_mul(cols).and_then(|n| n.checked_mul(width)) != Some(data_len) {
        return Err(bad("data size does not match the shape"));
    }
    Ok(Npy {
        dtype,
        rows,
        cols,
        bytes,
        start: start + hlen,
    })
}

/// Reads a 2-D little-endian f32, f64 or u64 `.npy` (format 1.0 or 2.0, C order) as f64; u64
/// values (the integer mode's residues) are read as signed integers.
pub fn read_npy(path: &Path) -> Result<Matrix, AttackError> {
    let npy = read_npy_raw(path)?;
    let body = npy.body();
    let data = match npy.dtype {
        Dtype::F32 => body
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::U64 => body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as i64 as f64)
            .collect(),
        Dtype::F64 => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    };
    Ok(Matrix {
        rows: npy.rows,
        cols: npy.cols,
        data,
    })
}

/// Reads a 2-D little-endian u64 `.npy` (the integer mode's residues) bit for bit: [`read_npy`]
/// goes through f64 and keeps only 53 bits, which the pad statistics cannot afford.
pub fn read_npy_u64(path: &Path) -> Result<Residues, AttackError> {
    let npy = read_npy_raw(path)?;
    if npy.dtype != Dtype::U64 {
        return Err(AttackError::Format(format!(
            "{}: dtype is not <u8 (only the integer mode's residues are uint64)",
            path.display()
        )));
    }
    let data = npy
        .body()
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(Residues {
        rows: npy.rows,
        cols: npy.cols,
        data,
    })
}
