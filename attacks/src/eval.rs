//! Scoring guesses against the truth an experiment recorded (never shown to an attack).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{AttackError, SessionGuess};

/// The experiment's record of what each session's prompt was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Truth {
    pub format: String,
    pub sessions: Vec<VictimTruth>,
}

/// One victim session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VictimTruth {
    pub session: u64,
    pub prompt: Vec<u32>,
    pub text: String,
    /// The generated tokens that went back into the model, one per decode pass (all but the
    /// last generated token).
    #[serde(default)]
    pub response: Vec<u32>,
}

/// The file beside a tap that holds the truth.
pub const TRUTH_FILE: &str = "truth.json";

impl Truth {
    pub const FORMAT: &'static str = "talaria-truth-1";

    pub fn read(path: &Path) -> Result<Self, AttackError> {
        crate::read_versioned(path, Self::FORMAT)
    }

    pub fn write(&self, path: &Path) -> Result<(), AttackError> {
        let json = serde_json::to_vec_pretty(self).map_err(AttackError::json(path))?;
        std::fs::write(path, json).map_err(AttackError::io(path))
    }
}

/// How much of the prompts an attack recovered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttackScore {
    pub attack: String,
    /// Prompt tokens recovered: per session, the size of the multiset intersection of the
    /// guesses and the prompt (order-free, which credits an attacker that learns the words but
    /// not their order).
    pub recovered: usize,
    pub total: usize,
    pub accuracy: f64,
    /// 95 % Wilson interval of the accuracy.
    pub ci95: [f64; 2],
    pub sessions: usize,
    pub seconds: f64,
    /// The same for the response tokens, when the victims generated more than one token.
    pub response: Option<Counts>,
    /// What a Bayesian attack's beliefs say about the true tokens (the ideal attack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub information: Option<Information>,
    /// The attack against its own prior on the same positions (the ideal attack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired: Option<Paired>,
    /// The same information measured along the true tokens (the ideal attack's evidence given
    /// the right prefix and every other token: an upper bound, not an attack;
    /// `Attacker::ideal_true_prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_prefix: Option<Information>,
}

/// The information an attack's evidence gave about the true tokens, position by position (prompt
/// and response; a position is the i-th guess against the i-th true token).
///
/// Per position, over the attack's candidate set: `log2 P_post(true) − log2 P_prior(true)`, both
/// normalised over the set. A position whose true token is outside the set counts **0 bits**
/// (the floor: neither distribution knows that token, and the evidence cannot be credited or
/// blamed for it); `covered` says how often that happened. Linked sessions with the same truth
/// count once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Information {
    /// Positions scored.
    pub positions: usize,
    /// Positions whose true token was in the candidate set.
    pub covered: usize,
    /// Mean information gain on the true token, bits per token.
    pub bits_per_token: f64,
    /// Its 95 % interval (normal approximation over positions).
    pub bits_ci95: [f64; 2],
    /// Mean `−log2 P(true)` over covered positions under the prior, and under the posterior.
    pub prior_bits: f64,
    pub posterior_bits: f64,
    /// Share of positions whose true token had the highest probability in the set under the
    /// posterior, and under the prior.
    pub posterior_top1: f64,
    pub prior_top1: f64,
    /// Exact McNemar of the two on the same positions: the true token first under the posterior
    /// only, under the prior only, and the two-sided p-value.
    #[serde(default)]
    pub posterior_only: usize,
    #[serde(default)]
    pub prior_only: usize,
    #[serde(default = "one")]
    pub top1_p_value: f64,
}

fn one() -> f64 {
    1.0
}

/// An exact McNemar test of the attack against its prior, on per-position correctness of the
/// same positions in the same run. The prior's guess at a position is its own most probable
/// candidate after the same prefix (the attack's path): the decision the attack would make there
/// without evidence. (The prior-only beam's whole path is a poor comparator: without evidence a
/// beam settles on the model's most probable — often repetitive — text, and noise alone would
/// move a path off it and "win"; its positions right are reported beside, not tested.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    pub positions: usize,
    /// Positions the attack, and the prior on the same prefix, guessed right.
    pub attack_correct: usize,
    pub baseline_correct: usize,
    /// Positions the prior-only beam search (same width and candidates, no evidence) got right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_beam_correct: Option<usize>,
    /// Discordant positions: right only by the attack, right only by the baseline.
    pub attack_only: usize,
    pub baseline_only: usize,
    /// Two-sided exact p-value (binomial on the discordant positions, p = 1/2).
    pub p_value: f64,
}

