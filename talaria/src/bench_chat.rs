//! `talaria bench-chat`: what the agent's conversation cache saves. A chat with a long history
//! is asked through a cluster's agent, then its next turn twice, side by side: on the same salt
//! (the agent reuses the first turn's keys and values) and on a fresh one (it runs the whole
//! history again). Prints JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;
use talaria_engine::{ChatMessage, SamplingParams, Tokenizer, chat_prompt};
use talaria_wire::{Prompt, TenantRequest};

#[derive(Debug, Args)]
pub struct BenchChatArgs {
    /// Tokens of history the first turn carries (at least; whole sentences are added).
    #[arg(long, default_value_t = 1000)]
    pub history_tokens: usize,
    /// Tokens each turn generates (greedy).
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model file, for its tokenizer (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    #[command(flatten)]
    pub agent: crate::cluster::AgentArgs,
}

#[derive(Serialize)]
struct Turn {
    prompt_tokens: usize,
    /// Prompt tokens the agent took from its conversation cache.
    cached_tokens: usize,
    /// Request sent to first token received, at the client (attestation and session set-up
    /// included).
    ttft_s: f64,
    /// The agent's own prefill: its first pass to the first token.
    agent_prefill_s: f64,
    /// Masked calls the turn made.
    calls: u64,
    ids: Vec<u32>,
}

#[derive(Serialize)]
struct Report {
    history_tokens: usize,
    gen_tokens: usize,
    first: Turn,
    /// The next turn on the first turn's salt: the agent reuses the conversation.
    second_warm: Turn,
    /// The same next turn on a fresh salt: the whole history runs again.
    second_cold: Turn,
    /// second_warm.ttft_s / first.ttft_s.
    warm_over_first_ttft: f64,
    /// second_warm.ttft_s / second_cold.ttft_s.
    warm_over_cold_ttft: f64,
    /// Whether the warm and cold second turns answered the same ids.
    same_answer: bool,
}

/// A user message of at least `tokens` tokens (with the chat template) from a fixed public text.
fn long_message(tokenizer: &Tokenizer, tokens: usize) -> Result<String> {
    const SENTENCES: [&str; 6] = [
        "The harbour town woke before dawn, when the fishing boats slipped out past the lighthouse.",
        "By noon the market square was full of traders selling bread, salt, rope and lamp oil.",
        "Old records in the library describe three great storms that flooded the lower streets.",
        "Each spring the townspeople repaired the sea wall with stone carried down from the hills.",
        "Children learned to read the weather from the colour of the sky over the western cliffs.",
        "In the evenings the lamplighter walked the length of the quay, lighting forty lamps.",
    ];
    let mut text = String::from("Here are my notes about a town:\n");
    let mut i = 0;
    loop {
        let rendered = chat_prompt(&[ChatMessage {
            role: "user".into(),
            content: format!("{text}\nWhat is the town like?"),
        }]);
        if tokenizer.encode(&rendered)?.len() >= tokens {
            return Ok(format!("{text}\nWhat is the town like?"));
        }
        text.push_str(SENTENCES[i % SENTENCES.len()]);
        text.push(' ');
        i += 1;
    }
}

fn ask(
    agent: &crate::cluster::AgentArgs,
    messages: &[ChatMessage],
    gen_tokens: usize,
    salt: &str,
) -> Result<(Turn, String)> {
    let req = TenantRequest {
        prompt: Prompt::Chat(messages.to_vec()),
        max_tokens: gen_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: false,
        stop: Vec::new(),
        cache_salt: Some(salt.to_string()),
    };
    let t0 = Instant::now();
    let mut first = None;
    let answer = crate::cluster::generate(agent, &req, |_, _| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
    })?;
    let g = answer.generation;
    Ok((
        Turn {
            prompt_tokens: g.prompt_ids.len(),
            cached_tokens: g.cached_tokens,
            ttft_s: first.unwrap_or(f64::NAN),
            agent_prefill_s: g.prefill_ms / 1e3,
            calls: answer.latency.calls,
            ids: g.ids,
        },
        answer.text,
    ))
}

pub fn run(args: BenchChatArgs) -> Result<()> {
    let model_path = crate::resolve_model(args.model_file.clone())?;
    let f = talaria_gguf::GgufFile::open(&model_path)?;
    let tokenizer = Tokenizer::from_spec(&talaria_model_file::read_tokenizer_spec(&f)?)?;
    let message = |role: &str, content: String| ChatMessage {
        role: role.into(),
        content,
    };
    let mut history = vec![message(
        "user",
        long_message(&tokenizer, args.history_tokens)?,
    )];
    let salt = crate::fresh_salt();
    let (first, reply) = ask(&args.agent, &history, args.gen_tokens, &salt)?;
    history.push(message("assistant", reply));
    history.push(message("user", "Give the town a name.".into()));
    let (second_warm, _) = ask(&args.agent, &history, args.gen_tokens, &salt)?;
    let (second_cold, _) = ask(&args.agent, &history, args.gen_tokens, &crate::fresh_salt())?;
    if second_warm.cached_tokens == 0 {
        bail!("the agent reused nothing of the first turn (is its conversation_cache_mib 0?)");
    }
    let report = Report {
        history_tokens: first.prompt_tokens,
        gen_tokens: args.gen_tokens,
        warm_over_first_ttft: second_warm.ttft_s / first.ttft_s,
        warm_over_cold_ttft: second_warm.ttft_s / second_cold.ttft_s,
        same_answer: second_warm.ids == second_cold.ids,
        first,
        second_warm,
        second_cold,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.out {
        std::fs::write(path, &json)?;
    }
    println!("{json}");
    Ok(())
}
