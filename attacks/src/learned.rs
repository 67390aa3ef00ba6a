//! Learned inversion: the cloud makes its own training data — public text run through the model
//! and masked by the public algorithm with keys of its own — fits a ridge decoder from masked
//! rows to token embeddings for several ops, keeps the op its decoder does best on held-out
//! data, and decodes the tap's rows there.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use talaria_engine::{BlockOp, OpId};
use talaria_kernels::gemm::{matmul_f32, matmul_f64};

use crate::AttackError;
use crate::attack::{Attacker, Geometry, Pass, keep_rows};
use crate::tap::Tap;

/// Plaintext recordings of public text, kept across taps (they do not depend on the masks).
#[derive(Default)]
pub(crate) struct Cache {
    rec: Option<Recordings>,
    /// The decoder fitted for a tap (its directory and parameters): the op it reads and the fit.
    fitted: Option<(Fitted, OpId, Ridge)>,
}

type Fitted = (std::path::PathBuf, talaria_params::RemoConfig);

struct Recordings {
    /// Per op: rows (`tokens.len() × d_in`).
    rows: HashMap<OpId, Vec<f32>>,
    /// The token at each recorded position.
    tokens: Vec<u32>,
    /// Which training sequence each position came from.
    sequence: Vec<usize>,
}

/// The ops the decoder is tried on.
fn views(n_layers: usize) -> Vec<OpId> {
    let mut v: Vec<OpId> = BlockOp::ALL
        .into_iter()
        .map(|op| OpId::Block { layer: 0, op })
        .collect();
    for layer in [1, 3, 8, 15, n_layers - 1] {
        if layer < n_layers {
            v.push(OpId::Block {
                layer,
                op: BlockOp::Qkv,
            });
        }
    }
    v.sort();
    v.dedup();
    v
}

fn record(a: &mut Attacker) -> Result<Recordings, AttackError> {
    let config = a.sim.config().clone();
    let ops = views(config.n_layers);
    let mut rng = ChaCha20Rng::seed_from_u64(a.opts.seed ^ 0x5eed);
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    for line in crate::PUBLIC_TEXT.lines().filter(|l| !l.trim().is_empty()) {
        seqs.push(a.sim.tokenizer().encode(line)?);
    }
    for _ in 0..a.opts.train_random {
        seqs.push(
            (0..16)
                .map(|_| rng.random_range(0..config.vocab as u32))
                .collect(),
        );
    }
    let mut rec = Recordings {
        rows: ops.iter().map(|&op| (op, Vec::new())).collect(),
        tokens: Vec::new(),
        sequence: Vec::new(),
    };
    for (s, seq) in seqs.iter().enumerate() {
        let got = a.sim.record(seq, &ops)?;
        for op in &ops {
            rec.rows
                .get_mut(op)
                .expect("op")
                .extend_from_slice(got[op].data());
        }
        rec.tokens.extend_from_slice(seq);
        rec.sequence.extend(std::iter::repeat_n(s, seq.len()));
    }
    Ok(rec)
}

