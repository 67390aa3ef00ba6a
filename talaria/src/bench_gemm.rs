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
use talaria_kernels::IntKernel;
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
    /// The kernel the node's u64 product runs at this many rows (`IntKernel::for_rows`; where a
    /// weight's scales or minimums are held 64 bits wide, `amx` runs the VNNI kernel instead,
    /// which this model's never are).
    u64_kernel: &'static str,
    /// Per op kind (`qkv`, `attn_out`, `gate_up`, `down`, `lm_head`), summed over layers.
    f32_ms: BTreeMap<String, f64>,
    f64_ms: BTreeMap<String, f64>,
    u64_ms: BTreeMap<String, f64>,
    total_f32_ms: f64,
    total_f64_ms: f64,
    total_u64_ms: f64,
    u64_over_f32: f64,
    u64_over_f64: f64,
    /// The u64 pass on every kernel this CPU has (`amx` where the host grants AMX), same
    /// weights, same rows, each op's kernels measured back to back right after its `u64_ms`
    /// (the node's own choice through its weights): warm caches and threads, so at 1 row below
    /// `u64_ms`. Where the host grants AMX, also `amx-int8`: the experimental product on the
    /// weights' byte digits (`talaria_kernels::amx`, made before timing; no product uses it).
    u64_by_kernel_ms: BTreeMap<&'static str, f64>,
    /// `u64_kernel`'s multiply-adds per second over the measured peak of all threads: for a
    /// vector kernel 16-bit ones (four per 64-bit product by a code) against its pair dot's
    /// peak, for `amx` 8-bit ones (eight per product) against the tile product's.
    u64_fraction_of_peak: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    /// The kernel the u64 product runs on this CPU for many rows (each pass names its own).
    u64_kernel: &'static str,
    /// The machine's peak for each vector kernel's inner step, measured on one thread:
    /// 16 × 16-bit multiply-adds per second (`IntKernel::pair_dot_peak`).
    pair_dot_peak_per_thread: BTreeMap<&'static str, f64>,
    /// AMX's int8 tile product, where the CPU and kernel have it: 8-bit multiply-adds per second
    /// on one thread (`ring::amx_int8_peak`).
    amx_int8_peak_per_thread: Option<f64>,
    /// Byte digits per weight of the AMX experiment (the most any op needs), and the bytes
    /// they take.
    amx_digits: Option<usize>,
    amx_weight_bytes: Option<usize>,
    /// 64-bit products by a code in one row's pass: `Σ d_in · d_out` over the ops.
    u64_products_per_row: usize,
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
    let threads = rayon::current_num_threads();
    let fast_kernels: Vec<IntKernel> = IntKernel::available()
        .into_iter()
        .filter(|k| *k != IntKernel::Portable)
        .collect();
    let peaks: BTreeMap<&'static str, f64> = fast_kernels
        .iter()
        .filter_map(|k| Some((k.name(), k.pair_dot_peak()?)))
        .collect();
    let amx = talaria_kernels::ring::amx_int8_peak();
    if let Some(p) = amx {
        eprintln!(
            "amx-int8: measured peak {:.1} G 8-bit multiply-adds/s per thread",
            p / 1e9
        );
    }
    for (k, p) in &peaks {
        eprintln!(
            "{k}: measured peak {:.1} G 16-bit multiply-adds/s per thread",
            p / 1e9
        );
    }
    // The AMX experiment's digits, made once for every op (not part of any product's cost).
    let amx_weights: BTreeMap<OpId, talaria_kernels::AmxWeight> = talaria_cvm_agent::all_ops(&c)
        .into_iter()
        .filter_map(|op| {
            let w = weights.int_weight(op).ok()?;
            Some((op, talaria_kernels::AmxWeight::new(w)?))
        })
        .collect();
    let products_per_row: usize = talaria_cvm_agent::all_ops(&c)
        .into_iter()
        .map(|op| {
            let (d_in, d_out) = op.shape(&c);
            d_in * d_out
        })
        .sum();
    for &rows in &args.rows {
        let kernel = IntKernel::for_rows(rows);
        let mut cost = PassCost {
            rows,
            u64_kernel: kernel.name(),
            f32_ms: BTreeMap::new(),
            f64_ms: BTreeMap::new(),
            u64_ms: BTreeMap::new(),
            total_f32_ms: 0.0,
            total_f64_ms: 0.0,
            total_u64_ms: 0.0,
            u64_over_f32: 0.0,
            u64_over_f64: 0.0,
            u64_by_kernel_ms: BTreeMap::new(),
            u64_fraction_of_peak: 0.0,
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
            for &k in &fast_kernels {
                let w = weights.int_weight(op)?;
                *cost.u64_by_kernel_ms.entry(k.name()).or_default() += median_ms(args.runs, || {
                    talaria_kernels::int_matmul_with(k, &xu, rows, w);
                });
            }
            if let Some(aw) = amx_weights.get(&op) {
                *cost.u64_by_kernel_ms.entry("amx-int8").or_default() +=
                    median_ms(args.runs, || {
                        talaria_kernels::amx_matmul(&xu, rows, aw);
                    });
            }
            *cost.f32_ms.entry(kind(op)).or_default() += a;
            *cost.f64_ms.entry(kind(op)).or_default() += b;
            *cost.u64_ms.entry(kind(op)).or_default() += u;
            cost.total_f32_ms += a;
            cost.total_f64_ms += b;
            cost.total_u64_ms += u;
        }
        cost.u64_over_f32 = cost.total_u64_ms / cost.total_f32_ms;
        cost.u64_over_f64 = cost.total_u64_ms / cost.total_f64_ms;
        let peak = match peaks.get(kernel.name()) {
            Some(&p) => Some((4.0, p)),
            None => amx.filter(|_| kernel.name() == "amx").map(|p| (8.0, p)),
        };
        if let Some((per_product, peak)) = peak {
            let macs = per_product * (rows * products_per_row) as f64;
            cost.u64_fraction_of_peak = macs / (cost.total_u64_ms / 1e3) / (peak * threads as f64);
        }
        eprintln!(
            "{rows} rows: f32 {:.1} ms, f64 {:.1} ms, u64 {:.1} ms per forward pass ({:.0} % of peak); u64 by kernel {:?}",
            cost.total_f32_ms,
            cost.total_f64_ms,
            cost.total_u64_ms,
            100.0 * cost.u64_fraction_of_peak,
            cost.u64_by_kernel_ms
        );
        passes.push(cost);
    }
    let report = Report {
        model: path.display().to_string(),
        threads,
        u64_kernel: IntKernel::best().name(),
        pair_dot_peak_per_thread: peaks,
        amx_int8_peak_per_thread: amx,
        amx_digits: amx_weights.values().map(|a| a.digits()).max(),
        amx_weight_bytes: (!amx_weights.is_empty())
            .then(|| amx_weights.values().map(|a| a.bytes()).sum()),
        u64_products_per_row: products_per_row,
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
