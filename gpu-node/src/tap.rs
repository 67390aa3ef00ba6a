//! The tap: everything the cloud receives and knows, written as NumPy `.npy` files plus a JSON
//! index (`docs/tap-format.md`), so that anyone can attack it with their own tools.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use talaria_actors::stage::Arrival;
use talaria_engine::OpId;
use talaria_wire::{BasisSpec, MaskedCall, SetupRequest, Tensor};

use crate::NodeError;

/// One recorded event, in arrival order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Event {
    /// A session opened on a cluster stage: the coordinator names its tenant.
    Open {
        session: u64,
        tenant: String,
        t_us: u64,
    },
    Setup {
        session: u64,
        t_us: u64,
        frame_bytes: Option<usize>,
        op: String,
        layer: Option<usize>,
        d_in: usize,
        basis: &'static str,
        rank: usize,
        /// The expanded public basis (`rank × d_in`, f64), for orthonormal bases.
        basis_file: Option<String>,
    },
    Call {
        session: u64,
        /// Arrival, in µs since the tap started.
        t_us: u64,
        /// The request frame's length; `None` in process (no wire).
        frame_bytes: Option<usize>,
        seq: u64,
        op: String,
        layer: Option<usize>,
        rows: usize,
        cols: usize,
        dtype: &'static str,
        file: String,
    },
}

#[derive(Serialize)]
struct Index<'a> {
    format: &'static str,
    events: &'a [Event],
}

/// Records the cloud's view into a directory.
pub struct Tap {
    dir: PathBuf,
    start: Instant,
    events: Vec<Event>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |e| NodeError::Tap(format!("{}: {e}", path.display()))
}

fn op_parts(op: OpId) -> (String, Option<usize>) {
    match op {
        OpId::Block { layer, op } => (op.name().to_string(), Some(layer)),
        OpId::LmHead => ("lm_head".into(), None),
    }
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
            events: Vec::new(),
        })
    }

    /// µs from the tap's start to `at`.
    fn t_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    pub(crate) fn record_open(&mut self, session: u64, tenant: &str) {
        let t_us = self.t_us(Instant::now());
        self.events.push(Event::Open {
            session,
            tenant: tenant.to_string(),
            t_us,
        });
    }

    pub(crate) fn record_setup(
        &mut self,
        req: &SetupRequest,
        d_in: usize,
        expanded: Option<&[f64]>,
        seen: Arrival,
    ) -> Result<(), NodeError> {
        let (op, layer) = op_parts(req.op);
        let rank = req.basis.rank(d_in);
        let (basis, basis_file) = match &req.basis {
            BasisSpec::Identity => ("identity", None),
            BasisSpec::Orthonormal { .. } => {
                let name = format!("basis-s{}-{}.npy", req.session, crate::tap_op_name(req.op));
                if let Some(b) = expanded {
                    write_npy(&self.dir.join(&name), rank, d_in, NpyData::F64(b))?;
                }
                ("orthonormal", Some(name))
            }
        };
        self.events.push(Event::Setup {
            session: req.session,
            t_us: self.t_us(seen.at),
            frame_bytes: seen.frame_bytes,
            op,
            layer,
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
        let (op, layer) = op_parts(call.op);
        let (rows, cols) = call.x.shape();
        let file = format!("call-{:06}.npy", self.events.len());
        let path = self.dir.join(&file);
        let dtype = match &call.x {
            Tensor::F32 { data, .. } => {
                write_npy(&path, rows, cols, NpyData::F32(data))?;
                "float32"
            }
            Tensor::F64 { data, .. } => {
                write_npy(&path, rows, cols, NpyData::F64(data))?;
                "float64"
            }
            Tensor::U64 { data, .. } => {
                write_npy(&path, rows, cols, NpyData::U64(data))?;
                "uint64"
            }
        };
        self.events.push(Event::Call {
            session: call.session,
            t_us: self.t_us(seen.at),
            frame_bytes: seen.frame_bytes,
            seq: call.seq,
            op,
            layer,
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
        let index = Index {
            format: "talaria-tap-1",
            events: &self.events,
        };
        let json = serde_json::to_vec_pretty(&index).map_err(|e| NodeError::Tap(e.to_string()))?;
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
