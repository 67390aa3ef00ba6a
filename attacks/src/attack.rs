//! The attacks. Each works on every forward pass of every recorded session — the prefill, where
//! the prompt's rows sit, then one pass per generated token — and guesses as many tokens as a
//! pass's calls had real rows (the number of dummy rows is public).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use talaria_engine::{BlockOp, KvCache, OpId};
use talaria_params::Calibration;

use crate::score::{self, Basis, Distance, Space, log_sum_exp, matrix_f32};
use crate::sim::Simulator;
use crate::tap::{CallRef, Matrix, Public, SessionTap, Tap, read_npy};
use crate::{AttackError, learned};

/// The attacks, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Token frequencies of public text alone: the floor any attack must beat.
    Prior,
    /// Nearest neighbour of each layer-0 `qkv` row in the normed embedding table.
    Nn,
    /// Forward simulation ("Hidden No More"): position by position, every shortlisted candidate
    /// run through the model after the tokens recovered so far, matched at a chosen op against
    /// any row of the call.
    Forward,
    /// `nn` then `forward` on the part of each row outside its public basis's span.
    Projection,
    /// Gaussian maximum a posteriori over the four ops of layer 0: mask scale estimated from
    /// each row's norm, whitened by the basis, with the public-text prior.
    Gaussian,
    /// The Gaussian evidence of every op of the pass (4 per layer and the LM head) summed, with
    /// the same prior.
    MultiView,
    /// A ridge decoder from masked rows to embeddings, trained on public text masked with the
    /// attacker's own keys.
    Learned,
    /// The ideal attacker (`ideal.rs`): beam search over positions with the model's own
    /// next-token distribution as the prior and the exact likelihood of every view under the
    /// public mask model as the evidence; reports its beliefs and the prior's own guesses.
    Ideal,
    /// The exact bits of each layer-0 `qkv` value against every token (`exactness.rs`): finds
    /// every token where the masks cannot reach every value of the row's grid.
    Exactness,
}

impl AttackKind {
    pub const ALL: [AttackKind; 9] = [
        AttackKind::Prior,
        AttackKind::Nn,
        AttackKind::Forward,
        AttackKind::Projection,
        AttackKind::Gaussian,
        AttackKind::MultiView,
        AttackKind::Learned,
        AttackKind::Ideal,
        AttackKind::Exactness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AttackKind::Prior => "prior",
            AttackKind::Nn => "nn",
            AttackKind::Forward => "forward",
            AttackKind::Projection => "projection",
            AttackKind::Gaussian => "gaussian",
            AttackKind::MultiView => "multi-view",
            AttackKind::Learned => "learned",
            AttackKind::Ideal => "ideal",
            AttackKind::Exactness => "exactness",
        }
    }
}

impl std::str::FromStr for AttackKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        AttackKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = AttackKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown attack {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// The attacks' knobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Candidates simulated per position by the sequential attacks.
    pub shortlist: usize,
    /// The op whose input the forward-simulation attacks match.
    pub forward_view: OpId,
    pub distance: Distance,
    /// Seed of the learned attacker's own masks and random training text.
    pub seed: u64,
    /// Random token sequences added to the public text for the learned attack.
    pub train_random: usize,
    /// Hypotheses the ideal attack keeps per position.
    #[serde(default = "crate::ideal::default_beam")]
    pub beam: usize,
    /// The model's next tokens the ideal attack tries per hypothesis (and as many again from
    /// its layer-0 screen).
    #[serde(default = "crate::ideal::default_top_k")]
    pub top_k: usize,
    /// The ideal attack sums the evidence of sessions whose passes have the same row counts
    /// (taken to hold the same tokens).
    #[serde(default)]
    pub link_sessions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shortlist: 256,
            forward_view: OpId::Block {
                layer: 1,
                op: BlockOp::Qkv,
            },
            distance: Distance::L2,
            seed: 0x7a1a_71a5,
            train_random: 48,
            beam: crate::ideal::default_beam(),
            top_k: crate::ideal::default_top_k(),
            link_sessions: false,
        }
    }
}

