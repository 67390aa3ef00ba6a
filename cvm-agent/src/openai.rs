//! The tenant-facing HTTP API of a cvm-agent, compatible with OpenAI's: `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions` (both with `stream: true` as
//! server-sent events), plus `GET /metrics`.
//!
//! It is served over HTTPS with the same certificate (the same key) the agent's attestation
//! binds, so a tenant that verified the agent knows whom it is talking to. Every request runs
//! in a session of its own through [`Tenancy`]; errors come back in OpenAI's error shape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, Json};
use actix_web::{HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::{Value, json};
use talaria_engine::first_stop;
use talaria_engine::{ChatMessage, Generation, SamplingParams, StopReason};
use talaria_wire::{ErrorReply, Prompt, TenantEvent, TenantRequest};
use tokio::sync::mpsc;

use crate::cluster::Principal;
use crate::session::{Tenancy, UplinkHealth};
use talaria_actors::metrics;

/// What the API serves: the model's id and the sessions.
#[derive(Clone)]
pub struct Api {
    pub model: String,
    pub tenancy: Tenancy,
    /// Longest generation a request may ask for (and the default of chat completions).
    pub max_tokens: usize,
    /// SHA-256 of the API keys accepted (`Authorization: Bearer <key>`); none: every `/v1`
    /// request is refused.
    pub api_keys: Arc<Vec<[u8; 32]>>,
    /// The uplink's state, which `GET /health` reports.
    pub health: UplinkHealth,
}

impl Api {
    fn limits(&self) -> Limits<'_> {
        Limits {
            model: &self.model,
            max_tokens: self.max_tokens,
        }
    }
}

/// Whether `headers` carry a bearer key whose SHA-256 is one of `keys`. The presented key is
/// hashed before any comparison, so the time taken says nothing about how much of it matched.
fn authorize(
    keys: &[[u8; 32]],
    headers: &actix_web::http::header::HeaderMap,
) -> Result<Principal, ApiError> {
    let presented = headers
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let refuse = |message: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    };
    let Some(key) = presented else {
        return Err(refuse(
            "no API key: send it as `Authorization: Bearer <key>` (the client's api_key)",
        ));
    };
    if let Some(digest) = talaria_actors::accepted_key(keys, key.trim()) {
        Ok(Principal(digest))
    } else {
        Err(refuse("incorrect API key"))
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: String,
    message: String,
    param: Option<&'static str>,
    /// Already in `talaria_errors_total`: an error the generation answered with is counted
    /// where it was made (the session, or the admission), so the response does not count it
    /// again.
    counted: bool,
}

impl ApiError {
    /// An error this API makes (not yet counted).
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
            counted: false,
        }
    }

    /// The same, naming the request's parameter at fault.
    fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            message,
        )
        .with_param(param)
    }

    /// A body that is not a request of this API's shape.
    fn invalid_json(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("the body is not a valid request: {e}"),
        )
    }

    /// The HTTP form of an error the generation answered with.
    fn from_reply(e: &ErrorReply) -> Self {
        let (status, kind) = match e.error_type.as_str() {
            "empty_prompt"
            | "token_out_of_range"
            | "context_full"
            | "context_length_exceeded"
            | "tokenizer"
            | "sampling"
            | "bad_request" => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            "too_many_sessions" | "overloaded" => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            "node_unavailable" | "connection" | "no_route" | "not_admitted" | "unknown_session"
            | "deadline_exceeded" => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            // The cloud answered with a wrong product: a bad upstream, not a retryable outage.
            "integrity" => (StatusCode::BAD_GATEWAY, "server_error"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        Self {
            counted: true,
            ..Self::new(status, kind, e.error_type.clone(), e.message.clone())
        }
    }

    /// The machine-readable code (`invalid_json`, `invalid_value`, ...).
    pub fn code(&self) -> &str {
        &self.code
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        // The message may quote the tenant's own text (a bad value, a model name): it goes back
        // to the tenant only. The log names the field, never its value.
        tracing::warn!(
            status = %self.status,
            error_type = %self.code,
            param = self.param.unwrap_or("-"),
            "API request refused"
        );
        if !self.counted {
            metrics::error(&self.code);
        }
        let mut response = HttpResponse::build(self.status);
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            // Busy or briefly without its cloud: worth retrying soon (OpenAI's clients do).
            response.insert_header(("Retry-After", "1"));
        }
        padded_body(response, &self.body())
    }
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of a completion: text, or token ids (one prompt per request).
#[derive(Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

/// `content` of a chat message: text, or a list of parts of which text parts are read.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    /// OpenAI's name for padding the stream's events (`obfuscation`): on unless the tenant's
    /// own request turns it off, over the channel only it and the attested agent read.
    #[serde(default = "padded_by_default")]
    include_obfuscation: bool,
}

