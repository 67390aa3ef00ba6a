//! The weight-dependent half: the block projections and the LM head, held as burn tensors.
//!
//! Norm gains are folded into the projection that follows each norm (W' = diag(γ)·W), so the
//! weight-free half runs gain-free norms.

use burn::backend::Flex;
use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;
use talaria_gguf::GgufFile;
use talaria_model_file::{OpSource, block_sources, lm_head_source, load_vector};
use talaria_topology::Backend as Placement;

use talaria_engine::{BlockOp, EngineError, LinearOps, ModelConfig, OpId, Rows};

use crate::NodeError;
use crate::int_weights::IntWeights;
use talaria_kernels::IntWeight;

/// The tensor backend of the CPU build.
pub type CpuBackend = Flex;

/// The tensor backend of the `cuda` build's GPU stages.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;

type Matrix<B> = Tensor<B, 2>;
type Device<B> = <B as burn::tensor::backend::BackendTypes>::Device;

/// A `[d_in, d_out]` projection split by output columns into shards that run in parallel.
///
/// burn's CPU matmul only goes multi-threaded for large products, so decode's one-row calls
/// would use one core; column shards put every core on every call.
struct Sharded<B: Backend> {
    /// The weight, or with [`Split::Tf32`] its TF32-representable high part.
    shards: Vec<(Matrix<B>, usize)>,
    /// With [`Split::Tf32`]: `W − hi`, exact in f32 (one shard).
    lo: Option<Matrix<B>>,
    /// f64 copies, made on the first f64 call (the lossless mode's GEMM).
    shards_f64: OnceLock<Vec<Matrix<B>>>,
    d_in: usize,
    d_out: usize,
}

/// Rounds to the nearest TF32 value (10 explicit mantissa bits, ties to even).
fn round_tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    let b = v.to_bits();
    f32::from_bits(b.wrapping_add(0x0fff + ((b >> 13) & 1)) & !0x1fff)
}

/// Splits `v` into a TF32 high part and the exact f32 rest.
fn split_tf32(v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    v.iter()
        .map(|&x| {
            let hi = round_tf32(x);
            (hi, x - hi)
        })
        .unzip()
}

/// How a projection is laid out for its backend.
#[derive(Clone, Copy, PartialEq)]
enum Split {
    /// As is: the CPU's f32 GEMM is exact f32 arithmetic.
    None,
    /// High and low parts for GPUs whose f32 GEMM runs on TF32 tensor cores (burn-cuda's matmul
    /// always does on Ampere and later). TF32 keeps 10 mantissa bits: ~5e-4 relative error,
    /// which masked rows (σ = 100 times the signal) turn into noise a hundred times the answer,
    /// and the canaries reject it. `x·W ≈ x_hi·W_hi + x_hi·W_lo + x_lo·W_hi` (the 3xTF32 scheme)
    /// brings the products back to f32 accuracy, every product exact in TF32, accumulated in f32.
    Tf32,
}

impl<B: Backend> Sharded<B> {
    fn new(
        values: Vec<f32>,
        d_in: usize,
        d_out: usize,
        n_shards: usize,
        device: &Device<B>,
        split: Split,
    ) -> Self {
        if split == Split::Tf32 {
            let (hi, lo) = split_tf32(&values);
            return Self {
                shards: vec![(
                    Tensor::from_data(TensorData::new(hi, [d_in, d_out]), device),
                    d_out,
                )],
                lo: Some(Tensor::from_data(
                    TensorData::new(lo, [d_in, d_out]),
                    device,
                )),
                shards_f64: OnceLock::new(),
                d_in,
                d_out,
            };
        }
        // Shard widths are multiples of 16 so each stays SIMD-friendly.
        let step = d_out.div_ceil(n_shards.max(1)).div_ceil(16) * 16;
        let mut shards = Vec::new();
        let mut c0 = 0;
        while c0 < d_out {
            let w = step.min(d_out - c0);
            let mut part = Vec::with_capacity(d_in * w);
            for row in values.chunks_exact(d_out) {
                part.extend_from_slice(&row[c0..c0 + w]);
            }
            shards.push((
                Tensor::from_data(TensorData::new(part, [d_in, w]), device),
                w,
            ));
            c0 += w;
        }
        Self {
            shards,
            lo: None,
            shards_f64: OnceLock::new(),
            d_in,
            d_out,
        }
    }