/// An attack's guesses for one session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionGuess {
    pub session: u64,
    /// The prompt (from the prefill).
    pub tokens: Vec<u32>,
    /// The generated tokens that went back into the model (one per decode pass).
    pub response: Vec<u32>,
    /// The Bayesian attacks' beliefs at every guessed position (prompt, then response).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub beliefs: Vec<crate::ideal::Belief>,
    /// What the same search guesses from the prior alone (for the paired test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<crate::ideal::Baseline>,
    /// The first session of the linked group this guess was made for, when it was linked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
}

/// What the masks of an op look like to the cloud.
#[derive(Debug, Clone)]
pub(crate) enum Geometry {
    /// No masking.
    Plain,
    /// Full rank: fresh isotropic noise.
    Identity,
    /// Rank m < d: masks in the span of this public basis (m × d, orthonormal rows).
    Basis(Basis),
}

impl Geometry {
    fn basis(&self) -> Option<&Basis> {
        match self {
            Geometry::Basis(b) => Some(b),
            _ => None,
        }
    }
}

/// One op's observed rows in a forward pass.
pub(crate) struct Observed {
    pub rows: Matrix,
    pub geometry: Geometry,
}

/// One forward pass of a session.
pub(crate) struct Pass<'t> {
    pub session: &'t SessionTap,
    pub calls: BTreeMap<OpId, CallRef>,
    pub n_real: usize,
    pub ordered: bool,
    public: &'t Public,
    cache: HashMap<OpId, std::rc::Rc<Observed>>,
}

impl<'t> Pass<'t> {
    pub(crate) fn new_public(
        session: &'t SessionTap,
        public: &'t Public,
        calls: BTreeMap<OpId, CallRef>,
    ) -> Result<Self, AttackError> {
        let first = calls
            .values()
            .next()
            .ok_or_else(|| AttackError::Format("empty pass".into()))?;
        let n_real = public.real_rows(first.rows);
        Ok(Self {
            session,
            n_real,
            ordered: public.ordered(),
            calls,
            public,
            cache: HashMap::new(),
        })
    }

    /// An op's rows and mask geometry, read once.
    pub(crate) fn observed(
        &mut self,
        op: OpId,
        sim: &Simulator,
    ) -> Result<std::rc::Rc<Observed>, AttackError> {
        if let Some(o) = self.cache.get(&op) {
            return Ok(o.clone());
        }
        let call = self
            .calls
            .get(&op)
            .ok_or_else(|| AttackError::Format(format!("no {op} call in the pass")))?;
        let mut rows = read_npy(&call.file)?;
        let remo = &self.public.remo;
        if remo.enabled && remo.precision.is_int() {
            // Residues read as signed fixed point with the public f: what the data would be
            // without the pad.
            let scale = 2f64.powi(-(remo.frac_bits as i32));
            rows.data.iter_mut().for_each(|v| *v *= scale);
        }
        let (d_in, _) = op.shape(sim.config());
        if rows.cols != d_in || rows.rows != call.rows {
            return Err(AttackError::Format(format!(
                "{}: {} x {}, expected {} x {d_in}",
                call.file.display(),
                rows.rows,
                rows.cols,
                call.rows
            )));
        }
        let geometry = if !self.public.remo.enabled {
            Geometry::Plain
        } else if let Some(path) = self.session.basis(op) {
            let b = read_npy(path)?;
            if b.cols != d_in {
                return Err(AttackError::Format(format!(
                    "{}: basis width {} for an op of width {d_in}",
                    path.display(),
                    b.cols
                )));
            }
            Geometry::Basis(Basis::new(b))
        } else {
            Geometry::Identity
        };
        let o = std::rc::Rc::new(Observed { rows, geometry });
        self.cache.insert(op, o.clone());
        Ok(o)
    }

    /// The rows of `op` that may hold position `i` (`None`: the op does not see it).
    fn rows_for(&self, op: OpId, i: usize, total: usize) -> Option<Vec<usize>> {
        if op == OpId::LmHead {
            // The LM head sees only the last position of a pass.
            if i + 1 != self.n_real {
                return None;
            }
            return Some(if self.ordered {
                vec![0]
            } else {
                (0..total).collect()
            });
        }
        Some(if self.ordered {
            vec![i]
        } else {
            (0..total).collect()
        })
    }
}

