//! What an agent states to its tenant about the protection it runs with. The statement is bound
//! into the agent's attestation report (`talaria_attestation::Bound::claims`), so a tenant that
//! verifies the report knows the configuration the measured agent code enforces, whatever the
//! operator's topology file said.

use serde::{Deserialize, Serialize};
use talaria_params::RemoConfig;

/// The claims an agent's tenant attestation binds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentClaims {
    pub format: String,
    /// The tenant the agent serves.
    pub tenant: String,
    /// The effective ReMO configuration of every session the agent runs.
    pub remo: RemoConfig,
    /// SHA-256 (hex, sorted) of the API keys its HTTPS API accepts: a tenant checks that only
    /// its own are there.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// SHA-256 of the model manifest the agent checks the cloud's weights against (built into
    /// its binary): which model, exactly, the tenant is talking to.
    #[serde(default)]
    pub model_manifest_sha256: String,
}

/// A configuration below the floor (`RemoConfig::below_floor`): refused unless the tenant
/// accepted it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("remo_below_floor: the ReMO configuration is below the floor: {}", .0.join("; "))]
pub struct BelowFloor(pub Vec<String>);

impl BelowFloor {
    pub fn error_type(&self) -> &'static str {
        "remo_below_floor"
    }
}

/// `Ok` when `remo` meets the floor or the tenant accepted less.
pub fn check_floor(remo: &RemoConfig, tenant_accepts: bool) -> Result<(), BelowFloor> {
    let why = remo.below_floor();
    if why.is_empty() || tenant_accepts {
        Ok(())
    } else {
        Err(BelowFloor(why))
    }
}

impl AgentClaims {
    pub const FORMAT: &'static str = "talaria-agent-claims-1";

    pub fn new(
        tenant: &str,
        remo: &RemoConfig,
        api_key_sha256: &[String],
        model_manifest_sha256: &str,
    ) -> Self {
        let mut keys: Vec<String> = api_key_sha256.iter().map(|k| k.to_lowercase()).collect();
        keys.sort();
        keys.dedup();
        Self {
            format: Self::FORMAT.into(),
            tenant: tenant.into(),
            remo: remo.clone(),
            api_key_sha256: keys,
            model_manifest_sha256: model_manifest_sha256.into(),
        }
    }

    /// The bytes the report binds (JSON: what a tenant can read and compare).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("claims serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let c: Self = serde_json::from_slice(bytes).map_err(|e| format!("agent claims: {e}"))?;
        if c.format != Self::FORMAT {
            return Err(format!(
                "agent claims of format {:?}, expected {:?}",
                c.format,
                Self::FORMAT
            ));
        }
        c.remo
            .validate()
            .map_err(|e| format!("agent claims: {e}"))?;
        Ok(c)
    }
}
