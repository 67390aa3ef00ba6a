//! The engines the CLI can run, composed here from the CVM side and the cloud side.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use talaria_cvm_agent::RemoLinear;
use talaria_engine::{
    EngineError, GenerateRequest, Generation, LinearOps, ModelConfig, Tokenizer, Transformer,
    generate,
};
use talaria_gguf::GgufFile;
use talaria_gpu_node::{CloudExecutor, IntWeights, LinearWeights, PlainEngine, Tap};
use talaria_model_file::read_provision;
use talaria_params::{Calibration, PadRows, Precision, Rank, RemoConfig};
use talaria_remo::FixedPointLinear;
use talaria_wire::Loopback;

/// Which engine answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Both halves in one process, unmasked.
    Plain,
    /// The CVM side and the cloud side in one process, joined only by ReMO-masked messages.
    Remo,
    /// Both halves in one process, unmasked, in the integer mode's fixed-point arithmetic
    /// (`--remo-frac-bits`): the exactness reference of `--remo-precision int`.
    Fixed,
    /// A running cluster's cvm-agent, over QUIC (`talaria up`).
    Cluster,
}

/// The ReMO parameters, as flags. Defaults: `RemoConfig::default()` (see docs/remo.md).
#[derive(Debug, Clone, Args)]
pub struct RemoArgs {
    /// Basis rank: `full` (identity basis), or a fraction of each op's input width for the
    /// published m < d setting, which leaks.
    #[arg(long, default_value = "full", value_parser = parse_rank)]
    pub remo_rank: Rank,
    /// σ: mask scale in units of each op's calibrated input RMS.
    #[arg(long, default_value_t = RemoConfig::default().scale)]
    pub remo_scale: f64,
    /// Arithmetic: int (the default: the exact integer one-time pad, fixed point plus uniform
    /// pads mod 2^64, full rank only, σ unused), or the float modes f64-gemm (lossless),
    /// f64-client and f32, which hide only statistically (docs/attacks.md).
    #[arg(long, default_value = "int", value_parser = parse_precision)]
    pub remo_precision: Precision,
    /// The integer mode's fractional bits f (rows that could overflow 63 bits get fewer).
    #[arg(long, default_value_t = RemoConfig::default().frac_bits)]
    pub remo_frac_bits: u32,
    /// Dummy rows added to every call and shuffled with the real ones (default: 0 in the integer
    /// mode, 2 in the float modes, whose shuffle hides a decode row among them).
    #[arg(long)]
    pub remo_dummy_rows: Option<usize>,
    /// Length hiding: prefill calls padded to a bucket of rows, `pow2:MIN` (the next power of
    /// two, at least MIN), `max` (the context length) or `off` (the cloud reads the length).
    #[arg(long, default_value_t = RemoConfig::default().pad_rows, value_parser = parse_pad_rows)]
    pub remo_pad_rows: PadRows,
    /// Fairness: a prefill padded past this many rows runs in passes of this many (a power of
    /// two, at least 16; 0: one pass). The cloud sees the same rows either way.
    #[arg(long, default_value_t = RemoConfig::default().prefill_chunk)]
    pub remo_prefill_chunk: usize,
    /// Shuffle the rows of every call.
    #[arg(long, default_value_t = RemoConfig::default().shuffle, action = clap::ArgAction::Set)]
    pub remo_shuffle: bool,
    /// Masks precomputed per op on a background thread (0: compute on the spot).
    #[arg(long, default_value_t = RemoConfig::default().pool)]
    pub remo_pool: usize,
    /// No masking: the plaintext split (the attack suite's control).
    #[arg(long)]
    pub remo_off: bool,
    /// Seed of the private mask generator (default: from the operating system).
    #[arg(long)]
    pub remo_seed: Option<u64>,
    /// Record everything the cloud sees into this directory (docs/tap-format.md).
    #[arg(long)]
    pub tap: Option<PathBuf>,
    /// Device of the cloud side's weights: `cpu` or `cuda:N` (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub backend: talaria_topology::Backend,
}

fn parse_rank(s: &str) -> Result<Rank, String> {
    s.parse()
}

pub fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse()
}

fn parse_pad_rows(s: &str) -> Result<PadRows, String> {
    s.parse()
}

