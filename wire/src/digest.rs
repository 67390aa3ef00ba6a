//! SHA-256 of a message's canonical encoding (postcard, as it crosses the wire), computed as it
//! is encoded: what a model manifest pins, without a second copy of the encoding. (An integer
//! weight whose codes are held four bits each still unpacks them once to encode them.)

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Feeds postcard's output into SHA-256.
struct Hashing(Sha256);

impl postcard::ser_flavors::Flavor for Hashing {
    type Output = [u8; 32];

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.update([data]);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.update(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<[u8; 32]> {
        Ok(self.0.finalize().into())
    }
}

/// SHA-256 of `value`'s postcard encoding (deterministic: the same value always encodes to the
/// same bytes, so a sender and a receiver that decoded it agree).
pub fn sha256<T: Serialize + ?Sized>(value: &T) -> [u8; 32] {
    postcard::serialize_with_flavor(value, Hashing(Sha256::new()))
        .expect("encoding into a hash cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    #[test]
    fn the_digest_is_that_of_the_encoded_bytes_and_sees_every_value() {
        let t = Tensor::F32 {
            rows: 2,
            cols: 2,
            data: vec![1.0, 2.0, 3.0, 4.0],
        };
        let bytes = postcard::to_allocvec(&t).unwrap();
        let want: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(sha256(&t), want);
        let scaled = Tensor::F32 {
            rows: 2,
            cols: 2,
            data: vec![1.0, 2.0, 3.0, 8.0],
        };
        assert_ne!(sha256(&scaled), want);
    }
}