fn padded_by_default() -> bool {
    true
}

/// The parameters both endpoints share (unknown fields are ignored, as OpenAI's clients send
/// ones this server has no use for).
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
    #[serde(default)]
    echo: bool,
    /// vLLM's extension: conversations are reused only within one key and salt.
    cache_salt: Option<String>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: CompletionPrompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint: it decides the JSON objects of the answer.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// What a request body is checked against: the model served and the longest generation.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub model: &'a str,
    pub max_tokens: usize,
}

impl Limits<'_> {
    /// The tenant request the common parameters describe.
    fn request(
        &self,
        c: &Common,
        prompt: Prompt,
        default_max: usize,
    ) -> Result<TenantRequest, ApiError> {
        if c.model != self.model {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "The model `{}` does not exist (this agent serves `{}`)",
                    c.model, self.model
                ),
            )
            .with_param("model"));
        }
        if c.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
        if c.echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        let max_tokens = c
            .max_completion_tokens
            .or(c.max_tokens)
            .unwrap_or(default_max);
        if max_tokens == 0 || max_tokens > self.max_tokens {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be in 1..={}", self.max_tokens),
            ));
        }
        let temperature = c.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                "temperature must be in [0, 2]",
            ));
        }
        let stop = match &c.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
            Some(Stop::Many(_)) => {
                return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
            }
        };
        let sampling = SamplingParams {
            temperature,
            top_k: 0,
            top_p: c.top_p.unwrap_or(1.0),
            seed: c.seed.map_or_else(rand::random, |s| s as u64),
        };
        // The engine's own check; the temperature passed the stricter one above, so what it
        // can still refuse is top_p.
        sampling
            .validate()
            .map_err(|e| ApiError::invalid("top_p", e.to_string()))?;
        Ok(TenantRequest {
            prompt,
            max_tokens,
            sampling,
            ignore_eos: false,
            stop,
            cache_salt: c.cache_salt.clone(),
        })
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Eos | StopReason::Stopped => "stop",
        StopReason::Length | StopReason::Context => "length",
    }
}

/// Holds back streamed text that could be the start of a stop sequence, so the stream never
/// shows what the final text leaves out.
struct StopFilter {
    stops: Vec<String>,
    held: String,
    sent: String,
    stopped: bool,
}

impl StopFilter {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            sent: String::new(),
            stopped: false,
        }
    }

    /// Takes a new piece; returns what may be sent now. A stop sequence never starts in what
    /// was sent: any tail that could begin one is held back.
    fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        let held = &self.held;
        let cut = match first_stop(&self.stops, held) {
            Some(at) => {
                self.stopped = true;
                at
            }
            None => {
                let could_start = |s: &String| {
                    (1..s.len().min(held.len() + 1))
                        .rev()
                        .find(|&k| {
                            held.is_char_boundary(held.len() - k)
                                && s.starts_with(&held[held.len() - k..])
                        })
                        .unwrap_or(0)
                };
                held.len() - self.stops.iter().map(could_start).max().unwrap_or(0)
            }
        };
        let out: String = self.held[..cut].to_string();
        self.held = if self.stopped {
            String::new()
        } else {
            self.held[cut..].to_string()
        };
        self.sent.push_str(&out);
        out
    }

    /// What is left to send of the generation's final `text`.
    fn finish(&mut self, text: &str) -> String {
        let rest = text
            .strip_prefix(self.sent.as_str())
            .unwrap_or("")
            .to_string();
        self.sent.push_str(&rest);
        rest
    }
}

