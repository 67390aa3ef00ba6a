//! The weight-free half of the forward pass: it holds the embedding table, runs the norms, RoPE,
//! attention with the KV cache, SwiGLU and residuals, and asks [`LinearOps`] for every projection.

use std::ops::ControlFlow;

use crate::linear::{BlockOp, LinearOps, OpId, Rows};
use crate::ops::{AttentionShape, Rope, add_into, attend, rms_norm, swiglu};
use crate::{EngineError, ModelConfig};

/// Keys and values of every position seen so far, per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    kv_dim: usize,
    max: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions the cache may hold.
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Forgets every position from `len` on (nothing when it holds `len` or fewer).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.rollback();
        }
    }

    /// Bytes the cache holds in memory (what it has allocated, used or not).
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(self.values.iter())
            .map(|v| v.capacity() * std::mem::size_of::<f32>())
            .sum()
    }

    /// Gives back the memory allocated beyond the cached positions.
    pub fn shrink_to_fit(&mut self) {
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.shrink_to_fit();
        }
    }

    fn rollback(&mut self) {
        let keep = self.len * self.kv_dim;
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.truncate(keep);
        }
    }
}

/// The CVM-side model: configuration, embedding table and RoPE; no block weights.
pub struct Transformer {
    config: ModelConfig,
    embeddings: Vec<f32>,
    rope: Rope,
}

