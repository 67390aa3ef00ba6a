//! On the real Milan report and VCEK that the `sev` crate ships (fixtures/NOTICE.md).

use super::*;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn real_report() -> Vec<u8> {
    hex::decode(
        std::fs::read_to_string(fixture("report_milan.hex"))
            .unwrap()
            .trim(),
    )
    .unwrap()
}

fn evidence(report: Vec<u8>, vcek: &str) -> Evidence {
    Evidence::Snp {
        report,
        vcek_der: std::fs::read(fixture(vcek)).unwrap(),
    }
}

/// The policy the real report meets: its measurement and TCB, and SMT allowed (its guest
/// policy allows SMT; `smt_is_refused_unless_allowed` checks the default).
fn policy_for(report: &[u8]) -> Policy {
    let r = parse_report(report).unwrap();
    let mut p = Policy::new(
        &fixture("ark.pem"),
        &fixture("ask.pem"),
        vec![r.measurement],
        tcb_of(&r),
        0,
        false,
    )
    .unwrap();
    p.allow_smt = true;
    p
}

#[test]
fn smt_is_refused_unless_allowed_and_the_default_min_tcb_is_met_by_the_real_report() {
    let report = real_report();
    let mut policy = policy_for(&report);
    policy.allow_smt = false;
    let e = verify_evidence(&evidence(report.clone(), "vcek_milan.der"), &policy).unwrap_err();
    assert_eq!(e.error_type(), "attestation_guest_policy", "{e}");
    // The default minimum TCB is not 0.0.0.0, and this (patched Milan) platform meets it.
    assert_ne!(DEFAULT_MIN_TCB, Tcb::default());
    assert!(tcb_of(&parse_report(&report).unwrap()).at_least(&DEFAULT_MIN_TCB));
}

#[test]
fn the_vcek_must_certify_the_reported_tcb_and_chip() {
    // The real VCEK certifies the real report's TCB and chip (its extensions parse and match).
    let report = parse_report(&real_report()).unwrap();
    let vcek = std::fs::read(fixture("vcek_milan.der")).unwrap();
    check_vcek(&vcek, &report).unwrap();
    // A report claiming another TCB component or chip than the VCEK certifies is refused (the
    // signature would catch an edit of these bytes too; this is the check a VCEK of an older,
    // vulnerable TCB meets when it signs a report that claims a newer one).
    let edits: [fn(&mut AttestationReport); 6] = [
        |r| r.reported_tcb.bootloader += 1,
        |r| r.reported_tcb.tee += 1,
        |r| r.reported_tcb.snp += 1,
        |r| r.reported_tcb.microcode -= 1,
        |r| r.chip_id[63] ^= 1,
        |r| r.chip_id[0] ^= 1,
    ];
    for (i, edit) in edits.into_iter().enumerate() {
        let mut r = report;
        edit(&mut r);
        let e = check_vcek(&vcek, &r).unwrap_err();
        assert_eq!(e.error_type(), "attestation_vcek_mismatch", "edit {i}: {e}");
    }
    // Another chip's VCEK (Turin) does not certify this report either.
    let turin = std::fs::read(fixture("vcek_turin.der")).unwrap();
    assert!(check_vcek(&turin, &report).is_err());
}

#[test]
fn report_version_migration_agent_guest_svn_and_abi_are_checked() {
    let report = real_report();
    let mut policy = policy_for(&report);
    let parsed = parse_report(&report).unwrap();
    check_contents(&parsed, &policy).unwrap();
    let refused = |r: &AttestationReport, p: &Policy| check_contents(r, p).unwrap_err();
    let mut r = parsed;
    r.version = 1;
    assert_eq!(
        refused(&r, &policy).error_type(),
        "attestation_report_version"
    );
    let mut r = parsed;
    r.policy.set_migrate_ma_allowed(true);
    assert_eq!(
        refused(&r, &policy).error_type(),
        "attestation_guest_policy"
    );
    policy.min_guest_svn = parsed.guest_svn + 1;
    assert_eq!(
        refused(&parsed, &policy).error_type(),
        "attestation_guest_svn"
    );
    policy.min_guest_svn = 0;
    policy.min_abi = (1, 0);
    assert_eq!(
        refused(&parsed, &policy).error_type(),
        "attestation_guest_policy"
    );
}

#[test]
fn the_real_report_verifies_with_its_chain_and_policy() {
    let report = real_report();
    let policy = policy_for(&report);
    let v = verify_evidence(&evidence(report.clone(), "vcek_milan.der"), &policy).unwrap();
    assert!(!v.insecure);
    assert_eq!(
        v.measurement,
        Some(parse_report(&report).unwrap().measurement)
    );
}

#[test]
fn tampering_any_field_breaks_the_signature() {
    let report = real_report();
    let policy = policy_for(&report);
    // version, guest_svn, policy, family_id, image_id, vmpl, sig_algo, current_tcb, platform
    // info, report_data, measurement, host_data, id_key_digest, author_key_digest, report_id,
    // report_id_ma, reported_tcb, chip_id, committed_tcb, launch_tcb, the signature.
    let offsets = [
        0x00, 0x04, 0x08, 0x10, 0x20, 0x30, 0x34, 0x38, 0x40, 0x50, 0x90, 0xC0, 0xE0, 0x110, 0x140,
        0x160, 0x180, 0x1A0, 0x1E0, 0x1F0, 0x2A0, 0x2F0,
    ];
    for off in offsets {
        let mut bad = report.clone();
        bad[off] ^= 0x01;
        let e = verify_evidence(&evidence(bad, "vcek_milan.der"), &policy).unwrap_err();
        assert!(
            matches!(
                e,
                AttestationError::Signature(_) | AttestationError::Malformed(_)
            ),
            "byte {off:#x}: {e}"
        );
    }
}