/// One streamed chunk (or the whole answer's choice) of either endpoint.
fn choice(kind: Kind, text: Option<&str>, finish: Option<&str>, whole: bool) -> Value {
    match (kind, whole) {
        (Kind::Completion, _) => json!({
            "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
        }),
        (Kind::Chat, true) => json!({
            "index": 0, "logprobs": null, "finish_reason": finish,
            "message": {"role": "assistant", "content": text.unwrap_or(""), "refusal": null},
        }),
        (Kind::Chat, false) => {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
    }
}

fn envelope(kind: Kind, id: &str, created: u64, model: &str, choices: Value, whole: bool) -> Value {
    let object = match (kind, whole) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, true) => "chat.completion",
        (Kind::Chat, false) => "chat.completion.chunk",
    };
    json!({
        "id": id, "object": object, "created": created, "model": model,
        "system_fingerprint": null, "choices": choices,
    })
}

/// OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts the prompt's leading
/// tokens taken from the conversation cache.
fn usage(generation: &Generation) -> Value {
    let (prompt, completion) = (generation.prompt_ids.len(), generation.ids.len());
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    })
}

/// The size every padded event, and every whole answer, is rounded up to. A streamed event
/// is one TLS record that the network (the cloud) sees; unpadded, its length is the token's
/// text length plus a constant, and that sequence of lengths tells an attacker who owns the
/// model much of the answer (`talaria_attacks::stream`). A chunk's envelope is at most about
/// 320 bytes (the topology keeps the model's name to 64 plain bytes), so an event of up to
/// about 190 bytes of JSON text fits one bucket: every token's; text a long stop sequence held
/// back may take two.
pub const PAD_BUCKET: usize = 512;

/// What an `obfuscation` field holding the empty string adds to a compact JSON object that
/// has other fields: `,"obfuscation":""`.
const PAD_FIELD: usize = 17;

/// An event of a stream: `data: <chunk>\n\n`, the chunk padded, when `pad`, with an
/// `obfuscation` field (OpenAI's name; clients ignore it) to a multiple of [`PAD_BUCKET`]
/// bytes.
fn sse(v: &Value, pad: bool) -> Bytes {
    let data = |v: &Value| format!("data: {v}\n\n");
    let mut fields = match v.as_object() {
        Some(fields) if pad => fields.clone(),
        _ => return Bytes::from(data(v)),
    };
    fields.remove("obfuscation");
    if fields.is_empty() {
        // Every chunk and error has fields; this keeps the arithmetic below true regardless.
        fields.insert("object".into(), Value::String("padding".into()));
    }
    let plain = data(&Value::Object(fields.clone())).len();
    let total = (plain + PAD_FIELD).next_multiple_of(PAD_BUCKET);
    fields.insert(
        "obfuscation".into(),
        Value::String("x".repeat(total - plain - PAD_FIELD)),
    );
    Bytes::from(data(&Value::Object(fields)))
}

/// An SSE comment line, which clients skip, then `tail`: one bucket in all.
fn behind_comment(tail: &str) -> Bytes {
    let spaces = PAD_BUCKET - tail.len() - 2;
    Bytes::from(format!(":{}\n{tail}", " ".repeat(spaces)))
}

/// The end of a stream, padded as its events are.
fn sse_done(pad: bool) -> Bytes {
    const DONE: &str = "data: [DONE]\n\n";
    if pad {
        behind_comment(DONE)
    } else {
        Bytes::from_static(DONE.as_bytes())
    }
}

