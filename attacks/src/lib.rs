//! What an honest-but-curious cloud can reconstruct from what it sees.
//!
//! The attacks get only the cloud's view: a tap (`docs/tap-format.md`) with its public
//! parameters, the model (the cloud owns the weights, hence the [`Simulator`]), the embedded public
//! calibration, the tokenizer and public text. They output, for every recorded session, guesses
//! for the tokens of its prompt; [`eval`] scores them against a `truth.json` the experiment wrote
//! beside the tap, which no attack reads.

mod attack;
pub mod eval;
mod exactness;
mod ideal;
mod learned;
pub mod metadata;
pub mod pads;
pub mod score;
mod sim;
pub mod stream;
pub mod tap;

use std::path::Path;

pub use attack::{AttackKind, Attacker, Options, SessionGuess};
pub use eval::{AttackScore, Truth, wilson};
pub use exactness::Reachable;
pub use ideal::{Baseline, Belief};
pub use sim::Simulator;
pub use tap::{Public, Tap};

/// Why an attack could not run.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("malformed tap: {0}")]
    Format(String),
    #[error("model: {0}")]
    Engine(#[from] talaria_engine::EngineError),
    #[error("model: {0}")]
    Node(#[from] talaria_gpu_node::NodeError),
    #[error("ReMO parameters: {0}")]
    Params(#[from] talaria_params::ParamsError),
}

impl AttackError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| AttackError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn json(path: &Path) -> impl FnOnce(serde_json::Error) -> Self + '_ {
        move |source| AttackError::Json {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Reads a JSON file whose `format` field must be `want` (each file here names its version).
fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    want: &str,
) -> Result<T, AttackError> {
    /// Only the format name, read first: a file of another version is refused by its name,
    /// not by whichever field its schema changed.
    #[derive(serde::Deserialize)]
    struct Versioned {
        format: String,
    }
    let bytes = std::fs::read(path).map_err(AttackError::io(path))?;
    let Versioned { format: found } =
        serde_json::from_slice(&bytes).map_err(AttackError::json(path))?;
    if found != want {
        return Err(AttackError::Format(format!(
            "{}: format {found:?}, expected {want}",
            path.display()
        )));
    }
    serde_json::from_slice(&bytes).map_err(AttackError::json(path))
}

/// Public text the attacker learns from: the calibration corpus (written for this project,
/// `calibration/corpus.txt`), one sequence per line.
pub const PUBLIC_TEXT: &str = include_str!("../../calibration/corpus.txt");
