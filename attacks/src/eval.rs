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
        crate::read_versioned(path, Self::FORMAT, |t: &Truth| &t.format)
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
    AttackScore {
        attack: attack.into(),
        recovered,
        total,
        accuracy: prompt.accuracy,
        ci95: prompt.ci95,
        sessions: truth.sessions.len(),
        seconds,
        response: (r_total > 0).then(|| Counts::new(r_recovered, r_total)),
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
        }];
        let s = score("x", &g, &truth, 0.0);
        assert_eq!((s.recovered, s.total), (2, 4));
        let r = s.response.unwrap();
        assert_eq!((r.recovered, r.total), (1, 2));
        let none = score("x", &[], &truth, 0.0);
        assert_eq!(none.recovered, 0);
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
