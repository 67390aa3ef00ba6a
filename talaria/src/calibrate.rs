//! `talaria calibrate`: measures ρ_op, a high quantile of each op's input RMS, on public text.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use talaria_engine::{EngineError, LinearOps, OpId, Rows};
use talaria_gpu_node::PlainEngine;
use talaria_params::Calibration;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Public text, one passage per line.
    #[arg(long, default_value = "calibration/corpus.txt")]
    pub corpus: PathBuf,
    /// Quantile of the row RMS to take.
    #[arg(long, default_value_t = 0.99)]
    pub quantile: f64,
    /// Where to write the calibration JSON.
    #[arg(long, default_value = "calibration/smollm2-135m.json")]
    pub out: PathBuf,
    /// Model file (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
}

/// Records the RMS of every input row on its way to the weights.
struct Recorder<'a> {
    inner: &'a mut dyn LinearOps,
    rms: HashMap<OpId, Vec<f64>>,
}

impl LinearOps for Recorder<'_> {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        let entry = self.rms.entry(op).or_default();
        for r in 0..x.rows() {
            let row = x.row(r);
            let ms = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / row.len() as f64;
            entry.push(ms.sqrt());
        }
        self.inner.linear(op, x)
    }
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let path = crate::resolve_model(args.model_file.clone())?;
    let mut engine =
        PlainEngine::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let text = std::fs::read_to_string(&args.corpus)
        .with_context(|| format!("reading {}", args.corpus.display()))?;
    let PlainEngine {
        tokenizer,
        model,
        weights,
        ..
    } = &mut engine;
    let mut rec = Recorder {
        inner: weights,
        rms: HashMap::new(),
    };
    let mut tokens = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let ids = tokenizer.encode(line)?;
        tokens += ids.len();
        let mut cache = model.new_cache();
        model.forward(&mut rec, &mut cache, &ids)?;
    }
    let mut rho = BTreeMap::new();
    for (op, mut v) in rec.rms {
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * args.quantile).round() as usize;
        rho.insert(op.to_string(), v[i]);
    }
    let cal = Calibration {
        quantile: args.quantile,
        corpus: format!("{} ({tokens} tokens)", args.corpus.display()),
        rho,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&cal)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "calibrated {} ops on {tokens} tokens into {}",
        cal.rho.len(),
        args.out.display()
    );
    Ok(())
}