/// `aᵀ` of a row-major `rows × cols` matrix.
fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0f64; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// Solves `g·x = b` for symmetric positive definite `g` (n × n) and `b` (n × k), by Cholesky.
fn solve_spd(mut g: Vec<f64>, mut b: Vec<f64>, n: usize, k: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = g[j * n + j];
        for p in 0..j {
            d -= g[j * n + p] * g[j * n + p];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        g[j * n + j] = d;
        for i in j + 1..n {
            let mut s = g[i * n + j];
            for p in 0..j {
                s -= g[i * n + p] * g[j * n + p];
            }
            g[i * n + j] = s / d;
        }
    }
    for c in 0..k {
        for i in 0..n {
            let mut s = b[i * k + c];
            for p in 0..i {
                s -= g[i * n + p] * b[p * k + c];
            }
            b[i * k + c] = s / g[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = b[i * k + c];
            for p in i + 1..n {
                s -= g[p * n + i] * b[p * k + c];
            }
            b[i * k + c] = s / g[i * n + i];
        }
    }
    Some(b)
}

/// A fitted linear decoder `y = (x − μx)·A + μy`.
struct Ridge {
    a: Vec<f64>,
    mu_x: Vec<f64>,
    mu_y: Vec<f64>,
    d_in: usize,
    d_out: usize,
}

impl Ridge {
    fn fit(x: &[f64], y: &[f64], n: usize, d_in: usize, d_out: usize) -> Option<Self> {
        let mean = |m: &[f64], d: usize| {
            let mut mu = vec![0f64; d];
            for r in m.chunks_exact(d) {
                mu.iter_mut().zip(r).for_each(|(a, b)| *a += b / n as f64);
            }
            mu
        };
        let (mu_x, mu_y) = (mean(x, d_in), mean(y, d_out));
        let xc: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v - mu_x[i % d_in])
            .collect();
        let yc: Vec<f64> = y
            .iter()
            .enumerate()
            .map(|(i, v)| v - mu_y[i % d_out])
            .collect();
        let xt = transpose(&xc, n, d_in);
        let mut g = matmul_f64(&xt, &xc, d_in, n, d_in);
        let trace: f64 = (0..d_in).map(|i| g[i * d_in + i]).sum();
        let lambda = 1e-2 * trace / d_in as f64 + 1e-9;
        (0..d_in).for_each(|i| g[i * d_in + i] += lambda);
        let b = matmul_f64(&xt, &yc, d_in, n, d_out);
        let a = solve_spd(g, b, d_in, d_out)?;
        Some(Self {
            a,
            mu_x,
            mu_y,
            d_in,
            d_out,
        })
    }

    fn predict(&self, x: &[f64], n: usize) -> Vec<f64> {
        let xc: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v - self.mu_x[i % self.d_in])
            .collect();
        let mut y = matmul_f64(&xc, &self.a, n, self.d_in, self.d_out);
        y.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v += self.mu_y[i % self.d_out]);
        y
    }
}

/// The nearest token (by inner product with the normed embedding rows, all of one norm) of
/// each predicted row, with the margin over the second as the confidence.
fn decode(a: &Attacker, y: &[f64], n: usize) -> Vec<(u32, f64)> {
    const CHUNK: usize = 8192;
    let d = a.sim.config().d_model;
    let vocab = a.sim.config().vocab;
    let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
    let mut best = vec![(0u32, f32::NEG_INFINITY, f32::NEG_INFINITY); n];
    for start in (0..vocab).step_by(CHUNK) {
        let end = (start + CHUNK).min(vocab);
        let k = end - start;
        let table = &a.sim.l0_table()[start * d..end * d];
        let mut t = vec![0f32; d * k];
        for i in 0..k {
            for j in 0..d {
                t[j * k + i] = table[i * d + j];
            }
        }
        let s = matmul_f32(&y32, &t, n, d, k);
        for (r, b) in best.iter_mut().enumerate() {
            for j in 0..k {
                let v = s[r * k + j];
                if v > b.1 {
                    *b = ((start + j) as u32, v, b.1);
                } else if v > b.2 {
                    b.2 = v;
                }
            }
        }
    }
    best.into_iter()
        .map(|(t, a, b)| (t, f64::from(a - b)))
        .collect()
}

/// Masks training rows as the public algorithm would, with the attacker's own keys.
fn mask(rows: &mut [f64], d: usize, geometry: &Geometry, scale: f64, rng: &mut ChaCha20Rng) {
    let mut normal = || -> f64 { scale * Distribution::<f64>::sample(&StandardNormal, &mut *rng) };
    match geometry {
        Geometry::Plain => {}
        Geometry::Identity => rows.iter_mut().for_each(|v| *v += normal()),
        Geometry::Basis(b) => {
            for row in rows.chunks_exact_mut(d) {
                for i in 0..b.rank() {
                    let c = normal();
                    row.iter_mut().zip(b.row(i)).for_each(|(v, m)| *v += c * m);
                }
            }
        }
    }
}