/// What a token that streams no text sends when padded: a comment of one bucket (its blank line
/// ends an event with no data, which clients skip), so that every decode pass is one padded
/// event (a pass without one would show where a multi-byte character or a held-back stop
/// sequence fell).
fn sse_filler() -> Bytes {
    behind_comment("\n")
}

/// A JSON answer (whole or an error), padded with trailing spaces (insignificant in JSON) to a
/// multiple of [`PAD_BUCKET`] bytes: its length would tell the network the answer's length in
/// bytes, or an error's numbers.
fn padded_body(mut response: actix_web::HttpResponseBuilder, v: &Value) -> HttpResponse {
    let mut body = v.to_string();
    let total = body.len().next_multiple_of(PAD_BUCKET);
    body.extend(std::iter::repeat_n(' ', total - body.len()));
    response.content_type("application/json").body(body)
}

/// Runs one request: the whole answer as JSON, or its stream of server-sent events.
async fn answer(
    api: &Api,
    principal: Principal,
    kind: Kind,
    common: &Common,
    prompt: Prompt,
    default_max: usize,
) -> Result<HttpResponse, ApiError> {
    let request = api.limits().request(common, prompt, default_max)?;
    let stops = request.stop.clone();
    // Refused before any header: a busy agent answers 429 to a streaming request too.
    let mut events = api
        .tenancy
        .generate(request, principal)
        .await
        .map_err(|e| ApiError::from_reply(&e))?;
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{:032x}", rand::random::<u128>());
    let (created, model) = (now_s(), api.model.clone());
    if !common.stream {
        loop {
            match events.recv().await {
                Some(TenantEvent::Token { .. }) | Some(TenantEvent::Attestation { .. }) => {}
                Some(TenantEvent::Done {
                    generation, text, ..
                }) => {
                    let mut body = envelope(
                        kind,
                        &id,
                        created,
                        &model,
                        json!([choice(
                            kind,
                            Some(&text),
                            Some(finish_reason(generation.stop_reason)),
                            true
                        )]),
                        true,
                    );
                    body["usage"] = usage(&generation);
                    return Ok(padded_body(HttpResponse::Ok(), &body));
                }
                Some(TenantEvent::Error(e)) => return Err(ApiError::from_reply(&e)),
                None => {
                    return Err(ApiError::from_reply(&ErrorReply::new(
                        "internal",
                        "the session ended without an answer",
                    )));
                }
            }
        }
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let pad = common
        .stream_options
        .as_ref()
        .is_none_or(|o| o.include_obfuscation);
    let sse = move |v: &Value| sse(v, pad);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let chunk_of = move |choices: Value| envelope(kind, &id, created, &model, choices, false);
    actix_rt::spawn(async move {
        let mut filter = StopFilter::new(stops);
        if kind == Kind::Chat {
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
            let _ = tx.send(sse(&chunk_of(first)));
        }
        let mut ended = false;
        while let Some(event) = events.recv().await {
            ended = matches!(event, TenantEvent::Done { .. } | TenantEvent::Error(_));
            let sent = match event {
                TenantEvent::Token { piece, .. } => {
                    let out = piece.map_or_else(String::new, |p| filter.push(&p));
                    if !out.is_empty() {
                        tx.send(sse(&chunk_of(json!([choice(
                            kind,
                            Some(&out),
                            None,
                            false,
                        )]))))
                        .is_ok()
                    } else {
                        !pad || tx.send(sse_filler()).is_ok()
                    }
                }
                TenantEvent::Attestation { .. } => true,
                TenantEvent::Done {
                    generation, text, ..
                } => {
                    let rest = filter.finish(&text);
                    if !rest.is_empty() {
                        let _ = tx.send(sse(&chunk_of(json!([choice(
                            kind,
                            Some(&rest),
                            None,
                            false
                        )]))));
                    } else if pad {
                        // As many events whether or not text was held back to the end.
                        let _ = tx.send(sse_filler());
                    }
                    let _ = tx.send(sse(&chunk_of(json!([choice(
                        kind,
                        None,
                        Some(finish_reason(generation.stop_reason)),
                        false
                    )]))));
                    if include_usage {
                        let mut last = chunk_of(json!([]));
                        last["usage"] = usage(&generation);
                        let _ = tx.send(sse(&last));
                    }
                    break;
                }
                TenantEvent::Error(e) => {
                    // Headers are gone already: the error travels as an event of its own.
                    let _ = tx.send(sse(&ApiError::from_reply(&e).body()));
                    break;
                }
            };
            if !sent {
                // The client went away: dropping `events` cancels the generation.
                return;
            }
        }
        if !ended {
            // The session stopped without a last word (its worker died): the stream still
            // ends with an error event, never a silent cut.
            let e = ErrorReply::new("internal", "the generation ended without an answer");
            let _ = tx.send(sse(&ApiError::from_reply(&e).body()));
        }
        let _ = tx.send(sse_done(pad));
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, actix_web::Error>(b), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body))
}

/// `GET /health`: 200 while the agent is connected to and admitted by its coordinator, 503
/// (with the same JSON shape) while it is not.
async fn health(api: web::Data<Api>) -> HttpResponse {
    if api.health.is_up() {
        HttpResponse::Ok().json(json!({"status": "ok", "uplink": "up"}))
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(json!({"status": "unavailable", "uplink": "down"}))
    }
}

async fn models(api: web::Data<Api>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"object": "list", "data": [
        {"id": api.model, "object": "model", "created": 0, "owned_by": "talaria"}
    ]}))
}

