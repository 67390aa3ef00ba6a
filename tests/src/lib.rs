//! Support for Talaria's integration tests: the real model (fetched and verified on first use),
//! the golden files, and a tiny random-weight `llama` GGUF written from scratch.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use talaria_gguf::{GgmlType, GgufWriter, TensorPayload, Value, quantize_q4_1, quantize_q8_0};
use talaria_model_store as store;

pub mod cluster;

/// The repository root: `$TALARIA_REPO_ROOT` (a test binary run from another checkout, as the
/// device check does), else where this crate was built.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("TALARIA_REPO_ROOT") {
        return root.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The real SmolLM2-135M-Instruct GGUF, fetched into the model cache if it is not there yet.
pub fn real_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = store::home();
        store::fetch(&dir, &store::SMOLLM2_135M)
            .unwrap_or_else(|e| panic!("cannot fetch the real model into {}: {e}", dir.display()))
            .path()
            .to_path_buf()
    })
    .clone()
}

/// The bytes of a hex text file.
pub fn hex_file(path: &Path) -> Vec<u8> {
    hex::decode(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

/// A golden file under `tests/golden/`, parsed.
pub fn golden(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One golden prompt and the reference's greedy answer to it (`tests/golden/`).
pub struct GoldenCase {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    /// The greedy ids of the float64 reference forward pass.
    pub ids: Vec<u32>,
}

impl GoldenCase {
    /// Its greedy request, stopping at `eos`.
    pub fn request(&self, eos: u32) -> talaria_engine::GenerateRequest {
        talaria_engine::GenerateRequest {
            prompt_ids: self.prompt_ids.clone(),
            max_tokens: self.max_tokens,
            sampling: talaria_engine::SamplingParams::default(),
            stop_ids: vec![eos],
        }
    }
}

/// Every golden prompt with its reference answer, in file order.
pub fn golden_cases() -> Vec<GoldenCase> {
    let reference = golden("greedy.json");
    let prompts = golden("prompts.json");
    let results = reference["results"].as_array().expect("results");
    let prompts = prompts["prompts"].as_array().expect("prompts");
    assert_eq!(results.len(), prompts.len(), "one result per golden prompt");
    results
        .iter()
        .zip(prompts)
        .map(|(r, p)| GoldenCase {
            name: r["name"].as_str().unwrap_or_default().to_string(),
            prompt_ids: ids(&r["prompt_ids"]),
            max_tokens: p["max_tokens"].as_u64().expect("max_tokens") as usize,
            ids: ids(&r["ids"]),
        })
        .collect()
}

/// Token ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// GPT-2's byte-to-character map used by byte-level BPE vocabularies.
pub fn byte_chars() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    map
}

/// Knobs of the tiny model, including ways to break it.
#[derive(Debug, Clone)]
pub struct TinyOptions {
    pub seed: u64,
    pub architecture: String,
    pub context_length: u32,
    /// Leave this tensor out.
    pub drop_tensor: Option<String>,
    /// Store this tensor with the right element count but a wrong shape.
    pub misshape_tensor: Option<String>,
}

impl Default for TinyOptions {
    fn default() -> Self {
        Self {
            seed: 1,
            architecture: "llama".into(),
            context_length: 64,
            drop_tensor: None,
            misshape_tensor: None,
        }
    }
}

/// Dimensions of the tiny model.
pub const TINY_D: usize = 64;
pub const TINY_HEADS: usize = 4;
pub const TINY_KV_HEADS: usize = 2;
pub const TINY_FF: usize = 128;
pub const TINY_LAYERS: usize = 2;

/// Specials, then the 256 byte characters, then the merges' products.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const TINY_MERGES: [(&str, &str); 6] = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "t"),
    ("Ġt", "he"),
];

/// A tiny random-weight `llama` GGUF with a byte-level BPE tokenizer, as bytes.
pub fn tiny_model(opts: &TinyOptions) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    tokens.extend(TINY_MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let vocab = tokens.len();
    let mut types = vec![Value::I32(3); TINY_SPECIALS.len()];
    types.resize(vocab, Value::I32(1));

    let mut w = GgufWriter::new();
    let arch = &opts.architecture;
    w.kv("general.architecture", Value::String(arch.clone()))
        .kv("llama.block_count", Value::U32(TINY_LAYERS as u32))
        .kv("llama.context_length", Value::U32(opts.context_length))
        .kv("llama.embedding_length", Value::U32(TINY_D as u32))
        .kv("llama.feed_forward_length", Value::U32(TINY_FF as u32))
        .kv("llama.attention.head_count", Value::U32(TINY_HEADS as u32))
        .kv(
            "llama.attention.head_count_kv",
            Value::U32(TINY_KV_HEADS as u32),
        )
        .kv("llama.rope.freq_base", Value::F32(10_000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String("smollm".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        )
        .kv("tokenizer.ggml.token_type", Value::Array(types))
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(
                TINY_MERGES
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false));

    let kv = TINY_KV_HEADS * (TINY_D / TINY_HEADS);
    let mut add =
        |name: String, d_in: usize, d_out: usize, ty: GgmlType, scale: f32, around: f32| {
            if opts.drop_tensor.as_deref() == Some(name.as_str()) {
                return;
            }
            let values: Vec<f32> = (0..d_in * d_out)
                .map(|_| around + scale * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            let bytes = match ty {
                GgmlType::Q4_1 => quantize_q4_1(&values),
                GgmlType::Q8_0 => quantize_q8_0(&values),
                _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let mut dims = if d_out == 1 {
                vec![d_in as u64]
            } else {
                vec![d_in as u64, d_out as u64]
            };
            if opts.misshape_tensor.as_deref() == Some(name.as_str()) {
                // Same element count, other shape: only a shape check can catch it.
                dims.reverse();
                if dims.len() == 1 {
                    dims = vec![d_in as u64 / 2, 2];
                }
            }
            w.tensor(TensorPayload {
                name,
                dims,
                ty,
                bytes,
            });
        };
    add(
        "token_embd.weight".into(),
        TINY_D,
        vocab,
        GgmlType::Q8_0,
        1.0,
        0.0,
    );
    add(
        "output_norm.weight".into(),
        TINY_D,
        1,
        GgmlType::F32,
        0.3,
        1.0,
    );
    for l in 0..TINY_LAYERS {
        let n = |t: &str| format!("blk.{l}.{t}.weight");
        add(n("attn_norm"), TINY_D, 1, GgmlType::F32, 0.3, 1.0);
        add(n("ffn_norm"), TINY_D, 1, GgmlType::F32, 0.3, 1.0);
        add(n("attn_q"), TINY_D, TINY_D, GgmlType::Q4_1, 0.2, 0.0);
        add(n("attn_k"), TINY_D, kv, GgmlType::Q4_1, 0.2, 0.0);
        add(n("attn_v"), TINY_D, kv, GgmlType::Q4_1, 0.2, 0.0);
        add(n("attn_output"), TINY_D, TINY_D, GgmlType::Q4_1, 0.2, 0.0);
        add(n("ffn_gate"), TINY_D, TINY_FF, GgmlType::Q4_1, 0.2, 0.0);
        add(n("ffn_up"), TINY_D, TINY_FF, GgmlType::Q4_1, 0.2, 0.0);
        add(n("ffn_down"), TINY_FF, TINY_D, GgmlType::Q4_1, 0.2, 0.0);
    }
    w.to_bytes()
}

/// Writes the tiny model into `dir` and returns its path.
pub fn write_tiny_model(dir: &Path, opts: &TinyOptions) -> PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_model(opts)).unwrap();
    path
}

/// The calibration checked in for the default model.
pub fn calibration() -> talaria_params::Calibration {
    let path = repo_root().join("calibration/smollm2-135m.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The masked engine on a model file, composed as the CLI composes it: the cloud side reads the
/// file and provisions the CVM side, and the two meet only through a postcard loopback.
pub struct RemoSplit<L: talaria_wire::CloudLink> {
    pub tokenizer: talaria_engine::Tokenizer,
    pub model: talaria_engine::Transformer,
    pub linear: talaria_cvm_agent::RemoLinear<L>,
}

/// Builds a [`RemoSplit`]; `wrap` may put something (a tamperer) between the two sides.
pub fn remo_split<L: talaria_wire::CloudLink>(
    path: &Path,
    config: talaria_params::RemoConfig,
    tap: Option<&Path>,
    wrap: impl FnOnce(talaria_gpu_node::CloudExecutor) -> L,
) -> Result<RemoSplit<L>, talaria_cvm_agent::AgentError> {
    let f = talaria_gguf::GgufFile::open(path).unwrap();
    let provision = talaria_model_file::read_provision(&f).unwrap();
    let mut weights = talaria_gpu_node::LinearWeights::load(&f, &provision.config).unwrap();
    if config.precision.is_int() {
        weights.load_int(&f).unwrap();
    }
    let tap = tap.map(|d| talaria_gpu_node::Tap::create(d).unwrap());
    let cloud = talaria_gpu_node::CloudExecutor::new(weights, tap);
    let config_model = provision.config.clone();
    let (tokenizer, model) = provision.build().unwrap();
    let linear = talaria_cvm_agent::RemoLinear::connect(
        &config_model,
        config,
        &calibration(),
        1,
        Some([42; 32]),
        wrap(cloud),
    )?;
    Ok(RemoSplit {
        tokenizer,
        model,
        linear,
    })
}

/// The plain engine's greedy ids for `prompt_ids`, stopping at end-of-sequence: what every
/// other engine must answer.
pub fn plain_greedy(
    plain: &mut talaria_gpu_node::PlainEngine,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
) -> Vec<u32> {
    let eos = plain.tokenizer.eos();
    talaria_engine::generate(
        &plain.model,
        &mut plain.weights,
        &talaria_engine::GenerateRequest {
            prompt_ids,
            max_tokens,
            sampling: talaria_engine::SamplingParams::default(),
            stop_ids: vec![eos],
        },
        |_| Ok(()),
        None,
    )
    .unwrap()
    .ids
}
