//! The model manifest: SHA-256 of everything the cloud hands the CVM for one model — the
//! provision (configuration, tokenizer, embedding table) and, per op, the full-rank `R_pub = W`
//! of the float modes and the integer weight of the integer mode. The agent checks what arrives
//! against it before it installs anything, so a cloud that serves other weights (for example
//! `V` scaled by c and `attn_out` by 1/c, which leaves every answer unchanged but weakens the
//! float masks c-fold) is refused before any prompt is sent. The manifest of the model the
//! agent serves is built into its binary (part of the measured image), and its SHA-256 is in
//! the agent's attestation claims.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use talaria_engine::CvmProvision;
use talaria_engine::{ModelConfig, OpId};
use talaria_wire::{RPub, SetupReply};

/// The manifest of the model this repository serves (`talaria manifest` writes it; a test
/// checks it against the model file).
pub const EMBEDDED: &str = include_str!("../../calibration/smollm2-135m.manifest.json");

/// SHA-256 digests (hex) of one op's set-up material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpDigests {
    /// `RPub::Float`: the identity basis's `R_pub = W`, f32.
    pub float: String,
    /// `RPub::Int`: the integer mode's weight.
    pub int: String,
}

/// What the cloud must send for one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub format: String,
    /// The model file it was computed from (SHA-256 of the GGUF, as `docs/MODELS`-style
    /// references name it).
    pub model_sha256: String,
    pub provision: String,
    /// By op key (`"<layer>.<op>"`, `"lm_head"`).
    pub ops: BTreeMap<String, OpDigests>,
}

/// Something the cloud sent is not the model's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("model_manifest: {0}")]
pub struct ManifestMismatch(pub String);

impl ManifestMismatch {
    pub fn error_type(&self) -> &'static str {
        "model_manifest"
    }
}

fn hex32(d: [u8; 32]) -> String {
    hex::encode(d)
}

impl ModelManifest {
    pub const FORMAT: &'static str = "talaria-model-manifest-1";

    /// The manifest built into this binary.
    pub fn embedded() -> Result<Self, String> {
        serde_json::from_str(EMBEDDED).map_err(|e| format!("embedded model manifest: {e}"))
    }

    /// SHA-256 of the manifest's canonical JSON: what the agent's claims name.
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_vec(self).expect("a manifest serialises");
        hex::encode(sha2::Sha256::digest(json))
    }

    /// A manifest of `provision` and, per op of `config`, its two set-up replies (`replies`
    /// gives `(float, int)` for an op).
    pub fn compute(
        model_sha256: &str,
        provision: &CvmProvision,
        config: &ModelConfig,
        mut replies: impl FnMut(OpId) -> Result<(RPub, RPub), String>,
    ) -> Result<Self, String> {
        let mut ops = BTreeMap::new();
        for op in crate::all_ops(config) {
            let (float, int) = replies(op)?;
            ops.insert(
                op.to_string(),
                OpDigests {
                    float: hex32(talaria_wire::digest::sha256(&float)),
                    int: hex32(talaria_wire::digest::sha256(&int)),
                },
            );
        }
        Ok(Self {
            format: Self::FORMAT.into(),
            model_sha256: model_sha256.into(),
            provision: hex32(talaria_wire::digest::sha256(provision)),
            ops,
        })
    }

    /// Checks the coordinator's provision.
    pub fn check_provision(&self, provision: &CvmProvision) -> Result<(), ManifestMismatch> {
        if hex32(talaria_wire::digest::sha256(provision)) != self.provision {
            return Err(ManifestMismatch(
                "the provision (configuration, tokenizer or embedding table) is not the \
                 pinned model's"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks a full-rank set-up reply (identity basis) for `op`.
    pub fn check_setup(&self, op: OpId, reply: &SetupReply) -> Result<(), ManifestMismatch> {
        let key = op.to_string();
        let want = self
            .ops
            .get(&key)
            .ok_or_else(|| ManifestMismatch(format!("{op}: not an op of the pinned model")))?;
        let (want, what) = match &reply.r_pub {
            RPub::Float(_) => (&want.float, "R_pub"),
            RPub::Int(_) => (&want.int, "integer weight"),
        };
        if hex32(talaria_wire::digest::sha256(&reply.r_pub)) != *want {
            return Err(ManifestMismatch(format!(
                "{op}: the {what} the cloud sent is not the pinned model's"
            )));
        }
        Ok(())
    }
}