/// The prompt of a completion body.
fn completion_prompt(prompt: CompletionPrompt) -> Result<Prompt, ApiError> {
    Ok(match prompt {
        CompletionPrompt::Text(text) => Prompt::Text { text, chat: false },
        CompletionPrompt::Texts(mut v) if v.len() == 1 => Prompt::Text {
            text: v.remove(0),
            chat: false,
        },
        CompletionPrompt::Texts(_) => {
            return Err(ApiError::invalid("prompt", "one prompt per request"));
        }
        CompletionPrompt::Ids(ids) => Prompt::Ids(ids),
    })
}

/// The conversation of a chat body.
fn chat_prompt(messages: Vec<Message>) -> Result<Prompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let role = match m.role.as_str() {
            "developer" => "system".to_string(),
            "system" | "user" | "assistant" => m.role,
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unsupported role {other:?}"),
                ));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!("unsupported content part {kind:?}"),
                            ));
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(Prompt::Chat(out))
}

/// OpenAI's default `max_tokens` for completions.
const COMPLETION_DEFAULT_MAX: usize = 16;

/// Decodes and checks a JSON body of `POST /v1/completions` (`chat`: of
/// `/v1/chat/completions`) as the routes do: the tenant request it asks for, or the error the
/// API answers. Pure (no session is started): what the fuzz targets drive.
pub fn decode_body(limits: Limits<'_>, chat: bool, json: &[u8]) -> Result<TenantRequest, ApiError> {
    let bad = ApiError::invalid_json;
    if chat {
        let body: ChatBody = serde_json::from_slice(json).map_err(bad)?;
        limits.request(&body.common, chat_prompt(body.messages)?, limits.max_tokens)
    } else {
        let body: CompletionBody = serde_json::from_slice(json).map_err(bad)?;
        let default_max = COMPLETION_DEFAULT_MAX.min(limits.max_tokens);
        limits.request(&body.common, completion_prompt(body.prompt)?, default_max)
    }
}

async fn completions(
    api: web::Data<Api>,
    principal: web::ReqData<Principal>,
    body: Json<CompletionBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let prompt = completion_prompt(body.prompt)?;
    answer(
        &api,
        *principal,
        Kind::Completion,
        &body.common,
        prompt,
        COMPLETION_DEFAULT_MAX.min(api.max_tokens),
    )
    .await
}

