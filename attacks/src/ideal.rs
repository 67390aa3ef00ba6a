//! The ideal attacker (issue 20, items 3(b)–3(d)): a Bayesian beam search over the positions of
//! every forward pass, with the model's own next-token distribution as the prior and the
//! likelihood of every view of a position — all four ops of every layer and the LM head — under
//! the public mask model as the evidence.
//!
//! - **Hypotheses.** A hypothesis is a token sequence for the session so far (the prompt, then the
//!   generated tokens, one per decode pass) with its KV cache and the model's log-probabilities
//!   for the next token. At each position every hypothesis is extended by its candidates: the
//!   model's top-k next tokens after its prefix, and the top-k of the prior times the layer-0
//!   `qkv` evidence over the whole vocabulary (that view is context-free, so it costs one product
//!   with the embedding table per pass and lets a weak mask's tokens in even when the model ranks
//!   them low). Each candidate is simulated after the hypothesis's prefix
//!   ([`Simulator::branches`]) to get the input row it would give every op; its score is the
//!   hypothesis's plus `ln p_model(c | prefix)` plus the evidence. The best `beam` survive.
//! - **Evidence.** For one view with observed rows `y_r` (shuffled, with dummy rows that are pure
//!   masks) and a candidate row `x`: `ln Σ_r w_r · exp(ℓ(y_r | x) − ℓ(y_r | 0))`, the likelihood
//!   ratio against the dummy hypothesis (row norms cancel), mixed over the rows that may hold the
//!   position with soft weights `w_r`: the probability that the positions already placed leave
//!   row `r` free ([`free_rows`]), never a hard removal. Ordered calls (`Public::ordered`) use
//!   row `i` directly. The mask model is public: identity basis `y = x + N(0, s²I)` with `s =
//!   σ·ρ_op`; rank m < d `y = x + c·B`, `c ~ N(0, s²I_m)`, and outside the span `y = x` up to a
//!   tiny scale; masking off: `y = x` up to a tiny scale; the integer mode's pads are uniform,
//!   so its evidence is 0 for every candidate and the attack is the model prior's own beam
//!   search. All in f64, as differences of squared norms.
//! - **Beliefs.** After the search, each position's posterior on the final path is recomputed
//!   given the rest of the path (its rows weighted by what the path's other positions, earlier
//!   and later, leave free): during the search a token that sits in a later row of a shuffled
//!   call competes at every earlier position.
//! - **Linked sessions** (`Options::link_sessions`): sessions whose passes have the same row
//!   counts are taken to hold the same tokens (a conversation re-sent, a prompt retried) and their
//!   evidence is summed per position: K Gaussian views of a row cut the noise variance by K.
//! - **What it reports** besides its guesses: for every guessed position the candidate set with
//!   the log-probabilities under the prior alone and under the posterior (renormalised over the
//!   set), and the same beam search run without evidence (the prior's own guesses), so that
//!   [`crate::eval`] can measure the information gained and test the attack against its prior.
//!   [`Attacker::ideal_true_prefix`] gives the same beliefs along the true tokens, for the
//!   scorer (it reads the truth: a bound, not an attack).
//! - **Cost.** Per position and hypothesis, up to 2k candidates through the whole model
//!   (≈ 0.1 GMAC each on SmolLM2-135M) and one extension of each survivor; candidates whose
//!   layer-0 evidence is hopeless are not simulated, and hypotheses 50 nats behind are dropped,
//!   so strong masks and plaintext cost a few candidates per position.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use talaria_engine::{BlockOp, KvCache, OpId};
use talaria_kernels::gemm::matmul_f64_nt;

use crate::attack::{Attacker, Geometry, Pass};
use crate::score::{Basis, log_sum_exp};
use crate::tap::{CallRef, Matrix, Public, SessionTap, Tap};
use crate::{AttackError, SessionGuess};

/// Default beam width.
pub(crate) fn default_beam() -> usize {
    8
}

/// Default number of the model's next tokens taken as candidates (and as many again from the
/// layer-0 screen).
pub(crate) fn default_top_k() -> usize {
    64
}

/// Nats by which a hypothesis may trail the best one before it is dropped (posterior odds of
/// e⁻⁵⁰: nothing a report could show); a candidate is not simulated when its layer-0 evidence
/// trails the best candidate's by this plus [`PRUNE_SIGMAS`] standard deviations of that
/// evidence's noise.
const MARGIN: f64 = 50.0;

/// Standard deviations of the layer-0 evidence's noise a candidate may trail by and still be
/// simulated: the layer-0 log-ratio of a row of norm √d under a mask of scale s has noise of
/// standard deviation ≈ √d/s, so two candidates that are both in the call differ by several of
/// them at strong masks (σ = 1: ≈ 24 nats each); only far worse ones are dropped.
const PRUNE_SIGMAS: f64 = 10.0;

/// The scale of what should match exactly (masking off; the complement of a public basis), in
/// units of ρ_op: the simulator's rows differ from the victim's by float rounding (~1e-4
/// relative), far below it.
const EXACT: f64 = 1e-3;

/// Extra exact-part scale per unit of σ: a masked row stored in f32 is rounded at its own
/// magnitude, ≈ σ·ρ.
const ROUNDING: f64 = 1e-6;

