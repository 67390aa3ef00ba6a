//! The tokenizer, built from the GGUF's own `tokenizer.ggml.*` metadata, and the chat template.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecodeStream, ModelWrapper, NormalizerWrapper, PostProcessorWrapper};
use tokenizers::{DecoderWrapper, PreTokenizerWrapper, TokenizerImpl};

use crate::EngineError;

type Inner = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// GGUF token types that mark special tokens: 3 = control, 4 = user-defined.
const SPECIAL_TOKEN_TYPES: [i32; 2] = [3, 4];

/// Byte-level BPE tokenizer of a GGUF model.
pub struct Tokenizer {
    inner: Inner,
    eos: u32,
    bos: Option<u32>,
    specials: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// Everything needed to build the tokenizer, as a model file describes it (`tokenizer.ggml.*`).
///
/// The cloud extracts it from the model file and provisions it to the CVM.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`; only `gpt2` (byte-level BPE) is implemented.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name.
    pub pre: String,
    pub tokens: Vec<String>,
    /// GGUF token types (1 normal, 3 control, 4 user-defined, ...).
    pub token_types: Vec<i32>,
    /// Merges as `"left right"`.
    pub merges: Vec<String>,
    pub eos: u32,
    pub bos: Option<u32>,
    pub add_bos: bool,
}

impl Tokenizer {
    /// Builds the tokenizer a spec describes.
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self, EngineError> {
        if spec.model != "gpt2" {
            return Err(EngineError::Unsupported(format!(
                "tokenizer model {:?} (only byte-level BPE, \"gpt2\", is implemented)",
                spec.model
            )));
        }
        let pre_tokenizer: PreTokenizerWrapper = match spec.pre.as_str() {
            // SmolLM: every digit on its own, then the GPT-2 byte-level split.
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(EngineError::Unsupported(format!(
                    "pre-tokenizer {other:?} (implemented: smollm, gpt2)"
                )));
            }
        };
        let tokens = &spec.tokens;
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(EngineError::InvalidModel(
                "duplicate tokens in vocabulary".into(),
            ));
        }
        let merges = spec
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| EngineError::InvalidModel(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Inner::new(ModelWrapper::from(bpe));
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevelDecoder::default()));

        if spec.token_types.len() != tokens.len() {
            return Err(EngineError::InvalidModel(format!(
                "{} token types for {} tokens",
                spec.token_types.len(),
                tokens.len()
            )));
        }
        let specials: Vec<u32> = spec
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| SPECIAL_TOKEN_TYPES.contains(t))
            .map(|(i, _)| i as u32)
            .collect();
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|&i| AddedToken::from(tokens[i as usize].clone(), true))
            .collect();
        inner.add_special_tokens(&added);
        for id in [Some(spec.eos), spec.bos].into_iter().flatten() {
            if id as usize >= tokens.len() {
                return Err(EngineError::InvalidModel(format!(
                    "special token id {id} is outside the vocabulary of {}",
                    tokens.len()
                )));
            }
        }
        Ok(Self {
            inner,
            eos: spec.eos,
            bos: if spec.add_bos { spec.bos } else { None },
            specials,
        })
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognised, and BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// An incremental decoder that yields text only once it is complete UTF-8.
    pub fn decode_stream(&self) -> TextStream<'_> {
        TextStream(self.inner.decode_stream(false))
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Control and user-defined tokens.
    pub fn special_tokens(&self) -> &[u32] {
        &self.specials
    }

    /// Size of the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Text of a growing sequence of ids, one piece per token.
pub struct TextStream<'a>(
    DecodeStream<
        'a,
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
);

impl TextStream<'_> {
    /// Adds one token; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, EngineError> {
        self.0.step(id).map_err(tok_err)
    }
}

/// The default system prompt of SmolLM2's chat template, used when none is given.
pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Renders a conversation with the ChatML template of SmolLM2 and opens the assistant's turn.
///
/// As the model's own template does, a system message is added when the first message is not one.
pub fn chat_prompt(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    if messages.first().is_none_or(|m| m.role != "system") {
        s.push_str(&format!(
            "<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        ));
    }
    for m in messages {
        s.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    s.push_str("<|im_start|>assistant\n");
    s
}
