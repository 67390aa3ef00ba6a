//! The tap: everything the cloud receives and knows, written as NumPy `.npy` files plus a JSON
//! index (`docs/tap-format.md`), so that anyone can attack it with their own tools.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::runtime::Arrival;
use serde::{Deserialize, Serialize};
use talaria_engine::OpId;
use talaria_wire::{BasisSpec, MaskedCall, SetupRequest, Tensor};

use crate::NodeError;

/// The tap index's format name (`docs/tap-format.md`); readers refuse any other.
pub const TAP_FORMAT: &str = "talaria-tap-2";

/// `index.json`: the tap's events in arrival order. Written here, read by `talaria-attacks` and
/// anyone's own tools; this is the only definition of the schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TapIndex {
    pub format: String,
    pub events: Vec<TapEvent>,
}

/// One recorded event. Times are µs since the tap started and frame sizes are the request
/// frame's bytes; both are `None` where not recorded (in process there is no frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TapEvent {
    /// A session opened on a cluster stage: the coordinator names its tenant.
    Open {
        session: u64,
        tenant: String,
        #[serde(default)]
        t_us: Option<u64>,
    },
    /// The CVM asked for an op's `R_pub`.
    Setup {
        session: u64,
        #[serde(default)]
        t_us: Option<u64>,
        #[serde(default)]
        frame_bytes: Option<usize>,
        #[serde(with = "talaria_engine::op_text")]
        op: OpId,
        d_in: usize,
        basis: TapBasis,
        rank: usize,
        /// The expanded public basis (`rank × d_in`, f64), for orthonormal bases.
        basis_file: Option<String>,
    },
    /// One masked linear call; its rows are in `file`.
    Call {
        session: u64,
        #[serde(default)]
        t_us: Option<u64>,
        #[serde(default)]
        frame_bytes: Option<usize>,
        seq: u64,
        #[serde(with = "talaria_engine::op_text")]
        op: OpId,
        rows: usize,
        cols: usize,
        dtype: TapDtype,
        file: String,
    },
}

/// The public basis a set-up named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TapBasis {
    Identity,
    Orthonormal,
}

/// The element type of a call's `.npy` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TapDtype {
    Float32,
    Float64,
    /// The integer mode's residues modulo 2^64.
    Uint64,
}

/// Records the cloud's view into a directory.
pub struct Tap {
    dir: PathBuf,
    start: Instant,
    index: TapIndex,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |e| NodeError::Tap(format!("{}: {e}", path.display()))
}

/// Writes a row-major matrix as a NumPy `.npy` (format 1.0, little-endian).
pub fn write_npy(
    path: &Path,
    rows: usize,
    cols: usize,
    data: NpyData<'_>,
) -> Result<(), NodeError> {
    let descr = match data {
        NpyData::F32(_) => "<f4",
        NpyData::F64(_) => "<f8",
        NpyData::U64(_) => "<u8",
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + rows * cols * 8);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    match data {
        NpyData::F32(v) => v
            .iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes())),
        NpyData::F64(v) => v
            .iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes())),
        NpyData::U64(v) => v
            .iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes())),
    }
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(&bytes).map_err(io(path))
}

/// Values for [`write_npy`].
#[derive(Clone, Copy)]
pub enum NpyData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    /// The integer mode's residues modulo 2^64.
    U64(&'a [u64]),
}

impl Tap {
    /// Starts recording into `dir` (created if needed).
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, NodeError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self {
            dir,
            start: Instant::now(),
            index: TapIndex {
                format: TAP_FORMAT.into(),
                events: Vec::new(),
            },
        })
    }

    /// µs from the tap's start to `at`.
    fn t_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    pub(crate) fn record_open(&mut self, session: u64, tenant: &str) {
        let t_us = self.t_us(Instant::now());
        self.index.events.push(TapEvent::Open {
            session,
            tenant: tenant.to_string(),
            t_us: Some(t_us),
        });
    }

    pub(crate) fn record_setup(
        &mut self,
        req: &SetupRequest,
        d_in: usize,
        expanded: Option<&[f64]>,
        seen: Arrival,
    ) -> Result<(), NodeError> {
        let rank = req.basis.rank(d_in);
        let (basis, basis_file) = match &req.basis {
            BasisSpec::Identity => (TapBasis::Identity, None),
            BasisSpec::Orthonormal { .. } => {
                let name = format!("basis-s{}-{}.npy", req.session, req.op);
                if let Some(b) = expanded {
                    write_npy(&self.dir.join(&name), rank, d_in, NpyData::F64(b))?;
                }
                (TapBasis::Orthonormal, Some(name))
            }
        };
        self.index.events.push(TapEvent::Setup {
            session: req.session,
            t_us: Some(self.t_us(seen.at)),
            frame_bytes: seen.frame_bytes,
            op: req.op,
            d_in,
            basis,
            rank,
            basis_file,
        });
        Ok(())
    }

    pub(crate) fn record_call(
        &mut self,
        call: &MaskedCall,
        seen: Arrival,
    ) -> Result<(), NodeError> {
        let (rows, cols) = call.x.shape();
        let file = format!("call-{:06}.npy", self.index.events.len());
        let path = self.dir.join(&file);
        let dtype = match &call.x {
            Tensor::F32 { data, .. } => {
                write_npy(&path, rows, cols, NpyData::F32(data))?;
                TapDtype::Float32
            }
            Tensor::F64 { data, .. } => {
                write_npy(&path, rows, cols, NpyData::F64(data))?;
                TapDtype::Float64
            }
            Tensor::U64 { data, .. } => {
                write_npy(&path, rows, cols, NpyData::U64(data))?;
                TapDtype::Uint64
            }
        };
        self.index.events.push(TapEvent::Call {
            session: call.session,
            t_us: Some(self.t_us(seen.at)),
            frame_bytes: seen.frame_bytes,
            seq: call.seq,
            op: call.op,
            rows,
            cols,
            dtype,
            file,
        });
        Ok(())
    }

    /// Writes `index.json`.
    pub fn finish(&mut self) -> Result<(), NodeError> {
        let path = self.dir.join("index.json");
        let json =
            serde_json::to_vec_pretty(&self.index).map_err(|e| NodeError::Tap(e.to_string()))?;
        std::fs::write(&path, json).map_err(io(&path))
    }
}

impl Drop for Tap {
    /// A run that ends early (an error, an interrupt) still leaves a readable index.
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("tap index not written: {e}");
        }
    }
}