/// What a Bayesian attack believed at one guessed position: its candidate set, with natural-log
/// probabilities under the prior alone and under the posterior, each normalised over the set.
///
/// The posterior is the position's conditional given the rest of the attack's path: after the
/// search, each position's evidence is recomputed with the rows that the path's other positions
/// (earlier and later) claim taken out of its mixtures. (During the search only earlier positions
/// are known, so in a shuffled call a token that sits in a later row competes at every earlier
/// position; the conditional removes that, as the beam's path itself does.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Belief {
    pub candidates: Vec<u32>,
    pub prior: Vec<f32>,
    pub posterior: Vec<f32>,
    /// Which candidates were simulated (the others trailed on layer-0 evidence by more than
    /// the margin and keep a posterior below every simulated one).
    #[serde(skip)]
    pub(crate) simulated: Vec<bool>,
}

/// The same search with the evidence left out: what the prior alone guesses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub tokens: Vec<u32>,
    pub response: Vec<u32>,
}

/// How an op's observed rows depend on a candidate's input row.
enum Model {
    /// `y = x + N(0, s2·I)`: the identity basis, or (tiny `s2`) no masking.
    Isotropic { s2: f64 },
    /// `y = x + c·B`, `c ~ N(0, s2·I_m)`; outside the span `y = x + N(0, e2·I)`. `comp` holds the
    /// observed rows' components outside the span.
    Basis {
        basis: Basis,
        s2: f64,
        e2: f64,
        comp: Matrix,
    },
}

/// Candidate rows of one op, in f64, with their squared norms.
struct Cands {
    m: Matrix,
    norms: Vec<f64>,
}

impl Cands {
    fn new(rows: usize, cols: usize, data: &[f32]) -> Self {
        let data: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
        let m = Matrix { rows, cols, data };
        let norms = sq_norms(&m);
        Self { m, norms }
    }
}

