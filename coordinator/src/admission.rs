//! Who may join: the coordinator's attestation policy for cvm-agents.

use anyhow::Result;
use talaria_attestation::{
    AttestationError, Bound, Evidence, InsecurePolicy, Policy, Purpose, Tcb, parse_measurement,
};
use talaria_topology::Topology;
use talaria_wire::ErrorReply;

/// Admission by SEV-SNP attestation, with the topology's policy; agents without hardware only
/// where the topology allows it, and never silently.
pub struct AttestedAdmission {
    policy: Option<Policy>,
    allow_insecure: bool,
}

impl AttestedAdmission {
    pub fn new(topology: &Topology) -> Result<Self> {
        let policy = match &topology.attestation {
            None => None,
            Some(a) => Some({
                let mut p = Policy::new(
                    &a.ark,
                    &a.ask,
                    a.measurements
                        .iter()
                        .map(|m| parse_measurement(m))
                        .collect::<Result<_, _>>()
                        .map_err(anyhow::Error::msg)?,
                    Tcb {
                        bootloader: a.min_tcb[0],
                        tee: a.min_tcb[1],
                        snp: a.min_tcb[2],
                        microcode: a.min_tcb[3],
                    },
                    a.max_vmpl,
                    topology.allow_insecure_agents,
                )?;
                p.allow_smt = a.allow_smt;
                p.min_guest_svn = a.min_guest_svn;
                p
            }),
        };
        if policy.is_none() && !topology.allow_insecure_agents {
            tracing::warn!(
                "no [attestation] policy and insecure agents not allowed: no agent can be admitted"
            );
        }
        Ok(Self {
            policy,
            allow_insecure: topology.allow_insecure_agents,
        })
    }
}

impl AttestedAdmission {
    /// `Ok(())` to admit `tenant`'s agent, whose `evidence` must bind `nonce` (issued on this
    /// connection) and `key`, or the reason for refusing it.
    pub fn admit(
        &self,
        tenant: &str,
        agent: &str,
        evidence: &[u8],
        nonce: &[u8; 32],
        key: &[u8],
    ) -> Result<(), ErrorReply> {
        let refuse = |e: AttestationError| {
            tracing::warn!(%tenant, %agent, error_type = e.error_type(), "agent refused: {e}");
            ErrorReply::new(e.error_type(), e.to_string())
        };
        let evidence: Evidence = talaria_wire::frame::body(evidence)
            .map_err(|e| refuse(AttestationError::Malformed(e.to_string())))?;
        // The report binds the admission purpose and the tenant it asks for.
        let bound = Bound {
            purpose: Purpose::Admission,
            nonce,
            key,
            claims: tenant.as_bytes(),
        };
        let verified = match &self.policy {
            Some(p) => talaria_attestation::verify(&evidence, p, &bound),
            None => talaria_attestation::verify_without_root(
                &evidence,
                InsecurePolicy {
                    allow_insecure: self.allow_insecure,
                },
            ),
        }
        .map_err(refuse)?;
        match verified.measurement {
            Some(m) => {
                tracing::info!(%tenant, %agent, measurement = %hex::encode(m), "agent attested")
            }
            None => tracing::warn!(%tenant, %agent, "INSECURE: agent admitted without attestation"),
        }
        Ok(())
    }
}
