//! AMD SEV-SNP attestation for Talaria: the evidence a cvm-agent presents, and its verification
//! against a policy — the ARK → ASK → VCEK chain, the report's signature, the guest policy (no
//! debug), the minimum TCB, the VMPL, a measurement allowlist — and the binding of the report to
//! the verifier's fresh nonce and the agent's key. See `docs/attestation.md`.
//!
//! Every check is a step of its own with a typed error, so a rejection always says which check
//! failed. No field of a report is trusted before its signature is verified.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sev::certs::snp::{Certificate, Chain, Verifiable, ca};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use sha2::{Digest, Sha512};

/// Size of an SNP attestation report.
pub const REPORT_LEN: usize = 1184;
/// Domain separation of the report-data binding.
const BINDING_DOMAIN: &[u8] = b"talaria-attestation/2";

/// What a report is made for. Each purpose binds under its own domain, so evidence made for one
/// never verifies for the other: a tenant's attestation relayed to the coordinator is not an
/// admission, and an admission shown to a tenant is not a tenant attestation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An agent proves itself to its tenant (the tenant protocol's `Attest`).
    Tenant,
    /// An agent asks the coordinator to be admitted (`Hello`).
    Admission,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Tenant => b"tenant",
            Purpose::Admission => b"admission",
        }
    }
}

/// Everything a report binds: its purpose, the verifier's fresh nonce, the key the agent's
/// connection presents, and the agent's claims (for a tenant: the effective protection
/// settings; for admission: the tenant name), each length-prefixed.
#[derive(Debug, Clone, Copy)]
pub struct Bound<'a> {
    pub purpose: Purpose,
    pub nonce: &'a [u8; 32],
    pub key: &'a [u8],
    pub claims: &'a [u8],
}

/// What an agent presents to be admitted or trusted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Evidence {
    /// A hardware report and the VCEK that signed it.
    Snp {
        #[serde(with = "serde_bytes")]
        report: Vec<u8>,
        #[serde(with = "serde_bytes")]
        vcek_der: Vec<u8>,
    },
    /// No SEV-SNP hardware: accepted only by a verifier that opted in.
    Insecure { reason: String },
}

/// Why evidence was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttestationError {
    #[error(
        "insecure agent (no SEV-SNP report: {0}) and this verifier does not allow insecure agents"
    )]
    InsecureRefused(String),
    #[error("malformed evidence: {0}")]
    Malformed(String),
    #[error("certificate chain ARK -> ASK -> VCEK does not verify: {0}")]
    Chain(String),
    #[error("the VCEK's signature over the report does not verify: {0}")]
    Signature(String),
    #[error("the guest policy allows debugging")]
    Debug,
    #[error("VMPL {found} is above the allowed {max}")]
    Vmpl { found: u32, max: u32 },
    #[error("reported TCB {found} is below the minimum {min}")]
    Tcb { found: String, min: String },
    #[error("measurement {0} is not in the allowlist")]
    Measurement(String),
    #[error("report version {0} is not one this verifier reads (2 ..= 5)")]
    Version(u32),
    #[error("the guest policy {0}")]
    GuestPolicy(String),
    #[error("guest SVN {found} is below the minimum {min}")]
    GuestSvn { found: u32, min: u32 },
    #[error("the VCEK does not certify this report's platform: {0}")]
    VcekMismatch(String),
    #[error(
        "report data does not bind this purpose, nonce, key and claims (a stale nonce, another \
         key, changed claims, or a report made for another purpose)"
    )]
    Binding,
    #[error("{path}: {message}")]
    Provisioning { path: String, message: String },
}

impl AttestationError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            AttestationError::InsecureRefused(_) => "attestation_required",
            AttestationError::Malformed(_) => "attestation_malformed",
            AttestationError::Chain(_) => "attestation_chain",
            AttestationError::Signature(_) => "attestation_signature",
            AttestationError::Debug => "attestation_debug_policy",
            AttestationError::Vmpl { .. } => "attestation_vmpl",
            AttestationError::Tcb { .. } => "attestation_tcb",
            AttestationError::Measurement(_) => "attestation_measurement",
            AttestationError::Version(_) => "attestation_report_version",
            AttestationError::GuestPolicy(_) => "attestation_guest_policy",
            AttestationError::GuestSvn { .. } => "attestation_guest_svn",
            AttestationError::VcekMismatch(_) => "attestation_vcek_mismatch",
            AttestationError::Binding => "attestation_binding",
            AttestationError::Provisioning { .. } => "attestation_provisioning",
        }
    }
}

