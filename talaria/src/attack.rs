//! `talaria attack` (attack one tap) and `talaria attack-report` (victims through a grid of ReMO
//! settings, every attack on each, next to the setting's drift and cost).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use talaria_attacks::eval::{TRUTH_FILE, VictimTruth, score};
use talaria_attacks::metadata::{self, MetaScore, SessionMeta};
use talaria_attacks::score::Distance;
use talaria_attacks::{
    AttackKind, AttackScore, Attacker, Options, SessionGuess, Simulator, Tap, Truth,
};
use talaria_cvm_agent::{PublicCache, RemoLinear};
use talaria_engine::{GenerateRequest, OpId, SamplingParams, generate};
use talaria_params::{PadRows, Precision, Rank, RemoConfig};

use crate::engines::{Cloud, RemoArgs, default_calibration};
use crate::lossless::{self, SettingReport};

fn parse_attack(s: &str) -> Result<AttackKind, String> {
    s.parse()
}

fn parse_distance(s: &str) -> Result<Distance, String> {
    match s {
        "l2" => Ok(Distance::L2),
        "sorted" => Ok(Distance::Sorted),
        _ => Err(format!("{s:?}: expected l2 or sorted")),
    }
}

/// The attacks' knobs.
#[derive(Debug, Clone, Args)]
pub struct Knobs {
    /// Candidates the sequential attacks simulate per position.
    #[arg(long, default_value_t = Options::default().shortlist)]
    pub shortlist: usize,
    /// The op whose input the forward-simulation attacks match (`<layer>.<op>`).
    #[arg(long, default_value = "1.qkv", value_parser = str::parse::<OpId>)]
    pub forward_view: OpId,
    /// Row distance of the matching attacks: `l2`, or `sorted` (blind to feature permutations).
    #[arg(long, default_value = "l2", value_parser = parse_distance)]
    pub distance: Distance,
    /// Seed of the learned attacker's own masks.
    #[arg(long, default_value_t = Options::default().seed)]
    pub attack_seed: u64,
    /// Hypotheses the ideal attack keeps per position (its beam width).
    #[arg(long, default_value_t = Options::default().beam)]
    pub beam: usize,
    /// The model's next tokens the ideal attack tries per hypothesis (and as many again from
    /// its layer-0 screen).
    #[arg(long, default_value_t = Options::default().top_k)]
    pub top_k: usize,
    /// The ideal attack sums the evidence of sessions whose passes have the same row counts,
    /// taking them to hold the same tokens (a retried prompt, a re-sent conversation).
    #[arg(long)]
    pub link_sessions: bool,
}

