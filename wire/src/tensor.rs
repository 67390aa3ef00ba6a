use serde::{Deserialize, Serialize};

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
}

/// A row-major matrix in the precision the call asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

impl Tensor {
    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Tensor::F32 { rows, cols, .. } | Tensor::F64 { rows, cols, .. } => (rows, cols),
        }
    }

    /// `"f32"` or `"f64"`.
    pub fn precision(&self) -> &'static str {
        match self {
            Tensor::F32 { .. } => "f32",
            Tensor::F64 { .. } => "f64",
        }
    }

    /// Checks that the data length matches the shape: a peer may send anything.
    pub fn validate(&self) -> Result<(), WireError> {
        let (rows, cols) = self.shape();
        let len = match self {
            Tensor::F32 { data, .. } => data.len(),
            Tensor::F64 { data, .. } => data.len(),
        };
        if rows.checked_mul(cols) != Some(len) {
            return Err(WireError::BadLength { rows, cols, len });
        }
        Ok(())
    }

    /// The values widened to f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Tensor::F32 { data, .. } => data.iter().map(|&v| f64::from(v)).collect(),
            Tensor::F64 { data, .. } => data.clone(),
        }
    }
}
