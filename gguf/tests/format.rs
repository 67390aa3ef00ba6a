//! Round trips and corrupt-file handling of the GGUF reader, on files the writer makes.

use talaria_gguf::{
    GgmlType, GgufError, GgufFile, GgufWriter, TensorPayload, Value, quantize_q4_1, quantize_q8_0,
};

fn ramp(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect()
}

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(2))
        .kv("some.float", Value::F32(1.5))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        );
    w.tensor_f32("norm", &[64], &ramp(64));
    w.tensor(TensorPayload {
        name: "q8".into(),
        dims: vec![64, 2],
        ty: GgmlType::Q8_0,
        bytes: quantize_q8_0(&ramp(128)),
    });
    w.tensor(TensorPayload {
        name: "q4".into(),
        dims: vec![32, 3],
        ty: GgmlType::Q4_1,
        bytes: quantize_q4_1(&ramp(96)),
    });
    w
}

#[test]
fn round_trip_metadata_and_tensors() {
    let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f64("some.float").unwrap(), 1.5);
    assert_eq!(
        f.get_string_array("tokenizer.ggml.tokens").unwrap(),
        ["a", "b"]
    );
    assert_eq!(f.tensors().len(), 3);
    let (norm, dims) = f.dequantize("norm").unwrap();
    assert_eq!(dims, [64]);
    assert_eq!(norm, ramp(64));
}

#[test]
fn quantized_round_trip_is_within_one_step() {
    let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
    let (q8, _) = f.dequantize("q8").unwrap();
    for (block_x, block_q) in ramp(128).chunks(32).zip(q8.chunks(32)) {
        let step = block_x.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
        for (x, q) in block_x.iter().zip(block_q) {
            assert!((x - q).abs() <= step * 0.51 + 1e-3, "q8 {x} vs {q}");
        }
    }
    let (q4, dims) = f.dequantize("q4").unwrap();
    assert_eq!(dims, [32, 3]);
    for (block_x, block_q) in ramp(96).chunks(32).zip(q4.chunks(32)) {
        let lo = block_x.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = block_x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let step = (hi - lo) / 15.0;
        for (x, q) in block_x.iter().zip(block_q) {
            assert!((x - q).abs() <= step * 0.51 + 1e-2, "q4 {x} vs {q}");
        }
    }
}

#[test]
fn bad_magic_is_an_error() {
    let mut b = sample().to_bytes();
    b[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadMagic { .. })
    ));
}

#[test]
fn unknown_version_is_an_error() {
    let mut b = sample().to_bytes();
    b[4] = 2;
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::UnsupportedVersion { found: 2 })
    ));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = sample().to_bytes();
    for len in 0..full.len() {
        let r = GgufFile::from_bytes(full[..len].to_vec());
        assert!(r.is_err(), "truncated to {len} bytes was accepted");
    }
}

#[test]
fn unknown_tensor_type_is_an_error() {
    let mut w = GgufWriter::new();
    w.tensor_f32("t", &[4], &[0.0; 4]);
    let mut b = w.to_bytes();
    // Header (magic, version, two counts) is 24 bytes; the entry is name (8 + 1), n_dims (4) and
    // one dim (8), then the type code.
    let type_at = 24 + 9 + 4 + 8;
    assert_eq!(b[type_at..type_at + 4], 0u32.to_le_bytes());
    b[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::UnknownTensorType { found: 77, .. })
    ));
}