impl Transformer {
    /// Builds the weight-free half from a model's configuration and its token embedding table
    /// (`vocab` rows of `d_model` values).
    pub fn new(config: &ModelConfig, embeddings: Vec<f32>) -> Result<Self, EngineError> {
        config.validate()?;
        if embeddings.len() != config.vocab * config.d_model {
            return Err(EngineError::InvalidModel(format!(
                "embedding table has {} values, expected {} x {}",
                embeddings.len(),
                config.vocab,
                config.d_model
            )));
        }
        Ok(Self {
            rope: Rope::new(config.head_dim, config.rope_base),
            config: config.clone(),
            embeddings,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// An empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            keys: vec![Vec::new(); self.config.n_layers],
            values: vec![Vec::new(); self.config.n_layers],
            len: 0,
            kv_dim: self.config.kv_dim(),
            max: self.config.max_seq,
        }
    }

    /// The (unscaled) embedding rows of `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let d = self.config.d_model;
        let mut h = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let i = t as usize;
            if i >= self.config.vocab {
                return Err(EngineError::TokenOutOfRange {
                    id: t,
                    vocab: self.config.vocab,
                });
            }
            h.extend_from_slice(&self.embeddings[i * d..(i + 1) * d]);
        }
        Ok(h)
    }

    /// Runs `tokens` through the model after the cached positions, appends them to the cache,
    /// and returns the logits of the last token.
    ///
    /// On error the cache is left as it was.
    pub fn forward(
        &self,
        linear: &mut dyn LinearOps,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let logits =
            self.forward_observed(linear, cache, tokens, &mut |_, _| ControlFlow::Continue(()))?;
        logits.ok_or_else(|| EngineError::BadOp {
            op: "forward".into(),
            reason: "stopped without an observer asking".into(),
        })
    }

    /// As [`Transformer::forward`], showing `observe` the input rows of every projection before
    /// it is called. When `observe` breaks, the pass stops there, the cache is left as it was
    /// and `None` is returned. (The attack suite uses this to see what a cloud would see.)
    pub fn forward_observed(
        &self,
        linear: &mut dyn LinearOps,
        cache: &mut KvCache,
        tokens: &[u32],
        observe: &mut dyn FnMut(OpId, &Rows) -> ControlFlow<()>,
    ) -> Result<Option<Vec<f32>>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let needed = cache.len + tokens.len();
        if needed > cache.max {
            return Err(EngineError::ContextFull {
                needed,
                max: cache.max,
            });
        }
        let result = self.forward_inner(linear, Context::Causal(cache), tokens, observe);
        match result {
            Ok(Some(logits)) => {
                cache.len = needed;
                Ok(Some(logits))
            }
            Ok(None) => {
                cache.rollback();
                Ok(None)
            }
            Err(e) => {
                cache.rollback();
                Err(e)
            }
        }
    }

    /// Runs each of `tokens` as its own one-token continuation of `cache` — every branch sits at
    /// position `cache.len()` and attends to the cached positions and itself only — showing
    /// `observe` the input rows of every projection (one row per branch) until it breaks. The
    /// cache is not changed. This is how an attacker simulates every candidate for the next token
    /// in one batch.
    pub fn forward_branches(
        &self,
        linear: &mut dyn LinearOps,
        cache: &KvCache,
        tokens: &[u32],
        observe: &mut dyn FnMut(OpId, &Rows) -> ControlFlow<()>,
    ) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if cache.len + 1 > cache.max {
            return Err(EngineError::ContextFull {
                needed: cache.len + 1,
                max: cache.max,
            });
        }
        self.forward_inner(linear, Context::Branches(cache), tokens, observe)
            .map(|_| ())
    }

    /// One linear call, shown to `observe` first; `None` when it breaks.
    fn project(
        linear: &mut dyn LinearOps,
        observe: &mut dyn FnMut(OpId, &Rows) -> ControlFlow<()>,
        op: OpId,
        x: &Rows,
        cols: usize,
    ) -> Result<Option<Rows>, EngineError> {
        if observe(op, x).is_break() {
            return Ok(None);
        }
        expect_shape(linear.linear(op, x)?, x.rows(), cols).map(Some)
    }

    fn forward_inner(
        &self,
        linear: &mut dyn LinearOps,
        mut context: Context<'_>,
        tokens: &[u32],
        observe: &mut dyn FnMut(OpId, &Rows) -> ControlFlow<()>,
    ) -> Result<Option<Vec<f32>>, EngineError> {
        let c = &self.config;
        let (d, kv_dim, n) = (c.d_model, c.kv_dim(), tokens.len());
        let start = context.cached();
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let mut h = self.embed(tokens)?;
        let mut scores = Vec::new();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        macro_rules! project {
            ($op:expr, $x:expr, $cols:expr) => {
                match Self::project(linear, observe, $op, &$x, $cols)? {
                    Some(y) => y,
                    None => return Ok(None),
                }
            };
        }
        for layer in 0..c.n_layers {
            let block = |op| OpId::Block { layer, op };
            let x = Rows::new(n, d, rms_norm(&h, d, c.norm_eps))?;
            let qkv = project!(block(BlockOp::Qkv), x, d + 2 * kv_dim);
            let mut attn = vec![0f32; n * d];
            for (t, row) in qkv.data().chunks_exact(d + 2 * kv_dim).enumerate() {
                let (q_row, kv) = row.split_at(d);
                let (k_row, v_row) = kv.split_at(kv_dim);
                let pos = match context {
                    Context::Causal(_) => start + t,
                    Context::Branches(_) => start,
                };
                let mut q_row = q_row.to_vec();
                let mut k_row = k_row.to_vec();
                self.rope.apply(&mut q_row, pos);
                self.rope.apply(&mut k_row, pos);
                let out = &mut attn[t * d..(t + 1) * d];
                match &mut context {
                    Context::Causal(cache) => {
                        cache.keys[layer].extend_from_slice(&k_row);
                        cache.values[layer].extend_from_slice(v_row);
                        let (k, v) = (&cache.keys[layer], &cache.values[layer]);
                        attend(shape, &q_row, k, v, pos, out, &mut scores);
                    }
                    Context::Branches(cache) => {
                        let prefix = start * kv_dim;
                        keys.clear();
                        keys.extend_from_slice(&cache.keys[layer][..prefix]);
                        keys.extend_from_slice(&k_row);
                        values.clear();
                        values.extend_from_slice(&cache.values[layer][..prefix]);
                        values.extend_from_slice(v_row);
                        attend(shape, &q_row, &keys, &values, pos, out, &mut scores);
                    }
                }
            }
            let o = project!(block(BlockOp::AttnOut), Rows::new(n, d, attn)?, d);
            add_into(&mut h, o.data());

            let x = Rows::new(n, d, rms_norm(&h, d, c.norm_eps))?;
            let gu = project!(block(BlockOp::GateUp), x, 2 * c.d_ff);
            let z = Rows::new(n, c.d_ff, swiglu(gu.data(), c.d_ff))?;
            let down = project!(block(BlockOp::Down), z, d);
            add_into(&mut h, down.data());
        }
        // A causal pass needs the last position's logits; every branch is a last position.
        let last = match context {
            Context::Causal(_) => Rows::new(1, d, rms_norm(&h[(n - 1) * d..], d, c.norm_eps))?,
            Context::Branches(_) => Rows::new(n, d, rms_norm(&h, d, c.norm_eps))?,
        };
        let logits = project!(OpId::LmHead, last, c.vocab);
        Ok(Some(logits.into_data()))
    }
}

/// What the positions of a forward pass attend to.
enum Context<'a> {
    /// A causal sequence: its keys and values are appended to the cache.
    Causal(&'a mut KvCache),
    /// Independent one-token branches after the cache, which is only read.
    Branches(&'a KvCache),
}

impl Context<'_> {
    fn cached(&self) -> usize {
        match self {
            Context::Causal(c) => c.len,
            Context::Branches(c) => c.len,
        }
    }
}

/// Checks that a linear call answered with the shape asked for: the other half may be remote.
fn expect_shape(r: Rows, rows: usize, cols: usize) -> Result<Rows, EngineError> {
    if r.rows() != rows || r.cols() != cols {
        return Err(EngineError::BadOp {
            op: "linear reply".into(),
            reason: format!("got {} x {}, expected {rows} x {cols}", r.rows(), r.cols()),
        });
    }
    Ok(r)
}
