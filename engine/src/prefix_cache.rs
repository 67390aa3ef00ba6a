//! Conversation KV caches kept between requests, so that a request which extends an earlier one
//! (the next turn of a chat) runs only its new tokens.
//!
//! An entry is the KV cache of a token sequence, tagged with the partition it belongs to (who may
//! reuse it) and the group whose memory budget it counts against (who pays for it). A request
//! only ever reuses an entry of its own partition. It takes the entry that shares the longest
//! prefix with its prompt out of the cache (so no two generations ever share a cache), cut back to
//! that prefix, and puts its own extended cache back when it ends. Each group has a budget of its
//! own: a group's entries beyond it go, least recently used first, and no group's entries ever
//! make another's go.

use crate::forward::KvCache;

/// What the cache has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Requests that reused cached positions.
    pub hits: u64,
    /// Requests that found nothing to reuse.
    pub misses: u64,
    /// Entries dropped to stay within the budget (or too large for it).
    pub evictions: u64,
    /// Prompt positions reused instead of recomputed.
    pub reused_tokens: u64,
    /// Bytes the cached entries hold now.
    pub bytes: usize,
    /// Entries held now.
    pub entries: usize,
}

/// A cache taken for a request: `cache` holds the first `reused` positions of its prompt.
#[derive(Debug)]
pub struct Reused {
    pub cache: KvCache,
    pub reused: usize,
}

struct Entry<G, P> {
    group: G,
    partition: P,
    /// The tokens of the cached positions: `ids.len() == cache.len()`.
    ids: Vec<u32>,
    cache: KvCache,
    used: u64,
}