impl RemoArgs {
    /// The flags' defaults: `RemoConfig::default()`, no seed, no tap, the CPU.
    pub fn defaults() -> Self {
        let c = RemoConfig::default();
        Self {
            remo_rank: c.rank,
            remo_scale: c.scale,
            remo_precision: c.precision,
            remo_dummy_rows: None,
            remo_pad_rows: c.pad_rows,
            remo_prefill_chunk: c.prefill_chunk,
            remo_shuffle: c.shuffle,
            remo_pool: c.pool,
            remo_frac_bits: c.frac_bits,
            remo_off: !c.enabled,
            remo_seed: None,
            tap: None,
            backend: talaria_topology::Backend::Cpu,
        }
    }

    /// The configuration these flags describe.
    pub fn config(&self) -> RemoConfig {
        RemoConfig {
            enabled: !self.remo_off,
            rank: self.remo_rank,
            scale: self.remo_scale,
            precision: self.remo_precision,
            dummy_rows: self
                .remo_dummy_rows
                .unwrap_or(self.remo_precision.default_dummy_rows()),
            pad_rows: self.remo_pad_rows,
            shuffle: self.remo_shuffle,
            pool: self.remo_pool,
            frac_bits: self.remo_frac_bits,
            prefill_chunk: self.remo_prefill_chunk,
        }
    }

    pub fn seed(&self) -> Option<[u8; 32]> {
        self.remo_seed.map(|s| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&s.to_le_bytes());
            seed
        })
    }
}

/// The embedded calibration of the default model.
pub fn default_calibration() -> Result<Calibration> {
    talaria_cvm_agent::default_calibration().context("embedded calibration")
}

/// The masked engine: the CVM side driving the cloud side through ReMO.
pub struct RemoEngine {
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub linear: RemoLinear<Loopback<CloudExecutor>>,
}

impl RemoEngine {
    /// Loads the model: the cloud side reads the file and provisions the CVM side.
    pub fn load(path: &Path, args: &RemoArgs, calibration: &Calibration) -> Result<Self> {
        Self::load_config(path, args.config(), args, calibration)
    }

    /// As [`RemoEngine::load`], with `config` in place of the flags' ReMO parameters (the seed
    /// and the tap still come from `args`).
    pub fn load_config(
        path: &Path,
        config: RemoConfig,
        args: &RemoArgs,
        calibration: &Calibration,
    ) -> Result<Self> {
        let cloud = Cloud::load(path, &config, args)?;
        let linear = RemoLinear::connect(
            &cloud.config,
            config,
            calibration,
            1,
            args.seed(),
            cloud.link,
        )
        .context("setting up ReMO with the cloud side")?;
        Ok(Self {
            tokenizer: cloud.tokenizer,
            model: cloud.model,
            linear,
        })
    }
}

impl RemoEngine {
    /// Generates `req` as a new sequence of this engine's ReMO session (its first pass padded
    /// whatever its length).
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: impl FnMut(u32) -> Result<(), EngineError>,
    ) -> Result<Generation, EngineError> {
        self.linear.new_sequence();
        generate(&self.model, &mut self.linear, req, on_token, None)
    }
}

/// The cloud side in this process (the weights, and the tap if one is asked for) and the CVM
/// side it provisions, not yet joined by a ReMO session.
pub struct Cloud {
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub config: ModelConfig,
    pub link: Loopback<CloudExecutor>,
}

impl Cloud {
    /// Loads the model file; starts the tap (with the public parameters `config` beside it).
    pub fn load(path: &Path, config: &RemoConfig, args: &RemoArgs) -> Result<Self> {
        let f = GgufFile::open(path)?;
        let provision = read_provision(&f)?;
        let layers = 0..=provision.config.n_layers.saturating_sub(1);
        let mut weights =
            LinearWeights::load_on(&f, &provision.config, layers, true, args.backend)?;
        if config.precision.is_int() {
            weights.load_int(&f)?;
        }
        drop(f);
        let tap = args.tap.as_ref().map(Tap::create).transpose()?;
        if let Some(dir) = &args.tap {
            // The ReMO parameters are public: the attacks read them beside the tap.
            talaria_attacks::Public::write(dir, config)?;
        }
        let model_config = provision.config.clone();
        let (tokenizer, model) = provision.build()?;
        Ok(Self {
            tokenizer,
            model,
            config: model_config,
            link: Loopback(CloudExecutor::new(weights, tap)),
        })
    }
}