/// A TCB level: the security version numbers a report carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl Tcb {
    /// Whether every component is at least `min`'s.
    pub fn at_least(&self, min: &Tcb) -> bool {
        self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
    }
}

impl std::fmt::Display for Tcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bl {} tee {} snp {} ucode {}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// What a verifier accepts.
#[derive(Debug, Clone)]
pub struct Policy {
    ark: Certificate,
    ask: Certificate,
    /// Launch measurements of the agent images trusted.
    pub measurements: Vec<[u8; 48]>,
    pub min_tcb: Tcb,
    pub max_vmpl: u32,
    /// Accept [`Evidence::Insecure`] (development without SEV hardware); never where AMD roots
    /// are provisioned, so in effect only for [`InsecurePolicy`].
    pub allow_insecure: bool,
    /// Accept a guest whose policy allows SMT (a sibling thread of another tenant's or the
    /// host's shares the core's caches and predictors). Off by default.
    pub allow_smt: bool,
    /// The least guest SVN (the image author's security version) accepted.
    pub min_guest_svn: u32,
    /// The least ABI (major, minor) the guest's launch policy may require.
    pub min_abi: (u8, u8),
}

/// The least TCB a verifier accepts unless told otherwise: Milan's components at the level of
/// AMD's SB-3019 fixes (bootloader 3, TEE 0, SNP 8, microcode 115). Raise it to your platform's
/// current TCB; 0.0.0.0 accepts firmware with known SEV-SNP vulnerabilities.
pub const DEFAULT_MIN_TCB: Tcb = Tcb {
    bootloader: 3,
    tee: 0,
    snp: 8,
    microcode: 115,
};