/// KV caches of past sequences, per partition, within a memory budget per group.
pub struct PrefixCache<G, P> {
    budget: usize,
    entries: Vec<Entry<G, P>>,
    clock: u64,
    stats: PrefixStats,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<G: Eq + Clone, P: Eq> PrefixCache<G, P> {
    /// An empty cache holding at most `budget` bytes per group (0: it keeps nothing).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: Vec::new(),
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    /// The memory budget of each group, in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// What it has done so far.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            bytes: self.entries.iter().map(|e| e.cache.bytes()).sum(),
            entries: self.entries.len(),
            ..self.stats
        }
    }

    /// The cache to run `prompt` with for `partition`: the entry of that partition sharing the
    /// longest prefix with it, taken out and cut back to that prefix (at most all but the
    /// prompt's last token, which must run to give logits), or `None` when no entry shares a
    /// token.
    pub fn take(&mut self, partition: &P, prompt: &[u32]) -> Option<Reused> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.partition == *partition)
            .map(|(i, e)| (i, common_prefix(&e.ids, prompt).min(limit)))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0);
        let Some((i, reused)) = best else {
            self.stats.misses += 1;
            return None;
        };
        let mut cache = self.entries.swap_remove(i).cache;
        cache.truncate(reused);
        self.stats.hits += 1;
        self.stats.reused_tokens += reused as u64;
        Some(Reused { cache, reused })
    }

    /// Keeps `cache`, the KV cache of `ids`, for `partition`, counted against `group`'s budget.
    /// Entries of the partition whose tokens it extends go (it holds all they do), then the
    /// group's least recently used ones until the group is within its budget; one larger than
    /// the whole budget is not kept.
    ///
    /// # Panics
    /// If `ids` is not as long as the cache: the entry would answer for positions it lacks.
    pub fn put(&mut self, group: G, partition: P, ids: Vec<u32>, mut cache: KvCache) {
        assert_eq!(
            ids.len(),
            cache.len(),
            "a cached entry names every position it holds"
        );
        if ids.is_empty() {
            return;
        }
        cache.shrink_to_fit();
        if cache.bytes() > self.budget {
            self.stats.evictions += 1;
            return;
        }
        self.entries
            .retain(|e| !(e.partition == partition && ids.starts_with(&e.ids)));
        self.clock += 1;
        let mut bytes: usize = self
            .entries
            .iter()
            .filter(|e| e.group == group)
            .map(|e| e.cache.bytes())
            .sum::<usize>()
            + cache.bytes();
        self.entries.push(Entry {
            group: group.clone(),
            partition,
            ids,
            cache,
            used: self.clock,
        });
        while bytes > self.budget {
            let Some((oldest, _)) = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.group == group)
                .min_by_key(|(_, e)| e.used)
            else {
                break;
            };
            bytes -= self.entries.swap_remove(oldest).cache.bytes();
            self.stats.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::{LinearOps, OpId, Rows};
    use crate::{EngineError, ModelConfig, Transformer};

    /// Every projection answers zeros: enough to fill a cache with real positions.
    struct Zeros(ModelConfig);

    impl LinearOps for Zeros {
        fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
            let (_, d_out) = op.shape(&self.0);
            Rows::new(x.rows(), d_out, vec![0.0; x.rows() * d_out])
        }
    }

    fn model() -> Transformer {
        let config = ModelConfig {
            vocab: 16,
            d_model: 8,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            d_ff: 8,
            max_seq: 64,
            rope_base: 10000.0,
            norm_eps: 1e-5,
        };
        Transformer::new(&config, vec![0.5; 16 * 8]).expect("a valid tiny model")
    }

    fn filled(model: &Transformer, ids: &[u32]) -> KvCache {
        let mut cache = model.new_cache();
        model
            .forward(&mut Zeros(model.config().clone()), &mut cache, ids)
            .expect("a forward pass of the tiny model");
        cache
    }

    #[test]
    fn the_longest_shared_prefix_of_the_same_partition_is_taken_and_cut_back() {
        let m = model();
        let mut c = PrefixCache::new(1 << 20);
        c.put("a", "a", vec![1, 2, 3, 4], filled(&m, &[1, 2, 3, 4]));
        c.put("a", "a", vec![1, 2, 9], filled(&m, &[1, 2, 9]));
        c.put("b", "b", vec![1, 2, 3, 4, 5], filled(&m, &[1, 2, 3, 4, 5]));
        // Partition b's longer match is never offered to a.
        let got = c.take(&"a", &[1, 2, 3, 4, 5, 6]).expect("a hit");
        assert_eq!(got.reused, 4);
        assert_eq!(got.cache.len(), 4);
        // Taken out: the next request finds the shorter one.
        let got = c.take(&"a", &[1, 2, 3, 7]).expect("a hit");
        assert_eq!((got.reused, got.cache.len()), (2, 2));
        assert!(c.take(&"a", &[1, 2, 3]).is_none(), "a's entries are taken");
        assert!(c.take(&"c", &[1, 2, 3]).is_none(), "no entry of c");
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.reused_tokens, s.entries), (2, 2, 6, 1));
    }

    #[test]
    fn a_repeated_prompt_reruns_its_last_token() {
        let m = model();
        let mut c = PrefixCache::new(1 << 20);
        c.put(0u8, 0u8, vec![3, 4, 5], filled(&m, &[3, 4, 5]));
        let got = c.take(&0, &[3, 4, 5]).expect("a hit");
        assert_eq!(got.reused, 2, "the last token runs again to give logits");
        assert_eq!(got.cache.len(), 2);
        assert!(c.take(&0, &[7]).is_none());
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_and_refuses_an_entry_too_large() {
        let m = model();
        let one = filled(&m, &[1, 2, 3, 4]);
        let mut probe = one.clone();
        probe.shrink_to_fit();
        let size = probe.bytes();
        assert!(size > 0);
        let mut c = PrefixCache::new(2 * size);
        c.put(0u8, 0u8, vec![1, 2, 3, 4], one.clone());
        c.put(0u8, 0u8, vec![5, 6, 7, 8], filled(&m, &[5, 6, 7, 8]));
        c.put(0u8, 0u8, vec![9, 10, 11, 12], filled(&m, &[9, 10, 11, 12]));
        let s = c.stats();
        assert_eq!((s.entries, s.evictions), (2, 1));
        assert!(s.bytes <= c.budget());
        assert!(c.take(&0, &[1, 2, 3, 4, 0]).is_none(), "the oldest went");
        assert!(c.take(&0, &[9, 10, 11, 12, 0]).is_some());
        // An entry larger than the whole budget is not kept.
        let mut small = PrefixCache::new(size - 1);
        small.put(0u8, 0u8, vec![1, 2, 3, 4], one);
        assert_eq!(small.stats().entries, 0);
        assert_eq!(small.stats().evictions, 1);
        // Nothing is kept with no budget.
        let mut none = PrefixCache::new(0);
        none.put(0u8, 0u8, vec![1], filled(&m, &[1]));
        assert!(none.take(&0, &[1, 2]).is_none());
    }

    #[test]
    fn an_extended_sequence_replaces_the_entries_it_extends() {
        let m = model();
        let mut c = PrefixCache::new(1 << 20);
        c.put(0u8, 0u8, vec![1, 2], filled(&m, &[1, 2]));
        c.put(1u8, 1u8, vec![1, 2], filled(&m, &[1, 2]));
        c.put(0u8, 0u8, vec![1, 2, 3], filled(&m, &[1, 2, 3]));
        assert_eq!(c.stats().entries, 2, "partition 1's entry stays");
        assert_eq!(c.take(&0, &[1, 2, 3, 4]).expect("a hit").reused, 3);
    }

    #[test]
    fn a_group_pays_for_its_own_entries_only() {
        let m = model();
        let mut probe = filled(&m, &[1, 2, 3, 4]);
        probe.shrink_to_fit();
        let mut c = PrefixCache::new(2 * probe.bytes());
        // Group "x" keeps two entries; group "y" then fills its own budget many times over.
        c.put("x", 1u8, vec![1, 2, 3, 4], filled(&m, &[1, 2, 3, 4]));
        c.put("x", 2u8, vec![5, 6, 7, 8], filled(&m, &[5, 6, 7, 8]));
        for i in 0..6 {
            let ids = [9 + i, 1, 2, 3];
            c.put("y", 3u8, ids.to_vec(), filled(&m, &ids));
        }
        assert_eq!(c.stats().entries, 4, "two of x, the last two of y");
        assert!(c.take(&1, &[1, 2, 3, 4, 0]).is_some(), "x's entries stay");
        assert!(c.take(&2, &[5, 6, 7, 8, 0]).is_some());
        assert!(c.take(&3, &[9, 1, 2, 3, 0]).is_none(), "y's oldest went");
        assert!(c.take(&3, &[14, 1, 2, 3, 0]).is_some());
    }

    #[test]
    fn a_generation_stopped_by_an_error_leaves_the_positions_that_ran() {
        use crate::{GenerateRequest, SamplingParams, cached_ids, generate_cached};
        let m = model();
        let mut cache = filled(&m, &[1, 2]);
        let req = GenerateRequest {
            prompt_ids: vec![1, 2, 3, 4],
            max_tokens: 8,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
        };
        let mut chosen = Vec::new();
        let gone = generate_cached(
            &m,
            &mut Zeros(m.config().clone()),
            &req,
            &mut cache,
            |id| {
                chosen.push(id);
                if chosen.len() == 3 {
                    return Err(EngineError::EmptyPrompt);
                }
                Ok(std::ops::ControlFlow::Continue(()))
            },
            None,
        );
        assert!(gone.is_err());
        // The prompt and the first two chosen ids ran; the third never did.
        assert_eq!(cache.len(), 4 + 2);
        assert_eq!(
            cached_ids(&req.prompt_ids, &chosen, cache.len()),
            [&req.prompt_ids[..], &chosen[..2]].concat()
        );
    }
}