impl Knobs {
    fn options(&self) -> Options {
        Options {
            shortlist: self.shortlist,
            forward_view: self.forward_view,
            distance: self.distance,
            seed: self.attack_seed,
            beam: self.beam,
            top_k: self.top_k,
            link_sessions: self.link_sessions,
            ..Options::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct AttackArgs {
    /// A tap directory (docs/tap-format.md) with its public.json.
    #[arg(long)]
    pub tap: PathBuf,
    /// Run only this attack (default: all): prior, nn, forward, projection, gaussian,
    /// multi-view, learned, ideal (and the others `AttackKind::ALL` names).
    #[arg(long, value_parser = parse_attack)]
    pub attack: Option<AttackKind>,
    /// Score against this truth file (default: the tap's truth.json, when there is one).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Print JSON (scores and every guess) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Instead of attacking, test whether the integer mode's padded values are uniform
    /// (docs/attacks.md, "Statistical tests of the integer pads"); needs no model.
    #[arg(long, conflicts_with = "attack")]
    pub pad_stats: bool,
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: Knobs,
}

#[derive(Serialize)]
struct AttackRun {
    attack: &'static str,
    seconds: f64,
    score: Option<AttackScore>,
    guesses: Vec<SessionGuess>,
}

/// `talaria attack --pad-stats`: the pad report, as JSON or a short table.
fn pad_stats(args: &AttackArgs) -> Result<()> {
    use talaria_attacks::pads::{PadOptions, test_tap};
    let tap = Tap::open(&args.tap).with_context(|| format!("opening {}", args.tap.display()))?;
    let t0 = Instant::now();
    let report = test_tap(&tap, &PadOptions::default())
        .with_context(|| format!("pad statistics of {}", args.tap.display()))?;
    let seconds = t0.elapsed().as_secs_f64();
    if args.json {
        let out = serde_json::json!({"tap": args.tap, "seconds": seconds, "pads": report});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let (inc, acr) = (&report.pairs_in_call, &report.pairs_across_calls);
    println!(
        "{} calls, {} rows, {} values; row pairs tested: {} of {} in calls, {} of {} across \
         calls; {seconds:.1} s",
        report.calls,
        report.rows,
        report.values,
        inc.tested,
        inc.candidates,
        acr.tested,
        acr.candidates
    );
    println!(
        "verdict: {} ({} tests, each rejecting at p <= {:.1e}: family-wise false-alarm rate {:.0e})",
        report.verdict.name(),
        report.tests.len(),
        report.threshold,
        report.alpha
    );
    let mut shown: Vec<_> = report.tests.iter().collect();
    shown.sort_by(|a, b| a.p_value.total_cmp(&b.p_value));
    let n = report.failed.len().max(5).min(shown.len());
    let num = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.4}")
        }
    };
    println!(
        "{:<32} {:>14} {:>14} {:>10}",
        "test", "statistic", "expected", "p"
    );
    for t in &shown[..n] {
        let p = if t.p_value > 0.0 {
            format!("{:.2e}", t.p_value)
        } else {
            "< 1e-300".into()
        };
        let rejected = if t.p_value <= report.threshold {
            "  REJECTED"
        } else {
            ""
        };
        let (stat, expected) = (num(t.statistic), num(t.expected));
        println!("{:<32} {stat:>14} {expected:>14} {p:>10}{rejected}", t.name);
    }
    // Where a pair test rejected, the pair: the rows that look like they share a pad.
    for (kind, pairs) in [("in call", inc), ("across calls", acr)] {
        for (what, worst) in [
            ("difference", &pairs.worst_difference),
            ("xor", &pairs.worst_xor),
        ] {
            let name = format!("pairs {kind} ({what})");
            if let Some(w) = worst.as_ref().filter(|_| report.failed.contains(&name)) {
                println!(
                    "{name}: {} row {} and {} row {}: {} of {} columns sign-extended",
                    w.call_a, w.row_a, w.call_b, w.row_b, w.hits, w.cols
                );
            }
        }
    }
    Ok(())
}

/// What the cloud read without unmasking anything, one line per session.
fn print_metadata(metas: &[SessionMeta], score: Option<&MetaScore>) {
    let us = |v: Option<u64>| v.map_or("–".to_string(), |v| format!("{:.1} ms", v as f64 / 1e3));
    for m in metas {
        println!(
            "metadata    session {}: tenant {}, prompt {} tokens, {} generated, prefill {}, \
             step {}, {} request bytes",
            m.session,
            m.tenant.as_deref().unwrap_or("–"),
            m.prompt_tokens,
            m.generated_tokens,
            us(m.prefill_us),
            us(m.step_us),
            m.frame_bytes.map_or("–".to_string(), |b| b.to_string()),
        );
    }
    if let Some(s) = score {
        println!(
            "metadata    lengths read exactly: prompt {}/{}, response {}/{} sessions",
            s.prompt_length_exact, s.sessions, s.response_length_exact, s.sessions
        );
    }
}

pub fn run(args: AttackArgs) -> Result<()> {
    if args.pad_stats {
        return pad_stats(&args);
    }
    let path = crate::resolve_model(args.model_file.clone())?;
    let tap = Tap::open(&args.tap).with_context(|| format!("opening {}", args.tap.display()))?;
    let truth_path = args.truth.clone().or_else(|| {
        let p = args.tap.join(TRUTH_FILE);
        p.exists().then_some(p)
    });
    let truth = truth_path.as_deref().map(Truth::read).transpose()?;
    let mut sim = Simulator::load(&path)?;
    let metas = metadata::read(&tap);
    let meta_score = truth.as_ref().map(|t| metadata::score(&metas, t));
    if !args.json {
        print_metadata(&metas, meta_score.as_ref());
    }
    let mut attacker = Attacker::new(&mut sim, args.knobs.options(), default_calibration()?)?;
    let kinds = args.attack.map_or(AttackKind::ALL.to_vec(), |k| vec![k]);
    let mut runs = Vec::new();
    for kind in kinds {
        let t0 = Instant::now();
        let guesses = attacker
            .run(kind, &tap)
            .with_context(|| format!("attack {}", kind.name()))?;
        let seconds = t0.elapsed().as_secs_f64();
        let score = truth
            .as_ref()
            .map(|t| scored(&mut attacker, kind, &tap, &guesses, t, seconds))
            .transpose()?;
        if !args.json {
            match &score {
                Some(s) => {
                    print!(
                        "{:<11} prompt {:>5}/{:<5} {:>6.2} %  [{:.2} – {:.2}]",
                        kind.name(),
                        s.recovered,
                        s.total,
                        100.0 * s.accuracy,
                        100.0 * s.ci95[0],
                        100.0 * s.ci95[1],
                    );
                    if let Some(r) = &s.response {
                        print!(
                            "  response {}/{} {:.2} % [{:.2} – {:.2}]",
                            r.recovered,
                            r.total,
                            100.0 * r.accuracy,
                            100.0 * r.ci95[0],
                            100.0 * r.ci95[1]
                        );
                    }
                    println!("  {seconds:.1} s");
                    if let Some(line) = beliefs_line(s) {
                        println!("{:<11} {line}", "");
                    }
                }
                None => println!(
                    "{:<11} {} session(s) guessed, {seconds:.1} s (no truth to score against)",
                    kind.name(),
                    guesses.len()
                ),
            }
        }
        runs.push(AttackRun {
            attack: kind.name(),
            seconds,
            score,
            guesses,
        });
    }
    if args.json {
        let out = serde_json::json!({
            "tap": args.tap,
            "public": tap.public,
            "truth": truth_path,
            "metadata": metas,
            "metadata_score": meta_score,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Where the report goes (see --stem).
    #[arg(long, default_value = "docs/attacks")]
    pub out: PathBuf,
    /// Victim prompts, one per line.
    #[arg(long, default_value = "calibration/lossless-prompts.txt")]
    pub prompts: PathBuf,
    /// Victim sessions per setting (the first prompts of the file).
    #[arg(long, default_value_t = 16)]
    pub victims: usize,
    /// Tokens each victim generates (greedy): the first comes from the prefill, every further
    /// one makes a decode pass whose input, the token before, is attacked as the response.
    #[arg(long, default_value_t = 1)]
    pub gen_tokens: usize,
    /// The small grid the tests run (plaintext, the integer default, and f64-gemm at σ = 100,
    /// rank 1/2 and σ = 1) instead of the full one.
    #[arg(long)]
    pub small: bool,
    /// Run only these settings, separated by `;` (names contain commas): a setting's exact name,
    /// or the start of names (e.g. `f32`, `f64-gemm, rank`, `default`).
    #[arg(long, value_delimiter = ';')]
    pub settings: Vec<String>,
    /// File name stem of the report: STEM.json, STEM.md, STEM.png.
    #[arg(long, default_value = "attack-report")]
    pub stem: String,
    /// Attacks to run (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_attack)]
    pub attacks: Vec<AttackKind>,
    /// Prompts and tokens per prompt of the drift measurement (`talaria lossless`) of each
    /// setting; 0 prompts skips it.
    #[arg(long, default_value_t = 4)]
    pub drift_prompts: usize,
    #[arg(long, default_value_t = 16)]
    pub drift_tokens: usize,
    /// Where the victims' taps are written (each removed after its setting is attacked unless
    /// --keep-taps).
    #[arg(long)]
    pub taps: Option<PathBuf>,
    #[arg(long)]
    pub keep_taps: bool,
    /// Seed of the victims' private masks (fixed by default so a report can be reproduced; the
    /// attacks never see it).
    #[arg(long, default_value_t = 1)]
    pub victim_seed: u64,
    /// Skip the PNG plot (it needs Python with matplotlib: tools/requirements.txt).
    #[arg(long)]
    pub no_plot: bool,
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: Knobs,
}

/// One column of the grid.
#[derive(Debug, Clone, Serialize)]
struct Setting {
    name: String,
    config: RemoConfig,
}

fn grid(small: bool) -> Vec<Setting> {
    let base = RemoConfig::default();
    let s = |name: &str, config: RemoConfig| Setting {
        name: name.into(),
        config,
    };
    // The float modes are explicit choices: each is measured beside the default. They are
    // recorded without length padding, so the attacks know every prompt's length (the stronger
    // attacker, and the setting of the reports in docs/attacks); the default pads.
    let float = |precision: Precision, scale: f64| RemoConfig {
        precision,
        scale,
        dummy_rows: precision.default_dummy_rows(),
        pad_rows: PadRows::Off,
        ..base.clone()
    };
    let f64_gemm = |x: f64| float(Precision::F64Gemm, x);
    let rank = |f: f64| RemoConfig {
        rank: Rank::Fraction(f),
        ..f64_gemm(100.0)
    };
    let mut v = vec![
        s(
            "plaintext (--remo-off)",
            RemoConfig {
                enabled: false,
                ..base.clone()
            },
        ),
        s("default: int (one-time pad, f=32)", base.clone()),
    ];
    if small {
        v.push(s("f64-gemm, σ=100", f64_gemm(100.0)));
        v.push(s("f64-gemm, rank 1/2", rank(0.5)));
        v.push(s("f64-gemm, σ=1", f64_gemm(1.0)));
        return v;
    }
    for (name, p) in [
        ("f64-gemm", Precision::F64Gemm),
        ("f64-client", Precision::F64Client),
        ("f32", Precision::F32),
    ] {
        for x in [30.0, 100.0, 300.0, 1000.0] {
            v.push(s(&format!("{name}, σ={x}"), float(p, x)));
        }
    }
    for x in [1.0, 3.0, 10.0, 1e4] {
        v.push(s(&format!("f64-gemm, σ={x}"), f64_gemm(x)));
    }
    v.push(s("f64-gemm, rank d−1", rank(1.0 - 1.0 / 576.0)));
    v.push(s("f64-gemm, rank 3/4", rank(0.75)));
    v.push(s("f64-gemm, rank 1/2", rank(0.5)));
    v.push(s("f64-gemm, rank 1/4", rank(0.25)));
    v.push(s(
        "f64-gemm, σ=100, no shuffle",
        RemoConfig {
            shuffle: false,
            ..f64_gemm(100.0)
        },
    ));
    v.push(s(
        "f64-gemm, σ=100, no dummy rows",
        RemoConfig {
            dummy_rows: 0,
            ..f64_gemm(100.0)
        },
    ));
    v
}

/// The settings `wanted` names: each pattern selects the setting of exactly that name if there
/// is one (`f64-gemm, σ=1` is not also `f64-gemm, σ=100`), else every name it starts.
fn select_settings(grid: Vec<Setting>, wanted: &[String]) -> Vec<Setting> {
    if wanted.is_empty() {
        return grid;
    }
    let chosen = |name: &str| {
        wanted.iter().any(|p| {
            let exact = grid.iter().any(|s| &s.name == p);
            if exact {
                name == p
            } else {
                name.starts_with(p.as_str())
            }
        })
    };
    let keep: Vec<bool> = grid.iter().map(|s| chosen(&s.name)).collect();
    grid.into_iter()
        .zip(keep)
        .filter_map(|(s, k)| k.then_some(s))
        .collect()
}

/// Runs the victims' prompts through ReMO with `config`, one session each (prefill only: the
/// prompt is what is attacked), recording the cloud's view into `dir` and the truth beside it.
fn record_victims(
    path: &Path,
    config: &RemoConfig,
    prompts: &[(String, Vec<u32>)],
    gen_tokens: usize,
    dir: &Path,
    seed: u64,
) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let args = RemoArgs {
        tap: Some(dir.to_path_buf()),
        ..RemoArgs::defaults()
    };
    let calibration = default_calibration()?;
    let Cloud {
        model,
        config: model_config,
        mut link,
        ..
    } = Cloud::load(path, config, &args)?;
    let shared = PublicCache::default();
    let mut truth = Truth {
        format: Truth::FORMAT.into(),
        sessions: Vec::new(),
    };
    for (i, (text, prompt)) in prompts.iter().enumerate() {
        let session = i as u64 + 1;
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&session.to_le_bytes());
        let mut linear = RemoLinear::connect_shared(
            &model_config,
            config.clone(),
            &calibration,
            session,
            Some(key),
            link,
            Some(&shared),
        )
        .context("setting up ReMO")?;
        let req = GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens: gen_tokens.max(1),
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
        };
        let g = generate(&model, &mut linear, &req, |_| Ok(()), None)?;
        link = linear.into_link();
        truth.sessions.push(VictimTruth {
            session,
            prompt: prompt.clone(),
            text: text.clone(),
            // The last generated token never goes back into the model.
            response: g.ids[..g.ids.len().saturating_sub(1)].to_vec(),
        });
    }
    link.0.finish_tap()?;
    truth.write(&dir.join(TRUTH_FILE))?;
    Ok(())
}

#[derive(Serialize)]
struct SettingResult {
    name: String,
    config: RemoConfig,
    attacks: Vec<AttackScore>,
    /// Whether some attack's interval lies wholly above the prior's (the ideal attack: whether
    /// it beats its own prior in the paired test).
    leaks: bool,
    /// How many victims' prompt and response lengths the cloud read off the row counts.
    metadata: MetaScore,
    lossless: Option<SettingReport>,
}

#[derive(Serialize)]
struct Report {
    format: &'static str,
    command: String,
    victims: usize,
    victim_tokens: usize,
    prompts: PathBuf,
    options: Options,
    settings: Vec<SettingResult>,
}

pub fn report(args: ReportArgs) -> Result<()> {
    let path = crate::resolve_model(args.model_file.clone())?;
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading {}", args.prompts.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let taps = args.taps.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("talaria-taps-{}", std::process::id()))
    });
    let mut sim = Simulator::load(&path)?;
    let prompts: Vec<(String, Vec<u32>)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(args.victims)
        .map(|l| Ok((l.to_string(), sim.tokenizer().encode(l)?)))
        .collect::<Result<_>>()?;
    if prompts.is_empty() {
        bail!("{} has no prompts", args.prompts.display());
    }
    let victim_tokens = prompts.iter().map(|p| p.1.len()).sum();
    let drift = if args.drift_prompts > 0 {
        Some(lossless::references(
            &path,
            &text,
            args.drift_prompts,
            args.drift_tokens,
            talaria_topology::Backend::Cpu,
        )?)
    } else {
        None
    };
    let kinds = if args.attacks.is_empty() {
        AttackKind::ALL.to_vec()
    } else {
        args.attacks.clone()
    };
    let options = args.knobs.options();
    let calibration = default_calibration()?;
    let mut attacker = Attacker::new(&mut sim, options.clone(), calibration.clone())?;
    let mut report = Report {
        format: "talaria-attack-report-1",
        command: std::env::args().collect::<Vec<_>>().join(" "),
        victims: prompts.len(),
        victim_tokens,
        prompts: args.prompts.clone(),
        options,
        settings: Vec::new(),
    };
    let settings = select_settings(grid(args.small), &args.settings);
    if settings.is_empty() {
        bail!("no setting of the grid matches {:?}", args.settings);
    }
    for setting in settings {
        let t0 = Instant::now();
        let dir = taps.join(slug(&setting.name));
        record_victims(
            &path,
            &setting.config,
            &prompts,
            args.gen_tokens,
            &dir,
            args.victim_seed,
        )?;
        eprintln!(
            "{}: victims recorded in {:.1} s",
            setting.name,
            t0.elapsed().as_secs_f64()
        );
        let tap = Tap::open(&dir)?;
        let truth = Truth::read(&dir.join(TRUTH_FILE))?;
        let meta = metadata::score(&metadata::read(&tap), &truth);
        let mut scores = Vec::new();
        for &kind in &kinds {
            let t = Instant::now();
            let guesses = attacker
                .run(kind, &tap)
                .with_context(|| format!("attack {} on {}", kind.name(), setting.name))?;
            let s = scored(
                &mut attacker,
                kind,
                &tap,
                &guesses,
                &truth,
                t.elapsed().as_secs_f64(),
            )?;
            eprintln!(
                "{:<34} {:<11} {:>6.2} % [{:.2} – {:.2}] {:.1} s",
                setting.name,
                s.attack,
                100.0 * s.accuracy,
                100.0 * s.ci95[0],
                100.0 * s.ci95[1],
                s.seconds
            );
            if let Some(line) = beliefs_line(&s) {
                eprintln!("{:<34} {:<11} {line}", "", "");
            }
            scores.push(s);
        }
        if !args.keep_taps {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let t = Instant::now();
        let lossless = match &drift {
            Some((refs, macs)) if setting.config.enabled => Some(lossless::measure(
                &path,
                setting.config.clone(),
                &RemoArgs::defaults(),
                &calibration,
                refs,
                *macs,
            )?),
            _ => None,
        };
        if lossless.is_some() {
            eprintln!(
                "{}: drift measured in {:.1} s",
                setting.name,
                t.elapsed().as_secs_f64()
            );
        }
        let leaks = leaks(&scores);
        eprintln!("{}: {:.0} s", setting.name, t0.elapsed().as_secs_f64());
        report.settings.push(SettingResult {
            name: setting.name,
            config: setting.config,
            attacks: scores,
            leaks,
            metadata: meta,
            lossless,
        });
        // Written after every setting: a long grid that is stopped keeps what it measured.
        write_report(&args.out, &args.stem, &report)?;
    }
    if !args.no_plot {
        plot(&args.out, &args.stem)?;
    }
    println!("{}", args.out.join(format!("{}.md", args.stem)).display());
    Ok(())
}