impl Paired {
    /// Whether the attack beats its baseline at the 5 % level.
    pub fn significant(&self) -> bool {
        self.p_value < 0.05 && self.attack_only > self.baseline_only
    }
}

/// The two-sided exact McNemar p-value for `b` and `c` discordant pairs.
pub fn mcnemar(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    // 2 · P(X ≤ min(b, c)) for X ~ Binomial(n, 1/2), summed in log space.
    let ln_choose = |k: usize| -> f64 {
        (1..=k)
            .map(|i| ((n - k + i) as f64).ln() - (i as f64).ln())
            .sum()
    };
    let terms: Vec<f64> = (0..=b.min(c))
        .map(|k| ln_choose(k) - n as f64 * std::f64::consts::LN_2)
        .collect();
    (2.0 * crate::score::log_sum_exp(terms.into_iter()).exp()).min(1.0)
}

/// The information in `guesses`' beliefs about the true tokens (`None` without beliefs).
pub fn information(guesses: &[SessionGuess], truth: &Truth) -> Option<Information> {
    beliefs(guesses, truth).0
}

/// Per-position beliefs, guesses and baseline guesses against the truth.
fn beliefs(guesses: &[SessionGuess], truth: &Truth) -> (Option<Information>, Option<Paired>) {
    let by_session: HashMap<u64, &SessionGuess> = guesses.iter().map(|g| (g.session, g)).collect();
    let (mut gains, mut prior_bits, mut post_bits) = (Vec::new(), Vec::new(), Vec::new());
    let (mut post_top1, mut prior_top1) = (0usize, 0usize);
    let (mut post_only, mut prior_only) = (0usize, 0usize);
    let (mut n, mut right, mut base_right, mut b, mut c) = (0, 0, 0, 0, 0);
    let mut beam_right: Option<usize> = None;
    let mut seen: std::collections::HashSet<(u64, Vec<u32>)> = Default::default();
    for v in &truth.sessions {
        let Some(g) = by_session.get(&v.session) else {
            continue;
        };
        let truth_seq: Vec<u32> = v.prompt.iter().chain(&v.response).copied().collect();
        if let Some(lead) = g.group
            && !seen.insert((lead, truth_seq.clone()))
        {
            continue;
        }
        for (j, bel) in g.beliefs.iter().enumerate().take(truth_seq.len()) {
            let t = truth_seq[j];
            let at = bel.candidates.iter().position(|&x| x == t);
            let top = |p: &[f32]| at.is_some_and(|i| p.iter().all(|&q| q <= p[i]));
            match at {
                Some(i) if i < bel.prior.len() && i < bel.posterior.len() => {
                    let (lp, lq) = (f64::from(bel.prior[i]), f64::from(bel.posterior[i]));
                    gains.push((lq - lp) / std::f64::consts::LN_2);
                    prior_bits.push(-lp / std::f64::consts::LN_2);
                    post_bits.push(-lq / std::f64::consts::LN_2);
                    let (q, p) = (top(&bel.posterior), top(&bel.prior));
                    post_top1 += usize::from(q);
                    prior_top1 += usize::from(p);
                    post_only += usize::from(q && !p);
                    prior_only += usize::from(p && !q);
                }
                _ => gains.push(0.0),
            }
        }
        let seq: Vec<u32> = g.tokens.iter().chain(&g.response).copied().collect();
        for (j, bel) in g.beliefs.iter().enumerate().take(truth_seq.len()) {
            let t = truth_seq[j];
            let a = seq.get(j) == Some(&t);
            // The prior's most probable candidate (the first, on ties).
            let p = bel
                .prior
                .iter()
                .enumerate()
                .fold(None::<(usize, f32)>, |m, (i, &q)| match m {
                    Some((_, best)) if best >= q => m,
                    _ => Some((i, q)),
                })
                .and_then(|(i, _)| bel.candidates.get(i))
                == Some(&t);
            n += 1;
            right += usize::from(a);
            base_right += usize::from(p);
            b += usize::from(a && !p);
            c += usize::from(p && !a);
        }
        if let Some(base) = &g.baseline {
            let base_seq = base.tokens.iter().chain(&base.response);
            let hits = base_seq.zip(&truth_seq).filter(|(x, y)| x == y).count();
            *beam_right.get_or_insert(0) += hits;
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let information = (!gains.is_empty()).then(|| {
        let m = mean(&gains);
        let var =
            gains.iter().map(|g| (g - m) * (g - m)).sum::<f64>() / (gains.len().max(2) - 1) as f64;
        let half = 1.959_963_984_540_054 * (var / gains.len() as f64).sqrt();
        Information {
            positions: gains.len(),
            covered: prior_bits.len(),
            bits_per_token: m,
            bits_ci95: [m - half, m + half],
            prior_bits: mean(&prior_bits),
            posterior_bits: mean(&post_bits),
            posterior_top1: post_top1 as f64 / gains.len() as f64,
            prior_top1: prior_top1 as f64 / gains.len() as f64,
            posterior_only: post_only,
            prior_only,
            top1_p_value: mcnemar(post_only, prior_only),
        }
    });
    let paired = (n > 0).then(|| Paired {
        positions: n,
        attack_correct: right,
        baseline_correct: base_right,
        prior_beam_correct: beam_right,
        attack_only: b,
        baseline_only: c,
        p_value: mcnemar(b, c),
    });
    (information, paired)
}

/// Tokens recovered of a total, with the 95 % Wilson interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counts {
    pub recovered: usize,
    pub total: usize,
    pub accuracy: f64,
    pub ci95: [f64; 2],
}

impl Counts {
    fn new(recovered: usize, total: usize) -> Self {
        Self {
            recovered,
            total,
            accuracy: if total == 0 {
                0.0
            } else {
                recovered as f64 / total as f64
            },
            ci95: wilson(recovered, total),
        }
    }
}

/// The size of the multiset intersection of `guesses` and `truth`.
fn overlap(guesses: &[u32], truth: &[u32]) -> usize {
    let mut left: HashMap<u32, usize> = HashMap::new();
    for &t in truth {
        *left.entry(t).or_default() += 1;
    }
    guesses
        .iter()
        .filter(|t| match left.get_mut(t) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count()
}

/// Scores `guesses` against `truth`; a session without guesses counts as nothing recovered.
pub fn score(attack: &str, guesses: &[SessionGuess], truth: &Truth, seconds: f64) -> AttackScore {
    let by_session: HashMap<u64, &SessionGuess> = guesses.iter().map(|g| (g.session, g)).collect();
    let (mut recovered, mut total, mut r_recovered, mut r_total) = (0, 0, 0, 0);
    for v in &truth.sessions {
        total += v.prompt.len();
        r_total += v.response.len();
        if let Some(g) = by_session.get(&v.session) {
            recovered += overlap(&g.tokens, &v.prompt);
            r_recovered += overlap(&g.response, &v.response);
        }
    }
    let prompt = Counts::new(recovered, total);
    let (information, paired) = beliefs(guesses, truth);
    AttackScore {
        attack: attack.into(),
        recovered,
        total,
        accuracy: prompt.accuracy,
        ci95: prompt.ci95,
        sessions: truth.sessions.len(),
        seconds,
        response: (r_total > 0).then(|| Counts::new(r_recovered, r_total)),
        information,
        paired,
        true_prefix: None,
    }
}

/// The 95 % Wilson score interval of `k` successes in `n` trials.
pub fn wilson(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (k, n, z) = (k as f64, n as f64, 1.959_963_984_540_054);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiset_overlap_counts_each_prompt_token_once() {
        let truth = Truth {
            format: Truth::FORMAT.into(),
            sessions: vec![VictimTruth {
                session: 7,
                prompt: vec![1, 2, 2, 3],
                text: String::new(),
                response: vec![5, 6],
            }],
        };
        let g = [SessionGuess {
            session: 7,
            tokens: vec![2, 2, 2, 9],
            response: vec![6, 6],
            ..SessionGuess::default()
        }];
        let s = score("x", &g, &truth, 0.0);
        assert_eq!((s.recovered, s.total), (2, 4));
        let r = s.response.unwrap();
        assert_eq!((r.recovered, r.total), (1, 2));
        let none = score("x", &[], &truth, 0.0);
        assert_eq!(none.recovered, 0);
        assert!(s.information.is_none() && s.paired.is_none());
        // Old JSON (no beliefs, no baseline) still parses.
        let old: SessionGuess =
            serde_json::from_str(r#"{"session": 1, "tokens": [2], "response": []}"#).unwrap();
        assert!(old.beliefs.is_empty() && old.baseline.is_none() && old.group.is_none());
    }

    #[test]
    fn mcnemar_matches_the_binomial() {
        assert_eq!(mcnemar(0, 0), 1.0);
        assert_eq!(mcnemar(3, 3), 1.0);
        // 2 · P(X ≤ 0), n = 6: 2/64.
        assert!((mcnemar(6, 0) - 2.0 / 64.0).abs() < 1e-12);
        // 2 · P(X ≤ 2), n = 12: 2 · 79/4096.
        assert!((mcnemar(2, 10) - 2.0 * 79.0 / 4096.0).abs() < 1e-12);
        assert!(mcnemar(40, 10) < 1e-4);
    }

    #[test]
    fn information_counts_bits_on_the_true_token_and_floors_the_uncovered() {
        use crate::ideal::{Baseline, Belief};
        let ln = |p: f64| p.ln() as f32;
        let truth = Truth {
            format: Truth::FORMAT.into(),
            sessions: vec![VictimTruth {
                session: 1,
                prompt: vec![10, 11, 12],
                text: String::new(),
                response: vec![],
            }],
        };
        let bel = |post: f64| Belief {
            candidates: vec![10, 11, 12, 99],
            prior: vec![ln(0.25); 4],
            posterior: vec![ln(post), ln(post), ln(post), ln(1.0 - 3.0 * post)],
            ..Belief::default()
        };
        let g = SessionGuess {
            session: 1,
            tokens: vec![10, 11, 99],
            response: vec![],
            beliefs: vec![
                bel(0.3),
                bel(0.25),
                Belief {
                    candidates: vec![7, 8],
                    prior: vec![ln(0.5); 2],
                    posterior: vec![ln(0.9), ln(0.1)],
                    ..Belief::default()
                },
            ],
            baseline: Some(Baseline {
                tokens: vec![99, 11, 12],
                response: vec![],
            }),
            group: None,
        };
        let s = score("ideal", &[g], &truth, 0.0);
        let info = s.information.unwrap();
        assert_eq!((info.positions, info.covered), (3, 2));
        // log2(0.3 / 0.25) + 0 + 0 (uncovered), over 3.
        let want = (0.3f64 / 0.25).log2() / 3.0;
        assert!((info.bits_per_token - want).abs() < 1e-6, "{info:?}");
        // The prior is flat over the first two sets (its first candidate counts as its guess: 10,
        // then 10 again) and picks 7 at the third: right once (position 0), the attack twice.
        let p = s.paired.unwrap();
        assert_eq!(
            (p.positions, p.attack_correct, p.baseline_correct),
            (3, 2, 1)
        );
        assert_eq!((p.attack_only, p.baseline_only), (1, 0));
        assert_eq!(p.p_value, 1.0);
        // The prior-only beam's path (99, 11, 12) is right twice.
        assert_eq!(p.prior_beam_correct, Some(2));
    }

    #[test]
    fn wilson_interval_brackets_the_rate() {
        let [lo, hi] = wilson(50, 100);
        assert!(lo < 0.5 && hi > 0.5 && lo > 0.39 && hi < 0.61);
        let [lo, hi] = wilson(0, 200);
        assert!(lo.abs() < 1e-12);
        assert!(hi > 0.0 && hi < 0.03);
        assert_eq!(wilson(200, 200)[1], 1.0);
    }
}
