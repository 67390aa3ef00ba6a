use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors in a tensor received from the other side.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("tensor of {rows} x {cols} carries {len} values")]
    BadLength {
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error("expected a {expected} tensor, got {found}")]
    WrongPrecision {
        expected: &'static str,
        found: &'static str,
    },
    #[error(transparent)]
    BadIntWeight(#[from] talaria_kernels::BadIntWeight),
}

/// A row-major matrix in the precision the call asked for.
///
/// On the wire the values travel as one block of raw little-endian bytes (not one varint per
/// element), and are copied out on receipt: a borrowed byte slice is not aligned for floats.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    F64 {
        rows: usize,
        cols: usize,
        data: Vec<f64>,
    },
    /// Residues modulo `2^64`: the integer mode's padded rows and their products.
    U64 {
        rows: usize,
        cols: usize,
        data: Vec<u64>,
    },
}

impl Tensor {
    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Tensor::F32 { rows, cols, .. }
            | Tensor::F64 { rows, cols, .. }
            | Tensor::U64 { rows, cols, .. } => (rows, cols),
        }
    }

    /// `"f32"`, `"f64"` or `"u64"`.
    pub fn precision(&self) -> &'static str {
        match self {
            Tensor::F32 { .. } => "f32",
            Tensor::F64 { .. } => "f64",
            Tensor::U64 { .. } => "u64",
        }
    }

    /// Checks that the data length matches the shape: a peer may send anything.
    pub fn validate(&self) -> Result<(), WireError> {
        let (rows, cols) = self.shape();
        let len = match self {
            Tensor::F32 { data, .. } => data.len(),
            Tensor::F64 { data, .. } => data.len(),
            Tensor::U64 { data, .. } => data.len(),
        };
        if rows.checked_mul(cols) != Some(len) {
            return Err(WireError::BadLength { rows, cols, len });
        }
        Ok(())
    }

    /// The values widened to f64 (residues read as signed integers).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Tensor::F32 { data, .. } => data.iter().map(|&v| f64::from(v)).collect(),
            Tensor::F64 { data, .. } => data.clone(),
            Tensor::U64 { data, .. } => data.iter().map(|&v| v as i64 as f64).collect(),
        }
    }
}

/// The wire form of a [`Tensor`].
#[derive(Serialize, Deserialize)]
struct RawTensor<'a> {
    /// 0: f32, 1: f64, 2: u64.
    dtype: u8,
    rows: u64,
    cols: u64,
    #[serde(borrow, with = "serde_bytes")]
    bytes: std::borrow::Cow<'a, [u8]>,
}

fn le_bytes<T: bytemuck::Pod>(values: &[T], to_le: impl Fn(T) -> T) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        let swapped: Vec<T> = values.iter().map(|&v| to_le(v)).collect();
        std::borrow::Cow::Owned(bytemuck::cast_slice(&swapped).to_vec())
    }
}

impl Serialize for Tensor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (rows, cols) = self.shape();
        let (dtype, bytes) = match self {
            Tensor::F32 { data, .. } => {
                (0, le_bytes(data, |v| f32::from_bits(v.to_bits().to_le())))
            }
            Tensor::F64 { data, .. } => {
                (1, le_bytes(data, |v| f64::from_bits(v.to_bits().to_le())))
            }
            Tensor::U64 { data, .. } => (2, le_bytes(data, u64::to_le)),
        };
        RawTensor {
            dtype,
            rows: rows as u64,
            cols: cols as u64,
            bytes,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Tensor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = RawTensor::deserialize(d)?;
        let dim =
            |v: u64| usize::try_from(v).map_err(|_| D::Error::custom("tensor dimension overflows"));
        let (rows, cols) = (dim(raw.rows)?, dim(raw.cols)?);
        let width = match raw.dtype {
            0 => 4,
            1 | 2 => 8,
            t => return Err(D::Error::custom(format!("unknown tensor dtype {t}"))),
        };
        if raw.bytes.len() % width != 0 {
            return Err(D::Error::custom(format!(
                "{} tensor bytes are not a whole number of {width}-byte values",
                raw.bytes.len()
            )));
        }
        Ok(match raw.dtype {
            0 => Tensor::F32 {
                rows,
                cols,
                data: raw
                    .bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            },
            1 => Tensor::F64 {
                rows,
                cols,
                data: raw
                    .bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect(),
            },
            _ => Tensor::U64 {
                rows,
                cols,
                data: raw
                    .bytes
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect(),
            },
        })
    }
}