/// Whether some attack's interval lies wholly above the prior's, on the prompt or the response;
/// an attack that brings its own prior (the ideal attack: the model's next-token distribution)
/// is judged against that instead, by its paired test (McNemar p < 0.05, more positions right).
fn leaks(scores: &[AttackScore]) -> bool {
    if scores
        .iter()
        .any(|s| s.paired.as_ref().is_some_and(|p| p.significant()))
    {
        return true;
    }
    let Some(prior) = scores.iter().find(|s| s.attack == AttackKind::Prior.name()) else {
        return false;
    };
    scores.iter().filter(|s| s.paired.is_none()).any(|s| {
        s.ci95[0] > prior.ci95[1]
            || matches!((&s.response, &prior.response), (Some(r), Some(p)) if r.ci95[0] > p.ci95[1])
    })
}

/// Scores an attack's guesses; for the ideal attack also the information its evidence gives
/// along the true tokens (the scorer's bound, computed here because only the scorer holds the
/// truth).
fn scored(
    attacker: &mut Attacker,
    kind: AttackKind,
    tap: &Tap,
    guesses: &[SessionGuess],
    truth: &Truth,
    seconds: f64,
) -> Result<AttackScore> {
    let mut s = score(kind.name(), guesses, truth, seconds);
    if kind == AttackKind::Ideal {
        let along = attacker
            .ideal_true_prefix(tap, truth)
            .context("the ideal attack's evidence along the true tokens")?;
        s.true_prefix = talaria_attacks::eval::information(&along, truth);
    }
    Ok(s)
}

