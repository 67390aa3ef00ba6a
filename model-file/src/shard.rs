//! Shards of a model file: what one process of a cluster reads, and nothing else. A gpu-node
//! host gets the projections of its stage's layers (and the LM head if it serves it); the
//! coordinator's host gets the tokenizer and the embedding table it provisions agents with. A
//! shard keeps the whole file's metadata and copies each tensor's stored bytes unchanged, so a
//! stage computes from its shard exactly what it computes from the whole model.

use std::ops::RangeInclusive;

use talaria_engine::ModelConfig;
use talaria_gguf::{GgufFile, GgufWriter, Value};

use crate::ModelFileError;
use crate::sources::{OpSource, block_sources, lm_head_source};

/// Metadata key: which part of the model a shard is (`coordinator` or `stage`).
pub const SHARD_PART: &str = "talaria.shard.part";
/// Metadata key: a stage shard's layers, `first-last`.
pub const SHARD_LAYERS: &str = "talaria.shard.layers";
/// Metadata key: whether a stage shard holds the LM head.
pub const SHARD_LM_HEAD: &str = "talaria.shard.lm_head";
/// Metadata key: the SHA-256 (hex) of the model file the shard was cut from.
pub const SHARD_SOURCE_SHA256: &str = "talaria.shard.source_sha256";

/// A part of the model one process reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// The tokenizer (metadata) and the token embeddings the coordinator provisions agents with.
    Coordinator,
    /// A pipeline stage's projections and the norm gains folded into them.
    Stage {
        layers: RangeInclusive<usize>,
        lm_head: bool,
    },
}

impl Part {
    /// The tensors this part reads, in file order of their use.
    pub fn tensors(&self, f: &GgufFile, config: &ModelConfig) -> Vec<String> {
        let of = |s: OpSource| s.parts.into_iter().map(|(n, _)| n).chain(s.gain);
        match self {
            Part::Coordinator => vec!["token_embd.weight".into()],
            Part::Stage { layers, lm_head } => {
                let mut names: Vec<String> = layers
                    .clone()
                    .flat_map(|l| block_sources(config, l))
                    .flat_map(of)
                    .collect();
                if *lm_head {
                    names.extend(of(lm_head_source(f, config)));
                }
                names
            }
        }
    }

    /// The shard of `f` (whose SHA-256 is `source_sha256`) this part reads.
    pub fn shard(
        &self,
        f: &GgufFile,
        config: &ModelConfig,
        source_sha256: &str,
    ) -> Result<GgufWriter, ModelFileError> {
        if f.metadata().contains_key(SHARD_PART) {
            return Err(ModelFileError::InvalidModel(
                "this file is already a shard: cut shards from the whole model".into(),
            ));
        }
        let mut extra = vec![(
            SHARD_SOURCE_SHA256.to_string(),
            Value::String(source_sha256.into()),
        )];
        match self {
            Part::Coordinator => {
                extra.push((SHARD_PART.into(), Value::String("coordinator".into())));
            }
            Part::Stage { layers, lm_head } => {
                if *layers.end() >= config.n_layers || layers.is_empty() {
                    return Err(ModelFileError::InvalidModel(format!(
                        "layers {}-{}: the model has layers 0-{}",
                        layers.start(),
                        layers.end(),
                        config.n_layers.saturating_sub(1)
                    )));
                }
                extra.push((SHARD_PART.into(), Value::String("stage".into())));
                extra.push((
                    SHARD_LAYERS.into(),
                    Value::String(format!("{}-{}", layers.start(), layers.end())),
                ));
                extra.push((SHARD_LM_HEAD.into(), Value::Bool(*lm_head)));
            }
        }
        Ok(f.subset(&self.tensors(f, config), extra)?)
    }

    /// Checks that `f` can serve this part: the whole model, or a shard cut for it (or for a
    /// part that includes it). A shard for another part is refused here, with what it holds,
    /// rather than failing later on a missing tensor.
    pub fn check_file(&self, f: &GgufFile) -> Result<(), ModelFileError> {
        let Ok(part) = f.get_str(SHARD_PART) else {
            return Ok(());
        };
        let held = || -> Result<(RangeInclusive<usize>, bool), ModelFileError> {
            let layers = f.get_str(SHARD_LAYERS)?;
            let bad = || ModelFileError::InvalidModel(format!("{SHARD_LAYERS} {layers:?}"));
            let (a, b) = layers.split_once('-').ok_or_else(bad)?;
            let range = a.parse().map_err(|_| bad())?..=b.parse().map_err(|_| bad())?;
            Ok((range, f.get_bool(SHARD_LM_HEAD)?))
        };
        match (self, part) {
            (Part::Coordinator, "coordinator") => Ok(()),
            (Part::Stage { layers, lm_head }, "stage") => {
                let (have, have_head) = held()?;
                let covers = have.start() <= layers.start() && layers.end() <= have.end();
                if covers && (have_head || !lm_head) {
                    Ok(())
                } else {
                    Err(ModelFileError::InvalidModel(format!(
                        "this shard holds layers {}-{}{}; the stage needs layers {}-{}{}",
                        have.start(),
                        have.end(),
                        if have_head { " and the LM head" } else { "" },
                        layers.start(),
                        layers.end(),
                        if *lm_head { " and the LM head" } else { "" },
                    )))
                }
            }
            (_, other) => Err(ModelFileError::InvalidModel(format!(
                "this is a shard for the {other:?} part of the model, not for {self:?}"
            ))),
        }
    }
}
