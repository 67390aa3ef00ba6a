use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;
use talaria_engine::{GenerateRequest, Generation, SamplingParams};

use crate::engines::{Engine, EngineKind, RemoArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Engine to run.
    #[arg(long, value_enum, default_value = "plain")]
    pub engine: EngineKind,
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, fed as they are.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Model file (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    #[command(flatten)]
    pub remo: RemoArgs,
    #[command(flatten)]
    pub agent: crate::cluster::AgentArgs,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    engine: EngineKind,
    model: String,
    prompt_ids: &'a [u32],
    ids: &'a [u32],
    text: String,
    stop_reason: talaria_engine::StopReason,
    prompt_tokens: usize,
    generated_tokens: usize,
    load_ms: f64,
    prefill_ms: f64,
    decode_ms: f64,
    prefill_tok_per_s: f64,
    decode_tok_per_s: f64,
    /// Where the time went (`--engine cluster`).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<talaria_wire::LatencySplit>,
}

impl GenerateArgs {
    /// The prompt the flags describe.
    fn prompt(&self) -> Result<talaria_wire::Prompt> {
        Ok(match (&self.prompt, &self.prompt_ids) {
            (Some(text), _) => talaria_wire::Prompt::Text {
                text: text.clone(),
                chat: self.chat,
            },
            (None, Some(ids)) => talaria_wire::Prompt::Ids(ids.clone()),
            (None, None) => bail!("give --prompt or --prompt-ids"),
        })
    }

    /// The sampling parameters the flags describe.
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// `--engine cluster`: the prompt goes to the agent, which tokenizes it; tokens come back.
fn run_cluster(args: GenerateArgs) -> Result<()> {
    let req = talaria_wire::TenantRequest {
        prompt: args.prompt()?,
        max_tokens: args.max_tokens,
        sampling: args.sampling(),
        ignore_eos: args.ignore_eos,
        stop: Vec::new(),
        cache_salt: None,
    };
    let t0 = Instant::now();
    let mut out = std::io::stdout().lock();
    let json = args.json;
    let answer = crate::cluster::generate(&args.agent, &req, |_, piece| {
        if let (false, Some(p)) = (json, piece) {
            let _ = out.write_all(p.as_bytes()).and_then(|_| out.flush());
        }
    })?;
    if !json {
        let _ = writeln!(out);
    }
    // What protected the prompt, as the agent's attestation stated it (stderr: stdout is the
    // answer).
    let a = &answer.attested;
    let r = &a.claims.remo;
    eprintln!(
        "agent of {} ({}): ReMO {}, precision {}, rank {}{}, {} dummy rows, shuffle {}{}",
        a.claims.tenant,
        match a.verified.measurement {
            Some(m) => format!("attested, measurement {}", hex::encode(m)),
            None => "INSECURE: no hardware attestation, its claims are its word".into(),
        },
        if r.enabled { "on" } else { "OFF" },
        r.precision,
        r.rank,
        if r.precision.is_int() {
            String::new()
        } else {
            format!(", σ {}", r.scale)
        },
        r.dummy_rows,
        r.shuffle,
        if r.below_floor().is_empty() {
            ""
        } else {
            " (below the floor: accepted by --accept-below-floor)"
        },
    );
    let g = answer.generation;
    if !json {
        return Ok(());
    }
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let record = JsonOutput {
        engine: EngineKind::Cluster,
        model: "cluster".into(),
        prompt_ids: &g.prompt_ids,
        ids: &g.ids,
        text: answer.text,
        stop_reason: g.stop_reason,
        prompt_tokens: g.prompt_ids.len(),
        generated_tokens: g.ids.len(),
        // Session set-up (connection, ReMO set-up) stands in for loading.
        load_ms: (wall_ms - g.prefill_ms - g.decode_ms).max(0.0),
        prefill_ms: g.prefill_ms,
        decode_ms: g.decode_ms,
        prefill_tok_per_s: g.prefill_tok_per_s,
        decode_tok_per_s: g.decode_tok_per_s,
        latency: Some(answer.latency),
    };
    println!("{}", serde_json::to_string(&record)?);
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.engine == EngineKind::Cluster {
        return run_cluster(args);
    }
    let model_path = crate::resolve_model(args.model_file.clone())?;
    let t_load = Instant::now();
    let mut engine = Engine::load(args.engine, &model_path, &args.remo)?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;

    let prompt_ids = talaria_cvm_agent::cluster::prompt_ids(engine.tokenizer(), &args.prompt()?)?;
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: args.max_tokens,
        sampling: args.sampling(),
        stop_ids: if args.ignore_eos {
            vec![]
        } else {
            vec![engine.tokenizer().eos()]
        },
    };

    let generation: Generation = if args.json {
        engine.generate(&req, |_| Ok(()))?
    } else {
        let (tokenizer, model, mut weights) = engine.parts();
        let mut stream = tokenizer.decode_stream();
        let mut out = std::io::stdout().lock();
        let generation = talaria_engine::generate(
            model,
            &mut *weights,
            &req,
            |id| {
                if req.stop_ids.contains(&id) {
                    return Ok(());
                }
                if let Some(piece) = stream.step(id)? {
                    // A closed stdout (e.g. piped into `head`) ends the output, not the process.
                    let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
                }
                Ok(())
            },
            None,
        )?;
        let _ = writeln!(out);
        generation
    };

    engine.finish()?;
    if args.json {
        // The text ends before the stop token; `ids` keeps it.
        let text = generation.text(engine.tokenizer(), &[])?;
        let out = JsonOutput {
            engine: args.engine,
            model: model_path.display().to_string(),
            prompt_ids: &generation.prompt_ids,
            ids: &generation.ids,
            text,
            stop_reason: generation.stop_reason,
            prompt_tokens: generation.prompt_ids.len(),
            generated_tokens: generation.ids.len(),
            load_ms,
            prefill_ms: generation.prefill_ms,
            decode_ms: generation.decode_ms,
            prefill_tok_per_s: generation.prefill_tok_per_s,
            decode_tok_per_s: generation.decode_tok_per_s,
            latency: None,
        };
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