/// How observed rows are compared with candidate rows; higher scores are better.
#[derive(Debug, Clone, Copy)]
enum Scorer {
    Match { space: Space, distance: Distance },
    Gauss,
}

impl Scorer {
    /// `obs.rows × cands.rows` scores; `None` when the space holds nothing to compare.
    fn score(&self, obs: &Observed, sel: &[usize], cands: &Matrix) -> Option<Vec<f64>> {
        let rows = select(&obs.rows, sel);
        match *self {
            Scorer::Match { space, distance } => {
                let (o, c) = match (space, &obs.geometry) {
                    (Space::Full, _) | (Space::Complement, Geometry::Plain) => {
                        (rows, cands.clone())
                    }
                    (Space::Complement, Geometry::Identity) => return None,
                    (Space::Complement, Geometry::Basis(b)) => {
                        (b.complement(&rows), b.complement(cands))
                    }
                };
                Some(
                    score::distances(&o, &c, distance)
                        .into_iter()
                        .map(|d| -d)
                        .collect(),
                )
            }
            Scorer::Gauss => Some(score::gaussian(&rows, cands, obs.geometry.basis())),
        }
    }

    /// One score for a candidate from its scores against every row that may hold it.
    fn combine(&self, scores: impl Iterator<Item = f64> + Clone, n_rows: usize) -> f64 {
        match self {
            Scorer::Match { .. } => scores.fold(f64::NEG_INFINITY, f64::max),
            Scorer::Gauss => log_sum_exp(scores) - (n_rows as f64).ln(),
        }
    }

    /// Whether the best candidate so far is certain enough to stop simulating more.
    fn decisive(&self, best: f64, second: f64, scale: f64) -> bool {
        match self {
            // An exact match (up to rounding): plaintext.
            Scorer::Match { .. } => -best <= 1e-8 * scale,
            Scorer::Gauss => best - second > 50.0,
        }
    }
}

fn select(m: &Matrix, rows: &[usize]) -> Matrix {
    let mut data = Vec::with_capacity(rows.len() * m.cols);
    for &r in rows {
        data.extend_from_slice(m.row(r));
    }
    Matrix {
        rows: rows.len(),
        cols: m.cols,
        data,
    }
}

/// Token frequencies of public text.
pub(crate) struct Prior {
    /// Tokens by decreasing count.
    ranked: Vec<(u32, f64)>,
    counts: HashMap<u32, f64>,
    total: f64,
    vocab: f64,
}

impl Prior {
    fn new(sim: &Simulator) -> Result<Self, AttackError> {
        let mut counts: HashMap<u32, f64> = HashMap::new();
        for line in crate::PUBLIC_TEXT.lines().filter(|l| !l.trim().is_empty()) {
            for t in sim.tokenizer().encode(line)? {
                *counts.entry(t).or_default() += 1.0;
            }
        }
        let mut ranked: Vec<(u32, f64)> = counts.iter().map(|(&t, &c)| (t, c)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Self {
            ranked,
            total: counts.values().sum(),
            counts,
            vocab: sim.config().vocab as f64,
        })
    }

    /// `n` guesses that maximise the expected overlap with a prompt of `n` tokens: tokens
    /// allotted in proportion to their frequency (highest averages).
    pub(crate) fn guess(&self, n: usize) -> Vec<u32> {
        let mut given = vec![0usize; self.ranked.len()];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(best) = (0..self.ranked.len()).max_by(|&a, &b| {
                let q = |i: usize| self.ranked[i].1 / (given[i] + 1) as f64;
                q(a).total_cmp(&q(b)).then(b.cmp(&a))
            }) else {
                break;
            };
            given[best] += 1;
            out.push(self.ranked[best].0);
        }
        out
    }

    /// ln p(t), add-α smoothed over the vocabulary: the Bayesian attacks' prior.
    fn log_prob(&self, t: u32) -> f64 {
        const ALPHA: f64 = 0.1;
        let c = self.counts.get(&t).copied().unwrap_or(0.0);
        ((c + ALPHA) / (self.total + ALPHA * self.vocab)).ln()
    }

    fn top(&self, k: usize) -> impl Iterator<Item = u32> + '_ {
        self.ranked.iter().take(k).map(|p| p.0)
    }
}

