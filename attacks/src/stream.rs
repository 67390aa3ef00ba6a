//! The tenant's stream, seen from the network: the cloud carries every packet between a tenant
//! and its agent (it is the host of the CVM), so it reads the length of every TLS record of an
//! answer streamed over the agent's HTTPS API. One streamed event is one record, and an
//! unpadded event is a constant envelope plus the JSON text of one token: the sequence of
//! record lengths is the sequence of the answer's token lengths (the "token-length side
//! channel" of streamed LLM answers). The cloud owns the model, so it can predict the answer
//! to any prompt it guesses and compare.
//!
//! [`records`] reads the record lengths out of the bytes a server sent (TLS record headers are
//! not encrypted); [`identify`] scores guessed answers against them.

/// TLS's record type of application data (in TLS 1.3 every record after the handshake).
const APPLICATION_DATA: u8 = 23;

/// The length field of every application-data record in `bytes`, the bytes one side of a TLS
/// connection sent, in order (records cut off at the end are left out).
pub fn records(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if at + 5 + len > bytes.len() {
            break;
        }
        if header[0] == APPLICATION_DATA {
            out.push(len);
        }
        at += 5 + len;
    }
    out
}

/// How well one guessed answer explains a stream's record lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// Of the guess's events, how many line up with records of one constant overhead.
    pub matched: usize,
    /// The guess's events.
    pub events: usize,
}

/// For a guessed answer (the length of each streamed event's text, as the server would write
/// it), the best alignment with the observed `records`: over every start and the overhead the
/// start's record implies, how many of the guess's events have a record of exactly
/// `overhead + length`. The true answer of an unpadded stream matches every event.
pub fn fit(records: &[usize], guess: &[usize]) -> Fit {
    let events = guess.len();
    if events == 0 || records.len() < events {
        return Fit { matched: 0, events };
    }
    let matched = (0..=records.len() - events)
        .map(|start| {
            let window = &records[start..start + events];
            // The overhead the most events agree on.
            let mut overheads: Vec<i64> = window
                .iter()
                .zip(guess)
                .map(|(&r, &g)| r as i64 - g as i64)
                .collect();
            overheads.sort_unstable();
            overheads
                .chunk_by(|a, b| a == b)
                .map(<[i64]>::len)
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    Fit { matched, events }
}

/// Which of `guesses` (each the event text lengths of a guessed answer) best explains the
/// records: its index, or `None` when several explain them equally well (the stream tells them
/// apart no better than chance).
pub fn identify(records: &[usize], guesses: &[Vec<usize>]) -> Option<usize> {
    let fits: Vec<usize> = guesses.iter().map(|g| fit(records, g).matched).collect();
    let best = *fits.iter().max()?;
    let mut at_best = fits.iter().enumerate().filter(|(_, f)| **f == best);
    let (index, _) = at_best.next()?;
    at_best.next().is_none().then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
        r.resize(5 + len, 0xab);
        r
    }

    #[test]
    fn the_record_lengths_are_read_from_the_headers_and_a_cut_record_is_left_out() {
        let mut bytes = record(22, 40);
        bytes.extend(record(APPLICATION_DATA, 300));
        bytes.extend(record(APPLICATION_DATA, 7));
        bytes.extend(&record(APPLICATION_DATA, 90)[..50]);
        assert_eq!(records(&bytes), vec![300, 7]);
    }

    #[test]
    fn the_guess_that_made_the_lengths_fits_them_all_and_padding_leaves_a_tie() {
        let answers = [
            vec![3, 5, 1, 4, 4],
            vec![2, 6, 1, 3, 5],
            vec![4, 4, 4, 4, 4],
        ];
        // Unpadded: a header record, then one record per event of the second answer.
        let seen: Vec<usize> = std::iter::once(180)
            .chain(answers[1].iter().map(|l| 250 + l))
            .collect();
        assert_eq!(fit(&seen, &answers[1]).matched, 5);
        assert!(fit(&seen, &answers[0]).matched < 5);
        assert_eq!(identify(&seen, &answers), Some(1));
        // Padded to one size, every answer's stream is the same records: every guess fits as
        // well as its most common length lets it, so the most uniform guess wins whatever was
        // asked (right for one answer at most), and equally uniform ones tie.
        let padded = vec![180, 512, 512, 512, 512, 512];
        assert_eq!(identify(&padded, &answers), Some(2));
        assert_eq!(identify(&padded, &answers[..2]), Some(0));
        assert_eq!(identify(&padded, &[vec![1, 2], vec![3, 4]]), None);
    }
}