#[test]
fn another_chips_vcek_is_refused() {
    let report = real_report();
    let e = verify_evidence(
        &evidence(report.clone(), "vcek_turin.der"),
        &policy_for(&report),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            AttestationError::Chain(_) | AttestationError::Signature(_)
        ),
        "{e}"
    );
}

#[test]
fn an_unknown_measurement_low_tcb_and_high_vmpl_are_refused() {
    let report = real_report();
    let mut policy = policy_for(&report);
    policy.measurements = vec![[7u8; 48]];
    let e = verify_evidence(&evidence(report.clone(), "vcek_milan.der"), &policy).unwrap_err();
    assert_eq!(e.error_type(), "attestation_measurement", "{e}");

    let mut policy = policy_for(&report);
    policy.min_tcb.snp = policy.min_tcb.snp.saturating_add(1);
    let e = verify_evidence(&evidence(report.clone(), "vcek_milan.der"), &policy).unwrap_err();
    assert_eq!(e.error_type(), "attestation_tcb", "{e}");

    let parsed = parse_report(&report).unwrap();
    if parsed.vmpl > 0 {
        let e = verify_evidence(
            &evidence(report, "vcek_milan.der"),
            &policy_for(&real_report()),
        )
        .unwrap_err();
        assert_eq!(e.error_type(), "attestation_vmpl");
    }
}

#[test]
fn a_debug_policy_is_refused() {
    // The real report forbids debugging; a debug report cannot be forged with a valid signature,
    // so the policy step is checked on the parsed report.
    let report = real_report();
    let policy = policy_for(&report);
    let mut parsed = parse_report(&report).unwrap();
    assert!(!parsed.policy.debug_allowed());
    check_contents(&parsed, &policy).unwrap();
    parsed.policy.set_debug_allowed(true);
    assert_eq!(
        check_contents(&parsed, &policy).unwrap_err(),
        AttestationError::Debug
    );
    // And with the bit flipped in the raw report, the signature no longer verifies.
    let mut raw = report.clone();
    raw[0x08 + 2] ^= 1 << 3; // bit 19 of the policy
    assert!(verify_evidence(&evidence(raw, "vcek_milan.der"), &policy).is_err());
}

#[test]
fn the_binding_needs_this_nonce_and_this_key() {
    let report = real_report();
    let v = verify_evidence(
        &evidence(report, "vcek_milan.der"),
        &policy_for(&real_report()),
    )
    .unwrap();
    let b = |purpose, nonce, key, claims| Bound {
        purpose,
        nonce,
        key,
        claims,
    };
    let ours = b(Purpose::Tenant, &[1; 32], b"agent key", b"claims");
    // The real report binds someone else's data: a binding mismatch.
    assert_eq!(
        check_binding(&v, &ours).unwrap_err(),
        AttestationError::Binding
    );
    // A report whose data binds (purpose, nonce, key, claims) passes with them and fails when
    // any of them differs: a stale nonce, another key, changed claims, or the other purpose (a
    // tenant's attestation relayed as an admission).
    let bound = Verified {
        report_data: binding(&ours),
        ..v
    };
    check_binding(&bound, &ours).unwrap();
    for other in [
        b(Purpose::Tenant, &[2; 32], b"agent key", b"claims"),
        b(Purpose::Tenant, &[1; 32], b"other key", b"claims"),
        b(Purpose::Tenant, &[1; 32], b"agent key", b"claimz"),
        b(Purpose::Admission, &[1; 32], b"agent key", b"claims"),
        // Length prefixes: moving bytes between key and claims changes the binding.
        b(Purpose::Tenant, &[1; 32], b"agent keyc", b"laims"),
    ] {
        assert_eq!(
            check_binding(&bound, &other),
            Err(AttestationError::Binding),
            "{other:?}"
        );
    }
}

#[test]
fn insecure_evidence_needs_an_explicit_opt_in_and_garbage_is_typed() {
    let insecure = Evidence::Insecure {
        reason: "no /dev/sev-guest".into(),
    };
    let mut policy = policy_for(&real_report());
    assert_eq!(
        verify_evidence(&insecure, &policy)
            .unwrap_err()
            .error_type(),
        "attestation_required"
    );
    // Where AMD roots are provisioned, insecure evidence is a downgrade: refused even when the
    // policy allows insecure agents (that opt-in is for verifiers without roots).
    policy.allow_insecure = true;
    assert_eq!(
        verify_evidence(&insecure, &policy)
            .unwrap_err()
            .error_type(),
        "attestation_required"
    );
    assert!(
        verify_without_root(
            &insecure,
            InsecurePolicy {
                allow_insecure: true
            }
        )
        .unwrap()
        .insecure
    );
    assert!(
        verify_without_root(
            &insecure,
            InsecurePolicy {
                allow_insecure: false
            }
        )
        .is_err()
    );
    let short = Evidence::Snp {
        report: vec![0; 100],
        vcek_der: vec![1, 2, 3],
    };
    assert_eq!(
        verify_evidence(&short, &policy).unwrap_err().error_type(),
        "attestation_malformed"
    );
    let bad_vcek = Evidence::Snp {
        report: real_report(),
        vcek_der: vec![1, 2, 3],
    };
    assert_eq!(
        verify_evidence(&bad_vcek, &policy)
            .unwrap_err()
            .error_type(),
        "attestation_malformed"
    );
}
