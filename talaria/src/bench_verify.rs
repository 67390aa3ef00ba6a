//! `talaria bench-verify`: what issue 23's changes cost and save, in one run, in process — the
//! CVM's pad work and Freivalds' check per decode token with 0 and 2 dummy rows, decode speed,
//! and the prefill cost of each length-padding policy against what it hides.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use talaria_engine::{GenerateRequest, SamplingParams};
use talaria_params::{PadRows, RemoConfig};
use talaria_remo::MaskerStats;

use crate::bench::bench_prompt;
use crate::engines::{RemoArgs, RemoEngine, default_calibration};

#[derive(Args, Debug)]
pub struct BenchVerifyArgs {
    /// Prompt tokens of the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Generated tokens of the decode measurement.
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Prompt lengths of the padding measurement.
    #[arg(long, value_delimiter = ',', default_value = "10,40,100,129")]
    pub pad_lengths: Vec<usize>,
    /// Padding policies measured.
    #[arg(long, value_delimiter = ',', default_value = "off,pow2:16,pow2:64")]
    pub pad_policies: Vec<String>,
    /// Only the padding policies' arithmetic (overhead and entropy), no measurement.
    #[arg(long)]
    pub hiding_only: bool,
    /// Write the JSON report here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model file (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
}

#[derive(Serialize)]
struct DecodeRow {
    dummy_rows: usize,
    decode_tok_per_s: f64,
    prefill_tok_per_s: f64,
    /// Mask pairs (a pad and its product) consumed per generated token.
    pairs_per_decode_token: f64,
    /// Multiply-adds of those pairs per generated token.
    pad_macs_per_decode_token: f64,
    /// The pool thread's measured time per multiply-add, times the above.
    pad_ms_per_decode_token: f64,
    /// Freivalds' check (both halves) per generated token.
    verify_ms_per_decode_token: f64,
    /// Rows sent per generated token (real, dummies).
    rows_per_decode_token: f64,
    /// Freivalds vectors per op at the end (the integer mode makes as many as the op's largest
    /// row bound needs: `⌈20 / lz(B)⌉`).
    check_vectors_per_op: f64,
}

#[derive(Serialize)]
struct PadRow {
    policy: String,
    prompt_tokens: usize,
    rows_sent_per_op: usize,
    prefill_ms: f64,
    /// The cloud's share (its GEMMs and the loopback).
    cloud_ms: f64,
}

#[derive(Serialize)]
struct PadHiding {
    policy: String,
    /// Lengths drawn log-uniformly from 1 to the context (or uniformly from 1 to 512).
    distribution: String,
    /// Mean of padded rows / real rows over the distribution, per prompt.
    mean_overhead: f64,
    /// Padded rows over real rows, summed over the distribution: the extra prefill work of a
    /// stream of such prompts (cloud GEMMs, CVM cover masks and checks).
    work_overhead: f64,
    /// Entropy of what the cloud reads (the bucket), bits; the exact length's is beside it.
    bits_seen: f64,
    bits_of_length: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    context: usize,
    decode: Vec<DecodeRow>,
    padding: Vec<PadRow>,
    hiding: Vec<PadHiding>,
}

fn diff(a: &MaskerStats, b: &MaskerStats) -> MaskerStats {
    MaskerStats {
        calls: b.calls - a.calls,
        rows_sent: b.rows_sent - a.rows_sent,
        dummy_rows: b.dummy_rows - a.dummy_rows,
        pool_hits: b.pool_hits - a.pool_hits,
        pool_misses: b.pool_misses - a.pool_misses,
        mask_generation_s: b.mask_generation_s - a.mask_generation_s,
        mask_generation_macs: b.mask_generation_macs - a.mask_generation_macs,
        downshifted_rows: b.downshifted_rows - a.downshifted_rows,
        padding_rows: b.padding_rows - a.padding_rows,
        checked_rows: b.checked_rows - a.checked_rows,
        verify_s: b.verify_s - a.verify_s,
        check_vectors_made: b.check_vectors_made - a.check_vectors_made,
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    }
}

/// Entropy in bits of the values `f(L)` for lengths `L` with weights `w(L)`.
fn entropy(lengths: &[(usize, f64)], f: impl Fn(usize) -> usize) -> f64 {
    let total: f64 = lengths.iter().map(|l| l.1).sum();
    let mut mass = std::collections::BTreeMap::<usize, f64>::new();
    for &(l, w) in lengths {
        *mass.entry(f(l)).or_default() += w / total;
    }
    -mass.values().map(|p| p * p.log2()).sum::<f64>()
}

