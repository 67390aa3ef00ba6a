//! The mutation engine: byte-level havoc (bit flips, interesting values, insertions, deletions,
//! splices, truncation, appending) and, for text targets, token-level edits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bytes worth trying where a decoder reads one: boundaries of signed and unsigned ranges.
const BYTES: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xfe, 0x20, 0x40];
/// Words worth trying where a decoder reads a length, count or offset.
const WORDS: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
];
/// Numbers worth trying in text.
const NUMBERS: [&str; 14] = [
    "0",
    "-1",
    "1",
    "255",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551616",
    "-9223372036854775809",
    "1e309",
    "-0.0",
    "NaN",
    "0.5",
];

/// A seeded mutator: the same seed gives the same inputs.
pub struct Mutator {
    rng: ChaCha8Rng,
    /// Tokens of the target's input language (empty for binary targets).
    dict: &'static [&'static str],
    text: bool,
    max_len: usize,
}

impl Mutator {
    /// A mutator for a binary (`text` false) or text target; inputs never grow past `max_len`.
    pub fn new(seed: u64, text: bool, dict: &'static [&'static str], max_len: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            dict,
            text,
            max_len,
        }
    }

    /// A random index below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// Replaces `buf` with a mutant of itself: 1, 2, 4 or 8 stacked mutations, some of them
    /// taking material from `corpus`.
    pub fn mutate(&mut self, buf: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        let stack = 1 << self.below(4);
        for _ in 0..stack {
            if self.text && self.rng.random_bool(0.5) {
                self.token_edit(buf, corpus);
            } else {
                self.byte_edit(buf, corpus);
            }
        }
        buf.truncate(self.max_len);
    }

    fn pos(&mut self, buf: &[u8]) -> usize {
        self.below(buf.len() + 1)
    }

    fn range(&mut self, buf: &[u8]) -> (usize, usize) {
        let a = self.pos(buf);
        let len = self.below((buf.len() - a).min(64) + 1);
        (a, a + len)
    }

    fn random_bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.random()).collect()
    }

    /// A word in one of the encodings decoders read: LE u16/u32/u64, or a LEB128 varint
    /// (postcard's lengths and integers).
    fn word(&mut self) -> Vec<u8> {
        let mut v = WORDS[self.below(WORDS.len())];
        if self.rng.random_bool(0.2) {
            v = v.wrapping_add(self.rng.random_range(0..16)).wrapping_sub(8);
        }
        match self.below(4) {
            0 => (v as u16).to_le_bytes().to_vec(),
            1 => (v as u32).to_le_bytes().to_vec(),
            2 => v.to_le_bytes().to_vec(),
            _ => {
                let mut out = Vec::new();
                loop {
                    let b = (v & 0x7f) as u8;
                    v >>= 7;
                    if v == 0 {
                        out.push(b);
                        return out;
                    }
                    out.push(b | 0x80);
                }
            }
        }
    }

    fn other<'c>(&mut self, corpus: &'c [Vec<u8>]) -> &'c [u8] {
        if corpus.is_empty() {
            return &[];
        }
        &corpus[self.below(corpus.len())]
    }

    fn byte_edit(&mut self, buf: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        match self.below(12) {
            // Flip one bit.
            0 if !buf.is_empty() => {
                let i = self.below(buf.len());
                buf[i] ^= 1 << self.below(8);
            }
            // Set a byte to an interesting or a random value.
            1 if !buf.is_empty() => {
                let i = self.below(buf.len());
                buf[i] = BYTES[self.below(BYTES.len())];
            }
            2 if !buf.is_empty() => {
                let i = self.below(buf.len());
                buf[i] = self.rng.random();
            }
            // Overwrite with an interesting word (a length, count or offset).
            3 => {
                let w = self.word();
                let at = self.pos(buf);
                let end = (at + w.len()).min(buf.len());
                buf.splice(at..end, w);
            }
            // Insert an interesting word.
            4 => {
                let w = self.word();
                let at = self.pos(buf);
                buf.splice(at..at, w);
            }
            // Insert random bytes.
            5 => {
                let n = 1 + self.below(16);
                let bytes = self.random_bytes(n);
                let at = self.pos(buf);
                buf.splice(at..at, bytes);
            }
            // Delete a range.
            6 => {
                let (a, b) = self.range(buf);
                buf.drain(a..b);
            }
            // Duplicate a range in place.
            7 => {
                let (a, b) = self.range(buf);
                let copy = buf[a..b].to_vec();
                let at = self.pos(buf);
                buf.splice(at..at, copy);
            }
            // Splice: this input's head, another's tail.
            8 => {
                let other = self.other(corpus);
                let cut = self.pos(buf);
                let from = self.below(other.len() + 1);
                buf.truncate(cut);
                buf.extend_from_slice(&other[from..]);
            }
            // Truncate.
            9 => {
                let at = self.pos(buf);
                buf.truncate(at);
            }
            // Append random bytes or a piece of another input.
            10 => {
                if self.rng.random_bool(0.5) {
                    let n = 1 + self.below(32);
                    let bytes = self.random_bytes(n);
                    buf.extend(bytes);
                } else {
                    let other = self.other(corpus);
                    let (a, b) = self.range(other);
                    buf.extend_from_slice(&other[a..b]);
                }
            }
            // Add or subtract a little from a byte (a count off by one).
            _ if !buf.is_empty() => {
                let i = self.below(buf.len());
                let d = self.rng.random_range(1..=8u8);
                buf[i] = if self.rng.random_bool(0.5) {
                    buf[i].wrapping_add(d)
                } else {
                    buf[i].wrapping_sub(d)
                };
            }
            _ => buf.push(self.rng.random()),
        }
    }

    fn token_edit(&mut self, buf: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        let spans = tokens(buf);
        if spans.is_empty() {
            let piece = self.dict_token();
            buf.extend_from_slice(piece.as_bytes());
            return;
        }
        let (a, b) = spans[self.below(spans.len())];
        match self.below(6) {
            // Delete a token.
            0 => {
                buf.drain(a..b);
            }
            // Duplicate a token.
            1 => {
                let copy = buf[a..b].to_vec();
                buf.splice(b..b, copy);
            }
            // Swap two tokens.
            2 => {
                let (c, d) = spans[self.below(spans.len())];
                if b <= c {
                    let (first, second) = (buf[a..b].to_vec(), buf[c..d].to_vec());
                    buf.splice(c..d, first);
                    buf.splice(a..b, second);
                }
            }
            // Replace a token with one of the language or an interesting number.
            3 => {
                let piece = if self.rng.random_bool(0.5) {
                    self.dict_token()
                } else {
                    NUMBERS[self.below(NUMBERS.len())]
                };
                buf.splice(a..b, piece.bytes());
            }
            // Insert a token of the language.
            4 => {
                let piece = self.dict_token();
                buf.splice(a..a, piece.bytes());
            }
            // Insert a token of another input.
            _ => {
                let other = self.other(corpus);
                let theirs = tokens(other);
                if !theirs.is_empty() {
                    let (c, d) = theirs[self.below(theirs.len())];
                    buf.splice(a..a, other[c..d].iter().copied());
                }
            }
        }
    }

    fn dict_token(&mut self) -> &'static str {
        if self.dict.is_empty() {
            return NUMBERS[self.below(NUMBERS.len())];
        }
        self.dict[self.below(self.dict.len())]
    }
}