fn sq_norms(m: &Matrix) -> Vec<f64> {
    m.data
        .chunks_exact(m.cols.max(1))
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
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

impl Model {
    /// `ℓ(y_r | x_j) − ℓ(y_r | 0)` for every selected observed row `r` and candidate `j`
    /// (`sel.len() × x.rows`, row-major). Written as differences of squared norms
    /// (`‖y‖² − ‖y − x‖² = 2·y·x − ‖x‖²`), in f64.
    fn log_ratios(&self, y: &Matrix, sel: &[usize], x: &Cands) -> Vec<f64> {
        let (k, d) = (x.m.rows, x.m.cols);
        let ys = select(y, sel);
        let cross = matmul_f64_nt(&ys.data, &x.m.data, sel.len(), d, k);
        match self {
            Model::Isotropic { s2 } => {
                let mut out = cross;
                for row in out.chunks_exact_mut(k.max(1)) {
                    for (v, n) in row.iter_mut().zip(&x.norms) {
                        *v = (2.0 * *v - n) / (2.0 * s2);
                    }
                }
                out
            }
            Model::Basis {
                basis,
                s2,
                e2,
                comp,
            } => {
                let xc = basis.complement(&x.m);
                let xc_norms = sq_norms(&xc);
                let yc = select(comp, sel);
                let cross_c = matmul_f64_nt(&yc.data, &xc.data, sel.len(), d, k);
                let mut out = vec![0f64; sel.len() * k];
                for r in 0..sel.len() {
                    for j in 0..k {
                        let (full, c) = (cross[r * k + j], cross_c[r * k + j]);
                        let span = (2.0 * (full - c) - (x.norms[j] - xc_norms[j])) / (2.0 * s2);
                        let outside = (2.0 * c - xc_norms[j]) / (2.0 * e2);
                        out[r * k + j] = span + outside;
                    }
                }
                out
            }
        }
    }
}

/// One op's call in a pass, ready for evidence.
struct View {
    op: OpId,
    rows: Matrix,
    model: Model,
}

/// One forward pass of one session: every op's rows and mask model.
struct Observation {
    views: Vec<View>,
    ordered: bool,
    n_real: usize,
    /// Standard deviation of the noise of a layer-0 `qkv` log-ratio (√d·ρ/s).
    l0_noise: f64,
}

impl Observation {
    /// The rows of view `v` that may hold position `i` (`None`: the op does not see it).
    fn rows_for(&self, v: usize, i: usize) -> Option<Vec<usize>> {
        let view = &self.views[v];
        let total = view.rows.rows;
        if view.op == OpId::LmHead {
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

/// Every op of a forward pass, in forward order.
fn all_ops(n_layers: usize) -> Vec<OpId> {
    let mut ops: Vec<OpId> = (0..n_layers)
        .flat_map(|layer| {
            BlockOp::ALL
                .into_iter()
                .map(move |op| OpId::Block { layer, op })
        })
        .collect();
    ops.push(OpId::LmHead);
    ops
}

/// A hypothesis: the session's tokens so far and what the model and the evidence made of them.
#[derive(Clone)]
struct Hyp {
    cache: KvCache,
    /// `ln p_model(next token | tokens)` over the vocabulary.
    next: Rc<Vec<f64>>,
    score: f64,
    tokens: Vec<u32>,
    beliefs: Vec<Belief>,
    /// What each position of the current pass claims of the shuffled rows.
    claims: Vec<Rc<Claim>>,
}

/// One position's log-ratios against every row of each view whose call has several rows that
/// may hold it, per linked session and view (`None` for the other views).
type Claim = Vec<Vec<Option<Vec<f64>>>>;

/// `ln w_r`: the probability that row `r` of a shuffled call is left for one more position,
/// given the log-ratios of the positions already placed (`others`, one value per row); every
/// other slot — a dummy, or a position not yet known — is as likely in any row.
///
/// The placed positions take rows one after another, the most decided first: each takes row
/// `r` with its responsibility `γ(r) ∝ a_r·exp(ℓ(r))` among the rows still available, and
/// leaves `a_r·(1 − γ(r))` of it. Kept in logs (`ln(1 − γ(r))` as a log-sum-exp over the other
/// rows), a row a position is sure of is left with `e^(−margin)`, however large the margin —
/// a row several positions half-claim keeps what they leave, never less than nothing.
fn free_rows(others: &[&[f64]], rows: usize) -> Vec<f64> {
    if rows == 0 {
        return Vec::new();
    }
    let ratio = |v: &[f64], r: usize| v.get(r).copied().unwrap_or(0.0);
    // The most decided first: by the share of their best row.
    let mut order: Vec<(f64, &[f64])> = others
        .iter()
        .map(|v| {
            let z = log_sum_exp((0..rows).map(|r| ratio(v, r)));
            let best = (0..rows)
                .map(|r| ratio(v, r))
                .fold(f64::NEG_INFINITY, f64::max);
            (best - z, *v)
        })
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut avail = vec![0f64; rows];
    for (_, v) in order.into_iter().take(rows - 1) {
        let t: Vec<f64> = (0..rows).map(|r| avail[r] + ratio(v, r)).collect();
        let all = log_sum_exp(t.iter().copied());
        if !all.is_finite() {
            continue;
        }
        let left: Vec<f64> = (0..rows)
            .map(|r| {
                log_sum_exp(
                    t.iter()
                        .enumerate()
                        .filter(|(q, _)| *q != r)
                        .map(|(_, x)| *x),
                ) - all
            })
            .collect();
        for (a, l) in avail.iter_mut().zip(left) {
            *a += l;
        }
    }
    let z = log_sum_exp(avail.iter().copied());
    if !z.is_finite() {
        return vec![-(rows as f64).ln(); rows];
    }
    avail.into_iter().map(|v| v - z).collect()
}

/// `ln w_r` of the rows `sel` of view `v` of linked session `m` for a position, given the
/// claims of the other positions placed (uniform over a single row).
fn row_weights(claims: &[&Claim], m: usize, v: usize, sel: &[usize]) -> Vec<f64> {
    if sel.len() < 2 {
        return vec![0.0; sel.len()];
    }
    let others: Vec<&[f64]> = claims
        .iter()
        .filter_map(|c| c.get(m)?.get(v)?.as_deref())
        .collect();
    free_rows(&others, sel.len())
}

/// Candidate `j`'s claim: its column of the ratios of every view with several rows.
fn column(ratios: &Ratios, j: usize, k: usize) -> Claim {
    ratios
        .iter()
        .map(|per_view| {
            per_view
                .iter()
                .map(|e| match e {
                    Some((sel, lr)) if sel.len() > 1 => {
                        Some((0..sel.len()).map(|r| lr[r * k + j]).collect())
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Indices of the `k` largest values.
fn top_k(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx
}

/// `ln softmax` of logits, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let l: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let z = log_sum_exp(l.iter().copied());
    l.into_iter().map(|v| v - z).collect()
}

/// Normalises log-weights over their set.
fn normalise(v: &[f64]) -> Vec<f32> {
    let z = log_sum_exp(v.iter().copied());
    v.iter().map(|x| (x - z) as f32).collect()
}

/// Sessions taken to hold the same tokens, each with its forward passes.
type Group<'t> = Vec<(&'t SessionTap, Vec<BTreeMap<OpId, CallRef>>)>;

/// Sessions taken to hold the same tokens: one group per session, or (linking) one per shape.
fn groups<'t>(a: &Attacker, tap: &'t Tap) -> Result<Vec<Group<'t>>, AttackError> {
    let mut out: Vec<Vec<_>> = Vec::new();
    let mut by_shape: HashMap<Vec<usize>, usize> = HashMap::new();
    for session in tap.sessions() {
        let passes = session.passes(a.sim.config())?;
        let shape: Vec<usize> = passes
            .iter()
            .map(|p| p.values().next().map_or(0, |c| c.rows))
            .collect();
        match by_shape.get(&shape) {
            Some(&g) if a.opts.link_sessions => out[g].push((session, passes)),
            _ => {
                by_shape.insert(shape, out.len());
                out.push(vec![(session, passes)]);
            }
        }
    }
    Ok(out)
}

/// Runs the ideal attack on every session of a tap.
pub(crate) fn run(a: &mut Attacker, tap: &Tap) -> Result<Vec<SessionGuess>, AttackError> {
    let remo = &tap.public.remo;
    let evidence = !(remo.enabled && remo.precision.is_int());
    let start = start_log_probs(a)?;
    let mut out = Vec::new();
    // The prior's own search depends only on the passes' row counts.
    let mut baselines: HashMap<Vec<usize>, Rc<Hyp>> = HashMap::new();
    for group in groups(a, tap)? {
        let (lead, passes) = &group[0];
        let n_real: Vec<usize> = passes
            .iter()
            .map(|p| {
                p.values()
                    .next()
                    .map_or(0, |c| tap.public.real_rows(c.rows))
            })
            .collect();
        let baseline = match baselines.get(&n_real) {
            Some(b) => b.clone(),
            None => {
                let b = Rc::new(search(a, tap, &[], &n_real, start.clone())?);
                baselines.insert(n_real.clone(), b.clone());
                b
            }
        };
        let best = if evidence {
            let members: Vec<_> = group.iter().map(|(s, p)| (*s, p.as_slice())).collect();
            Rc::new(search(a, tap, &members, &n_real, start.clone())?)
        } else {
            // Uniform pads: every candidate's evidence is 0, the posterior is the prior.
            baseline.clone()
        };
        let baseline = split(&baseline.tokens, n_real[0]);
        let (tokens, response) = split(&best.tokens, n_real[0]);
        tracing::debug!(
            session = lead.id,
            linked = group.len(),
            ?tokens,
            ?response,
            "ideal"
        );
        for (session, _) in &group {
            out.push(SessionGuess {
                session: session.id,
                tokens: tokens.clone(),
                response: response.clone(),
                beliefs: best.beliefs.clone(),
                baseline: Some(Baseline {
                    tokens: baseline.0.clone(),
                    response: baseline.1.clone(),
                }),
                group: (group.len() > 1).then_some(lead.id),
            });
        }
    }
    out.sort_by_key(|g| g.session);
    Ok(out)
}

impl Attacker<'_> {
    /// The ideal attack's evidence along the **true** tokens: for every position, its beliefs
    /// (candidates: the model's top k after the true prefix, the layer-0 screen's top k, and the
    /// true token) with the posterior conditional on every other true token. This is not an
    /// attack — it reads the experiment's truth — but the bound the design study measured: how
    /// much the tap tells about a token to an attacker who has everything else right. Groups
    /// and linking as in [`AttackKind::Ideal`](crate::AttackKind::Ideal); sessions without a
    /// truth, or whose passes do not match it, are left out.
    pub fn ideal_true_prefix(
        &mut self,
        tap: &Tap,
        truth: &crate::Truth,
    ) -> Result<Vec<SessionGuess>, AttackError> {
        let remo = &tap.public.remo;
        let evidence = !(remo.enabled && remo.precision.is_int());
        let start = start_log_probs(self)?;
        let by_session: HashMap<u64, Vec<u32>> = truth
            .sessions
            .iter()
            .map(|v| {
                (
                    v.session,
                    v.prompt.iter().chain(&v.response).copied().collect(),
                )
            })
            .collect();
        let mut out = Vec::new();
        for group in groups(self, tap)? {
            let (lead, passes) = &group[0];
            let n_real: Vec<usize> = passes
                .iter()
                .map(|p| {
                    p.values()
                        .next()
                        .map_or(0, |c| tap.public.real_rows(c.rows))
                })
                .collect();
            let Some(seq) = by_session.get(&lead.id) else {
                continue;
            };
            if seq.len() != n_real.iter().sum::<usize>() {
                continue;
            }
            let members: Vec<_> = if evidence {
                group.iter().map(|(s, p)| (*s, p.as_slice())).collect()
            } else {
                Vec::new()
            };
            let hyp = along(self, tap, &members, &n_real, start.clone(), seq)?;
            let (tokens, response) = split(&hyp.tokens, n_real[0]);
            for (session, _) in &group {
                out.push(SessionGuess {
                    session: session.id,
                    tokens: tokens.clone(),
                    response: response.clone(),
                    beliefs: hyp.beliefs.clone(),
                    baseline: None,
                    group: (group.len() > 1).then_some(lead.id),
                });
            }
        }
        out.sort_by_key(|g| g.session);
        Ok(out)
    }
}

/// The beliefs along a given token sequence (the truth), refined as the search's path is.
fn along(
    a: &mut Attacker,
    tap: &Tap,
    members: &[(&SessionTap, &[BTreeMap<OpId, CallRef>])],
    n_real: &[usize],
    start: Rc<Vec<f64>>,
    seq: &[u32],
) -> Result<Hyp, AttackError> {
    let k = a.opts.top_k.max(1);
    let vocab = a.sim.config().vocab;
    let mut h = Hyp {
        cache: a.sim.empty(),
        next: start,
        score: 0.0,
        tokens: Vec::new(),
        beliefs: Vec::new(),
        claims: Vec::new(),
    };
    let mut kept = Vec::new();
    let mut pos = 0;
    for (p, &n) in n_real.iter().enumerate() {
        let obs: Vec<Observation> = members
            .iter()
            .map(|(s, passes)| observe(a, &tap.public, s, &passes[p]))
            .collect::<Result<_, _>>()?;
        let screens: Vec<Vec<f64>> = obs.iter().map(|o| screen_table(a, o)).collect();
        for i in 0..n {
            let t = seq[pos + i] as usize;
            if t >= vocab {
                return Err(AttackError::Format(format!(
                    "true token {t} outside the vocabulary"
                )));
            }
            let mut set = top_k(&h.next, k);
            let mut l0 = vec![0f64; vocab];
            for (m, o) in obs.iter().enumerate() {
                let sel = o.rows_for(0, i).unwrap_or_default();
                let lw = vec![-(sel.len().max(1) as f64).ln(); sel.len()];
                for (tok, e) in l0.iter_mut().enumerate() {
                    *e += log_sum_exp(
                        sel.iter()
                            .zip(&lw)
                            .map(|(&r, w)| w + screens[m][r * vocab + tok]),
                    );
                }
            }
            if !obs.is_empty() {
                let screened: Vec<f64> = h.next.iter().zip(&l0).map(|(p, e)| p + e).collect();
                set.extend(top_k(&screened, k));
            }
            set.push(t);
            let mut seen = std::collections::HashSet::new();
            set.retain(|x| seen.insert(*x));
            let best_l0 = set.iter().map(|&x| l0[x]).fold(f64::NEG_INFINITY, f64::max);
            let slack = prune_slack(&obs);
            let simulated: Vec<bool> = set
                .iter()
                .map(|&x| x == t || l0[x] >= best_l0 - slack)
                .collect();
            // Candidates not simulated start below the simulated ones by their layer-0 deficit.
            let post: Vec<f64> = set
                .iter()
                .zip(&simulated)
                .map(|(&x, &s)| h.next[x] - if s { 0.0 } else { best_l0 - l0[x] })
                .collect();
            let prior: Vec<f64> = set.iter().map(|&x| h.next[x]).collect();
            h.beliefs.push(Belief {
                candidates: set.iter().map(|&x| x as u32).collect(),
                prior: normalise(&prior),
                posterior: normalise(&post),
                simulated,
            });
            h.next = Rc::new(log_softmax(&a.sim.extend_logits(&mut h.cache, t as u32)?));
            h.tokens.push(t as u32);
        }
        pos += n;
        kept.push(obs);
    }
    if !members.is_empty() {
        refine(a, &mut h, &kept, n_real)?;
    }
    Ok(h)
}

fn split(tokens: &[u32], prompt: usize) -> (Vec<u32>, Vec<u32>) {
    let (p, r) = tokens.split_at(prompt.min(tokens.len()));
    (p.to_vec(), r.to_vec())
}

/// `ln p` of a prompt's first token. The victim's engine starts a prompt on an empty cache: with
/// a BOS-adding tokenizer the first token is BOS; otherwise (SmolLM2) the model has no
/// distribution for position 0, and the attacker takes its distribution after the document
/// separator it was trained with (`<|endoftext|>` when the vocabulary has it, else EOS) — the
/// separator is not part of the victim's sequence and not of the hypotheses' caches.
fn start_log_probs(a: &mut Attacker) -> Result<Rc<Vec<f64>>, AttackError> {
    let vocab = a.sim.config().vocab;
    let tok = a.sim.tokenizer();
    if let [bos] = tok.encode("")?[..] {
        let mut v = vec![-1e4; vocab];
        if let Some(p) = v.get_mut(bos as usize) {
            *p = 0.0;
        }
        return Ok(Rc::new(v));
    }
    let sep = match tok.encode("<|endoftext|>")?[..] {
        [t] if tok.special_tokens().contains(&t) => t,
        _ => tok.eos(),
    };
    let mut cache = a.sim.empty();
    Ok(Rc::new(log_softmax(&a.sim.extend_logits(&mut cache, sep)?)))
}

/// Reads one pass of one session into views with their mask models.
fn observe(
    a: &mut Attacker,
    public: &Public,
    session: &SessionTap,
    calls: &BTreeMap<OpId, CallRef>,
) -> Result<Observation, AttackError> {
    let mut pass = Pass::new_public(session, public, calls.clone())?;
    let remo = &public.remo;
    let first_rows = calls.values().next().map_or(0, |c| c.rows);
    let mut views = Vec::new();
    let mut l0_noise = 0.0;
    for op in all_ops(a.sim.config().n_layers) {
        let o = pass.observed(op, a.sim)?;
        let want = if op == OpId::LmHead {
            first_rows - pass.n_real + 1
        } else {
            first_rows
        };
        if o.rows.rows != want {
            return Err(AttackError::Format(format!(
                "session {}: {op} has {} rows in a pass whose first call has {first_rows}",
                session.id, o.rows.rows
            )));
        }
        let rho = a.calibration.rho(op)?;
        let exact = rho * (EXACT + ROUNDING * remo.scale);
        let model = match &o.geometry {
            Geometry::Plain => Model::Isotropic {
                s2: (EXACT * rho).powi(2),
            },
            Geometry::Identity => Model::Isotropic {
                s2: (remo.scale * rho).powi(2),
            },
            Geometry::Basis(b) => Model::Basis {
                comp: b.complement(&o.rows),
                basis: b.clone(),
                s2: (remo.scale * rho).powi(2),
                e2: exact * exact,
            },
        };
        if views.is_empty() {
            let s2 = match &model {
                Model::Isotropic { s2 } | Model::Basis { s2, .. } => *s2,
            };
            l0_noise = (o.rows.cols as f64).sqrt() * rho / s2.sqrt();
        }
        views.push(View {
            op,
            rows: o.rows.clone(),
            model,
        });
    }
    Ok(Observation {
        views,
        ordered: pass.ordered,
        n_real: pass.n_real,
        l0_noise,
    })
}

/// Layer-0 `qkv` log-ratios of every observed row against every token of the vocabulary
/// (`rows × vocab`): the context-free screen.
fn screen_table(a: &Attacker, obs: &Observation) -> Vec<f64> {
    const CHUNK: usize = 4096;
    let view = &obs.views[0];
    let d = a.sim.config().d_model;
    let vocab = a.sim.config().vocab;
    let all: Vec<usize> = (0..view.rows.rows).collect();
    let mut out = vec![0f64; all.len() * vocab];
    for start in (0..vocab).step_by(CHUNK) {
        let end = (start + CHUNK).min(vocab);
        let cands = Cands::new(end - start, d, &a.sim.l0_table()[start * d..end * d]);
        let lr = view.model.log_ratios(&view.rows, &all, &cands);
        for r in 0..all.len() {
            out[r * vocab + start..r * vocab + end]
                .copy_from_slice(&lr[r * (end - start)..(r + 1) * (end - start)]);
        }
    }
    out
}

/// How far a candidate's layer-0 evidence may trail the best before it is not simulated.
fn prune_slack(obs: &[Observation]) -> f64 {
    MARGIN + PRUNE_SIGMAS * obs.iter().map(|o| o.l0_noise).sum::<f64>()
}

/// A candidate extension of a hypothesis.
struct Expansion {
    parent: usize,
    token: u32,
    total: f64,
    /// Its column of the parent's ratios.
    index: usize,
}

/// Beam search over every position of the passes of one group of sessions. `members` empty:
/// no evidence (the prior's own search).
fn search(
    a: &mut Attacker,
    tap: &Tap,
    members: &[(&SessionTap, &[BTreeMap<OpId, CallRef>])],
    n_real: &[usize],
    start: Rc<Vec<f64>>,
) -> Result<Hyp, AttackError> {
    let beam = a.opts.beam.max(1);
    let k = a.opts.top_k.max(1);
    let mut beams = vec![Hyp {
        cache: a.sim.empty(),
        next: start,
        score: 0.0,
        tokens: Vec::new(),
        beliefs: Vec::new(),
        claims: Vec::new(),
    }];
    let mut kept: Vec<Vec<Observation>> = Vec::new();
    for (p, &n) in n_real.iter().enumerate() {
        let obs: Vec<Observation> = members
            .iter()
            .map(|(s, passes)| observe(a, &tap.public, s, &passes[p]))
            .collect::<Result<_, _>>()?;
        if obs.iter().any(|o| o.n_real != n) {
            return Err(AttackError::Format(format!(
                "linked sessions differ in pass {p}"
            )));
        }
        let screens: Vec<Vec<f64>> = obs.iter().map(|o| screen_table(a, o)).collect();
        for h in &mut beams {
            h.claims.clear();
        }
        for i in 0..n {
            beams = step(a, &beams, &obs, &screens, i, beam, k)?;
        }
        kept.push(obs);
    }
    let mut best = beams
        .into_iter()
        .next()
        .ok_or_else(|| AttackError::Format("the beam emptied".into()))?;
    if !members.is_empty() {
        refine(a, &mut best, &kept, n_real)?;
    }
    Ok(best)
}

/// Replaces each position's posterior on the final path by its conditional given the rest of
/// the path: the rows of each shuffled call are weighted by how likely the path's other
/// positions (earlier and later) and the dummies leave them free ([`free_rows`]).
fn refine(
    a: &mut Attacker,
    best: &mut Hyp,
    kept: &[Vec<Observation>],
    n_real: &[usize],
) -> Result<(), AttackError> {
    let mut cache = a.sim.empty();
    let mut pos = 0;
    for (obs, &n) in kept.iter().zip(n_real) {
        let start = cache.clone();
        // What each token of the path claims.
        let mut claims: Vec<Claim> = Vec::with_capacity(n);
        for i in 0..n {
            let t = best.tokens[pos + i];
            let r = ratios(a, &cache, obs, i, &[t])?;
            claims.push(column(&r, 0, 1));
            a.sim.extend(&mut cache, t)?;
        }
        cache = start;
        for i in 0..n {
            let bel = &best.beliefs[pos + i];
            let sim: Vec<usize> = (0..bel.candidates.len())
                .filter(|&j| bel.simulated.get(j).copied().unwrap_or(true))
                .collect();
            let cands: Vec<u32> = sim.iter().map(|&j| bel.candidates[j]).collect();
            let r = ratios(a, &cache, obs, i, &cands)?;
            let others: Vec<&Claim> = claims
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| c)
                .collect();
            let ev = combine(&r, cands.len(), |m, v, sel| row_weights(&others, m, v, sel));
            let old_floor = sim
                .iter()
                .map(|&j| f64::from(bel.posterior[j]))
                .fold(f64::INFINITY, f64::min);
            let mut post: Vec<f64> = bel.prior.iter().map(|&p| f64::from(p)).collect();
            for (&j, e) in sim.iter().zip(&ev) {
                post[j] += e;
            }
            let new_floor = sim.iter().map(|&j| post[j]).fold(f64::INFINITY, f64::min);
            for (j, p) in post.iter_mut().enumerate() {
                if !bel.simulated.get(j).copied().unwrap_or(true) {
                    *p = new_floor + f64::from(bel.posterior[j]) - old_floor;
                }
            }
            best.beliefs[pos + i].posterior = normalise(&post);
            a.sim.extend(&mut cache, best.tokens[pos + i])?;
        }
        pos += n;
    }
    Ok(())
}

/// One position: every hypothesis extended by its candidates, the best `beam` kept.
fn step(
    a: &mut Attacker,
    beams: &[Hyp],
    obs: &[Observation],
    screens: &[Vec<f64>],
    i: usize,
    beam: usize,
    k: usize,
) -> Result<Vec<Hyp>, AttackError> {
    let vocab = a.sim.config().vocab;
    let mut expansions: Vec<Expansion> = Vec::new();
    let mut beliefs: Vec<Belief> = Vec::with_capacity(beams.len());
    // Each parent's ratios (to take its survivors' claims from) and candidate count.
    let mut parents: Vec<(Ratios, usize)> = Vec::with_capacity(beams.len());
    for (b, h) in beams.iter().enumerate() {
        // Candidates: the prior's top k, and the top k of the prior times the layer-0 evidence.
        let mut set = top_k(&h.next, k);
        let mut l0 = vec![0f64; vocab];
        if !obs.is_empty() {
            for (m, o) in obs.iter().enumerate() {
                let sel = o.rows_for(0, i).unwrap_or_default();
                let placed: Vec<&Claim> = h.claims.iter().map(|c| c.as_ref()).collect();
                let lw = row_weights(&placed, m, 0, &sel);
                let table = &screens[m];
                for (t, e) in l0.iter_mut().enumerate() {
                    *e += log_sum_exp(sel.iter().zip(&lw).map(|(&r, w)| w + table[r * vocab + t]));
                }
            }
            let screened: Vec<f64> = h.next.iter().zip(&l0).map(|(p, e)| p + e).collect();
            for t in top_k(&screened, k) {
                if !set.contains(&t) {
                    set.push(t);
                }
            }
        }
        let best_l0 = set.iter().map(|&t| l0[t]).fold(f64::NEG_INFINITY, f64::max);
        let slack = prune_slack(obs);
        let simulated: Vec<usize> = set
            .iter()
            .copied()
            .filter(|&t| l0[t] >= best_l0 - slack)
            .collect();
        let sim_tokens: Vec<u32> = simulated.iter().map(|&t| t as u32).collect();
        let (ev, r) = if obs.is_empty() {
            (vec![0.0; sim_tokens.len()], Vec::new())
        } else {
            evidence(a, h, obs, i, &sim_tokens)?
        };
        // The belief over the whole set: a candidate not simulated is put below every simulated
        // one by its layer-0 deficit.
        let floor = ev.iter().copied().fold(f64::INFINITY, f64::min);
        let by_token: HashMap<usize, f64> =
            simulated.iter().copied().zip(ev.iter().copied()).collect();
        let prior: Vec<f64> = set.iter().map(|&t| h.next[t]).collect();
        let post: Vec<f64> = set
            .iter()
            .map(|&t| {
                h.next[t]
                    + by_token
                        .get(&t)
                        .copied()
                        .unwrap_or(floor - (best_l0 - l0[t]))
            })
            .collect();
        beliefs.push(Belief {
            candidates: set.iter().map(|&t| t as u32).collect(),
            prior: normalise(&prior),
            posterior: normalise(&post),
            simulated: set.iter().map(|t| by_token.contains_key(t)).collect(),
        });
        let k_sim = sim_tokens.len();
        for (index, (t, e)) in sim_tokens.into_iter().zip(ev).enumerate() {
            expansions.push(Expansion {
                parent: b,
                token: t,
                total: h.score + h.next[t as usize] + e,
                index,
            });
        }
        parents.push((r, k_sim));
    }
    expansions.sort_by(|x, y| y.total.total_cmp(&x.total));
    let best = expansions.first().map_or(f64::NEG_INFINITY, |e| e.total);
    let mut out = Vec::with_capacity(beam);
    for e in expansions
        .into_iter()
        .filter(|e| e.total >= best - MARGIN)
        .take(beam)
    {
        let parent = &beams[e.parent];
        let mut child = parent.clone();
        child.next = Rc::new(log_softmax(
            &a.sim.extend_logits(&mut child.cache, e.token)?,
        ));
        child.score = e.total;
        child.tokens.push(e.token);
        child.beliefs.push(beliefs[e.parent].clone());
        // What this position claims of the shuffled rows, for the later positions' weights.
        let (r, k_sim) = &parents[e.parent];
        if !r.is_empty() {
            child.claims.push(Rc::new(column(r, e.index, *k_sim)));
        }
        out.push(child);
    }
    Ok(out)
}

/// Per linked session, per view: the rows that may hold the position and their log-ratios
/// against every candidate (`sel × k`); `None` where the view does not see the position.
type Ratios = Vec<Vec<Option<(Vec<usize>, Vec<f64>)>>>;

/// The log-ratios of every view that sees position `i`, for each candidate simulated after
/// `cache`.
fn ratios(
    a: &mut Attacker,
    cache: &KvCache,
    obs: &[Observation],
    i: usize,
    cands: &[u32],
) -> Result<Ratios, AttackError> {
    let k = cands.len();
    if k == 0 || obs.is_empty() {
        return Ok(obs.iter().map(|o| vec![None; o.views.len()]).collect());
    }
    let ops: Vec<OpId> = obs[0]
        .views
        .iter()
        .enumerate()
        .filter(|(v, _)| obs[0].rows_for(*v, i).is_some())
        .map(|(_, view)| view.op)
        .collect();
    let rows = a.sim.branches(cache, cands, &ops)?;
    let mut simulated: HashMap<OpId, Cands> = HashMap::new();
    let mut out = Vec::with_capacity(obs.len());
    for o in obs {
        let mut per_view = Vec::with_capacity(o.views.len());
        for (v, view) in o.views.iter().enumerate() {
            let Some(sel) = o.rows_for(v, i) else {
                per_view.push(None);
                continue;
            };
            let x = match simulated.get(&view.op) {
                Some(x) => x,
                None => {
                    let data = rows.get(&view.op).ok_or_else(|| {
                        AttackError::Format(format!("{} was not simulated", view.op))
                    })?;
                    let x = Cands::new(k, view.rows.cols, data);
                    simulated.entry(view.op).or_insert(x)
                }
            };
            let lr = view.model.log_ratios(&view.rows, &sel, x);
            per_view.push(Some((sel, lr)));
        }
        out.push(per_view);
    }
    Ok(out)
}

/// Each candidate's evidence, `Σ_views ln Σ_r w_r·exp(ratio)` with `ln w` from
/// `log_w(session, view, rows)`.
fn combine(
    ratios: &Ratios,
    k: usize,
    log_w: impl Fn(usize, usize, &[usize]) -> Vec<f64>,
) -> Vec<f64> {
    let mut ev = vec![0f64; k];
    for (m, per_view) in ratios.iter().enumerate() {
        for (v, entry) in per_view.iter().enumerate() {
            let Some((sel, lr)) = entry else { continue };
            let lw = log_w(m, v, sel);
            for (j, e) in ev.iter_mut().enumerate() {
                *e += log_sum_exp((0..sel.len()).map(|r| lw[r] + lr[r * k + j]));
            }
        }
    }
    ev
}

/// The evidence of every view for each candidate after hypothesis `h` at position `i`, summed
/// over the linked sessions (row weights: what `h`'s earlier positions leave free), and the
/// ratios it came from.
fn evidence(
    a: &mut Attacker,
    h: &Hyp,
    obs: &[Observation],
    i: usize,
    cands: &[u32],
) -> Result<(Vec<f64>, Ratios), AttackError> {
    let r = ratios(a, &h.cache, obs, i, cands)?;
    let placed: Vec<&Claim> = h.claims.iter().map(|c| c.as_ref()).collect();
    let ev = combine(&r, cands.len(), |m, v, sel| row_weights(&placed, m, v, sel));
    Ok((ev, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, data: &[f64]) -> Matrix {
        Matrix {
            rows,
            cols,
            data: data.to_vec(),
        }
    }

    fn cands(rows: usize, cols: usize, data: &[f64]) -> Cands {
        let m = m(rows, cols, data);
        let norms = sq_norms(&m);
        Cands { m, norms }
    }

    fn gauss_ll(y: &[f64], x: &[f64], s2: f64) -> f64 {
        -y.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / (2.0 * s2)
    }

    #[test]
    fn isotropic_ratios_are_likelihood_differences_against_a_dummy() {
        let y = m(2, 3, &[1.0, 2.0, -1.0, 0.5, 0.0, 3.0]);
        let x = cands(2, 3, &[1.0, 2.0, -1.0, 0.0, 1.0, 0.0]);
        let model = Model::Isotropic { s2: 2.5 };
        let lr = model.log_ratios(&y, &[0, 1], &x);
        for r in 0..2 {
            for j in 0..2 {
                let want = gauss_ll(y.row(r), x.m.row(j), 2.5) - gauss_ll(y.row(r), &[0.0; 3], 2.5);
                assert!((lr[r * 2 + j] - want).abs() < 1e-12, "{lr:?}");
            }
        }
    }

    #[test]
    fn basis_ratios_split_span_and_exact_complement() {
        // Span: the first axis; a huge mask there, the rest sent as it is.
        let basis = Basis::new(m(1, 3, &[1.0, 0.0, 0.0]));
        let y = m(2, 3, &[1e3, 1.0, 0.0, -7.0, 0.0, 0.0]);
        let model = Model::Basis {
            comp: basis.complement(&y),
            basis,
            s2: 1e6,
            e2: 1e-6,
        };
        let x = cands(2, 3, &[0.3, 1.0, 0.0, 0.3, 0.0, 1.0]);
        let lr = model.log_ratios(&y, &[0, 1], &x);
        // Row 0 holds candidate 0 (its complement matches exactly); row 1 is a dummy.
        assert!(lr[0] > 0.0 && lr[0] > lr[1] + 1e5, "{lr:?}");
        assert!(lr[2] < -1e5 && lr[3] < -1e5, "{lr:?}");
        let want = gauss_ll(&[1e3], &[0.3], 1e6) - gauss_ll(&[1e3], &[0.0], 1e6)
            + gauss_ll(&[1.0, 0.0], &[1.0, 0.0], 1e-6)
            - gauss_ll(&[1.0, 0.0], &[0.0, 0.0], 1e-6);
        assert!(
            (lr[0] - want).abs() < 1e-6 * want.abs(),
            "{} vs {want}",
            lr[0]
        );
    }

    #[test]
    fn free_rows_share_out_what_placed_positions_claim() {
        let w = |lw: Vec<f64>| -> Vec<f64> { lw.iter().map(|v| v.exp()).collect() };
        // Nothing placed: every row as likely.
        let none = w(free_rows(&[], 4));
        assert!(none.iter().all(|v| (v - 0.25).abs() < 1e-9), "{none:?}");
        // One position sure of row 0: the free one goes elsewhere.
        let sure = w(free_rows(&[&[40.0, 0.0, 0.0, 0.0]], 4));
        assert!(
            sure[0] < 1e-9 && (sure.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{sure:?}"
        );
        // However sure (plaintext margins are ~1e8 nats), in logs: the row is left with
        // e^(-margin), not a floor.
        let lw = free_rows(&[&[1e8, 0.0, 0.0, 0.0]], 4);
        assert!(lw[0] < -9e7 && lw[1].is_finite(), "{lw:?}");
        // However sure (plaintext margins are ~1e8 nats), in logs: the row is left with
        // e^(-margin), not a floor.
        let lw = free_rows(&[&[1e8, 0.0, 0.0, 0.0]], 4);
        assert!(lw[0] < -9e7 && lw[1].is_finite(), "{lw:?}");
        // Two positions that both half-like row 0 leave it less likely than the rest, but far
        // from excluded.
        let half = w(free_rows(
            &[&[1.0, 0.0, 0.0, 0.0], &[1.0, 0.0, 0.0, 0.0]],
            4,
        ));
        assert!(half[0] < half[1] && half[0] > 0.05, "{half:?}");
        // Three positions sure of three rows: the fourth is the only one left.
        let full = w(free_rows(
            &[
                &[40.0, 0.0, 0.0, 0.0],
                &[0.0, 40.0, 0.0, 0.0],
                &[0.0, 0.0, 40.0, 0.0],
            ],
            4,
        ));
        assert!(full[3] > 1.0 - 1e-6, "{full:?}");
    }

    #[test]
    fn top_k_is_sorted_and_bounded() {
        assert_eq!(top_k(&[0.1, 3.0, -1.0, 2.0], 2), vec![1, 3]);
        assert_eq!(top_k(&[1.0], 5), vec![0]);
        assert!(top_k(&[], 3).is_empty());
    }
}