/// Runs attacks on taps; keeps what it learned (public text recordings) between runs.
pub struct Attacker<'s> {
    pub(crate) sim: &'s mut Simulator,
    pub(crate) opts: Options,
    pub(crate) calibration: Calibration,
    pub(crate) prior: Prior,
    pub(crate) learned: learned::Cache,
}

/// Rows kept from per-row guesses: all real rows in order, or the most confident ones.
pub(crate) fn keep_rows(per_row: &[(u32, f64)], n_real: usize, ordered: bool) -> Vec<u32> {
    if ordered {
        return per_row.iter().take(n_real).map(|g| g.0).collect();
    }
    let mut idx: Vec<usize> = (0..per_row.len()).collect();
    idx.sort_by(|&a, &b| per_row[b].1.total_cmp(&per_row[a].1));
    idx.into_iter().take(n_real).map(|i| per_row[i].0).collect()
}

impl<'s> Attacker<'s> {
    pub fn new(
        sim: &'s mut Simulator,
        opts: Options,
        calibration: Calibration,
    ) -> Result<Self, AttackError> {
        let prior = Prior::new(sim)?;
        Ok(Self {
            sim,
            opts,
            calibration,
            prior,
            learned: learned::Cache::default(),
        })
    }

    /// Runs one attack on every session of a tap.
    pub fn run(&mut self, kind: AttackKind, tap: &Tap) -> Result<Vec<SessionGuess>, AttackError> {
        if kind == AttackKind::Ideal {
            return crate::ideal::run(self, tap);
        }
        if kind == AttackKind::Exactness {
            return crate::exactness::run(self, tap);
        }
        let mut out = Vec::new();
        for session in tap.sessions() {
            let mut guess = SessionGuess {
                session: session.id,
                ..SessionGuess::default()
            };
            // The context recovered so far: the sequential attacks simulate after it.
            let mut context = self.sim.empty();
            for (p, calls) in session.passes(self.sim.config())?.into_iter().enumerate() {
                let mut pass = Pass::new_public(session, &tap.public, calls)?;
                let tokens = if kind == AttackKind::Learned {
                    learned::attack_pass(self, tap, &mut pass)?
                } else {
                    self.attack_pass(kind, &mut pass, &mut context)?
                };
                if p == 0 {
                    guess.tokens = tokens;
                } else {
                    guess.response.extend(tokens);
                }
            }
            tracing::debug!(
                session = session.id,
                attack = kind.name(),
                ?guess,
                "guessed"
            );
            out.push(guess);
        }
        Ok(out)
    }

    fn attack_pass(
        &mut self,
        kind: AttackKind,
        pass: &mut Pass,
        context: &mut KvCache,
    ) -> Result<Vec<u32>, AttackError> {
        let n = pass.n_real;
        let full = Scorer::Match {
            space: Space::Full,
            distance: self.opts.distance,
        };
        let comp = Scorer::Match {
            space: Space::Complement,
            distance: self.opts.distance,
        };
        let view = self.opts.forward_view;
        let layer0: Vec<OpId> = BlockOp::ALL
            .into_iter()
            .map(|op| OpId::Block { layer: 0, op })
            .collect();
        Ok(match kind {
            AttackKind::Prior => self.prior.guess(n),
            AttackKind::Nn => match self.scan_l0(pass, full)? {
                Some(per_row) => keep_rows(&per_row.best(), n, pass.ordered),
                None => self.prior.guess(n),
            },
            AttackKind::Forward => {
                let list = self.shortlist(pass, full)?;
                self.sequential(pass, &[view], full, &list, context)?
            }
            AttackKind::Projection => match self.scan_l0(pass, comp)? {
                // The basis spans everything (full rank): there is no complement to attack.
                None => self.prior.guess(n),
                Some(_) => {
                    let list = self.shortlist(pass, comp)?;
                    self.sequential(pass, &[view], comp, &list, context)?
                }
            },
            AttackKind::Gaussian => {
                let list = self.shortlist(pass, Scorer::Gauss)?;
                self.sequential(pass, &layer0, Scorer::Gauss, &list, context)?
            }
            AttackKind::MultiView => {
                let list = self.shortlist(pass, Scorer::Gauss)?;
                let mut views = all_ops(self.sim);
                views.sort();
                self.sequential(pass, &views, Scorer::Gauss, &list, context)?
            }
            AttackKind::Learned => unreachable!("handled by learned::attack_pass"),
            AttackKind::Ideal => unreachable!("handled by ideal::run"),
            AttackKind::Exactness => unreachable!("handled by exactness::run"),
        })
    }

