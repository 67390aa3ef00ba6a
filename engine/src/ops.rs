//! Weight-free steps of the forward pass: gain-free RMS norm, RoPE, attention, SwiGLU.

/// Normalises each `d`-wide row of `x` to unit RMS, without a gain (gains live in the weights).
pub fn rms_norm(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().map(|&v| v * scale));
    }
    out
}

/// Rotary position embedding over adjacent pairs `(x[2i], x[2i+1])`, as the `llama` GGUF
/// converter's permuted Q and K expect.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The rotation frequencies for `head_dim` and `base`.
    pub fn new(head_dim: usize, base: f32) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| base.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// Rotates every head (`head_dim` wide) of `row` for position `pos`.
    pub fn apply(&self, row: &mut [f32], pos: usize) {
        let hd = self.inv_freq.len() * 2;
        let (sin, cos): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|&f| (pos as f32 * f).sin_cos())
            .unzip();
        for head in row.chunks_exact_mut(hd) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// `silu(gate) * up` for rows laid out as `[gate | up]`, each half `d_ff` wide.
pub fn swiglu(gate_up: &[f32], d_ff: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * d_ff) {
        let (gate, up) = row.split_at(d_ff);
        out.extend(
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u),
        );
    }
    out
}

/// Adds `delta` into `acc` element-wise (the residual connection).
pub fn add_into(acc: &mut [f32], delta: &[f32]) {
    for (a, d) in acc.iter_mut().zip(delta) {
        *a += d;
    }
}

/// Shapes of grouped-query attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `Σ a[i] · b[i]` in eight interleaved partial sums (lane `i % 8`), added in lane order, then
/// the tail: a fixed order every machine and engine shares (the basis expansion relies on it
/// for identical bits), which the compiler can keep in vector registers (a single running sum
/// cannot be reordered, so it would run one add at a time).
pub fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T> + std::iter::Sum,
{
    let mut lanes = [T::default(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] = lanes[k] + x[k] * y[k];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// Causal attention of one query row at absolute position `pos` over cached keys and values
/// `0..=pos` (each row `n_kv_heads * head_dim` wide). Writes `n_heads * head_dim` values to `out`.
pub fn attend(
    s: AttentionShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    pos: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let kv_dim = s.n_kv_heads * s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    for h in 0..s.n_heads {
        let kv_off = (h / group) * s.head_dim;
        let qh = &q[h * s.head_dim..(h + 1) * s.head_dim];
        scores.clear();
        scores.extend((0..=pos).map(|t| {
            let k = &keys[t * kv_dim + kv_off..t * kv_dim + kv_off + s.head_dim];
            dot(qh, k) * scale
        }));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in scores.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let oh = &mut out[h * s.head_dim..(h + 1) * s.head_dim];
        oh.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            let v = &values[t * kv_dim + kv_off..t * kv_dim + kv_off + s.head_dim];
            let w = p / sum;
            for (o, &x) in oh.iter_mut().zip(v) {
                *o += w * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_rms() {
        let x = [3.0, -4.0, 12.0, 0.5, 1.0, 1.0, 1.0, 1.0];
        let y = rms_norm(&x, 4, 0.0);
        for row in y.chunks(4) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let rope = Rope::new(8, 10_000.0);
        let x: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mut y = x.clone();
        rope.apply(&mut y, 0);
        assert_eq!(x, y);
        rope.apply(&mut y, 37);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&y)).abs() / n(&x) < 1e-5);
        assert_ne!(x, y);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let s = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let mut out = vec![0.0; 4];
        attend(
            s,
            &[1.0, 0.0, 0.0, 1.0],
            &[5.0, 5.0],
            &[0.25, -2.0],
            0,
            &mut out,
            &mut Vec::new(),
        );
        assert_eq!(out, [0.25, -2.0, 0.25, -2.0]);
    }
}