/// The plain fixed-point engine: the integer weights and the integer mode's encoding, no masks.
pub struct FixedEngine {
    pub tokenizer: Tokenizer,
    pub model: Transformer,
    pub linear: FixedPointLinear,
}

impl FixedEngine {
    /// Loads the model's integer weights; rows are encoded with at most `frac_bits` bits.
    pub fn load(path: &Path, frac_bits: u32) -> Result<Self> {
        let f = GgufFile::open(path)?;
        let provision = read_provision(&f)?;
        let c = provision.config.clone();
        // The integer forms alone: the float weights are not needed here.
        let weights = IntWeights::load(&f, &c, 0..c.n_layers, true)?;
        drop(f);
        let mut linear = FixedPointLinear::new(frac_bits);
        for op in talaria_cvm_agent::all_ops(&c) {
            let (d_in, d_out) = op.shape(&c);
            linear.install(op, weights.weight(op)?.clone(), d_in, d_out)?;
        }
        let (tokenizer, model) = provision.build()?;
        Ok(Self {
            tokenizer,
            model,
            linear,
        })
    }
}

/// Any engine, behind one interface.
pub enum Engine {
    Plain(Box<PlainEngine>),
    Remo(Box<RemoEngine>),
    Fixed(Box<FixedEngine>),
}

impl Engine {
    /// Loads the engine `kind` from a model file.
    pub fn load(kind: EngineKind, path: &Path, remo: &RemoArgs) -> Result<Self> {
        Ok(match kind {
            EngineKind::Plain => Engine::Plain(Box::new(
                PlainEngine::load_on(path, remo.backend)
                    .with_context(|| format!("loading {}", path.display()))?,
            )),
            EngineKind::Remo => Engine::Remo(Box::new(
                RemoEngine::load(path, remo, &default_calibration()?)
                    .with_context(|| format!("loading {}", path.display()))?,
            )),
            EngineKind::Fixed => Engine::Fixed(Box::new(
                FixedEngine::load(path, remo.remo_frac_bits)
                    .with_context(|| format!("loading {}", path.display()))?,
            )),
            EngineKind::Cluster => {
                anyhow::bail!("the cluster engine runs in the cluster's processes, not in this one")
            }
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            Engine::Plain(e) => &e.tokenizer,
            Engine::Remo(e) => &e.tokenizer,
            Engine::Fixed(e) => &e.tokenizer,
        }
    }

    /// The weight-free half and the linear ops.
    pub fn parts(&mut self) -> (&Tokenizer, &Transformer, Box<dyn LinearOps + '_>) {
        match self {
            Engine::Plain(e) => (&e.tokenizer, &e.model, Box::new(e.linear())),
            Engine::Remo(e) => (&e.tokenizer, &e.model, Box::new(&mut e.linear)),
            Engine::Fixed(e) => (&e.tokenizer, &e.model, Box::new(&mut e.linear)),
        }
    }

    /// Generates, calling `on_token` with each id (and its text piece, when complete).
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: impl FnMut(u32) -> Result<(), EngineError> + Send,
    ) -> Result<Generation, EngineError> {
        match self {
            Engine::Remo(e) => return e.generate(req, on_token),
            Engine::Plain(e) => return e.generate(req, on_token),
            Engine::Fixed(_) => {}
        }
        let (_, model, mut linear) = self.parts();
        generate(model, &mut *linear, req, on_token, None)
    }

    /// Mask pairs the ReMO engine's calls took from its pool and made on the spot (the pool had
    /// run dry), so far; `None` for the other engines.
    pub fn pool_use(&self) -> Option<(u64, u64)> {
        match self {
            Engine::Remo(e) => {
                let s = e.linear.stats();
                Some((s.pool_hits, s.pool_misses))
            }
            _ => None,
        }
    }

    /// Writes the tap's index, if one is recording.
    pub fn finish(&mut self) -> Result<()> {
        if let Engine::Remo(e) = self {
            e.linear.link_mut().0.finish_tap()?;
        }
        Ok(())
    }
}