async fn chat(
    api: web::Data<Api>,
    principal: web::ReqData<Principal>,
    body: Json<ChatBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let prompt = chat_prompt(body.messages)?;
    answer(
        &api,
        *principal,
        Kind::Chat,
        &body.common,
        prompt,
        api.max_tokens,
    )
    .await
}

/// A JSON body that does not parse: OpenAI's 400 shape, not actix's plain text.
fn json_error(
    err: actix_web::error::JsonPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::invalid_json(err).into()
}

/// The app: the three OpenAI routes and `/metrics`.
pub fn configure(api: Api) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(api.clone()))
            .app_data(
                web::JsonConfig::default()
                    .limit(4 << 20)
                    .error_handler(json_error),
            )
            .service(
                web::scope("/v1")
                    // The key is checked before anything of the request is read.
                    .wrap_fn({
                        let keys = api.api_keys.clone();
                        move |req, srv| {
                            use actix_web::HttpMessage;
                            use actix_web::dev::Service;
                            match authorize(&keys, req.headers()) {
                                Ok(principal) => {
                                    req.extensions_mut().insert(principal);
                                    let fut = srv.call(req);
                                    Box::pin(
                                        async move { fut.await.map(|r| r.map_into_boxed_body()) },
                                    )
                                        as futures::future::LocalBoxFuture<'static, _>
                                }
                                Err(e) => {
                                    let response = req.into_response(e.error_response());
                                    Box::pin(async move { Ok(response) })
                                }
                            }
                        }
                    })
                    .route("/models", web::get().to(models))
                    .route("/completions", web::post().to(completions))
                    .route("/chat/completions", web::post().to(chat)),
            )
            // Counters and histograms only: no tenant text, no key needed.
            .route("/metrics", web::get().to(metrics::metrics_route))
            // For supervisors: up only while the agent can reach its cloud.
            .route("/health", web::get().to(health));
    }
}

/// TLS handshakes in progress a worker of the HTTPS API keeps at once (actix's default is 256).
/// A connection that never starts its handshake holds one until [`TLS_HANDSHAKE_TIMEOUT`]: with
/// the default, a stranger's thousand silent sockets kept the tenant's connection waiting in
/// the accept queue for seconds.
pub const TLS_HANDSHAKES_PER_WORKER: usize = 16 << 10;