fn read_cert(path: &Path) -> Result<Certificate, AttestationError> {
    let err = |message: String| AttestationError::Provisioning {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if bytes.starts_with(b"-----BEGIN") {
        Certificate::from_pem(&bytes)
    } else {
        Certificate::from_der(&bytes)
    }
    .map_err(|e| err(format!("not a certificate: {e}")))
}

/// Parses a measurement written in hex (96 digits).
pub fn parse_measurement(hex_text: &str) -> Result<[u8; 48], String> {
    let bytes = hex::decode(hex_text.trim()).map_err(|e| format!("{hex_text:?}: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("a measurement has 48 bytes, {hex_text:?} has {}", b.len()))
}

impl Policy {
    /// A policy with AMD's ARK and ASK read from files (PEM or DER), provisioned by the operator:
    /// nothing is fetched at run time.
    pub fn new(
        ark: &Path,
        ask: &Path,
        measurements: Vec<[u8; 48]>,
        min_tcb: Tcb,
        max_vmpl: u32,
        allow_insecure: bool,
    ) -> Result<Self, AttestationError> {
        Ok(Self {
            ark: read_cert(ark)?,
            ask: read_cert(ask)?,
            measurements,
            min_tcb,
            max_vmpl,
            allow_insecure,
            allow_smt: false,
            min_guest_svn: 0,
            min_abi: (0, 0),
        })
    }

    /// A policy that accepts only insecure agents, or none (no hardware root provisioned).
    pub fn insecure_only(allow_insecure: bool) -> InsecurePolicy {
        InsecurePolicy { allow_insecure }
    }
}

/// The policy of a verifier with no provisioned AMD root: it can only accept insecure agents,
/// and only if it opted in.
#[derive(Debug, Clone, Copy)]
pub struct InsecurePolicy {
    pub allow_insecure: bool,
}

/// What verified evidence established.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// `None` for an insecure agent.
    pub measurement: Option<[u8; 48]>,
    pub report_data: [u8; 64],
    pub reported_tcb: Tcb,
    pub insecure: bool,
}

/// The report data that binds `b`: SHA-512 of the domain tag, the purpose, the nonce, the key
/// and the claims (the variable-length parts length-prefixed).
pub fn binding(b: &Bound<'_>) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(BINDING_DOMAIN);
    for part in [b.purpose.tag(), b.nonce.as_slice(), b.key, b.claims] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Parses a raw report.
pub fn parse_report(report: &[u8]) -> Result<AttestationReport, AttestationError> {
    if report.len() != REPORT_LEN {
        return Err(AttestationError::Malformed(format!(
            "a report has {REPORT_LEN} bytes, this one {}",
            report.len()
        )));
    }
    AttestationReport::from_bytes(report).map_err(|e| AttestationError::Malformed(e.to_string()))
}

fn tcb_of(report: &AttestationReport) -> Tcb {
    let t = &report.reported_tcb;
    Tcb {
        bootloader: t.bootloader,
        tee: t.tee,
        snp: t.snp,
        microcode: t.microcode,
    }
}

/// The VCEK's X.509 extensions of AMD's OID arc (1.3.6.1.4.1.3704.1): the TCB it certifies
/// and the chip it was issued to.
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";

/// A DER INTEGER's value as u8 (the SPLs are bytes).
fn der_small_int(v: &[u8]) -> Option<u8> {
    let (&tag, rest) = v.split_first()?;
    let (&len, body) = rest.split_first()?;
    if tag != 0x02 || len as usize != body.len() || body.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in body {
        n = n.checked_mul(256)? + b as u64;
    }
    u8::try_from(n).ok()
}

/// The bytes of a DER OCTET STRING, or the value itself where the extension holds raw bytes
/// (AMD's hwID is written both ways across generations).
fn der_octets(v: &[u8]) -> &[u8] {
    match v {
        [0x04, len, body @ ..] if *len as usize == body.len() => body,
        _ => v,
    }
}

/// The VCEK must certify exactly the TCB the report says it runs at, and the chip the report
/// names: else a VCEK of an older TCB (or of another chip) could vouch for a report.
fn check_vcek(vcek_der: &[u8], report: &AttestationReport) -> Result<(), AttestationError> {
    use x509_cert::der::Decode;
    let bad = |m: String| AttestationError::VcekMismatch(m);
    let cert = x509_cert::Certificate::from_der(vcek_der)
        .map_err(|e| AttestationError::Malformed(format!("VCEK: {e}")))?;
    let exts = cert.tbs_certificate.extensions.unwrap_or_default();
    let ext = |oid: &str| {
        exts.iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes())
    };
    let t = &report.reported_tcb;
    for (oid, name, want) in [
        (OID_BL_SPL, "bootloader", t.bootloader),
        (OID_TEE_SPL, "tee", t.tee),
        (OID_SNP_SPL, "snp", t.snp),
        (OID_UCODE_SPL, "microcode", t.microcode),
    ] {
        let got = ext(oid).ok_or_else(|| bad(format!("no {name} SPL extension")))?;
        let got = der_small_int(got).ok_or_else(|| bad(format!("{name} SPL is not an integer")))?;
        if got != want {
            return Err(bad(format!(
                "it certifies {name} {got}, the report says {want}"
            )));
        }
    }
    let hwid = der_octets(ext(OID_HWID).ok_or_else(|| bad("no hwID extension".into()))?);
    // Milan and Genoa VCEKs carry the 64-byte chip id; Turin's an 8-byte prefix of it.
    if hwid.is_empty() || hwid.len() > 64 || report.chip_id[..hwid.len()] != *hwid {
        return Err(bad("its hwID is not the report's chip id".into()));
    }
    Ok(())
}

/// The checks on the report's contents, once its signature is verified.
fn check_contents(report: &AttestationReport, policy: &Policy) -> Result<(), AttestationError> {
    if !(2..=5).contains(&report.version) {
        return Err(AttestationError::Version(report.version));
    }
    if report.policy.debug_allowed() {
        return Err(AttestationError::Debug);
    }
    if report.policy.migrate_ma_allowed() {
        return Err(AttestationError::GuestPolicy(
            "allows a migration agent (it could export the guest's memory)".into(),
        ));
    }
    if report.policy.smt_allowed() && !policy.allow_smt {
        return Err(AttestationError::GuestPolicy(
            "allows SMT and this verifier does not (allow_smt)".into(),
        ));
    }
    let abi = (
        report.policy.abi_major() as u8,
        report.policy.abi_minor() as u8,
    );
    if abi < policy.min_abi {
        return Err(AttestationError::GuestPolicy(format!(
            "requires ABI {}.{}, below the minimum {}.{}",
            abi.0, abi.1, policy.min_abi.0, policy.min_abi.1
        )));
    }
    if report.guest_svn < policy.min_guest_svn {
        return Err(AttestationError::GuestSvn {
            found: report.guest_svn,
            min: policy.min_guest_svn,
        });
    }
    if report.vmpl > policy.max_vmpl {
        return Err(AttestationError::Vmpl {
            found: report.vmpl,
            max: policy.max_vmpl,
        });
    }
    let tcb = tcb_of(report);
    if !tcb.at_least(&policy.min_tcb) {
        return Err(AttestationError::Tcb {
            found: tcb.to_string(),
            min: policy.min_tcb.to_string(),
        });
    }
    if !policy.measurements.contains(&report.measurement) {
        return Err(AttestationError::Measurement(hex::encode(
            report.measurement,
        )));
    }
    Ok(())
}

/// Verifies evidence against `policy`: chain, signature, then contents. The binding is checked
/// separately ([`check_binding`]) or together ([`verify`]).
pub fn verify_evidence(evidence: &Evidence, policy: &Policy) -> Result<Verified, AttestationError> {
    let (report_bytes, vcek_der) = match evidence {
        // A verifier with AMD roots provisioned expects hardware: insecure evidence there is a
        // downgrade, whatever `allow_insecure` says.
        Evidence::Insecure { reason } => {
            return Err(AttestationError::InsecureRefused(format!(
                "{reason}; AMD roots are provisioned, so only hardware evidence is accepted"
            )));
        }
        Evidence::Snp { report, vcek_der } => (report, vcek_der),
    };
    let report = parse_report(report_bytes)?;
    let vcek = Certificate::from_der(vcek_der)
        .map_err(|e| AttestationError::Malformed(format!("VCEK: {e}")))?;
    let chain = Chain {
        ca: ca::Chain {
            ark: policy.ark.clone(),
            ask: policy.ask.clone(),
        },
        vek: vcek,
    };
    chain
        .verify()
        .map_err(|e| AttestationError::Chain(e.to_string()))?;
    (&chain, &report)
        .verify()
        .map_err(|e| AttestationError::Signature(e.to_string()))?;
    check_contents(&report, policy)?;
    check_vcek(vcek_der, &report)?;
    Ok(Verified {
        measurement: Some(report.measurement),
        report_data: report.report_data,
        reported_tcb: tcb_of(&report),
        insecure: false,
    })
}

fn insecure(reason: &str, allowed: bool) -> Result<Verified, AttestationError> {
    if !allowed {
        return Err(AttestationError::InsecureRefused(reason.into()));
    }
    tracing::warn!("INSECURE: accepting an agent without SEV-SNP attestation ({reason})");
    Ok(Verified {
        measurement: None,
        report_data: [0; 64],
        reported_tcb: Tcb::default(),
        insecure: true,
    })
}

/// Verifies evidence where no AMD root is provisioned: only insecure evidence, and only when
/// allowed.
pub fn verify_without_root(
    evidence: &Evidence,
    policy: InsecurePolicy,
) -> Result<Verified, AttestationError> {
    match evidence {
        Evidence::Insecure { reason } => insecure(reason, policy.allow_insecure),
        Evidence::Snp { .. } => Err(AttestationError::Provisioning {
            path: "(policy)".into(),
            message: "a hardware report arrived but no ARK/ASK is provisioned to verify it".into(),
        }),
    }
}

/// Checks that a verified report binds `bound` (insecure evidence binds nothing).
pub fn check_binding(verified: &Verified, bound: &Bound<'_>) -> Result<(), AttestationError> {
    if verified.insecure || verified.report_data == binding(bound) {
        Ok(())
    } else {
        Err(AttestationError::Binding)
    }
}

/// [`verify_evidence`] and [`check_binding`] together.
pub fn verify(
    evidence: &Evidence,
    policy: &Policy,
    bound: &Bound<'_>,
) -> Result<Verified, AttestationError> {
    let v = verify_evidence(evidence, policy)?;
    check_binding(&v, bound)?;
    Ok(v)
}

/// Asks the SEV-SNP guest device for a report binding `bound`, with the VCEK from the host's
/// extended report. Only inside an SNP guest (`/dev/sev-guest`).
pub fn hardware_evidence(bound: &Bound<'_>) -> Result<Evidence, AttestationError> {
    use sev::firmware::guest::Firmware;
    let dev = |e: String| AttestationError::Provisioning {
        path: "/dev/sev-guest".into(),
        message: e,
    };
    let mut fw = Firmware::open().map_err(|e| dev(e.to_string()))?;
    let (report, certs) = fw
        .get_ext_report(None, Some(binding(bound)), Some(0))
        .map_err(|e| dev(e.to_string()))?;
    let vcek_der = certs
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.cert_type == sev::firmware::host::CertType::VCEK)
        .map(|c| c.data)
        .ok_or_else(|| dev("the host provided no VCEK in the extended report".into()))?;
    Ok(Evidence::Snp { report, vcek_der })
}

#[cfg(test)]
mod tests;