/// Fits the decoder for a tap's masks (the public parameters and the first session's bases).
fn fit(a: &mut Attacker, tap: &Tap) -> Result<(OpId, Ridge), AttackError> {
    let config = a.sim.config().clone();
    if a.learned.rec.is_none() {
        a.learned.rec = Some(record(a)?);
    }
    let first = tap
        .sessions()
        .next()
        .ok_or_else(|| AttackError::Format("the tap holds no session".into()))?;
    let calls = first
        .passes(&config)?
        .into_iter()
        .next()
        .ok_or_else(|| AttackError::Format("no forward pass".into()))?;
    let mut probe = Pass::new_public(first, &tap.public, calls)?;
    let mut rng = ChaCha20Rng::seed_from_u64(a.opts.seed);
    let rec = a.learned.rec.as_ref().expect("recorded");
    let n = rec.tokens.len();
    let d = config.d_model;
    // Targets: the normed embedding of each position's token.
    let targets: Vec<f64> = rec
        .tokens
        .iter()
        .flat_map(|&t| a.sim.l0_row(t).iter().map(|&v| f64::from(v)))
        .collect();
    let held_out = |i: usize| rec.sequence[i] % 5 == 4;
    let (mut best_view, mut best_acc) = (None, -1.0);
    let mut fitted: HashMap<OpId, Ridge> = HashMap::new();
    for op in views(config.n_layers) {
        let (d_in, _) = op.shape(&config);
        let geometry = probe.observed(op, a.sim)?.geometry.clone();
        let scale = tap.public.remo.scale * a.calibration.rho(op)?;
        let mut x: Vec<f64> = rec.rows[&op].iter().map(|&v| f64::from(v)).collect();
        mask(&mut x, d_in, &geometry, scale, &mut rng);
        let split = |keep: bool, m: &[f64], w: usize| -> Vec<f64> {
            (0..n)
                .filter(|&i| held_out(i) == keep)
                .flat_map(|i| m[i * w..(i + 1) * w].iter().copied())
                .collect()
        };
        let (xt, yt) = (split(false, &x, d_in), split(false, &targets, d));
        let (xv, n_val) = (
            split(true, &x, d_in),
            (0..n).filter(|&i| held_out(i)).count(),
        );
        let Some(r) = Ridge::fit(&xt, &yt, n - n_val, d_in, d) else {
            tracing::warn!("learned attack: ridge fit failed for {op}");
            continue;
        };
        let val_tokens: Vec<u32> = (0..n)
            .filter(|&i| held_out(i))
            .map(|i| rec.tokens[i])
            .collect();
        let guesses = decode(a, &r.predict(&xv, n_val), n_val);
        let acc = guesses
            .iter()
            .zip(&val_tokens)
            .filter(|(g, t)| g.0 == **t)
            .count() as f64
            / n_val.max(1) as f64;
        tracing::info!("learned attack: {op} held-out accuracy {acc:.3}");
        if acc > best_acc {
            best_acc = acc;
            best_view = Some(op);
            // Refit on everything for the attack itself.
            if let Some(full) = Ridge::fit(&x, &targets, n, d_in, d) {
                fitted.insert(op, full);
            }
        }
    }
    let Some(op) = best_view else {
        return Err(AttackError::Format("no decoder could be fitted".into()));
    };
    let ridge = fitted.remove(&op).expect("fitted with the best accuracy");
    Ok((op, ridge))
}

/// Decodes one forward pass's rows at the op the decoder was fitted for.
pub(crate) fn attack_pass(
    a: &mut Attacker,
    tap: &Tap,
    pass: &mut Pass,
) -> Result<Vec<u32>, AttackError> {
    let key = (tap.dir.clone(), tap.public.remo.clone());
    if a.learned.fitted.as_ref().is_none_or(|f| f.0 != key) {
        let (op, ridge) = fit(a, tap)?;
        a.learned.fitted = Some((key, op, ridge));
    }
    let (_, op, ridge) = a.learned.fitted.as_ref().expect("fitted");
    let obs = pass.observed(*op, a.sim)?;
    let per_row = decode(
        a,
        &ridge.predict(&obs.rows.data, obs.rows.rows),
        obs.rows.rows,
    );
    Ok(keep_rows(&per_row, pass.n_real, pass.ordered))
}
