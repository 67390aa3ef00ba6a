//! Frames: one postcard header, then the payload, behind a little-endian `u32` length prefix.
//!
//! The header is decoded on its own ([`split`]) so that a router can read where a frame goes and
//! forward the payload untouched.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame accepted unless configured otherwise: the largest set-up reply of the default
/// model (the LM head's `R_pub` at rank d − 1 in f64, 226 MB) fits.
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;

use talaria_params::MAX_EXTRA_ROWS;

/// The largest tenant request frame (a `TenantMessage`): a prompt of a few MB.
pub const MAX_TENANT_MESSAGE: usize = 4 << 20;

/// The largest frame of events a tenant client reads (an attestation, a token, a summary).
pub const MAX_TENANT_EVENT: usize = 16 << 20;

/// What a call or reply frame holds beyond its values: header, tensor tag, shape and lengths.
const FRAME_OVERHEAD: usize = 4096;

/// The most rows a masked call of a model with `config` may carry.
pub fn max_call_rows(config: &talaria_engine::ModelConfig) -> usize {
    config.max_seq.saturating_add(MAX_EXTRA_ROWS)
}

/// The largest request frame a cloud process (coordinator, gpu-node) reads for a model with
/// `config`: a masked call of [`max_call_rows`] rows of the widest op input, in 8-byte values.
/// Set-ups, hellos and session requests are far smaller.
pub fn max_request_frame(config: &talaria_engine::ModelConfig) -> usize {
    max_call_rows(config)
        .saturating_mul(config.d_model.max(config.d_ff))
        .saturating_mul(8)
        .saturating_add(FRAME_OVERHEAD)
}

/// The largest reply frame a call of `rows` rows of `op` can have: `rows × d_out` values of 8
/// bytes. What the agent reads of a reply is bounded by the call it answers.
pub fn max_call_reply(
    config: &talaria_engine::ModelConfig,
    op: talaria_engine::OpId,
    rows: usize,
) -> usize {
    rows.saturating_mul(op.shape(config).1)
        .saturating_mul(8)
        .saturating_add(FRAME_OVERHEAD)
}

/// A frame that cannot be read or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("connection: {0}")]
    Connection(String),
    /// The frame did not arrive whole within the receiver's deadline.
    #[error("frame not read in time: {0}")]
    TimedOut(String),
}

impl FrameError {
    /// A short machine-readable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Malformed(_) => "malformed_frame",
            FrameError::Connection(_) => "connection",
            FrameError::TimedOut(_) => "deadline_exceeded",
        }
    }
}

fn malformed(e: postcard::Error) -> FrameError {
    FrameError::Malformed(e.to_string())
}

/// A frame body: `head`, then `body` if any (without the length prefix).
pub fn encode<H: Serialize, B: Serialize>(
    head: &H,
    body: Option<&B>,
) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_allocvec(head).map_err(malformed)?;
    if let Some(b) = body {
        out = postcard::to_extend(b, out).map_err(malformed)?;
    }
    Ok(out)
}

/// A frame body with an already-encoded payload (forwarding).
pub fn encode_raw<H: Serialize>(head: &H, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_allocvec(head).map_err(malformed)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes a frame's header and returns it with the undecoded payload.
pub fn split<H: DeserializeOwned>(frame: &[u8]) -> Result<(H, &[u8]), FrameError> {
    postcard::take_from_bytes(frame).map_err(malformed)
}

/// Decodes a payload that must be exactly one `B`.
pub fn body<B: DeserializeOwned>(payload: &[u8]) -> Result<B, FrameError> {
    let (b, rest) = postcard::take_from_bytes(payload).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the payload",
            rest.len()
        )));
    }
    Ok(b)
}

/// A frame body of `head` alone, followed by zero bytes up to a multiple of `bucket` bytes: the
/// network sees the frame's length, and a frame whose length followed its content (a token's
/// text) would tell it the content's length. Read with [`body_padded`].
pub fn encode_padded<H: Serialize>(head: &H, bucket: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_allocvec(head).map_err(malformed)?;
    out.resize(out.len().next_multiple_of(bucket.max(1)), 0);
    Ok(out)
}