/// The ideal attack's information and paired test, in one line (`None` for other attacks).
fn beliefs_line(s: &AttackScore) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(i) = &s.information {
        parts.push(format!(
            "{:.3} bits/token [{:.3} – {:.3}] over {} positions ({} with the true token among the \
             candidates); top-1 posterior {:.1} %, prior {:.1} %",
            i.bits_per_token,
            i.bits_ci95[0],
            i.bits_ci95[1],
            i.positions,
            i.covered,
            100.0 * i.posterior_top1,
            100.0 * i.prior_top1
        ));
    }
    if let Some(p) = &s.paired {
        parts.push(format!(
            "positions right {}/{} vs the prior's on the same prefix {} (McNemar {}:{}, \
             p = {:.2e}; the prior-only beam {})",
            p.attack_correct,
            p.positions,
            p.baseline_correct,
            p.attack_only,
            p.baseline_only,
            p.p_value,
            p.prior_beam_correct
                .map_or("–".to_string(), |c| c.to_string()),
        ));
    }
    if let Some(i) = &s.true_prefix {
        parts.push(format!(
            "with the true prefix: {:.3} bits/token [{:.3} – {:.3}], top-1 posterior {:.1} %, \
             prior {:.1} % (McNemar {}:{}, p = {:.2e})",
            i.bits_per_token,
            i.bits_ci95[0],
            i.bits_ci95[1],
            100.0 * i.posterior_top1,
            100.0 * i.prior_top1,
            i.posterior_only,
            i.prior_only,
            i.top1_p_value
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn write_report(out: &Path, stem: &str, report: &Report) -> Result<()> {
    let json = out.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join(format!("{stem}.md"));
    std::fs::write(&md, markdown(report)).with_context(|| format!("writing {}", md.display()))
}

fn markdown(r: &Report) -> String {
    let attacks: Vec<&str> = r
        .settings
        .first()
        .map(|s| s.attacks.iter().map(|a| a.attack.as_str()).collect())
        .unwrap_or_default();
    let mut s = format!(
        "# Token reconstruction by the cloud\n\n`{}`\n\n{} victim prompts ({} tokens) from `{}`, \
         one session each; accuracy is the share of prompt tokens recovered (order-free), with \
         its 95 % Wilson interval. \"leaks\": some attack's interval lies wholly above the \
         prior's, or the ideal attack beats its own (the model's) prior in the paired test below \
         (p < 0.05). Drift and cost: `talaria lossless` on the same setting (teacher-forced, {}).\n\n",
        r.command,
        r.victims,
        r.victim_tokens,
        r.prompts.display(),
        r.settings.iter().find_map(|s| s.lossless.as_ref()).map_or(
            "not measured".to_string(),
            |l| format!("{} prompts, {} tokens", l.prompts, l.tokens)
        ),
    );
    header(
        &mut s,
        &attacks,
        &[
            "verdict",
            "lengths read (prompt, response)",
            "greedy agreement",
            "max \\|Δlogit\\|",
            "online ms/pos",
            "offline ms/pos",
        ],
    );
    for set in &r.settings {
        s.push_str(&format!("| {} |", set.name));
        for a in &set.attacks {
            s.push_str(&cell(a.accuracy, a.ci95));
        }
        s.push_str(if set.leaks {
            " **leaks** |"
        } else {
            " not above the prior |"
        });
        let m = &set.metadata;
        s.push_str(&format!(
            " {}/{}, {}/{} |",
            m.prompt_length_exact, m.sessions, m.response_length_exact, m.sessions
        ));
        match &set.lossless {
            Some(l) => s.push_str(&format!(
                " {:.2} % | {:.1e} | {:.1} | {:.0} |\n",
                100.0 * l.token_agreement,
                l.max_abs_dlogit,
                l.online_mask_ms_per_token,
                l.offline_mask_ms_per_token
            )),
            None => s.push_str(" – | – | – | – |\n"),
        }
    }
    if r.settings
        .iter()
        .any(|set| set.attacks.iter().any(|a| a.response.is_some()))
    {
        s.push_str("\nResponse tokens (the generated tokens that went back into the model):\n\n");
        header(&mut s, &attacks, &[]);
        for set in &r.settings {
            s.push_str(&format!("| {} |", set.name));
            for a in &set.attacks {
                match &a.response {
                    Some(c) => s.push_str(&cell(c.accuracy, c.ci95)),
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
    }
    beliefs_table(&mut s, r);
    s
}

/// The attacks that report beliefs (the ideal attack): information on the true token and the
/// paired test against the prior.
fn beliefs_table(s: &mut String, r: &Report) {
    let rows: Vec<(&str, &AttackScore)> = r
        .settings
        .iter()
        .flat_map(|set| {
            set.attacks
                .iter()
                .filter(|a| {
                    a.information.is_some() || a.paired.is_some() || a.true_prefix.is_some()
                })
                .map(move |a| (set.name.as_str(), a))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    s.push_str(
        "\nInformation and paired test (prompt and response positions; a position is right when \
         the i-th guess is the i-th token). Bits: mean log2 P_post(true) − log2 P_prior(true) over \
         the candidate set, 0 where the true token is not a candidate. Paired: exact McNemar of \
         the attack against the prior's own most probable candidate after the same prefix (the \
         model prior alone); the prior-only beam search's positions right are shown beside. True \
         prefix: the same information along the true tokens, each position's posterior given \
         every other true token (a bound the scorer measures, not an attack).\n\n",
    );
    s.push_str(
        "| setting | attack | bits/token (95 %) | covered | positions right: attack / prior | \
         attack only : prior only | McNemar p | prior-only beam | true prefix: bits/token (95 %) \
         | true prefix: top-1 posterior / prior |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let pct = |k: usize, n: usize| format!("{:.1} %", 100.0 * k as f64 / n.max(1) as f64);
    for (name, a) in rows {
        let (bits, covered) = match &a.information {
            Some(i) => (
                format!(
                    "{:.3} ({:.3}–{:.3})",
                    i.bits_per_token, i.bits_ci95[0], i.bits_ci95[1]
                ),
                format!("{}/{}", i.covered, i.positions),
            ),
            None => ("–".into(), "–".into()),
        };
        let (right, discordant, p, beam) = match &a.paired {
            Some(p) => (
                format!(
                    "{} / {}",
                    pct(p.attack_correct, p.positions),
                    pct(p.baseline_correct, p.positions)
                ),
                format!("{} : {}", p.attack_only, p.baseline_only),
                format!("{:.2e}", p.p_value),
                p.prior_beam_correct
                    .map_or("–".into(), |c| pct(c, p.positions)),
            ),
            None => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        let (tp_bits, tp_top) = match &a.true_prefix {
            Some(i) => (
                format!(
                    "{:.3} ({:.3}–{:.3})",
                    i.bits_per_token, i.bits_ci95[0], i.bits_ci95[1]
                ),
                format!(
                    "{:.1} % / {:.1} % (p = {:.2e})",
                    100.0 * i.posterior_top1,
                    100.0 * i.prior_top1,
                    i.top1_p_value
                ),
            ),
            None => ("–".into(), "–".into()),
        };
        s.push_str(&format!(
            "| {name} | {} | {bits} | {covered} | {right} | {discordant} | {p} | {beam} | \
             {tp_bits} | {tp_top} |\n",
            a.attack
        ));
    }
}

/// A table's header and separator rows: the setting, one column per attack, then `extra`.
fn header(s: &mut String, attacks: &[&str], extra: &[&str]) {
    let columns: Vec<&str> = std::iter::once("setting")
        .chain(attacks.iter().copied())
        .chain(extra.iter().copied())
        .collect();
    s.push_str(&format!("| {} |\n", columns.join(" | ")));
    s.push_str(&format!("|{}\n", "---|".repeat(columns.len())));
}

/// A table cell: accuracy and its interval, in percent.
fn cell(accuracy: f64, ci95: [f64; 2]) -> String {
    format!(
        " {:.1} % ({:.1}–{:.1}) |",
        100.0 * accuracy,
        100.0 * ci95[0],
        100.0 * ci95[1]
    )
}

/// Draws the PNG with the project's Python helper (matplotlib, pinned in tools/requirements.txt).
fn plot(out: &Path, stem: &str) -> Result<()> {
    let python = std::env::var_os("TALARIA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/plot_attacks.py");
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(out.join(format!("{stem}.json")))
        .arg(out.join(format!("{stem}.png")))
        .status()
        .with_context(|| {
            format!(
                "running {} (set TALARIA_PYTHON, or make the venv: scripts/test.sh does; \
                 --no-plot skips the plot)",
                python.display()
            )
        })?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}