/// The longest a TLS handshake on the HTTPS API may take (actix's default is 3 s).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a client may take to send a request's head once connected.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the API on `addr` over HTTPS with `tls`. Must be called inside an actix `System`.
pub fn serve(addr: SocketAddr, api: Api, tls: rustls::ServerConfig) -> std::io::Result<()> {
    let routes = configure(api);
    let server =
        actix_web::HttpServer::new(move || actix_web::App::new().configure(routes.clone()))
            .workers(2)
            .disable_signals()
            .max_connection_rate(TLS_HANDSHAKES_PER_WORKER)
            .tls_handshake_timeout(TLS_HANDSHAKE_TIMEOUT)
            .client_request_timeout(REQUEST_HEAD_TIMEOUT)
            .bind_rustls_0_23(addr, tls)?
            .run();
    actix_rt::spawn(server);
    tracing::info!(%addr, "serving the OpenAI-compatible API over HTTPS");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ApiError, Limits, PAD_BUCKET, StopFilter, decode_body, sse, sse_done, sse_filler};
    use actix_web::ResponseError;
    use actix_web::http::StatusCode;
    use talaria_wire::ErrorReply;

    #[test]
    fn every_padded_event_is_whole_buckets_and_reads_as_the_chunk_it_pads() {
        let texts = [
            String::new(),
            "a".into(),
            " Paris".into(),
            "\n\t\"quoted\" \\ back".into(),
            "\u{1}\u{1f}".repeat(40),
            "é日本🦀".repeat(30),
            "x".repeat(260),
            "y".repeat(1500),
        ];
        for text in &texts {
            let chunk = serde_json::json!({
                "id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 1,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
            });
            for v in [
                chunk,
                serde_json::json!({"obfuscation": "stale"}),
                serde_json::json!({}),
            ] {
                let event = sse(&v, true);
                assert_eq!(
                    event.len() % PAD_BUCKET,
                    0,
                    "{text:?}: {} bytes",
                    event.len()
                );
                let line = std::str::from_utf8(&event).unwrap();
                let json: serde_json::Value =
                    serde_json::from_str(line.strip_prefix("data: ").unwrap().trim_end()).unwrap();
                for (key, value) in v.as_object().unwrap() {
                    if key != "obfuscation" {
                        assert_eq!(&json[key], value);
                    }
                }
                // Unpadded, the event is the chunk as it is.
                assert_eq!(sse(&v, false), format!("data: {v}\n\n").as_bytes());
            }
        }
        for bytes in [sse_done(true), sse_filler()] {
            assert_eq!(bytes.len(), PAD_BUCKET);
            let text = std::str::from_utf8(&bytes).unwrap();
            assert!(text.starts_with(':') && text.ends_with("\n\n"), "{text:?}");
        }
        assert!(sse_done(true).ends_with(b"\ndata: [DONE]\n\n"));
    }

    #[test]
    fn busy_and_unreachable_are_retryable_and_an_overlong_prompt_is_the_clients_error() {
        for (error_type, status, retry) in [
            ("overloaded", StatusCode::TOO_MANY_REQUESTS, true),
            ("too_many_sessions", StatusCode::TOO_MANY_REQUESTS, true),
            ("deadline_exceeded", StatusCode::SERVICE_UNAVAILABLE, true),
            ("connection", StatusCode::SERVICE_UNAVAILABLE, true),
            ("context_length_exceeded", StatusCode::BAD_REQUEST, false),
            ("integrity", StatusCode::BAD_GATEWAY, false),
        ] {
            let response = ApiError::from_reply(&ErrorReply::new(error_type, "x")).error_response();
            assert_eq!(response.status(), status, "{error_type}");
            assert_eq!(
                response.headers().contains_key("retry-after"),
                retry,
                "{error_type}"
            );
        }
    }

    #[test]
    fn bodies_decode_into_requests_or_typed_errors() {
        let limits = Limits {
            model: "m",
            max_tokens: 100,
        };
        let chat = br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
        assert_eq!(decode_body(limits, true, chat).unwrap().max_tokens, 100);
        let completion = br#"{"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}"#;
        assert_eq!(
            decode_body(limits, false, completion).unwrap().max_tokens,
            5
        );
        for (chat, body, code) in [
            (true, &b"{"[..], "invalid_json"),
            (true, br#"{"model": "m", "messages": []}"#, "invalid_value"),
            (
                false,
                br#"{"model": "x", "prompt": "a"}"#,
                "model_not_found",
            ),
            (
                false,
                br#"{"model": "m", "prompt": "a", "max_tokens": 101}"#,
                "invalid_value",
            ),
        ] {
            assert_eq!(decode_body(limits, chat, body).unwrap_err().code(), code);
        }
    }

    #[test]
    fn text_that_may_start_a_stop_sequence_is_held_back() {
        let mut f = StopFilter::new(vec!["END".into(), String::new()]);
        assert_eq!(f.push("Hello E"), "Hello ");
        assert_eq!(f.push("N"), "");
        // "E", "N", "D": the stop sequence is complete; nothing from it on is sent.
        assert_eq!(f.push("Dless"), "");
        assert!(f.stopped);
        // The generation's text ends before the stop sequence; nothing is left to send.
        assert_eq!(f.finish("Hello "), "");
    }

    #[test]
    fn a_false_start_is_released_and_the_final_text_completes_the_stream() {
        let mut f = StopFilter::new(vec!["\n\n".into()]);
        assert_eq!(f.push("one\n"), "one");
        assert_eq!(f.push("two"), "\ntwo");
        assert_eq!(f.finish("one\ntwo three"), " three");
        let mut plain = StopFilter::new(vec![]);
        assert_eq!(plain.push("as is\n"), "as is\n");
    }
}