/// Decodes a payload of [`encode_padded`] with `bucket`: a whole number of buckets holding one
/// `B`, then nothing but zero bytes. A reader that demands the padding notices a writer that
/// stopped padding.
pub fn body_padded<B: DeserializeOwned>(payload: &[u8], bucket: usize) -> Result<B, FrameError> {
    if !payload.len().is_multiple_of(bucket.max(1)) {
        return Err(FrameError::Malformed(format!(
            "a padded frame of {} bytes is not a whole number of {bucket}-byte buckets",
            payload.len()
        )));
    }
    let (b, rest) = postcard::take_from_bytes(payload).map_err(malformed)?;
    if rest.iter().any(|&byte| byte != 0) {
        return Err(FrameError::Malformed(
            "padding after the payload is not zero bytes".into(),
        ));
    }
    Ok(b)
}

/// Decodes a tenant event frame, which must be padded to its event's bucket
/// ([`crate::TenantEvent::bucket`]: a `Done` of fewer would show the answer's length).
pub fn tenant_event(payload: &[u8]) -> Result<crate::TenantEvent, FrameError> {
    let event: crate::TenantEvent = body_padded(payload, crate::TENANT_EVENT_BUCKET)?;
    if !payload.len().is_multiple_of(event.bucket()) {
        return Err(FrameError::Malformed(format!(
            "a tenant event of {} bytes is not padded to its {}-byte bucket",
            payload.len(),
            event.bucket()
        )));
    }
    Ok(event)
}

/// The most calls one [`Request::Batch`](crate::Request::Batch) frame carries.
pub const MAX_BATCH_CALLS: usize = 64;

/// The largest call frame a coordinator packs into a batch, and the largest batch it sends:
/// a decode step's call (one row and a few dummy rows of the widest input, 8 bytes a value)
/// fits many times over, as does a short prefill's; a longer prefill's goes alone.
pub const MAX_BATCHED_FRAME: usize = 256 << 10;

/// The largest answer a call frame of `frame_len` bytes for `op` can have: its rows are at most
/// what the frame holds at 4 bytes a value (f32, the narrowest a call carries). What a batch of
/// calls may need of its answer's limit.
pub fn max_answer_of(
    config: &talaria_engine::ModelConfig,
    op: talaria_engine::OpId,
    frame_len: usize,
) -> usize {
    let d_in = op.shape(config).0.max(1);
    max_call_reply(config, op, frame_len / d_in.saturating_mul(4) + 1)
}

/// `frames` as one payload: each behind a little-endian `u32` length, in order. Read with
/// [`unpack`].
pub fn pack<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    pack_onto(&mut out, frames)?;
    Ok(out)
}

/// A frame body of `head` followed by `frames` [`pack`]ed, written once into one buffer (a
/// batch of LM-head answers is megabytes).
pub fn encode_packed<'a, H: Serialize>(
    head: &H,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_allocvec(head).map_err(malformed)?;
    pack_onto(&mut out, frames)?;
    Ok(out)
}

fn pack_onto<'a>(
    out: &mut Vec<u8>,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), FrameError> {
    // Sized once: grown as it went, a batch of megabytes was copied again at each doubling.
    let frames: Vec<&[u8]> = frames.into_iter().collect();
    out.reserve_exact(frames.iter().map(|f| 4 + f.len()).sum());
    for f in frames {
        let len = u32::try_from(f.len()).map_err(|_| FrameError::TooLarge {
            len: f.len() as u64,
            max: u32::MAX as usize,
        })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(f);
    }
    Ok(())
}

/// The `count` frames of a [`pack`]ed payload, borrowed from it: exactly `count` (at most
/// [`MAX_BATCH_CALLS`]), each length within what is left, nothing after the last.
pub fn unpack(payload: &[u8], count: usize) -> Result<Vec<&[u8]>, FrameError> {
    if count > MAX_BATCH_CALLS {
        return Err(FrameError::Malformed(format!(
            "a batch of {count} frames (at most {MAX_BATCH_CALLS})"
        )));
    }
    let mut frames = Vec::with_capacity(count);
    let mut rest = payload;
    for i in 0..count {
        let (prefix, tail) = rest.split_first_chunk::<4>().ok_or_else(|| {
            FrameError::Malformed(format!("a batch ends before frame {i} of {count}"))
        })?;
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > tail.len() {
            return Err(FrameError::Malformed(format!(
                "frame {i} of a batch claims {len} bytes, {} are left",
                tail.len()
            )));
        }
        let (f, tail) = tail.split_at(len);
        frames.push(f);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after a batch's {count} frames",
            rest.len()
        )));
    }
    Ok(frames)
}