/// Token spans of text: runs of word characters, runs of white space, and single other bytes.
fn tokens(buf: &[u8]) -> Vec<(usize, usize)> {
    let class = |b: u8| {
        if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 {
            0
        } else if b.is_ascii_whitespace() {
            1
        } else {
            2
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let c = class(buf[i]);
        let mut j = i + 1;
        if c != 2 {
            while j < buf.len() && class(buf[j]) == c {
                j += 1;
            }
        }
        out.push((i, j));
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_mutants_and_length_is_capped() {
        let corpus = vec![b"{\"a\": [1, 2, 3]}".to_vec(), vec![0u8; 40]];
        let run = |seed| {
            let mut m = Mutator::new(seed, true, &["{", "}"], 64);
            let mut out = Vec::new();
            for i in 0..200 {
                let mut buf = corpus[i % 2].clone();
                m.mutate(&mut buf, &corpus);
                assert!(buf.len() <= 64);
                out.push(buf);
            }
            out
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn tokens_cover_the_text() {
        let text = b"key = \"v1\"  # x";
        let spans = tokens(text);
        assert_eq!(spans.first(), Some(&(0, 3)));
        assert_eq!(spans.last().unwrap().1, text.len());
        assert!(spans.windows(2).all(|w| w[0].1 == w[1].0));
    }
}
