//! What the cloud reads without breaking any mask: whose session it is, how long the prompt is,
//! how many tokens were generated, when and how fast, and how many bytes crossed.
//!
//! No mode hides these today (`docs/attacks.md`, "What every mode leaves visible"). This module
//! reads them off a tap the way a cloud operator would, so that the docs' claim is measured on
//! every report, and so that any future length hiding has a baseline to beat.

use serde::Serialize;
use talaria_engine::{BlockOp, OpId};

use crate::eval::Truth;
use crate::tap::{CallRef, Public, SessionTap, Tap};

/// One session as the cloud sees it without unmasking anything.
#[derive(Debug, Clone, Serialize)]
pub struct SessionMeta {
    pub session: u64,
    /// The tenant the coordinator named (cluster taps).
    pub tenant: Option<String>,
    /// Real rows of the prefill: the prompt's length in tokens (dummy rows are public).
    pub prompt_tokens: usize,
    /// Forward passes: one per generated token (the prefill produces the first).
    pub generated_tokens: usize,
    /// From the prefill's first call to its last, µs (arrival times).
    pub prefill_us: Option<u64>,
    /// Median time between successive decode passes, µs: the tenant's step cadence.
    pub step_us: Option<u64>,
    /// Request bytes the stage received for this session (cluster taps).
    pub frame_bytes: Option<u64>,
}

/// The metadata of every session in `tap` that has layer-0 `qkv` calls (the first op of every
/// forward pass: a tap of a later pipeline stage alone has none).
pub fn read(tap: &Tap) -> Vec<SessionMeta> {
    tap.sessions()
        .filter_map(|s| session_meta(s, &tap.public))
        .collect()
}

/// One session's metadata, read off its passes' first calls (layer-0 `qkv`, one per pass).
fn session_meta(s: &SessionTap, public: &Public) -> Option<SessionMeta> {
    let first_op = OpId::Block {
        layer: 0,
        op: BlockOp::Qkv,
    };
    let firsts: Vec<&CallRef> = s.calls().filter(|c| c.op == first_op).collect();
    let prefill = firsts.first()?;
    // The prefill pass: its calls up to the second pass's first call.
    let prefill_end = firsts.get(1).map_or(u64::MAX, |c| c.seq);
    let prefill_ts: Option<Vec<u64>> = s
        .calls()
        .filter(|c| c.seq < prefill_end)
        .map(|c| c.t_us)
        .collect();
    let prefill_us = prefill_ts.and_then(|ts| Some(ts.iter().max()? - ts.iter().min()?));
    let starts: Option<Vec<u64>> = firsts.iter().map(|c| c.t_us).collect();
    let step_us = starts.and_then(|st| {
        // Gaps between decode passes: the first pass's own length is the prefill's.
        let mut gaps: Vec<u64> = st
            .windows(2)
            .skip(1)
            .map(|w| w[1].saturating_sub(w[0]))
            .collect();
        gaps.sort_unstable();
        gaps.get(gaps.len() / 2).copied()
    });
    let frame_bytes = s
        .calls()
        .map(|c| c.frame_bytes.map(|b| b as u64))
        .sum::<Option<u64>>();
    Some(SessionMeta {
        session: s.id,
        tenant: s.tenant.clone(),
        prompt_tokens: public.real_rows(prefill.rows),
        generated_tokens: firsts.len(),
        prefill_us,
        step_us,
        frame_bytes,
    })
}

/// How much of the truth the metadata gives away exactly.
#[derive(Debug, Clone, Serialize)]
pub struct MetaScore {
    pub sessions: usize,
    /// Sessions whose prompt length the cloud read exactly.
    pub prompt_length_exact: usize,
    /// Sessions whose number of fed-back tokens (+1) the cloud read exactly.
    pub response_length_exact: usize,
}

/// Scores `metas` against the experiment's truth.
pub fn score(metas: &[SessionMeta], truth: &Truth) -> MetaScore {
    let mut out = MetaScore {
        sessions: 0,
        prompt_length_exact: 0,
        response_length_exact: 0,
    };
    for m in metas {
        let Some(t) = truth.sessions.iter().find(|t| t.session == m.session) else {
            continue;
        };
        out.sessions += 1;
        out.prompt_length_exact += usize::from(t.prompt.len() == m.prompt_tokens);
        out.response_length_exact += usize::from(t.response.len() + 1 == m.generated_tokens);
    }
    out
}