/// Checks a length prefix against the limit before anything is allocated for it.
pub fn check_len(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as u64;
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    #[test]
    fn header_splits_off_and_payload_round_trips() {
        let t = Tensor::F32 {
            rows: 2,
            cols: 3,
            data: vec![1.0, -2.5, 3.0, f32::MAX, f32::MIN_POSITIVE, 0.0],
        };
        let frame = encode(&(7u64, "route"), Some(&t)).unwrap();
        let ((n, s), payload): ((u64, String), _) = split(&frame).unwrap();
        assert_eq!((n, s.as_str()), (7, "route"));
        assert_eq!(body::<Tensor>(payload).unwrap(), t);
        // The values travel as raw bytes: 24 of them plus a few bytes of header.
        assert!(payload.len() < 24 + 8, "payload is {} bytes", payload.len());
    }

    #[test]
    fn garbage_and_trailing_bytes_are_typed_errors() {
        assert_eq!(
            split::<(u64, String)>(&[0xff; 3]).unwrap_err().error_type(),
            "malformed_frame"
        );
        let mut frame = encode(&1u8, Some(&2u8)).unwrap();
        frame.push(9);
        let (_, payload): (u8, _) = split(&frame).unwrap();
        assert_eq!(
            body::<u8>(payload).unwrap_err().error_type(),
            "malformed_frame"
        );
        let t = Tensor::F64 {
            rows: 1,
            cols: 1,
            data: vec![1.0],
        };
        let mut bytes = encode(&(), Some(&t)).unwrap();
        // Claim a dtype that does not exist.
        bytes[0] = 9;
        assert!(body::<Tensor>(&bytes).is_err());
    }

    #[test]
    fn a_padded_frame_fills_its_bucket_and_only_zero_padding_is_read() {
        let short = encode_padded(&(1u32, Some("a".to_string())), 256).unwrap();
        let long = encode_padded(&(70_000u32, Some("a longer piece".to_string())), 256).unwrap();
        assert_eq!((short.len(), long.len()), (256, 256));
        assert_eq!(
            body_padded::<(u32, Option<String>)>(&long, 256).unwrap(),
            (70_000, Some("a longer piece".to_string()))
        );
        let mut tampered = short.clone();
        *tampered.last_mut().unwrap() = 1;
        let unpadded = encode(&(1u32, Some("a".to_string())), None::<&()>).unwrap();
        for bad in [tampered, unpadded] {
            assert_eq!(
                body_padded::<(u32, Option<String>)>(&bad, 256)
                    .unwrap_err()
                    .error_type(),
                "malformed_frame"
            );
        }
        // A value longer than a bucket takes the next one.
        let big = encode_padded(&"x".repeat(300), 256).unwrap();
        assert_eq!(big.len(), 512);
    }

    #[test]
    fn packed_frames_round_trip_and_a_bad_pack_is_a_typed_error() {
        let frames: [&[u8]; 3] = [b"one", b"", &[7; 300]];
        let packed = pack(frames).unwrap();
        assert_eq!(
            encode_packed(&9u8, frames).unwrap(),
            encode_raw(&9u8, &packed).unwrap()
        );
        assert_eq!(packed.len(), 3 * 4 + 3 + 300);
        assert_eq!(unpack(&packed, 3).unwrap(), frames);
        // Too few frames, too many, a length past the end, a count over the limit.
        for (bytes, count) in [
            (&packed[..], 2),
            (&packed[..], 4),
            (&packed[..packed.len() - 1], 3),
            (&pack(std::iter::repeat_n(&b"x"[..], 65)).unwrap()[..], 65),
        ] {
            assert_eq!(
                unpack(bytes, count).unwrap_err().error_type(),
                "malformed_frame",
                "{count} frames of {} bytes",
                bytes.len()
            );
        }
        let mut huge = packed.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&huge, 3).is_err());
        assert_eq!(unpack(&[], 0).unwrap(), Vec::<&[u8]>::new());
    }

    #[test]
    fn length_prefix_over_the_limit_is_refused() {
        let err = check_len((1000u32).to_le_bytes(), 999).unwrap_err();
        assert_eq!(err.error_type(), "frame_too_large");
        assert_eq!(check_len(999u32.to_le_bytes(), 999).unwrap(), 999);
    }
}
