//! The weight-free half of the forward pass: it holds the embedding table, runs the norms, RoPE,
//! attention with the KV cache, SwiGLU and residuals, and asks [`LinearOps`] for every projection.

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
        let result = self.forward_inner(linear, cache, tokens);
        match result {
            Ok(logits) => {
                cache.len = needed;
                Ok(logits)
            }
            Err(e) => {
                cache.rollback();
                Err(e)
            }
        }
    }

    fn forward_inner(
        &self,
        linear: &mut dyn LinearOps,
        cache: &mut KvCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let (d, kv_dim, n) = (c.d_model, c.kv_dim(), tokens.len());
        let start = cache.len;
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let mut h = self.embed(tokens)?;
        let mut scores = Vec::new();
        for layer in 0..c.n_layers {
            let block = |op| OpId::Block { layer, op };
            let x = Rows::new(n, d, rms_norm(&h, d, c.norm_eps))?;
            let qkv = expect_shape(linear.linear(block(BlockOp::Qkv), &x)?, n, d + 2 * kv_dim)?;
            let mut q = Vec::with_capacity(n * d);
            for (t, row) in qkv.data().chunks_exact(d + 2 * kv_dim).enumerate() {
                let (q_row, kv) = row.split_at(d);
                let (k_row, v_row) = kv.split_at(kv_dim);
                let mut q_row = q_row.to_vec();
                let mut k_row = k_row.to_vec();
                self.rope.apply(&mut q_row, start + t);
                self.rope.apply(&mut k_row, start + t);
                q.extend_from_slice(&q_row);
                cache.keys[layer].extend_from_slice(&k_row);
                cache.values[layer].extend_from_slice(v_row);
            }
            let mut attn = vec![0f32; n * d];
            for t in 0..n {
                attend(
                    shape,
                    &q[t * d..(t + 1) * d],
                    &cache.keys[layer],
                    &cache.values[layer],
                    start + t,
                    &mut attn[t * d..(t + 1) * d],
                    &mut scores,
                );
            }
            let o = linear.linear(block(BlockOp::AttnOut), &Rows::new(n, d, attn)?)?;
            add_into(&mut h, expect_shape(o, n, d)?.data());

            let x = Rows::new(n, d, rms_norm(&h, d, c.norm_eps))?;
            let gu = expect_shape(linear.linear(block(BlockOp::GateUp), &x)?, n, 2 * c.d_ff)?;
            let z = Rows::new(n, c.d_ff, swiglu(gu.data(), c.d_ff))?;
            let down = linear.linear(block(BlockOp::Down), &z)?;
            add_into(&mut h, expect_shape(down, n, d)?.data());
        }
        let last = Rows::new(1, d, rms_norm(&h[(n - 1) * d..], d, c.norm_eps))?;
        let logits = expect_shape(linear.linear(OpId::LmHead, &last)?, 1, c.vocab)?;
        Ok(logits.into_data())
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
