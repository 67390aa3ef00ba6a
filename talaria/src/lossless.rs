//! `talaria lossless`: the plain and the masked engines on the same prompts in one run —
//! greedy-token agreement, logit drift, and the mask's cost per token, per ReMO setting.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use talaria_engine::{GenerateRequest, SamplingParams, argmax, generate};
use talaria_gpu_node::PlainEngine;
use talaria_params::{Calibration, Precision, RemoConfig};

use crate::engines::{RemoArgs, RemoEngine, default_calibration};

#[derive(Debug, Args)]
pub struct LosslessArgs {
    /// Prompts, one per line.
    #[arg(long, default_value = "calibration/lossless-prompts.txt")]
    pub prompts: PathBuf,
    /// How many of them to run.
    #[arg(long, default_value_t = 50)]
    pub n_prompts: usize,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Run the grid (f64-gemm at σ=1e4; f32 and f64-client at σ = 10, 30, 100, 1000)
    /// instead of the one setting given by the --remo-* flags.
    #[arg(long, conflicts_with_all = ["precisions", "scales"])]
    pub grid: bool,
    /// Run every combination of these precisions and --scales (other fields from --remo-*).
    #[arg(long, value_delimiter = ',', value_parser = crate::engines::parse_precision)]
    pub precisions: Vec<Precision>,
    /// Scales σ for --precisions.
    #[arg(long, value_delimiter = ',', requires = "precisions")]
    pub scales: Vec<f64>,
    /// Also write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model file (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    #[command(flatten)]
    pub remo: RemoArgs,
}

/// The plain engine's greedy run of one prompt, with the logits of every step.
pub(crate) struct Reference {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SettingReport {
    pub(crate) config: RemoConfig,
    pub(crate) prompts: usize,
    pub(crate) tokens: usize,
    /// Steps whose greedy token equals the plain engine's, fed the plain engine's tokens.
    pub(crate) token_agreement: f64,
    /// Prompts whose whole greedy sequence equals the plain engine's.
    pub(crate) sequence_agreement: f64,
    pub(crate) max_abs_dlogit: f64,
    pub(crate) mean_abs_dlogit: f64,
    /// Positions run through the model (prompt tokens and fed-back tokens): the unit of the
    /// per-token costs below.
    pub(crate) positions: usize,
    /// Critical-path milliseconds per position spent masking and unmasking.
    pub(crate) online_mask_ms_per_token: f64,
    /// Milliseconds per position spent making masks and their products (pool or on the spot).
    pub(crate) offline_mask_ms_per_token: f64,
    /// Multiply-adds per position to make masks and their products (dummy rows included).
    pub(crate) offline_mask_macs_per_token: f64,
    /// Multiply-adds per position of the model's own projections.
    pub(crate) model_macs_per_token: f64,
    /// Milliseconds per position waiting for the cloud.
    pub(crate) cloud_ms_per_token: f64,
    pub(crate) wall_s: f64,
}

fn grid(base: &RemoConfig) -> Vec<RemoConfig> {
    let mut v = vec![RemoConfig {
        precision: Precision::F64Gemm,
        scale: 1e4,
        shuffle: true,
        dummy_rows: base.dummy_rows.max(1),
        ..base.clone()
    }];
    for precision in [Precision::F32, Precision::F64Client] {
        for scale in [10.0, 30.0, 100.0, 1000.0] {
            v.push(RemoConfig {
                precision,
                scale,
                dummy_rows: base.dummy_rows.max(precision.default_dummy_rows()),
                ..base.clone()
            });
        }
    }
    v
}

/// The plain engine's greedy answers and logits for the first `n` prompts of `text`, and the
/// model's multiply-adds per position.
pub(crate) fn references(
    path: &Path,
    text: &str,
    n: usize,
    max_tokens: usize,
    backend: talaria_topology::Backend,
) -> Result<(Vec<Reference>, f64)> {
    let mut plain = PlainEngine::load_on(path, backend)
        .with_context(|| format!("loading {}", path.display()))?;
    let eos = plain.tokenizer.eos();
    let mut refs = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(n) {
        let prompt = plain.tokenizer.encode(line)?;
        let req = GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens,
            sampling: SamplingParams::default(),
            stop_ids: vec![eos],
        };
        let mut logits = Vec::new();
        let mut keep = |l: &[f32]| logits.push(l.to_vec());
        let g = generate(
            &plain.model,
            &mut plain.weights,
            &req,
            |_| Ok(()),
            Some(&mut keep),
        )?;
        refs.push(Reference {
            prompt,
            ids: g.ids,
            logits,
        });
    }
    let c = plain.model.config();
    let model_macs = talaria_cvm_agent::all_ops(c)
        .iter()
        .map(|op| {
            let (i, o) = op.shape(c);
            (i * o) as f64
        })
        .sum();
    Ok((refs, model_macs))
}