    /// Scores every token of the vocabulary against every row of the layer-0 `qkv` call (the
    /// one context-free view) and keeps each row's best candidates.
    fn scan_l0(&mut self, pass: &mut Pass, scorer: Scorer) -> Result<Option<TopRows>, AttackError> {
        const CHUNK: usize = 4096;
        let op = OpId::Block {
            layer: 0,
            op: BlockOp::Qkv,
        };
        let obs = pass.observed(op, self.sim)?;
        let d = self.sim.config().d_model;
        let vocab = self.sim.config().vocab;
        let all: Vec<usize> = (0..obs.rows.rows).collect();
        let keep = self.opts.shortlist.div_ceil(2 * all.len().max(1)).max(2);
        let mut top = TopRows::new(all.len(), keep);
        for start in (0..vocab).step_by(CHUNK) {
            let end = (start + CHUNK).min(vocab);
            let cands = matrix_f32(end - start, d, &self.sim.l0_table()[start * d..end * d]);
            let Some(s) = scorer.score(&obs, &all, &cands) else {
                return Ok(None);
            };
            top.add(&s, start as u32, end - start);
        }
        Ok(Some(top))
    }

    /// Candidates for the sequential attacks: each row's best layer-0 candidates, then the most
    /// frequent tokens of public text, `opts.shortlist` in all.
    fn shortlist(&mut self, pass: &mut Pass, scorer: Scorer) -> Result<Vec<u32>, AttackError> {
        let k = self.opts.shortlist.max(1);
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(k);
        if let Some(top) = self.scan_l0(pass, scorer)? {
            for t in top.interleaved() {
                if out.len() < k.div_ceil(2) && seen.insert(t) {
                    out.push(t);
                }
            }
        }
        for t in self.prior.top(k) {
            if out.len() < k && seen.insert(t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Decodes the prompt position by position: every candidate simulated after the tokens
    /// recovered so far, scored against the rows of each view that may hold the position.
    fn sequential(
        &mut self,
        pass: &mut Pass,
        views: &[OpId],
        scorer: Scorer,
        candidates: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<u32>, AttackError> {
        const CHUNK: usize = 128;
        let observed: Vec<_> = views
            .iter()
            .map(|&op| pass.observed(op, self.sim).map(|o| (op, o)))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(pass.n_real);
        // Rows already given to a position: a shuffled call's rows are each one position (or a
        // dummy), so a row matched once is not matched again.
        let mut used: Vec<HashSet<usize>> = vec![HashSet::new(); observed.len()];
        for i in 0..pass.n_real {
            let active: Vec<_> = observed
                .iter()
                .enumerate()
                .filter_map(|(v, (op, o))| {
                    let mut rows = pass.rows_for(*op, i, o.rows.rows)?;
                    if rows.len() > 1 {
                        let free: Vec<usize> = rows
                            .iter()
                            .copied()
                            .filter(|r| !used[v].contains(r))
                            .collect();
                        if !free.is_empty() {
                            rows = free;
                        }
                    }
                    Some((v, *op, o, rows))
                })
                .collect();
            let ops: Vec<OpId> = active.iter().map(|a| a.1).collect();
            let (mut best, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            let mut winner: Option<(u32, Vec<(usize, usize)>)> = None;
            for chunk in candidates.chunks(CHUNK) {
                let rows = self.sim.branches(cache, chunk, &ops)?;
                let mut evidence: Vec<f64> = match scorer {
                    Scorer::Gauss => chunk.iter().map(|&t| self.prior.log_prob(t)).collect(),
                    Scorer::Match { .. } => vec![0.0; chunk.len()],
                };
                // Per candidate, per view: the row it matched best.
                let mut matched = vec![Vec::with_capacity(active.len()); chunk.len()];
                let mut scale = 0.0;
                for (v, op, obs, sel) in &active {
                    let (d_in, _) = op.shape(self.sim.config());
                    let cands = matrix_f32(chunk.len(), d_in, &rows[op]);
                    scale += cands.data.iter().map(|x| x * x).sum::<f64>() / chunk.len() as f64;
                    let Some(s) = scorer.score(obs, sel, &cands) else {
                        continue;
                    };
                    let k = chunk.len();
                    for (j, e) in evidence.iter_mut().enumerate() {
                        let col = (0..sel.len()).map(|r| s[r * k + j]);
                        *e += scorer.combine(col.clone(), sel.len());
                        let r = (0..sel.len())
                            .max_by(|&a, &b| s[a * k + j].total_cmp(&s[b * k + j]))
                            .unwrap_or(0);
                        matched[j].push((*v, sel[r]));
                    }
                }
                for (j, &e) in evidence.iter().enumerate() {
                    if e > best {
                        second = best;
                        best = e;
                        winner = Some((chunk[j], std::mem::take(&mut matched[j])));
                    } else if e > second {
                        second = e;
                    }
                }
                if scorer.decisive(best, second, scale) {
                    break;
                }
            }
            let t = match winner {
                Some((t, rows)) => {
                    if !pass.ordered {
                        for (v, r) in rows {
                            used[v].insert(r);
                        }
                    }
                    t
                }
                None => self.prior.guess(1)[0],
            };
            out.push(t);
            self.sim.extend(cache, t)?;
        }
        Ok(out)
    }
}

/// Every op of a forward pass.
fn all_ops(sim: &Simulator) -> Vec<OpId> {
    let mut ops: Vec<OpId> = (0..sim.config().n_layers)
        .flat_map(|layer| {
            BlockOp::ALL
                .into_iter()
                .map(move |op| OpId::Block { layer, op })
        })
        .collect();
    ops.push(OpId::LmHead);
    ops
}

/// Each row's best candidates, by score.
pub(crate) struct TopRows {
    keep: usize,
    rows: Vec<Vec<(u32, f64)>>,
}

impl TopRows {
    fn new(rows: usize, keep: usize) -> Self {
        Self {
            keep,
            rows: vec![Vec::new(); rows],
        }
    }

    /// Adds the scores (`rows × k`) of candidates `first..first + k`.
    fn add(&mut self, scores: &[f64], first: u32, k: usize) {
        for (r, list) in self.rows.iter_mut().enumerate() {
            for j in 0..k {
                let s = scores[r * k + j];
                if list.len() < self.keep || s > list.last().map_or(f64::NEG_INFINITY, |l| l.1) {
                    let at = list.partition_point(|l| l.1 >= s);
                    list.insert(at, (first + j as u32, s));
                    list.truncate(self.keep);
                }
            }
        }
    }

    /// Each row's best candidate, with the margin over its second as the confidence.
    pub(crate) fn best(&self) -> Vec<(u32, f64)> {
        self.rows
            .iter()
            .map(|l| match l.as_slice() {
                [a, b, ..] => (a.0, a.1 - b.1),
                [a] => (a.0, 0.0),
                [] => (0, f64::NEG_INFINITY),
            })
            .collect()
    }

    /// Every row's first choice, then every row's second, ...
    fn interleaved(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.keep)
            .flat_map(move |k| self.rows.iter().filter_map(move |l| l.get(k).map(|c| c.0)))
    }
}