pub fn run(args: BenchVerifyArgs) -> Result<()> {
    let model = crate::resolve_model(args.model_file.clone())?;
    let calibration = default_calibration()?;
    let flags = RemoArgs::defaults();
    let mut decode = Vec::new();
    let mut context = 0;
    let dummy_settings: &[usize] = if args.hiding_only { &[] } else { &[0, 2] };
    if args.hiding_only {
        let f = talaria_gguf::GgufFile::open(&model)?;
        context = talaria_model_file::read_config(&f)?.max_seq;
    }
    for &dummy_rows in dummy_settings {
        let config = RemoConfig {
            dummy_rows,
            ..RemoConfig::default()
        };
        let mut e = RemoEngine::load_config(&model, config, &flags, &calibration)?;
        context = e.model.config().max_seq;
        let prompt = bench_prompt(&e.tokenizer, args.prompt_tokens)?;
        // Warm: the check vectors and the pool; then prefill alone, then prefill and decode.
        e.generate(&request(prompt.clone(), 2), |_| Ok(()))?;
        let s0 = e.linear.stats();
        e.generate(&request(prompt.clone(), 1), |_| Ok(()))?;
        let s1 = e.linear.stats();
        let g = e.generate(&request(prompt.clone(), args.gen_tokens + 1), |_| Ok(()))?;
        let s2 = e.linear.stats();
        let (prefill, both) = (diff(&s0, &s1), diff(&s1, &s2));
        let tokens = args.gen_tokens as f64;
        let per = |both: f64, prefill: f64| (both - prefill) / tokens;
        let pairs = per(
            (both.pool_hits + both.pool_misses) as f64,
            (prefill.pool_hits + prefill.pool_misses) as f64,
        );
        let macs = per(
            both.mask_generation_macs as f64,
            prefill.mask_generation_macs as f64,
        );
        // The pool thread's cost per multiply-add, over everything this engine made.
        let all = e.linear.stats();
        let s_per_mac = all.mask_generation_s / all.mask_generation_macs.max(1) as f64;
        decode.push(DecodeRow {
            dummy_rows,
            decode_tok_per_s: g.decode_tok_per_s,
            prefill_tok_per_s: g.prefill_tok_per_s,
            pairs_per_decode_token: pairs,
            pad_macs_per_decode_token: macs,
            pad_ms_per_decode_token: macs * s_per_mac * 1e3,
            verify_ms_per_decode_token: per(both.verify_s, prefill.verify_s) * 1e3,
            rows_per_decode_token: per(both.rows_sent as f64, prefill.rows_sent as f64),
            check_vectors_per_op: all.check_vectors_made as f64
                / talaria_cvm_agent::all_ops(e.model.config()).len() as f64,
        });
        eprintln!(
            "dummy rows {dummy_rows}: {:?}",
            serde_json::to_string(decode.last().unwrap())?
        );
    }

    let mut padding = Vec::new();
    let policies: &[String] = if args.hiding_only {
        &[]
    } else {
        &args.pad_policies
    };
    for policy in policies {
        let pad_rows: PadRows = policy.parse().map_err(anyhow::Error::msg)?;
        let config = RemoConfig {
            pad_rows,
            ..RemoConfig::default()
        };
        let mut e = RemoEngine::load_config(&model, config, &flags, &calibration)?;
        for &n in &args.pad_lengths {
            let prompt = bench_prompt(&e.tokenizer, n)?;
            // Warm once, then measure a prefill.
            e.generate(&request(prompt.clone(), 1), |_| Ok(()))?;
            let cloud0 = e.linear.timings().cloud_s;
            let s0 = e.linear.stats();
            let t0 = Instant::now();
            e.generate(&request(prompt.clone(), 1), |_| Ok(()))?;
            let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
            let d = diff(&s0, &e.linear.stats());
            padding.push(PadRow {
                policy: policy.clone(),
                prompt_tokens: n,
                // The LM head's one row aside, every op of the pass sends the same count.
                rows_sent_per_op: ((d.rows_sent - 1) / (d.calls - 1)) as usize,
                prefill_ms,
                cloud_ms: (e.linear.timings().cloud_s - cloud0) * 1e3,
            });
            eprintln!("{policy}, {n} tokens: {prefill_ms:.0} ms");
        }
    }

    let mut hiding = Vec::new();
    let log_uniform: Vec<(usize, f64)> = (1..=context).map(|l| (l, 1.0 / l as f64)).collect();
    let uniform: Vec<(usize, f64)> = (1..=512.min(context)).map(|l| (l, 1.0)).collect();
    for policy in ["off", "pow2:8", "pow2:16", "pow2:64", "max"] {
        let p: PadRows = policy.parse().map_err(anyhow::Error::msg)?;
        for (name, dist) in [
            ("log-uniform 1..context", &log_uniform),
            ("uniform 1..512", &uniform),
        ] {
            let total: f64 = dist.iter().map(|d| d.1).sum();
            let real: f64 = dist.iter().map(|&(l, w)| w * l as f64).sum();
            let padded: f64 = dist
                .iter()
                .map(|&(l, w)| w * p.bucket(l, context) as f64)
                .sum();
            let overhead = dist
                .iter()
                .map(|&(l, w)| w * p.bucket(l, context) as f64 / l as f64)
                .sum::<f64>()
                / total;
            hiding.push(PadHiding {
                policy: policy.into(),
                distribution: name.into(),
                mean_overhead: overhead,
                work_overhead: padded / real,
                bits_seen: entropy(dist, |l| p.bucket(l, context)),
                bits_of_length: entropy(dist, |l| l),
            });
        }
    }
    let report = Report {
        model: model.display().to_string(),
        context,
        decode,
        padding,
        hiding,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json)?;
    }
    println!("{json}");
    Ok(())
}
