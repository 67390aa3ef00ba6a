use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use talaria_engine::{GenerateRequest, SamplingParams};

use crate::engines::{Engine, EngineKind, RemoArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Prompt length in tokens for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to decode for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Repetitions; the best and the median run are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model file (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    /// Engine to measure.
    #[arg(long, value_enum, default_value = "plain")]
    pub engine: EngineKind,
    #[command(flatten)]
    pub remo: RemoArgs,
    #[command(flatten)]
    pub agent: crate::cluster::AgentArgs,
}

#[derive(Serialize)]
struct Run {
    prefill_ms: f64,
    prefill_tok_per_s: f64,
    decode_tok_per_s: f64,
    /// Where the time went (`--engine cluster`).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<talaria_wire::LatencySplit>,
}

#[derive(Serialize)]
struct Report {
    engine: String,
    /// The ReMO parameters, for `--engine remo`.
    remo: Option<talaria_params::RemoConfig>,
    model: String,
    threads: usize,
    load_ms: f64,
    prompt_tokens: usize,
    gen_tokens: usize,
    median_prefill_tok_per_s: f64,
    median_decode_tok_per_s: f64,
    runs: Vec<Run>,
    /// The prompt, so another engine can be measured on the same ids.
    prompt_ids: Vec<u32>,
    /// Greedy ids of the first run, to check another engine computes the same thing.
    ids: Vec<u32>,
    /// `--engine remo`: the share of mask pairs its calls found ready in the pool (made ahead,
    /// off the critical path), over every run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_hit_rate: Option<f64>,
}

/// A prompt of exactly `n` tokens from a fixed public text, so every engine sees the same ids.
pub fn bench_prompt(tokenizer: &talaria_engine::Tokenizer, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles \
        begins with a single step. All that glitters is not gold. ";
    let mut ids = tokenizer.encode(TEXT)?;
    while ids.len() < n {
        let more = ids.clone();
        ids.extend(more);
    }
    ids.truncate(n);
    Ok(ids)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: BenchArgs) -> Result<()> {
    let model_path = crate::resolve_model(args.model_file.clone())?;
    let t_load = Instant::now();
    // The cluster engine runs elsewhere; here only the tokenizer is needed, for the prompt.
    let mut engine = match args.engine {
        EngineKind::Cluster => None,
        kind => Some(Engine::load(kind, &model_path, &args.remo)?),
    };
    let prompt = match &engine {
        Some(e) => bench_prompt(e.tokenizer(), args.prompt_tokens.max(1))?,
        None => {
            let f = talaria_gguf::GgufFile::open(&model_path)?;
            let spec = talaria_model_file::read_tokenizer_spec(&f)?;
            bench_prompt(
                &talaria_engine::Tokenizer::from_spec(&spec)?,
                args.prompt_tokens.max(1),
            )?
        }
    };
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let mut runs = Vec::new();
    let mut first_ids = None;
    for _ in 0..args.runs.max(1) {
        let req = GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens: args.gen_tokens.max(2),
            sampling: SamplingParams::default(),
            stop_ids: vec![],
        };
        let (g, latency) = match &mut engine {
            Some(e) => (e.generate(&req, |_| Ok(()))?, None),
            None => {
                let tenant = talaria_wire::TenantRequest {
                    prompt: talaria_wire::Prompt::Ids(req.prompt_ids.clone()),
                    max_tokens: req.max_tokens,
                    sampling: req.sampling.clone(),
                    ignore_eos: true,
                    stop: Vec::new(),
                    // Every run cold: a fresh salt reuses no earlier run's conversation.
                    cache_salt: Some(crate::fresh_salt()),
                };
                let a = crate::cluster::generate(&args.agent, &tenant, |_, _| {})?;
                (a.generation, Some(a.latency))
            }
        };
        first_ids.get_or_insert(g.ids);
        runs.push(Run {
            prefill_ms: g.prefill_ms,
            prefill_tok_per_s: g.prefill_tok_per_s,
            decode_tok_per_s: g.decode_tok_per_s,
            latency,
        });
    }
    let report = Report {
        engine: format!(
            "talaria-{}",
            serde_json::to_value(args.engine)?.as_str().unwrap_or("?")
        ),
        remo: (args.engine == EngineKind::Remo).then(|| args.remo.config()),
        // The cluster's own [remo] section applies there (see its topology).
        model: model_path.display().to_string(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_ms,
        prompt_tokens: prompt.len(),
        gen_tokens: args.gen_tokens.max(2),
        median_prefill_tok_per_s: median(runs.iter().map(|r| r.prefill_tok_per_s).collect()),
        median_decode_tok_per_s: median(runs.iter().map(|r| r.decode_tok_per_s).collect()),
        runs,
        prompt_ids: prompt,
        ids: first_ids.unwrap_or_default(),
        pool_hit_rate: engine
            .as_ref()
            .and_then(|e| e.pool_use())
            .filter(|&(hits, misses)| hits + misses > 0)
            .map(|(hits, misses)| hits as f64 / (hits + misses) as f64),
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{json}");
    Ok(())
}
