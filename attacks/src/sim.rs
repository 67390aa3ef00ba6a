//! The cloud's own copy of the model, run in plaintext: it simulates what any candidate token
//! would have made each op see, and records its own training data from public text.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use talaria_engine::{KvCache, OpId, Rows, Tokenizer, ops::rms_norm};
use talaria_gpu_node::PlainEngine;

use crate::AttackError;

/// Candidates simulated per batch.
const BRANCH_BATCH: usize = 128;

/// The plain model and what is derived from it once.
pub struct Simulator {
    engine: PlainEngine,
    /// Every token's layer-0 `qkv` input (its gain-free normed embedding), `vocab × d_model`:
    /// the one view that does not depend on the context.
    l0: Vec<f32>,
}

impl Simulator {
    /// Loads the model the cloud serves (it owns the file).
    pub fn load(model: &Path) -> Result<Self, AttackError> {
        let engine = PlainEngine::load(model)?;
        let c = engine.model.config().clone();
        let all: Vec<u32> = (0..c.vocab as u32).collect();
        let l0 = rms_norm(&engine.model.embed(&all)?, c.d_model, c.norm_eps);
        Ok(Self { engine, l0 })
    }

    pub fn config(&self) -> &talaria_engine::ModelConfig {
        self.engine.model.config()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.engine.tokenizer
    }

    /// Token `t`'s layer-0 `qkv` input.
    pub fn l0_row(&self, t: u32) -> &[f32] {
        let d = self.config().d_model;
        &self.l0[t as usize * d..(t as usize + 1) * d]
    }

    /// The whole layer-0 table (`vocab × d_model`).
    pub fn l0_table(&self) -> &[f32] {
        &self.l0
    }

    /// An empty context.
    pub fn empty(&self) -> KvCache {
        self.engine.model.new_cache()
    }

    /// Appends `token` to a context.
    pub fn extend(&mut self, cache: &mut KvCache, token: u32) -> Result<(), AttackError> {
        let e = &mut self.engine;
        e.model.forward(&mut e.weights, cache, &[token])?;
        Ok(())
    }

    /// Appends `token` to a context and returns the model's logits for the token after it: the
    /// cloud owns the LM head, so the model's next-token distribution is part of its prior.
    pub fn extend_logits(
        &mut self,
        cache: &mut KvCache,
        token: u32,
    ) -> Result<Vec<f32>, AttackError> {
        let e = &mut self.engine;
        let logits = e.model.forward(&mut e.weights, cache, &[token])?;
        if logits.len() != self.config().vocab {
            return Err(AttackError::Format(format!(
                "{} logits for a vocabulary of {}",
                logits.len(),
                self.config().vocab
            )));
        }
        Ok(logits)
    }

    /// For each candidate as the next token after `cache`, the input row of every op in `ops`
    /// (`candidates.len()` rows per op, in candidate order).
    pub fn branches(
        &mut self,
        cache: &KvCache,
        candidates: &[u32],
        ops: &[OpId],
    ) -> Result<HashMap<OpId, Vec<f32>>, AttackError> {
        let mut out: HashMap<OpId, Vec<f32>> = ops.iter().map(|&op| (op, Vec::new())).collect();
        let Some(&last) = ops.iter().max() else {
            return Ok(out);
        };
        let e = &mut self.engine;
        for batch in candidates.chunks(BRANCH_BATCH) {
            e.model
                .forward_branches(&mut e.weights, cache, batch, &mut |op, rows| {
                    if let Some(v) = out.get_mut(&op) {
                        v.extend_from_slice(rows.data());
                    }
                    if op >= last {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })?;
        }
        for (op, rows) in &out {
            let (d_in, _) = op.shape(self.config());
            if rows.len() != candidates.len() * d_in {
                return Err(AttackError::Format(format!(
                    "simulated {op}: {} values for {} candidates of width {d_in}",
                    rows.len(),
                    candidates.len()
                )));
            }
        }
        Ok(out)
    }

    /// Runs a whole sequence and records the input rows of every op in `ops` (`lm_head` sees
    /// only the last position).
    pub fn record(
        &mut self,
        tokens: &[u32],
        ops: &[OpId],
    ) -> Result<HashMap<OpId, Rows>, AttackError> {
        let mut out = HashMap::new();
        let e = &mut self.engine;
        let mut cache = e.model.new_cache();
        e.model
            .forward_observed(&mut e.weights, &mut cache, tokens, &mut |op, rows| {
                if ops.contains(&op) {
                    out.insert(op, rows.clone());
                }
                ControlFlow::Continue(())
            })?;
        Ok(out)
    }
}