#[test]
fn size_disagreeing_with_shape_is_an_error() {
    // 33 elements is not a whole number of Q8_0 blocks.
    let mut w = GgufWriter::new();
    w.tensor(TensorPayload {
        name: "odd".into(),
        dims: vec![33],
        ty: GgmlType::Q8_0,
        bytes: vec![0; 34],
    });
    assert!(matches!(
        GgufFile::from_bytes(w.to_bytes()),
        Err(GgufError::BadTensor { .. })
    ));
    // A shape that claims more data than the file holds.
    let mut w = GgufWriter::new();
    w.tensor(TensorPayload {
        name: "big".into(),
        dims: vec![1 << 20, 1 << 20],
        ty: GgmlType::F32,
        bytes: vec![0; 64],
    });
    assert!(matches!(
        GgufFile::from_bytes(w.to_bytes()),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn huge_counts_do_not_allocate() {
    // A header that claims 2^60 metadata entries and a string of 2^62 bytes.
    let mut b = Vec::new();
    b.extend(talaria_gguf::GGUF_MAGIC.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Truncated { .. })
    ));
    // An array claiming 2^40 elements.
    let mut b = Vec::new();
    b.extend(talaria_gguf::GGUF_MAGIC.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.push(b'k');
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    b.extend((1u64 << 40).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn unsupported_dequantization_is_a_typed_error() {
    let mut w = GgufWriter::new();
    w.tensor(TensorPayload {
        name: "k".into(),
        dims: vec![256],
        ty: GgmlType::Q6K,
        bytes: vec![0; 210],
    });
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(matches!(
        f.dequantize("k"),
        Err(GgufError::UnsupportedType { .. })
    ));
    assert!(matches!(
        f.dequantize("nope"),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn a_subset_keeps_the_metadata_and_the_named_tensors_byte_for_byte() {
    let mut w = sample();
    w.kv("general.alignment", Value::U32(64));
    let whole = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let part = whole
        .subset(
            &["q4".into(), "norm".into()],
            vec![
                ("extra.key".into(), Value::String("x".into())),
                ("some.float".into(), Value::F32(2.5)),
            ],
        )
        .unwrap();
    let part = GgufFile::from_bytes(part.to_bytes()).unwrap();
    let names: Vec<&str> = part.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["q4", "norm"]);
    for name in ["q4", "norm"] {
        assert_eq!(
            part.tensor_bytes(name).unwrap(),
            whole.tensor_bytes(name).unwrap()
        );
        assert_eq!(
            part.tensor(name).unwrap().dims,
            whole.tensor(name).unwrap().dims
        );
    }
    assert!(!part.has_tensor("q8"));
    assert_eq!(part.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(part.get_str("extra.key").unwrap(), "x");
    assert_eq!(part.get_f64("some.float").unwrap(), 2.5);
    // Re-aligned to the default: the source's alignment key is not carried over.
    assert!(part.get("general.alignment").is_err());
    assert!(matches!(
        whole.subset(&["nope".into()], vec![]),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn an_empty_tensor_past_the_end_of_a_short_file_is_an_error_not_a_panic() {
    // Found while writing the talaria-fuzz gguf target: a tensor of no elements at offset 0
    // passed the bounds check (0 + 0 bytes fit in an empty data section) while the data section
    // began past the end of the file, and reading its bytes sliced out of range.
    let mut w = GgufWriter::new();
    w.kv("general.alignment", Value::U32(1 << 20));
    w.tensor(TensorPayload {
        name: "empty".into(),
        dims: vec![0],
        ty: GgmlType::F32,
        bytes: Vec::new(),
    });
    let bytes = w.to_bytes();
    // The writer pads to the alignment; a file cut after its directory is what a peer may send.
    let cut = bytes.len() - (1 << 20) + 200;
    let short = bytes[..cut.min(bytes.len())].to_vec();
    match GgufFile::from_bytes(short) {
        Ok(f) => assert_eq!(f.tensor_bytes("empty").unwrap(), &[] as &[u8]),
        Err(e) => assert!(matches!(e, GgufError::Truncated { .. }), "{e}"),
    }
}

#[test]
fn a_tensor_offset_near_u64_max_is_a_truncation_error_not_an_overflow() {
    // Found by the talaria-fuzz gguf target in a debug build (overflow checks on): the
    // Truncated error's offset, `data_start + offset`, overflowed for a tensor offset of
    // 0xffff_ffff_ffff_ff40 and panicked; in release it wrapped to a meaningless number.
    let hex = "474755460300000002000000000000000200000000000000110000000000000067656e6572616c2e616c69676e6d656e7404000000400000000c0000000000000067656e6572616c2e6e616d6508000000040000000000000074696e790100000000000000610100000003000000000000000000000000000000000000000100000000000000620400000001000000000000000100000000000000010000000000000002000000000000000000000040ffffffffffffffff00000000000000000000803f000000400000404000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000080400000a040";
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    match GgufFile::from_bytes(bytes) {
        Err(GgufError::Truncated { offset, .. }) => assert_eq!(offset, u64::MAX),
        other => panic!("expected a truncation error, got {:?}", other.err()),
    }
}
