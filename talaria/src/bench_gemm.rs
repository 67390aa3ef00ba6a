//! `talaria bench-gemm`: the cloud side's products for one forward pass, in each arithmetic the
//! modes use — f32, f64 (the lossless float mode) and wrapping u64 over the integer weights (the
//! integer mode) — on the same weights, in the same run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use talaria_engine::{OpId, Rows};
use talaria_gguf::GgufFile;
use talaria_gpu_node::LinearWeights;
use talaria_model_file::read_config;

#[derive(Debug, Args)]
pub struct BenchGemmArgs {
    /// Rows per call to measure (decode: 1 real + the dummy rows; prefill: a prompt + dummies).
    #[arg(long, value_delimiter = ',', default_value = "3,130")]
    pub rows: Vec<usize>,
    /// Repetitions of each product; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model file (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
}

/// Milliseconds per forward pass in each arithmetic, for one row count.
#[derive(Debug, Serialize)]
struct PassCost {
    rows: usize,
    /// Per op kind (`qkv`, `attn_out`, `gate_up`, `down`, `lm_head`), summed over layers.
    f32_ms: BTreeMap<String, f64>,
    f64_ms: BTreeMap<String, f64>,
    u64_ms: BTreeMap<String, f64>,
    total_f32_ms: f64,
    total_f64_ms: f64,
    total_u64_ms: f64,
    u64_over_f32: f64,
    u64_over_f64: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    /// The vector unit the u64 product was compiled for at run time.
    u64_kernel: &'static str,
    runs: usize,
    /// Bytes the cloud holds: the f32 weights and the integer forms.
    f32_weight_bytes: usize,
    int_weight_bytes: usize,
    /// The smallest exact shift `s` of each op kind's integer weights: `[min, max]` over layers.
    shifts: BTreeMap<String, [u32; 2]>,
    passes: Vec<PassCost>,
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn kind(op: OpId) -> String {
    match op {
        OpId::Block { op, .. } => op.name().into(),
        OpId::LmHead => "lm_head".into(),
    }
}

pub fn run(args: BenchGemmArgs) -> Result<()> {
    let path = crate::resolve_model(args.model_file)?;
    let f = GgufFile::open(&path)?;
    let c = read_config(&f)?;
    let mut weights = LinearWeights::load(&f, &c)?;
    let f32_weight_bytes = weights.bytes();
    weights.load_int(&f)?;
    let int_weight_bytes = weights.bytes() - f32_weight_bytes;
    drop(f);
    let mut shifts: BTreeMap<String, [u32; 2]> = BTreeMap::new();
    for op in talaria_cvm_agent::all_ops(&c) {
        let s = weights.int_weight(op)?.shift;
        let e = shifts.entry(kind(op)).or_insert([s, s]);
        *e = [e[0].min(s), e[1].max(s)];
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut passes = Vec::new();
    for &rows in &args.rows {
        let mut cost = PassCost {
            rows,
            f32_ms: BTreeMap::new(),
            f64_ms: BTreeMap::new(),
            u64_ms: BTreeMap::new(),
            total_f32_ms: 0.0,
            total_f64_ms: 0.0,
            total_u64_ms: 0.0,
            u64_over_f32: 0.0,
            u64_over_f64: 0.0,
        };
        for op in talaria_cvm_agent::all_ops(&c) {
            let (d_in, _) = op.shape(&c);
            // Masked rows: large floats, uniform residues.
            let x64: Vec<f64> = (0..rows * d_in)
                .map(|_| rng.random_range(-300.0..300.0))
                .collect();
            let x32 = Rows::new(rows, d_in, x64.iter().map(|&v| v as f32).collect())?;
            let xu: Vec<u64> = (0..rows * d_in).map(|_| rng.random()).collect();
            // The first f64 call builds the f64 copy of the weight: not part of the cost.
            weights.linear_f64(op, rows, &x64)?;
            let a = median_ms(args.runs, || {
                weights.matmul(op, &x32).expect("f32 product");
            });
            let b = median_ms(args.runs, || {
                weights.linear_f64(op, rows, &x64).expect("f64 product");
            });
            let u = median_ms(args.runs, || {
                weights.int_matmul(op, rows, &xu).expect("u64 product");
            });
            *cost.f32_ms.entry(kind(op)).or_default() += a;
            *cost.f64_ms.entry(kind(op)).or_default() += b;
            *cost.u64_ms.entry(kind(op)).or_default() += u;
            cost.total_f32_ms += a;
            cost.total_f64_ms += b;
            cost.total_u64_ms += u;
        }
        cost.u64_over_f32 = cost.total_u64_ms / cost.total_f32_ms;
        cost.u64_over_f64 = cost.total_u64_ms / cost.total_f64_ms;
        eprintln!(
            "{rows} rows: f32 {:.1} ms, f64 {:.1} ms, u64 {:.1} ms per forward pass",
            cost.total_f32_ms, cost.total_f64_ms, cost.total_u64_ms
        );
        passes.push(cost);
    }
    let report = Report {
        model: path.display().to_string(),
        threads: rayon::current_num_threads(),
        u64_kernel: talaria_kernels::int_kernel(),
        runs: args.runs,
        f32_weight_bytes,
        int_weight_bytes,
        shifts,
        passes,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, &json)?;
    }
    Ok(())
}