    /// `x · W` for `rows` row-major rows of `x` (host values), in f32.
    fn matmul_host(
        &self,
        x: &[f32],
        rows: usize,
        device: &Device<B>,
    ) -> Result<Vec<f32>, EngineError> {
        let upload = |v: Vec<f32>| -> Matrix<B> {
            Tensor::from_data(TensorData::new(v, [rows, self.d_in]), device)
        };
        let Some(lo) = &self.lo else {
            return self.matmul(upload(x.to_vec()), rows);
        };
        let hi = &self.shards[0].0;
        let (x_hi, x_lo) = split_tf32(x);
        let (x_hi, x_lo) = (upload(x_hi), upload(x_lo));
        // Small terms first, so they are not lost against the large one.
        let small = x_hi.clone().matmul(lo.clone()) + x_lo.matmul(hi.clone());
        (small + x_hi.matmul(hi.clone()))
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| EngineError::Backend(format!("{e:?}")))
    }

    /// `x · W` for `rows` rows of `x`, in the element type `E` of `weights`.
    fn run<E: burn::tensor::Element>(
        &self,
        weights: &[Matrix<B>],
        x: Matrix<B>,
        rows: usize,
    ) -> Result<Vec<E>, EngineError> {
        let parts: Vec<Vec<E>> = weights
            .par_iter()
            .map(|w| {
                x.clone()
                    .matmul(w.clone())
                    .into_data()
                    .into_vec::<E>()
                    .map_err(|e| EngineError::Backend(format!("{e:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(self.interleave(parts, rows))
    }

    /// Joins per-shard row-major outputs (`rows × width` each) into `rows × d_out`.
    fn interleave<E: Copy>(&self, parts: Vec<Vec<E>>, rows: usize) -> Vec<E> {
        if parts.len() == 1 {
            return parts.into_iter().next().unwrap_or_default();
        }
        let mut out = Vec::with_capacity(rows * self.d_out);
        for r in 0..rows {
            for (part, (_, w)) in parts.iter().zip(&self.shards) {
                out.extend_from_slice(&part[r * w..(r + 1) * w]);
            }
        }
        out
    }

    fn matmul(&self, x: Matrix<B>, rows: usize) -> Result<Vec<f32>, EngineError> {
        let weights: Vec<Matrix<B>> = self.shards.iter().map(|(w, _)| w.clone()).collect();
        self.run(&weights, x, rows)
    }

    fn matmul_f64(&self, x: Matrix<B>, rows: usize) -> Result<Vec<f64>, EngineError> {
        let weights = self.shards_f64.get_or_init(|| {
            self.shards
                .iter()
                .map(|(w, _)| w.clone().cast(DType::F64))
                .collect()
        });
        self.run(weights, x, rows)
    }

    /// The whole matrix, row-major `[d_in, d_out]`.
    fn dense(&self) -> Result<Vec<f32>, EngineError> {
        if let Some(lo) = &self.lo {
            let read = |m: &Matrix<B>| {
                m.clone()
                    .into_data()
                    .into_vec::<f32>()
                    .map_err(|e| EngineError::Backend(format!("{e:?}")))
            };
            // hi + lo is W exactly: lo was computed as W − hi in f32 without rounding.
            let (hi, lo) = (read(&self.shards[0].0)?, read(lo)?);
            return Ok(hi.iter().zip(&lo).map(|(h, l)| h + l).collect());
        }
        let parts: Vec<Vec<f32>> = self
            .shards
            .iter()
            .map(|(w, _)| {
                w.clone()
                    .into_data()
                    .into_vec::<f32>()
                    .map_err(|e| EngineError::Backend(format!("{e:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(self.interleave(parts, self.d_in))
    }
}

/// The projections of one decoder block, each `[d_in, d_out]`.
struct BlockWeights<B: Backend> {
    qkv: Sharded<B>,
    attn_out: Sharded<B>,
    gate_up: Sharded<B>,
    down: Sharded<B>,
}

/// A stage's projections on one backend's device.
struct Stack<B: Backend> {
    /// The first layer held; `blocks[i]` is layer `first_layer + i`.
    first_layer: usize,
    blocks: Vec<BlockWeights<B>>,
    lm_head: Option<Sharded<B>>,
    device: Device<B>,
    /// Whether the backend has an f64 GEMM (burn-cuda 0.21's matmul does not).
    f64_gemm: bool,
}

/// The stack on the device the topology chose.
enum Placed {
    Cpu(Stack<Flex>),
    #[cfg(feature = "cuda")]
    Cuda(Stack<CudaBackend>),
}

/// Runs `$body` with `$s` bound to the stack, whatever its backend.
macro_rules! on_stack {
    ($placed:expr, $s:ident => $body:expr) => {
        match $placed {
            Placed::Cpu($s) => $body,
            #[cfg(feature = "cuda")]
            Placed::Cuda($s) => $body,
        }
    };
}

/// The weight-dependent projections of a model, or of one pipeline stage (a range of layers,
/// with or without the LM head), ready for batched `x · W` on the CPU or a CUDA device.
pub struct LinearWeights {
    config: ModelConfig,
    placed: Placed,
    /// The integer mode's exact forms, when loaded ([`LinearWeights::load_int`]).
    int: Option<IntWeights>,
}

/// A projection as stored in GGUF: `out` rows of `in` values each.
struct Stored {
    values: Vec<f32>,
    d_out: usize,
}

fn load_stored(f: &GgufFile, name: &str, d_in: usize, d_out: usize) -> Result<Stored, NodeError> {
    let (values, dims) = f.dequantize(name)?;
    NodeError::check_dims(name, &dims, d_in, d_out)?;
    Ok(Stored { values, d_out })
}

/// Lays stored projections side by side as one `[d_in, Σ d_out]` row-major matrix, scaling
/// input row `i` by `gain[i]`.
fn fuse_transposed(parts: &[Stored], d_in: usize, gain: Option<&[f32]>) -> (Vec<f32>, usize) {
    let d_out: usize = parts.iter().map(|p| p.d_out).sum();
    let mut out = vec![0f32; d_in * d_out];
    let mut col0 = 0;
    for p in parts {
        for o in 0..p.d_out {
            let src = &p.values[o * d_in..(o + 1) * d_in];
            for (i, &w) in src.iter().enumerate() {
                out[i * d_out + col0 + o] = w * gain.map_or(1.0, |g| g[i]);
            }
        }
        col0 += p.d_out;
    }
    (out, d_out)
}

impl LinearWeights {
    /// Loads every projection of the model and the LM head (the plain engine's weights).
    pub fn load(f: &GgufFile, config: &ModelConfig) -> Result<Self, NodeError> {
        let all = 0..=config.n_layers.saturating_sub(1);
        Self::load_on(f, config, all, true, Placement::Cpu)
    }

    /// Loads only the projections of `layers`, and the LM head if `lm_head` (a pipeline stage
    /// holds nothing else in memory), on the device `placement` names (`cuda:N` needs the
    /// `cuda` feature).
    pub fn load_on(
        f: &GgufFile,
        config: &ModelConfig,
        layers: std::ops::RangeInclusive<usize>,
        lm_head: bool,
        placement: Placement,
    ) -> Result<Self, NodeError> {
        let placed = match placement {
            Placement::Cpu => Placed::Cpu(Stack::load(
                f,
                config,
                layers,
                lm_head,
                Default::default(),
                rayon::current_num_threads(),
                Split::None,
            )?),
            #[cfg(feature = "cuda")]
            Placement::Cuda(index) => {
                // burn-cuda panics where there is no driver or no such device: a typed error
                // instead, so a topology naming a GPU the host lacks stops the node cleanly.
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Stack::load(
                        f,
                        config,
                        layers,
                        lm_head,
                        burn::backend::cuda::CudaDevice::new(index),
                        // One device: one shard, the GPU parallelises the product itself.
                        1,
                        Split::Tf32,
                    )
                }));
                match loaded {
                    Ok(stack) => Placed::Cuda(stack?),
                    Err(panic) => {
                        let why =
                            talaria_actors::panic_message(panic.as_ref()).unwrap_or("no message");
                        return Err(NodeError::Backend(format!(
                            "{placement}: loading the weights there failed (no driver, no such \
                             device, or out of its memory): {why}"
                        )));
                    }
                }
            }
            #[cfg(not(feature = "cuda"))]
            Placement::Cuda(_) => {
                return Err(talaria_model_file::ModelFileError::Unsupported(format!(
                    "backend {placement}: this build has no `cuda` feature"
                ))
                .into());
            }
        };
        Ok(Self {
            config: config.clone(),
            placed,
            int: None,
        })
    }

    /// Also loads the exact integer form of the same projections (the integer mode), from the
    /// same file. It is held on the host: the integer product runs on the CPU.
    pub fn load_int(&mut self, f: &GgufFile) -> Result<(), NodeError> {
        let (layers, lm_head) = on_stack!(&self.placed, s => (
            s.first_layer..s.first_layer + s.blocks.len(),
            s.lm_head.is_some(),
        ));
        self.int = Some(IntWeights::load(f, &self.config, layers, lm_head)?);
        Ok(())
    }

    /// The integer form of `op`'s weight.
    pub fn int_weight(&self, op: OpId) -> Result<&IntWeight, EngineError> {
        self.int
            .as_ref()
            .ok_or_else(|| EngineError::BadOp {
                op: op.to_string(),
                reason: "this stage holds no integer weights (its topology is not in the \
                         integer mode)"
                    .into(),
            })?
            .weight(op)
    }

    /// `x̃ · W_int` modulo `2^64` for `rows` row-major rows (the integer mode's product).
    pub fn int_matmul(&self, op: OpId, rows: usize, x: &[u64]) -> Result<Vec<u64>, EngineError> {
        let (d_in, _) = op.shape(&self.config);
        self.check_input(op, rows, d_in, x.len())?;
        match &self.int {
            Some(int) => int.matmul(op, rows, x),
            None => self.int_weight(op).map(|_| Vec::new()),
        }
    }

    /// The device the weights are on.
    pub fn placement(&self) -> Placement {
        match &self.placed {
            Placed::Cpu(_) => Placement::Cpu,
            #[cfg(feature = "cuda")]
            Placed::Cuda(s) => Placement::Cuda(s.device.index),
        }
    }
}

impl<B: Backend> Stack<B> {
    fn load(
        f: &GgufFile,
        config: &ModelConfig,
        layers: std::ops::RangeInclusive<usize>,
        lm_head: bool,
        device: Device<B>,
        n_shards: usize,
        split: Split,
    ) -> Result<Self, NodeError> {
        let c = config;
        if *layers.end() >= c.n_layers {
            return Err(NodeError::invalid_model(format!(
                "layers {}-{} asked of a model with {} layers",
                layers.start(),
                layers.end(),
                c.n_layers
            )));
        }
        // One op: its parts, the gain folded in, laid out for the backend.
        let load = |s: &OpSource| -> Result<Sharded<B>, NodeError> {
            let parts = s
                .parts
                .iter()
                .map(|(name, d_out)| load_stored(f, name, s.d_in, *d_out))
                .collect::<Result<Vec<_>, _>>()?;
            let gain = s
                .gain
                .as_ref()
                .map(|g| load_vector(f, g, s.d_in))
                .transpose()?;
            let (values, d_out) = fuse_transposed(&parts, s.d_in, gain.as_deref());
            Ok(Sharded::new(
                values, s.d_in, d_out, n_shards, &device, split,
            ))
        };
        let first_layer = *layers.start();
        let mut blocks = Vec::with_capacity(layers.clone().count());
        for l in layers {
            let [qkv, attn_out, gate_up, down] = block_sources(c, l);
            blocks.push(BlockWeights {
                qkv: load(&qkv)?,
                attn_out: load(&attn_out)?,
                gate_up: load(&gate_up)?,
                down: load(&down)?,
            });
        }
        let lm_head = if lm_head {
            Some(load(&lm_head_source(f, c))?)
        } else {
            None
        };
        Ok(Self {
            first_layer,
            blocks,
            lm_head,
            device,
            f64_gemm: split == Split::None,
        })
    }

    /// Bytes of weights held (f32 values; f64 copies made for the lossless mode are extra).
    fn bytes(&self) -> usize {
        let shard_bytes = |s: &Sharded<B>| s.d_in * s.d_out * 4;
        self.blocks
            .iter()
            .map(|b| {
                shard_bytes(&b.qkv)
                    + shard_bytes(&b.attn_out)
                    + shard_bytes(&b.gate_up)
                    + shard_bytes(&b.down)
            })
            .sum::<usize>()
            + self.lm_head.as_ref().map_or(0, shard_bytes)
    }

    fn weight(&self, op: OpId) -> Result<&Sharded<B>, EngineError> {
        let not_held = |reason: String| EngineError::BadOp {
            op: op.to_string(),
            reason,
        };
        Ok(match op {
            OpId::LmHead => self
                .lm_head
                .as_ref()
                .ok_or_else(|| not_held("the LM head is not held here".into()))?,
            OpId::Block { layer, op: kind } => {
                let b = layer
                    .checked_sub(self.first_layer)
                    .and_then(|i| self.blocks.get(i))
                    .ok_or_else(|| {
                        not_held(format!(
                            "layer not held (layers {}-{} are)",
                            self.first_layer,
                            (self.first_layer + self.blocks.len()).saturating_sub(1)
                        ))
                    })?;
                match kind {
                    BlockOp::Qkv => &b.qkv,
                    BlockOp::AttnOut => &b.attn_out,
                    BlockOp::GateUp => &b.gate_up,
                    BlockOp::Down => &b.down,
                }
            }
        })
    }

    fn linear_f64(
        &self,
        op: OpId,
        rows: usize,
        d_in: usize,
        x: &[f64],
    ) -> Result<Vec<f64>, EngineError> {
        let w = self.weight(op)?;
        if !self.f64_gemm {
            return Err(EngineError::Backend(
                "the f64 GEMM (the lossless f64-gemm mode, and R_pub of a rank < d basis) is not \
                 available on CUDA: burn 0.21's matmul has no f64 kernel; use a cpu stage or \
                 --remo-precision f32 / f64-client"
                    .into(),
            ));
        }
        let input: Matrix<B> = Tensor::from_data(
            TensorData::new(x.to_vec(), [rows, d_in]),
            (&self.device, DType::F64),
        );
        w.matmul_f64(input, rows)
    }

    fn matmul(&self, op: OpId, x: &Rows) -> Result<Vec<f32>, EngineError> {
        self.weight(op)?
            .matmul_host(x.data(), x.rows(), &self.device)
    }
}

impl LinearWeights {
    /// Whether these weights include `op`.
    pub fn holds(&self, op: OpId) -> bool {
        on_stack!(&self.placed, s => s.weight(op).is_ok())
    }

    /// Bytes of weights held (f32 values and integer forms; f64 copies made for the lossless
    /// mode are extra).
    pub fn bytes(&self) -> usize {
        on_stack!(&self.placed, s => s.bytes()) + self.int.as_ref().map_or(0, IntWeights::bytes)
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The folded weight of `op` as a row-major `[d_in, d_out]` matrix.
    pub fn dense(&self, op: OpId) -> Result<Vec<f32>, EngineError> {
        on_stack!(&self.placed, s => s.weight(op)?.dense())
    }

    /// Checks that `len` values are `rows` rows of `op`'s input width.
    pub fn check_input(
        &self,
        op: OpId,
        rows: usize,
        cols: usize,
        len: usize,
    ) -> Result<(), EngineError> {
        let (d_in, _) = op.shape(&self.config);
        if cols != d_in {
            return Err(EngineError::Shape {
                op: op.to_string(),
                expected: d_in,
                found: cols,
            });
        }
        if rows.checked_mul(cols) != Some(len) {
            return Err(EngineError::BadOp {
                op: op.to_string(),
                reason: format!("{len} values cannot be {rows} x {cols}"),
            });
        }
        Ok(())
    }

    /// `x · W_op` in f64 (the lossless mode's GEMM) for `rows` row-major rows of `x`.
    pub fn linear_f64(&self, op: OpId, rows: usize, x: &[f64]) -> Result<Vec<f64>, EngineError> {
        let (d_in, _) = op.shape(&self.config);
        self.check_input(op, rows, d_in, x.len())?;
        if rows == 0 {
            on_stack!(&self.placed, s => s.weight(op).map(|_| ()))?;
            return Ok(Vec::new());
        }
        on_stack!(&self.placed, s => s.linear_f64(op, rows, d_in, x))
    }
}

impl LinearOps for LinearWeights {
    fn linear(&mut self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        self.matmul(op, x)
    }
}

impl LinearWeights {
    /// `x · W_op` in f32; shared access, so several calls may run at once.
    pub fn matmul(&self, op: OpId, x: &Rows) -> Result<Rows, EngineError> {
        let (_, d_out) = op.shape(&self.config);
        self.check_input(op, x.rows(), x.cols(), x.data().len())?;
        if x.rows() == 0 {
            return Rows::new(0, d_out, Vec::new());
        }
        let y = on_stack!(&self.placed, s => s.matmul(op, x))?;
        Rows::new(x.rows(), d_out, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn tf32_split_is_exact_and_high_parts_fit_tf32() {
        for v in [1.0f32, -2.5, 1e-30, 6.0e7, 0.1, f32::MIN_POSITIVE, 0.0] {
            let hi = round_tf32(v);
            assert_eq!(hi.to_bits() & 0x1fff, 0, "{v}");
            assert_eq!(hi + (v - hi), v, "{v}");
            assert!((hi - v).abs() <= v.abs() * 2f32.powi(-11), "{v}");
        }
    }

    #[test]
    fn the_3xtf32_layout_matches_the_plain_f32_gemm() {
        // The split layout's arithmetic, checked on the CPU backend (where TF32 is not involved,
        // so this checks the decomposition; the device check runs it on CUDA).
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (d_in, d_out, rows) = (64, 48, 5);
        let w: Vec<f32> = (0..d_in * d_out)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let x: Vec<f32> = (0..rows * d_in)
            .map(|_| rng.random_range(-300.0..300.0))
            .collect();
        let device = Default::default();
        let plain = Sharded::<Flex>::new(w.clone(), d_in, d_out, 1, &device, Split::None);
        let split = Sharded::<Flex>::new(w.clone(), d_in, d_out, 1, &device, Split::Tf32);
        assert_eq!(split.dense().unwrap(), w);
        let a = plain.matmul_host(&x, rows, &device).unwrap();
        let b = split.matmul_host(&x, rows, &device).unwrap();
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err <= 1e-5 * scale, "3xTF32 off by {err} of {scale}");
    }
}