/// Teacher-forces the ReMO engine with `config` along the references: agreement, drift, cost.
pub(crate) fn measure(
    path: &Path,
    config: RemoConfig,
    remo: &RemoArgs,
    calibration: &Calibration,
    refs: &[Reference],
    model_macs: f64,
) -> Result<SettingReport> {
    let t0 = Instant::now();
    let mut engine = RemoEngine::load_config(path, config.clone(), remo, calibration)?;
    let (mut agree, mut tokens, mut same_seq, mut positions) = (0usize, 0usize, 0usize, 0usize);
    let (mut max_d, mut sum_d, mut n_d) = (0f64, 0f64, 0usize);
    for r in refs {
        let mut cache = engine.model.new_cache();
        let mut all_agree = true;
        for (step, want) in r.ids.iter().enumerate() {
            // Teacher forcing: both engines see the same context at every step.
            let input = if step == 0 {
                r.prompt.clone()
            } else {
                vec![r.ids[step - 1]]
            };
            positions += input.len();
            let logits = engine
                .model
                .forward(&mut engine.linear, &mut cache, &input)?;
            for (a, b) in logits.iter().zip(&r.logits[step]) {
                let d = f64::from((a - b).abs());
                max_d = max_d.max(d);
                sum_d += d;
                n_d += 1;
            }
            let ok = argmax(&logits) == *want;
            agree += usize::from(ok);
            all_agree &= ok;
            tokens += 1;
        }
        same_seq += usize::from(all_agree);
    }
    let stats = engine.linear.stats();
    let timings = engine.linear.timings().clone();
    let per_token = |x: f64| x / positions.max(1) as f64;
    Ok(SettingReport {
        prompts: refs.len(),
        tokens,
        positions,
        token_agreement: agree as f64 / tokens.max(1) as f64,
        sequence_agreement: same_seq as f64 / refs.len().max(1) as f64,
        max_abs_dlogit: max_d,
        mean_abs_dlogit: sum_d / n_d.max(1) as f64,
        online_mask_ms_per_token: per_token(timings.online_mask_s * 1e3),
        offline_mask_ms_per_token: per_token(stats.mask_generation_s * 1e3),
        offline_mask_macs_per_token: per_token(stats.mask_generation_macs as f64),
        model_macs_per_token: model_macs,
        cloud_ms_per_token: per_token(timings.cloud_s * 1e3),
        wall_s: t0.elapsed().as_secs_f64(),
        config,
    })
}

pub fn run(args: LosslessArgs) -> Result<()> {
    let path = crate::resolve_model(args.model_file.clone())?;
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading {}", args.prompts.display()))?;
    let (refs, model_macs) = references(
        &path,
        &text,
        args.n_prompts,
        args.max_tokens,
        args.remo.backend,
    )?;

    let calibration = default_calibration()?;
    let base = args.remo.config();
    let settings = if args.grid {
        grid(&base)
    } else if !args.precisions.is_empty() {
        let scales = if args.scales.is_empty() {
            vec![base.scale]
        } else {
            args.scales.clone()
        };
        let mut v = Vec::new();
        for &precision in &args.precisions {
            for &scale in &scales {
                v.push(RemoConfig {
                    precision,
                    scale,
                    dummy_rows: args
                        .remo
                        .remo_dummy_rows
                        .unwrap_or(precision.default_dummy_rows()),
                    ..base.clone()
                });
            }
        }
        v
    } else {
        vec![base]
    };
    let mut reports = Vec::new();
    for config in settings {
        let report = measure(&path, config, &args.remo, &calibration, &refs, model_macs)?;
        eprintln!(
            "{:?} σ={} agreement {:.4} sequences {:.3} max|Δlogit| {:.2e}",
            report.config.precision,
            report.config.scale,
            report.token_agreement,
            report.sequence_agreement,
            report.max_abs_dlogit
        );
        reports.push(report);
        // Written after every setting, so a long grid that is stopped keeps what it measured.
        if let Some(out) = &args.out {
            std::fs::write(out, serde_json::to_string_pretty(&reports)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    println!("{}", serde_json::to_string_pretty(&reports)?);
    Ok(())
}
