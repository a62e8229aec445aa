//! The Next-DiT denoiser of NewBie-image-Exp0.1 (`NextDiT_CLIP`, spec §2-§4).
//!
//! Structure (one struct per block, field paths equal to the original checkpoint key names):
//!
//! * [`TimestepEmbedder`] `t_embedder.mlp.{0,2}`: sinusoid (256, `[cos, sin]`) → Linear → SiLU → Linear.
//! * `clip_text_pooled_proj.{0,1}` (RMSNorm → Linear) and `time_text_embed.1` (SiLU → Linear on
//!   `cat[t_emb, clip_emb]`) build the conditioning vector `adaln_in` used by every modulated block.
//! * `cap_embedder.{0,1}` (RMSNorm → Linear) embeds the caption features.
//! * [`JointTransformerBlock`]: sandwich RMSNorm around GQA attention (qk-norm, 3-axis interleaved RoPE)
//!   and a SwiGLU FFN; modulated blocks add scale-only modulation and tanh gates.
//!   Two unmodulated `context_refiner` blocks on the caption, two modulated `noise_refiner` blocks on
//!   the image tokens, then `n_layers` modulated `layers` on the joint `[caption ; image]` sequence.
//! * [`FinalLayer`]: LayerNorm without affine (eps 1e-6), scale-only modulation, Linear to patches.
//!
//! Numerics: timestep sinusoids, RoPE tables (angles in f64, then f32), RoPE rotation and every norm's
//! statistics are computed in f32 and cast back to the weight dtype; the returned velocity is f32.
//!
//! Batches may mix captions of different lengths. In the reference layout ([`NextDit::forward_traced`])
//! each sample's joint sequence is `[its valid caption tokens ; its image tokens]`, right-padded to
//! the longest one, and attention uses a boolean key-padding mask (dropped entirely when no sample is
//! padded, so that the fastest SDPA kernel can run). [`NextDit::forward`] computes the same function
//! without padding: rows are grouped by valid caption length and each group runs as its own batch
//! with no mask.
//!
//! A forward pass is split in two: [`NextDit::prepare`] does what depends only on the conditioning
//! rows and the latent size (caption lengths, caption embedding and context refiner, pooled
//! projection, RoPE factors, masks), [`NextDit::forward_prepared`] the timestep-dependent rest. The
//! sampler prepares a batch once and runs only the second part at every step.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// Width of the sinusoidal timestep embedding fed to `t_embedder.mlp.0` ([NB-model] `frequency_embedding_size`).
pub const TIME_FREQ_DIM: i64 = 256;
/// `max_period` of the timestep sinusoid ([NB-model]).
pub const TIME_MAX_PERIOD: f64 = 10000.0;
/// LayerNorm eps of the final layer ([NB-model] `FinalLayer`, `elementwise_affine=False, eps=1e-6`).
pub const FINAL_LAYERNORM_EPS: f64 = 1e-6;
/// Upper bound of the time-embedding width: `min(dim, 1024)` ([NB-model]).
pub const MAX_T_EMB_DIM: i64 = 1024;

fn default_eps() -> f64 {
    1e-5
}

/// DiT configuration. Mirrors `transformer/config.json` of the official layout ([LT] converter:
/// `patch_size, dim, n_layers, n_heads, n_kv_heads, in_channels, axes_dims, axes_lens, clip_text_dim`)
/// plus the constructor defaults of `NextDiT` that the file leaves out; missing fields take the
/// NewBie-image-Exp0.1 values. The diffusers `Lumina2Transformer2DModel` names are accepted as aliases.
/// Derived sizes (`head_dim`, `ffn_hidden`, `t_emb_dim`, `n_rep`) are methods, never stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default = "DitConfig::newbie_exp0_1")]
pub struct DitConfig {
    pub patch_size: i64,
    pub in_channels: i64,
    #[serde(alias = "hidden_size")]
    pub dim: i64,
    #[serde(alias = "num_layers")]
    pub n_layers: i64,
    #[serde(alias = "num_refiner_layers")]
    pub n_refiner_layers: i64,
    #[serde(alias = "num_attention_heads")]
    pub n_heads: i64,
    #[serde(alias = "num_kv_heads")]
    pub n_kv_heads: i64,
    pub multiple_of: i64,
    pub ffn_dim_multiplier: Option<f64>,
    /// eps of the four block RMSNorms and of `cap_embedder.0`.
    pub norm_eps: f64,
    pub qk_norm: bool,
    pub cap_feat_dim: i64,
    #[serde(alias = "axes_dim_rope")]
    pub axes_dims: Vec<i64>,
    pub axes_lens: Vec<i64>,
    #[serde(alias = "pooled_projection_dim")]
    pub clip_text_dim: i64,
    pub rope_theta: f64,
    /// eps of `attention.q_norm` / `attention.k_norm` (spec §2: 1e-5 with apex, 1e-6 in the fallback class).
    #[serde(default = "default_eps", alias = "qk_norm_rmsnorm_eps")]
    pub qk_norm_eps: f64,
    /// eps of `clip_text_pooled_proj.0`.
    #[serde(default = "default_eps", alias = "clip_text_pooled_proj_rmsnorm_eps")]
    pub clip_proj_norm_eps: f64,
}

impl DitConfig {
    /// NewBie-image-Exp0.1: factory `NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP` in
    /// `NewBieAI-Lab/NewBie-image-Exp0.1` `models/model.py` (commit 709e9a4), built with
    /// `in_channels=16, qk_norm=True, cap_feat_dim=2560` (Gemma3-4B hidden size) as in `demo.py`;
    /// `transformer/config.json` per the official converter (spec §1-§2). 3,486,636,096 parameters.
    pub fn newbie_exp0_1() -> Self {
        Self {
            patch_size: 2,
            in_channels: 16,
            dim: 2304,
            n_layers: 36,
            n_refiner_layers: 2,
            n_heads: 24,
            n_kv_heads: 8,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            axes_dims: vec![32, 32, 32],
            axes_lens: vec![1024, 512, 512],
            clip_text_dim: 1024,
            rope_theta: 10000.0,
            qk_norm_eps: 1e-5,
            clip_proj_norm_eps: 1e-5,
        }
    }

    /// The tiny configuration of the public goldens (spec §12.1, `goldens/dit.json` `config`):
    /// GQA with n_rep 2, unequal RoPE axes, FFN rounding (4·64 → 288 with multiple_of 96).
    pub fn tiny() -> Self {
        Self {
            patch_size: 2,
            in_channels: 16,
            dim: 64,
            n_layers: 2,
            n_refiner_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            multiple_of: 96,
            ffn_dim_multiplier: None,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 40,
            axes_dims: vec![4, 6, 6],
            axes_lens: vec![64, 32, 32],
            clip_text_dim: 24,
            rope_theta: 10000.0,
            qk_norm_eps: 1e-5,
            clip_proj_norm_eps: 1e-5,
        }
    }

    /// Reads a `config.json` (original or diffusers names); absent fields take the NewBie values.
    pub fn from_json_file(path: &Path) -> Result<Self, DitError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DitError::Config(format!("reading {}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| DitError::Config(format!("parsing {}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> i64 {
        self.dim / self.n_heads
    }

    pub fn n_rep(&self) -> i64 {
        self.n_heads / self.n_kv_heads
    }

    /// SwiGLU hidden width: `multiple_of * ceil(m * 4 * dim / multiple_of)` ([NB-model] `FeedForward`).
    pub fn ffn_hidden(&self) -> i64 {
        let mut hidden = 4 * self.dim;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as i64;
        }
        self.multiple_of * ((hidden + self.multiple_of - 1) / self.multiple_of)
    }

    /// Width of the timestep embedding and of `adaln_in`: `min(dim, 1024)`.
    pub fn t_emb_dim(&self) -> i64 {
        self.dim.min(MAX_T_EMB_DIM)
    }

    pub fn out_channels(&self) -> i64 {
        self.in_channels
    }

    /// Length of one patch vector: `p * p * in_channels`.
    pub fn patch_dim(&self) -> i64 {
        self.patch_size * self.patch_size * self.in_channels
    }

    pub fn validate(&self) -> Result<(), DitError> {
        let bad = |m: String| Err(DitError::Config(m));
        if self.dim <= 0 || self.n_heads <= 0 || self.n_kv_heads <= 0 || self.patch_size <= 0 {
            return bad("dim, n_heads, n_kv_heads and patch_size must be positive".into());
        }
        if self.dim % self.n_heads != 0 {
            return bad(format!("dim {} not divisible by n_heads {}", self.dim, self.n_heads));
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("n_heads {} not divisible by n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return bad("axes_dims and axes_lens must have 3 entries".into());
        }
        if self.axes_dims.iter().any(|d| *d <= 0 || d % 2 != 0) {
            return bad(format!("axes_dims {:?} must be positive and even", self.axes_dims));
        }
        if self.axes_dims.iter().sum::<i64>() != self.head_dim() {
            return bad(format!(
                "sum of axes_dims {:?} must equal head_dim {}",
                self.axes_dims,
                self.head_dim()
            ));
        }
        if !self.qk_norm {
            return bad("qk_norm=false is not supported (every released checkpoint has q_norm/k_norm)".into());
        }
        Ok(())
    }

    /// Every parameter of the model with its shape, in checkpoint key names (the key set a strict
    /// loader expects). Computed from the configuration only; `NextDit::new` registers exactly these.
    pub fn param_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (d, t, c) = (self.dim, self.t_emb_dim(), self.clip_text_dim);
        let hd = self.head_dim();
        let qkv = (self.n_heads + 2 * self.n_kv_heads) * hd;
        let f = self.ffn_hidden();
        let mut v: Vec<(String, Vec<i64>)> = vec![
            ("x_embedder.weight".into(), vec![d, self.patch_dim()]),
            ("x_embedder.bias".into(), vec![d]),
            ("t_embedder.mlp.0.weight".into(), vec![t, TIME_FREQ_DIM]),
            ("t_embedder.mlp.0.bias".into(), vec![t]),
            ("t_embedder.mlp.2.weight".into(), vec![t, t]),
            ("t_embedder.mlp.2.bias".into(), vec![t]),
            ("cap_embedder.0.weight".into(), vec![self.cap_feat_dim]),
            ("cap_embedder.1.weight".into(), vec![d, self.cap_feat_dim]),
            ("cap_embedder.1.bias".into(), vec![d]),
            ("clip_text_pooled_proj.0.weight".into(), vec![c]),
            ("clip_text_pooled_proj.1.weight".into(), vec![c, c]),
            ("clip_text_pooled_proj.1.bias".into(), vec![c]),
            ("time_text_embed.1.weight".into(), vec![t, t + c]),
            ("time_text_embed.1.bias".into(), vec![t]),
            ("norm_final.weight".into(), vec![d]),
            ("final_layer.linear.weight".into(), vec![self.patch_size * self.patch_size * self.out_channels(), d]),
            ("final_layer.linear.bias".into(), vec![self.patch_size * self.patch_size * self.out_channels()]),
            ("final_layer.adaLN_modulation.1.weight".into(), vec![d, t]),
            ("final_layer.adaLN_modulation.1.bias".into(), vec![d]),
        ];
        let mut block = |prefix: String, modulated: bool| {
            let p = |s: &str| format!("{prefix}.{s}");
            v.push((p("attention.qkv.weight"), vec![qkv, d]));
            v.push((p("attention.out.weight"), vec![d, self.n_heads * hd]));
            v.push((p("attention.q_norm.weight"), vec![hd]));
            v.push((p("attention.k_norm.weight"), vec![hd]));
            v.push((p("feed_forward.w1.weight"), vec![f, d]));
            v.push((p("feed_forward.w2.weight"), vec![d, f]));
            v.push((p("feed_forward.w3.weight"), vec![f, d]));
            for n in ["attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"] {
                v.push((p(&format!("{n}.weight")), vec![d]));
            }
            if modulated {
                v.push((p("adaLN_modulation.1.weight"), vec![4 * d, t]));
                v.push((p("adaLN_modulation.1.bias"), vec![4 * d]));
            }
        };
        for i in 0..self.n_refiner_layers {
            block(format!("noise_refiner.{i}"), true);
        }
        for i in 0..self.n_refiner_layers {
            block(format!("context_refiner.{i}"), false);
        }
        for i in 0..self.n_layers {
            block(format!("layers.{i}"), true);
        }
        v
    }

    /// Total parameter count, from [`Self::param_shapes`].
    pub fn param_count(&self) -> i64 {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum()
    }
}

/// Errors of the DiT: bad configuration or inputs that do not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum DitError {
    #[error("invalid DiT configuration: {0}")]
    Config(String),
    #[error("invalid DiT input: {0}")]
    Input(String),
}

/// Registers a parameter with uninitialised storage: the weights are meant to be overwritten by the
/// loader (or by [`NextDit::randomize`]), so nothing is written (and, for big models on CPU, no page
/// is touched) at construction.
fn param(vs: &nn::Path, name: &str, dims: &[i64]) -> Tensor {
    vs.add(name, Tensor::empty(dims, (vs.kind(), vs.device())), false)
}

/// `x * rsqrt(mean(x², -1) + eps)` with the statistics in f32, cast back to `x`'s dtype (no weight).
fn rms_normalize(x: &Tensor, eps: f64) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let ms = xf.square().mean_dim(Some(&[-1i64][..]), true, Kind::Float);
    (xf * (ms + eps).rsqrt()).to_kind(x.kind())
}

/// A linear layer with the checkpoint's `[out, in]` weight.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = param(&vs, "weight", &[out_dim, in_dim]);
        let bias = bias.then(|| param(&vs, "bias", &[out_dim]));
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// RMSNorm as in the official fallback class: normalise in f32, cast back, then multiply by the weight.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self { weight: param(&vs, "weight", &[dim]), eps }
    }

    /// libtorch's `rms_norm` accumulates the statistics in f32 for bf16/fp16 inputs (fused kernel
    /// on CUDA) and rounds once after the weight multiply; the reference rounds before it. The two
    /// differ by at most one rounding of the output dtype (identical in f32).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm(self.weight.size().as_slice(), Some(&self.weight), self.eps)
    }

    /// The reference formulation: normalise in f32, cast back, then multiply by the weight.
    pub fn forward_reference(&self, x: &Tensor) -> Tensor {
        rms_normalize(x, self.eps) * &self.weight
    }

    /// Normalises `x` into the dtype `kind` of the weight. An input of another dtype is normalised
    /// in f32 from its own values and cast afterwards, so that values `kind` cannot hold (Gemma 3's
    /// largest activations in fp16) never reach it; then it is the reference formulation, and an
    /// input already in `kind` takes [`Self::forward`].
    pub fn forward_into(&self, x: &Tensor, kind: Kind) -> Tensor {
        if x.kind() == kind {
            return self.forward(x);
        }
        rms_normalize(&x.to_kind(Kind::Float), self.eps).to_kind(kind) * &self.weight
    }
}

/// `t_embedder`: sinusoid of t in [0,1] (no ×1000), then an MLP.
#[derive(Debug)]
pub struct TimestepEmbedder {
    /// `mlp.0`
    pub mlp_0: Linear,
    /// `mlp.2` (`mlp.1` is the SiLU)
    pub mlp_2: Linear,
}

impl TimestepEmbedder {
    pub fn new(vs: nn::Path, cfg: &DitConfig) -> Self {
        let mlp = vs.sub("mlp");
        let t = cfg.t_emb_dim();
        Self { mlp_0: Linear::new(mlp.sub("0"), TIME_FREQ_DIM, t, true), mlp_2: Linear::new(mlp.sub("2"), t, t, true) }
    }

    /// `[cos(t·f), sin(t·f)]` with `f_i = exp(-ln(max_period)·i/half)`, all in f32: `[B, 256]`.
    pub fn sinusoid(t: &Tensor) -> Tensor {
        let half = TIME_FREQ_DIM / 2;
        let idx = Tensor::arange(half, (Kind::Float, t.device()));
        let freqs = (idx * (-TIME_MAX_PERIOD.ln()) / (half as f64)).exp();
        let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
        Tensor::cat(&[args.cos(), args.sin()], -1)
    }

    pub fn forward(&self, t: &Tensor, dtype: Kind) -> Tensor {
        let e = Self::sinusoid(t).to_kind(dtype);
        self.mlp_2.forward(&self.mlp_0.forward(&e).silu())
    }
}

/// RoPE factors of a batch of tokens: `cos`, `sin`, each `[B, S, head_dim/2]` in f32, and the same
/// factors laid out for a rotation in one pass over interleaved pairs (see [`apply_rope`]).
#[derive(Debug)]
pub struct RopeFreqs {
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[B, S, 1, head_dim]`: `cos` with every factor repeated for both members of its pair.
    pair_cos: Tensor,
    /// `[B, S, 1, head_dim]`: `(-sin, +sin)` per pair.
    pair_sin: Tensor,
}

impl RopeFreqs {
    pub fn new(cos: Tensor, sin: Tensor) -> Self {
        let size = cos.size();
        let (b, s) = (size[0], size[1]);
        let pair_cos = Tensor::stack(&[&cos, &cos], -1).view([b, s, 1, -1]);
        let pair_sin = Tensor::stack(&[&(-&sin), &sin], -1).view([b, s, 1, -1]);
        Self { cos, sin, pair_cos, pair_sin }
    }

    /// The `[B, S, head_dim/2, 2]` (cos, sin) layout of the goldens.
    pub fn stacked(&self) -> Tensor {
        Tensor::stack(&[&self.cos, &self.sin], -1)
    }

    /// Zeroes the factors of rows where `keep` (`[B, S]`, bool) is false.
    fn masked(&self, keep: &Tensor) -> Self {
        let k = keep.to_kind(Kind::Float).unsqueeze(-1);
        Self::new(&self.cos * &k, &self.sin * &k)
    }
}

/// 3-axis rotary tables: axis a covers `axes_dims[a]/2` complex factors `exp(i·pos·θ^(-2j/d_a))`;
/// a token's factors are the concatenation over the three axes.
#[derive(Debug)]
pub struct RopeEmbedder {
    /// Per axis: `(cos, sin)` tables `[axes_lens[a], axes_dims[a]/2]`, f32.
    tables: Vec<(Tensor, Tensor)>,
    axes_lens: Vec<i64>,
}

impl RopeEmbedder {
    pub fn new(cfg: &DitConfig, device: Device) -> Self {
        let tables = cfg
            .axes_dims
            .iter()
            .zip(&cfg.axes_lens)
            .map(|(&d, &len)| {
                // Angles in f64 (as the reference), then f32 before cos/sin.
                let j = Tensor::arange_start_step(0, d, 2, (Kind::Double, Device::Cpu));
                let omega = (j / (d as f64) * cfg.rope_theta.ln()).exp().reciprocal();
                let pos = Tensor::arange(len, (Kind::Double, Device::Cpu));
                let ang = pos.outer(&omega).to_kind(Kind::Float).to_device(device);
                (ang.cos(), ang.sin())
            })
            .collect();
        Self { tables, axes_lens: cfg.axes_lens.clone() }
    }

    /// Factors for integer position ids `[B, S, 3]` (any device; moved to the tables' device).
    pub fn freqs(&self, ids: &Tensor) -> Result<RopeFreqs, DitError> {
        let (b, s) = (ids.size()[0], ids.size()[1]);
        let mut cos = Vec::with_capacity(3);
        let mut sin = Vec::with_capacity(3);
        for (a, (tc, ts)) in self.tables.iter().enumerate() {
            let col = ids.select(2, a as i64).reshape([-1]).to_device(Device::Cpu);
            let max = if col.numel() > 0 { col.max().int64_value(&[]) } else { 0 };
            let col = col.to_device(tc.device());
            if max >= self.axes_lens[a] {
                return Err(DitError::Input(format!(
                    "RoPE position {max} on axis {a} exceeds axes_lens[{a}] = {}",
                    self.axes_lens[a]
                )));
            }
            cos.push(tc.index_select(0, &col).view([b, s, -1]));
            sin.push(ts.index_select(0, &col).view([b, s, -1]));
        }
        Ok(RopeFreqs::new(Tensor::cat(&cos, -1), Tensor::cat(&sin, -1)))
    }
}

/// Rotates interleaved pairs `(x[2i], x[2i+1])` of `x` `[B, S, H, D]` by the per-token factors, in f32:
/// `(x0·c − x1·s, x1·c + x0·s)`, computed as `x·pair_cos + swap(x)·pair_sin` in four kernels: the
/// pair swap (in `x`'s dtype), a multiply and a fused multiply-add whose 16-bit operands are
/// widened to f32 inside the kernels (the f32 tables make the results f32; the values are the same
/// as from an explicit f32 copy, without writing one), and the cast back.
fn apply_rope(x: &Tensor, f: &RopeFreqs) -> Tensor {
    let size = x.size();
    let swapped = x.reshape([size[0], size[1], size[2], size[3] / 2, 2]).flip([-1]).view(size.as_slice());
    (x * &f.pair_cos).addcmul_(&swapped, &f.pair_sin).to_kind(x.kind())
}

/// The reference formulation of [`apply_rope`] (complex multiply written out on the pair members).
pub fn apply_rope_reference(x: &Tensor, f: &RopeFreqs) -> Tensor {
    let size = x.size();
    let xf = x.to_kind(Kind::Float).reshape([size[0], size[1], size[2], size[3] / 2, 2]);
    let (x0, x1) = (xf.select(-1, 0), xf.select(-1, 1));
    let (c, s) = (f.cos.unsqueeze(2), f.sin.unsqueeze(2));
    let r0 = &x0 * &c - &x1 * &s;
    let r1 = x0 * s + x1 * c;
    Tensor::stack(&[r0, r1], -1).reshape(size.as_slice()).to_kind(x.kind())
}

/// How the blocks run their element-wise work and feed attention. Every choice computes the same
/// function; they differ in kernel count and rounding (all within the parity bounds of the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// q and k heads normalised and rotated in one pass ([`apply_rope`]) and the gated residuals as
    /// one multiply-add; `false` normalises q and k separately, rotates them with the complex
    /// multiply written out ([`apply_rope_reference`]) and adds the gated residuals op by op (the
    /// baseline the benchmark compares against).
    pub fused: bool,
    /// GQA through SDPA's `enable_gqa` (the kernel reads each KV head for its `n_rep` query heads)
    /// instead of materialising the repeated keys and values. Not every CUDA backend accepts it.
    pub native_gqa: bool,
}

impl Default for Kernels {
    fn default() -> Self {
        Self { fused: true, native_gqa: false }
    }
}

impl Kernels {
    /// The unfused baseline.
    pub const UNFUSED: Kernels = Kernels { fused: false, native_gqa: false };
}

/// `attention`: fused qkv (rows `[Q | K | V]`), per-head RMSNorm on q and k, RoPE, GQA SDPA, `out`.
#[derive(Debug)]
pub struct JointAttention {
    pub qkv: Linear,
    pub out: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    pub kernels: Kernels,
}

impl JointAttention {
    pub fn new(vs: nn::Path, cfg: &DitConfig) -> Self {
        let hd = cfg.head_dim();
        Self {
            qkv: Linear::new(vs.sub("qkv"), cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, false),
            out: Linear::new(vs.sub("out"), cfg.n_heads * hd, cfg.dim, false),
            q_norm: RmsNorm::new(vs.sub("q_norm"), hd, cfg.qk_norm_eps),
            k_norm: RmsNorm::new(vs.sub("k_norm"), hd, cfg.qk_norm_eps),
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
            kernels: Kernels::default(),
        }
    }

    /// `x` `[B, S, dim]`; `key_mask` `[B, 1, 1, S]` bool (true = attend) or `None` for no padding.
    pub fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>, freqs: &RopeFreqs) -> Tensor {
        let (b, s) = (x.size()[0], x.size()[1]);
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = self.qkv.forward(x);
        let v = qkv.narrow(-1, (h + kvh) * hd, kvh * hd).view([b, s, kvh, hd]).transpose(1, 2);
        let (q, k) = if self.kernels.fused {
            // q and k heads are normalised and rotated together: one norm over the `h + kvh` heads
            // (q_norm and k_norm share eps), the per-head weights as one `[h + kvh, hd]` multiply
            // (the reference order: normalise, round, multiply), one RoPE pass.
            let qk = qkv.narrow(-1, 0, (h + kvh) * hd).view([b, s, h + kvh, hd]);
            let normed = qk.rms_norm([hd], None::<&Tensor>, self.q_norm.eps);
            let weights =
                Tensor::cat(&[self.q_norm.weight.expand([h, hd], false), self.k_norm.weight.expand([kvh, hd], false)], 0);
            let qk = apply_rope(&(normed * weights), freqs);
            (qk.narrow(2, 0, h).transpose(1, 2), qk.narrow(2, h, kvh).transpose(1, 2))
        } else {
            let parts = qkv.split_with_sizes([h * hd, kvh * hd, kvh * hd], -1);
            let q = self.q_norm.forward(&parts[0].view([b, s, h, hd]));
            let k = self.k_norm.forward(&parts[1].view([b, s, kvh, hd]));
            (apply_rope_reference(&q, freqs).transpose(1, 2), apply_rope_reference(&k, freqs).transpose(1, 2))
        };
        // KV head j serves query heads j*n_rep .. j*n_rep+n_rep-1 (repeat-interleave, which is also
        // what `enable_gqa` does).
        let n_rep = h / kvh;
        let native_gqa = n_rep > 1 && self.kernels.native_gqa;
        let (k, v) = if n_rep > 1 && !native_gqa {
            let expand = |t: Tensor| t.unsqueeze(2).expand([b, kvh, n_rep, s, hd], false).reshape([b, h, s, hd]);
            (expand(k), expand(v))
        } else {
            (k, v)
        };
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            key_mask,
            0.0,
            false,
            Some(1.0 / (hd as f64).sqrt()),
            native_gqa,
        );
        self.out.forward(&o.transpose(1, 2).reshape([b, s, h * hd]))
    }
}

/// `feed_forward`: SwiGLU `w2(SiLU(w1 x) * w3 x)`, no biases.
#[derive(Debug)]
pub struct FeedForward {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Linear,
}

impl FeedForward {
    pub fn new(vs: nn::Path, cfg: &DitConfig) -> Self {
        let f = cfg.ffn_hidden();
        Self {
            w1: Linear::new(vs.sub("w1"), cfg.dim, f, false),
            w2: Linear::new(vs.sub("w2"), f, cfg.dim, false),
            w3: Linear::new(vs.sub("w3"), cfg.dim, f, false),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        // In place: the `[B, S, ffn_hidden]` activations are the largest tensors of a block.
        let mut gate = self.w1.forward(x);
        let _ = gate.silu_();
        gate *= self.w3.forward(x);
        self.w2.forward(&gate)
    }
}

/// `JointTransformerBlock`: sandwich RMSNorms; modulated blocks scale the pre-norm outputs by
/// `1 + scale` and gate the residual branches with `tanh(gate)` (chunks: scale_msa, gate_msa,
/// scale_mlp, gate_mlp); no shift terms.
#[derive(Debug)]
pub struct JointTransformerBlock {
    pub attention: JointAttention,
    pub feed_forward: FeedForward,
    pub attention_norm1: RmsNorm,
    pub attention_norm2: RmsNorm,
    pub ffn_norm1: RmsNorm,
    pub ffn_norm2: RmsNorm,
    /// `adaLN_modulation.1` (`.0` is the SiLU); absent in the context refiner.
    pub adaln_modulation: Option<Linear>,
}

impl JointTransformerBlock {
    pub fn new(vs: nn::Path, cfg: &DitConfig, modulated: bool) -> Self {
        let norm = |name: &str| RmsNorm::new(vs.sub(name), cfg.dim, cfg.norm_eps);
        Self {
            attention: JointAttention::new(vs.sub("attention"), cfg),
            feed_forward: FeedForward::new(vs.sub("feed_forward"), cfg),
            attention_norm1: norm("attention_norm1"),
            attention_norm2: norm("attention_norm2"),
            ffn_norm1: norm("ffn_norm1"),
            ffn_norm2: norm("ffn_norm2"),
            adaln_modulation: modulated
                .then(|| Linear::new(vs.sub("adaLN_modulation").sub("1"), cfg.t_emb_dim(), 4 * cfg.dim, true)),
        }
    }

    /// `adaln_in` `[B, t_emb_dim]` is required by modulated blocks and ignored otherwise.
    pub fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>, freqs: &RopeFreqs, adaln_in: Option<&Tensor>) -> Tensor {
        match (&self.adaln_modulation, adaln_in) {
            (Some(m), Some(c)) => {
                let mods = m.forward(&c.silu()).unsqueeze(1).chunk(4, -1);
                let (scale_msa, gate_msa, scale_mlp, gate_mlp) = (&mods[0], &mods[1], &mods[2], &mods[3]);
                let a = self.attention.forward(&(self.attention_norm1.forward(x) * (scale_msa + 1.0)), key_mask, freqs);
                // `x + tanh(gate)·norm(branch)`: one multiply-add kernel (one rounding) when fused.
                let gated = |x: &Tensor, gate: &Tensor, branch: &Tensor| {
                    if self.attention.kernels.fused {
                        x.addcmul(&gate.tanh(), branch)
                    } else {
                        x + gate.tanh() * branch
                    }
                };
                let x = gated(x, gate_msa, &self.attention_norm2.forward(&a));
                let f = self.feed_forward.forward(&(self.ffn_norm1.forward(&x) * (scale_mlp + 1.0)));
                gated(&x, gate_mlp, &self.ffn_norm2.forward(&f))
            }
            (None, _) => {
                let a = self.attention.forward(&self.attention_norm1.forward(x), key_mask, freqs);
                let x = x + self.attention_norm2.forward(&a);
                let f = self.feed_forward.forward(&self.ffn_norm1.forward(&x));
                &x + self.ffn_norm2.forward(&f)
            }
            (Some(_), None) => panic!("modulated block called without adaln_in"),
        }
    }
}

/// `final_layer`: LayerNorm (no affine, eps 1e-6, in f32) × `(1 + scale)`, then Linear to patch vectors.
#[derive(Debug)]
pub struct FinalLayer {
    pub linear: Linear,
    /// `adaLN_modulation.1`
    pub adaln_modulation: Linear,
    dim: i64,
}

impl FinalLayer {
    pub fn new(vs: nn::Path, cfg: &DitConfig) -> Self {
        let p2 = cfg.patch_size * cfg.patch_size;
        Self {
            linear: Linear::new(vs.sub("linear"), cfg.dim, p2 * cfg.out_channels(), true),
            adaln_modulation: Linear::new(vs.sub("adaLN_modulation").sub("1"), cfg.t_emb_dim(), cfg.dim, true),
            dim: cfg.dim,
        }
    }

    pub fn forward(&self, x: &Tensor, adaln_in: &Tensor) -> Tensor {
        let scale = self.adaln_modulation.forward(&adaln_in.silu()).unsqueeze(1);
        let normed = x
            .to_kind(Kind::Float)
            .layer_norm([self.dim], None::<&Tensor>, None::<&Tensor>, FINAL_LAYERNORM_EPS, true)
            .to_kind(x.kind());
        self.linear.forward(&(normed * (scale + 1.0)))
    }
}

/// Valid caption length of each row of a right-padded mask `[B, L]`.
fn caption_lengths(cap_mask: &Tensor) -> Result<Vec<i64>, DitError> {
    Vec::<i64>::try_from(cap_mask.ne(0).sum_dim_intlist(Some(&[1i64][..]), false, Kind::Int64).to_device(Device::Cpu))
        .map_err(|e| DitError::Input(format!("cap_mask: {e}")))
}

/// Named intermediate tensors of one forward pass, keyed like the goldens (`mid.*`, `out.velocity`).
pub type Trace = BTreeMap<String, Tensor>;

/// The whole denoiser. Build it inside a `VarStore` whose kind and device are the inference dtype and
/// device (set `vs.set_kind` before `new`), then load weights with [`crate::model::loading`].
#[derive(Debug)]
pub struct NextDit {
    pub x_embedder: Linear,
    pub t_embedder: TimestepEmbedder,
    /// `cap_embedder.0`
    pub cap_embedder_norm: RmsNorm,
    /// `cap_embedder.1`
    pub cap_embedder_linear: Linear,
    /// `clip_text_pooled_proj.0`
    pub clip_proj_norm: RmsNorm,
    /// `clip_text_pooled_proj.1`
    pub clip_proj_linear: Linear,
    /// `time_text_embed.1` (`.0` is the SiLU)
    pub time_text_embed: Linear,
    pub noise_refiner: Vec<JointTransformerBlock>,
    pub context_refiner: Vec<JointTransformerBlock>,
    pub layers: Vec<JointTransformerBlock>,
    /// `norm_final`: present in every checkpoint, never used by the forward pass ([NB-model]).
    pub norm_final: RmsNorm,
    pub final_layer: FinalLayer,
    pub rope: RopeEmbedder,
    pub cfg: DitConfig,
    kind: Kind,
    device: Device,
}

impl NextDit {
    /// Registers every parameter (uninitialised storage) under `vs` and builds the RoPE tables.
    pub fn new(vs: nn::Path, cfg: &DitConfig) -> Result<Self, DitError> {
        cfg.validate()?;
        let d = cfg.dim;
        let t = cfg.t_emb_dim();
        let c = cfg.clip_text_dim;
        let blocks = |name: &str, n: i64, modulated: bool| {
            let p = vs.sub(name);
            (0..n).map(|i| JointTransformerBlock::new(p.sub(i.to_string()), cfg, modulated)).collect::<Vec<_>>()
        };
        let model = Self {
            x_embedder: Linear::new(vs.sub("x_embedder"), cfg.patch_dim(), d, true),
            t_embedder: TimestepEmbedder::new(vs.sub("t_embedder"), cfg),
            cap_embedder_norm: RmsNorm::new(vs.sub("cap_embedder").sub("0"), cfg.cap_feat_dim, cfg.norm_eps),
            cap_embedder_linear: Linear::new(vs.sub("cap_embedder").sub("1"), cfg.cap_feat_dim, d, true),
            clip_proj_norm: RmsNorm::new(vs.sub("clip_text_pooled_proj").sub("0"), c, cfg.clip_proj_norm_eps),
            clip_proj_linear: Linear::new(vs.sub("clip_text_pooled_proj").sub("1"), c, c, true),
            time_text_embed: Linear::new(vs.sub("time_text_embed").sub("1"), t + c, t, true),
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true),
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false),
            layers: blocks("layers", cfg.n_layers, true),
            norm_final: RmsNorm::new(vs.sub("norm_final"), d, cfg.norm_eps),
            final_layer: FinalLayer::new(vs.sub("final_layer"), cfg),
            rope: RopeEmbedder::new(cfg, vs.device()),
            cfg: cfg.clone(),
            kind: vs.kind(),
            device: vs.device(),
        };
        tch::no_grad(|| {
            let _ = model.norm_final.weight.shallow_clone().fill_(1.0);
        });
        Ok(model)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Switches how every block runs (see [`Kernels`]).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        for blk in self.context_refiner.iter_mut().chain(self.noise_refiner.iter_mut()).chain(self.layers.iter_mut()) {
            blk.attention.kernels = kernels;
        }
    }

    pub fn kernels(&self) -> Kernels {
        self.layers.first().or(self.noise_refiner.first()).map(|b| b.attention.kernels).unwrap_or_default()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Fills every parameter of `vs` with random values (benchmarks, tests): norm weights
    /// `1 + 0.1·N(0,1)`, biases `0.1·N(0,1)`, matrices `N(0,1)/sqrt(fan_in)`. Seeds torch's global
    /// generator with `seed`.
    pub fn randomize(vs: &nn::VarStore, seed: i64) {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        super::rng::seeded(seed, || tch::no_grad(|| {
            for (name, mut v) in vars {
                let size = v.size();
                let r = Tensor::randn(size.as_slice(), (Kind::Float, v.device()));
                let r = if size.len() >= 2 {
                    r / (size[1] as f64).sqrt()
                } else if name.ends_with(".bias") {
                    r * 0.1
                } else {
                    r * 0.1 + 1.0
                };
                v.copy_(&r);
            }
        }));
    }

    /// Velocity `[B, C, H, W]` (f32) for latents `x` `[B, C, H, W]`, times `t` `[B]` in [0,1]
    /// (0 = noise), caption features `cap_feats` `[B, L, cap_feat_dim]` with right-padded
    /// `cap_mask` `[B, L]` (nonzero = valid), and pooled text vectors `clip_pooled` `[B, clip_text_dim]`.
    /// [`Self::prepare`] then [`Self::forward_prepared`]; a sampler prepares once per batch instead.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        cap_feats: &Tensor,
        cap_mask: &Tensor,
        clip_pooled: &Tensor,
    ) -> Result<Tensor, DitError> {
        let b = self.check_conditioning(cap_feats, cap_mask, clip_pooled)?;
        let latent = self.check_latent(x, t, b)?;
        let prepared = self.prepare(cap_feats, cap_mask, clip_pooled, latent)?;
        self.forward_prepared(x, t, &prepared)
    }

    /// Everything of a forward pass that depends only on the conditioning rows and the latent size
    /// `[H, W]`, computed once for a batch and reused at every step: the valid caption lengths (the
    /// one read of device memory back to the host), the caption embedding and context refiner (no
    /// timestep input), the pooled-text projection, the RoPE factors and the attention masks.
    ///
    /// Rows are grouped by valid caption length; each group's caption is trimmed to that length and
    /// runs as its own batch with no attention mask, so SDPA can pick its fastest (flash) kernel and
    /// no work is spent on padding tokens. Samples never interact, so the result equals the padded
    /// batch's. With a single group this is one plain batch.
    pub fn prepare(
        &self,
        cap_feats: &Tensor,
        cap_mask: &Tensor,
        clip_pooled: &Tensor,
        latent: [i64; 2],
    ) -> Result<Prepared, DitError> {
        let rows = self.check_conditioning(cap_feats, cap_mask, clip_pooled)?;
        self.check_latent_size(latent)?;
        let (h, w) = (latent[0] / self.cfg.patch_size, latent[1] / self.cfg.patch_size);
        tch::no_grad(|| {
            let lens = caption_lengths(cap_mask)?;
            let l = cap_feats.size()[1];
            let mut by_len: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for (row, &len) in lens.iter().enumerate() {
                by_len.entry(len).or_default().push(row as i64);
            }
            let mut groups = Vec::with_capacity(by_len.len());
            if by_len.len() <= 1 {
                let len = lens.first().copied().unwrap_or(l);
                let (feats, pooled) = (cap_feats.narrow(1, 0, len), clip_pooled.shallow_clone());
                groups.push(PreparedGroup { rows: None, state: self.prepare_rows(&feats, &pooled, &lens, h, w, None)? });
            } else {
                for (len, rows) in by_len {
                    let index = Tensor::from_slice(&rows).to_device(self.device);
                    let sel = |v: &Tensor| v.index_select(0, &index.to_device(v.device()));
                    let group_lens = vec![len; rows.len()];
                    let state = self.prepare_rows(&sel(cap_feats).narrow(1, 0, len), &sel(clip_pooled), &group_lens, h, w, None)?;
                    groups.push(PreparedGroup { rows: Some(index), state });
                }
            }
            Ok(Prepared { rows, latent, device: self.device, kind: self.kind, groups })
        })
    }

    /// Velocity for latents `x` `[B, C, H, W]` at times `t` `[B]` under conditioning prepared by
    /// [`Self::prepare`] for the same `B` rows and latent size. Reads nothing back from the device.
    pub fn forward_prepared(&self, x: &Tensor, t: &Tensor, prepared: &Prepared) -> Result<Tensor, DitError> {
        if (prepared.device, prepared.kind) != (self.device, self.kind) {
            return Err(DitError::Input(format!(
                "conditioning prepared by a model on {:?} in {:?}, this one is on {:?} in {:?}",
                prepared.device, prepared.kind, self.device, self.kind
            )));
        }
        if x.size().first() != Some(&prepared.rows) {
            return Err(DitError::Input(format!(
                "latent has {:?} rows, the conditioning was prepared for {}",
                x.size().first(),
                prepared.rows
            )));
        }
        let latent = self.check_latent(x, t, prepared.rows)?;
        if latent != prepared.latent {
            return Err(DitError::Input(format!(
                "latent is {}x{}, the conditioning was prepared for {}x{}",
                latent[0], latent[1], prepared.latent[0], prepared.latent[1]
            )));
        }
        tch::no_grad(|| {
            let (x, t) = (x.to_device(self.device), t.to_device(self.device));
            let mut out: Option<Tensor> = None;
            for group in &prepared.groups {
                let Some(rows) = &group.rows else {
                    return Ok(self.denoise(&x, &t, &group.state, None));
                };
                let v = self.denoise(&x.index_select(0, rows), &t.index_select(0, rows), &group.state, None);
                let dst = out.get_or_insert_with(|| {
                    let mut size = v.size();
                    size[0] = prepared.rows;
                    Tensor::zeros(size.as_slice(), (v.kind(), v.device()))
                });
                let _ = dst.index_copy_(0, rows, &v);
            }
            Ok(out.expect("a prepared batch has at least one group"))
        })
    }

    /// Like [`Self::forward`], also returning the intermediates under the goldens' names. Runs the
    /// whole batch as one padded joint sequence (the reference layout), with key-padding masks.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        t: &Tensor,
        cap_feats: &Tensor,
        cap_mask: &Tensor,
        clip_pooled: &Tensor,
    ) -> Result<(Tensor, Trace), DitError> {
        let b = self.check_conditioning(cap_feats, cap_mask, clip_pooled)?;
        let latent = self.check_latent(x, t, b)?;
        let (h, w) = (latent[0] / self.cfg.patch_size, latent[1] / self.cfg.patch_size);
        let mut trace = Trace::new();
        let v = tch::no_grad(|| -> Result<Tensor, DitError> {
            let lens = caption_lengths(cap_mask)?;
            let state = self.prepare_rows(cap_feats, clip_pooled, &lens, h, w, Some(&mut trace))?;
            Ok(self.denoise(&x.to_device(self.device), &t.to_device(self.device), &state, Some(&mut trace)))
        })?;
        Ok((v, trace))
    }

    /// Checks caption features, mask and pooled vectors against each other and the config; returns
    /// the number of rows.
    fn check_conditioning(&self, cap: &Tensor, mask: &Tensor, pooled: &Tensor) -> Result<i64, DitError> {
        let cfg = &self.cfg;
        let err = |m: String| Err(DitError::Input(m));
        let cs = cap.size();
        if cs.len() != 3 || cs[2] != cfg.cap_feat_dim {
            return err(format!("cap_feats must be [B,L,{}], got {cs:?}", cfg.cap_feat_dim));
        }
        let b = cs[0];
        if b == 0 {
            return err("the conditioning has no rows".into());
        }
        if mask.size() != [b, cs[1]] {
            return err(format!("cap_mask must be [{b},{}], got {:?}", cs[1], mask.size()));
        }
        if pooled.size() != [b, cfg.clip_text_dim] {
            return err(format!("clip_pooled must be [{b},{}], got {:?}", cfg.clip_text_dim, pooled.size()));
        }
        Ok(b)
    }

    /// Checks latents `[b, C, H, W]` and times `[b]`; returns `[H, W]`.
    fn check_latent(&self, x: &Tensor, t: &Tensor, b: i64) -> Result<[i64; 2], DitError> {
        let xs = x.size();
        if xs.len() != 4 || xs[0] != b || xs[1] != self.cfg.in_channels {
            return Err(DitError::Input(format!("latent must be [{b},{},H,W], got {xs:?}", self.cfg.in_channels)));
        }
        if t.size() != [b] {
            return Err(DitError::Input(format!("t must be [{b}], got {:?}", t.size())));
        }
        let latent = [xs[2], xs[3]];
        self.check_latent_size(latent)?;
        Ok(latent)
    }

    fn check_latent_size(&self, [h, w]: [i64; 2]) -> Result<(), DitError> {
        let p = self.cfg.patch_size;
        if h <= 0 || w <= 0 {
            return Err(DitError::Input(format!("latent size {h}x{w} is empty")));
        }
        if h % p != 0 || w % p != 0 {
            return Err(DitError::Input(format!("latent size {h}x{w} not divisible by patch size {p}")));
        }
        Ok(())
    }

    /// The conditioning side of one batch in the reference layout (steps 1-6 and the position
    /// bookkeeping of step 9): rows of valid caption lengths `cap_lens`, an image of `h`×`w` patches.
    fn prepare_rows(
        &self,
        cap_feats: &Tensor,
        clip_pooled: &Tensor,
        cap_lens: &[i64],
        h: i64,
        w: i64,
        mut trace: Option<&mut Trace>,
    ) -> Result<CaptionState, DitError> {
        let (dev, kind) = (self.device, self.kind);
        let mut record = |name: &str, v: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.insert(name.to_string(), v.shallow_clone());
            }
        };
        let b = cap_lens.len() as i64;
        let n_img = h * w;
        let l = cap_feats.size()[1];

        // 2. The pooled-text half of the conditioning vector (the time half changes every step).
        let clip_emb = self.clip_proj_linear.forward(&self.clip_proj_norm.forward(&clip_pooled.to_device(dev).to_kind(kind)));
        record("mid.clip_emb", &clip_emb);

        // 3. Caption embedding (all L rows). Features in another dtype than the model's are
        // normalised before the cast (an fp16 model takes Gemma's features in bf16).
        let mut cap = self.cap_embedder_linear.forward(&self.cap_embedder_norm.forward_into(&cap_feats.to_device(dev), kind));
        record("mid.cap_embedded", &cap);

        // 4-5. Position ids and RoPE factors.
        let s_max = cap_lens.iter().map(|c| c + n_img).max().unwrap_or(n_img);
        let mut joint_ids = vec![0i64; (b * s_max * 3) as usize];
        let mut joint_valid = vec![false; (b * s_max) as usize];
        for (bi, &cl) in cap_lens.iter().enumerate() {
            for s in 0..(cl + n_img) {
                let at = ((bi as i64 * s_max + s) * 3) as usize;
                let (p0, p1, p2) = if s < cl { (s, 0, 0) } else { (cl, (s - cl) / w, (s - cl) % w) };
                joint_ids[at..at + 3].copy_from_slice(&[p0, p1, p2]);
                joint_valid[(bi as i64 * s_max + s) as usize] = true;
            }
        }
        let joint_ids = Tensor::from_slice(&joint_ids).view([b, s_max, 3]);
        let joint_valid = Tensor::from_slice(&joint_valid).view([b, s_max]).to_device(dev);
        record("mid.position_ids", &joint_ids);
        record("mid.joint_mask", &joint_valid.to_kind(Kind::Int64));
        let joint_freqs = self.rope.freqs(&joint_ids)?;
        record("mid.joint_freqs_cis", &joint_freqs.stacked());

        let cap_ids = Tensor::stack(
            &[
                Tensor::arange(l, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, l], false),
                Tensor::zeros([b, l], (Kind::Int64, Device::Cpu)),
                Tensor::zeros([b, l], (Kind::Int64, Device::Cpu)),
            ],
            -1,
        );
        let lens_t = Tensor::from_slice(cap_lens);
        let cap_valid = Tensor::arange(l, (Kind::Int64, Device::Cpu)).unsqueeze(0).lt_tensor(&lens_t.unsqueeze(1));
        // Positions of padded caption rows are clamped to 0 and their factors zeroed.
        let cap_ids = cap_ids * cap_valid.unsqueeze(-1).to_kind(Kind::Int64);
        let cap_valid = cap_valid.to_device(dev);
        let cap_freqs = self.rope.freqs(&cap_ids)?.masked(&cap_valid);
        record("mid.cap_freqs_cis", &cap_freqs.stacked());

        let img_ids = {
            let r = Tensor::arange(h, (Kind::Int64, Device::Cpu)).view([1, h, 1]).expand([b, h, w], false);
            let c = Tensor::arange(w, (Kind::Int64, Device::Cpu)).view([1, 1, w]).expand([b, h, w], false);
            let a0 = lens_t.view([b, 1, 1]).expand([b, h, w], false);
            Tensor::stack(&[a0, r, c], -1).reshape([b, n_img, 3])
        };
        let img_freqs = self.rope.freqs(&img_ids)?;
        record("mid.img_freqs_cis", &img_freqs.stacked());

        // 6. Context refiner on the caption, keys masked to the valid rows.
        let cap_key_mask = cap_lens.iter().any(|&c| c < l).then(|| cap_valid.view([b, 1, 1, l]));
        for (i, blk) in self.context_refiner.iter().enumerate() {
            cap = blk.forward(&cap, cap_key_mask.as_ref(), &cap_freqs, None);
            record(&format!("mid.context_refiner.{i}"), &cap);
        }

        let joint_key_mask = cap_lens.iter().any(|&c| c + n_img < s_max).then(|| joint_valid.view([b, 1, 1, s_max]));
        Ok(CaptionState { cap_lens: cap_lens.to_vec(), h, w, s_max, cap, clip_emb, img_freqs, joint_freqs, joint_key_mask })
    }

    /// The timestep-dependent rest of a forward pass (steps 1-2 for the time, 7-12) for latents `x`
    /// and times `t` on the model's device, rows as in `st`.
    fn denoise(&self, x: &Tensor, t: &Tensor, st: &CaptionState, mut trace: Option<&mut Trace>) -> Tensor {
        let cfg = &self.cfg;
        let kind = self.kind;
        let mut record = |name: &str, v: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.insert(name.to_string(), v.shallow_clone());
            }
        };
        let (b, h, w, s_max) = (st.cap_lens.len() as i64, st.h, st.w, st.s_max);
        let n_img = h * w;

        // 1-2. Conditioning vector.
        let t_emb = self.t_embedder.forward(t, kind);
        record("mid.t_emb", &t_emb);
        let adaln_in = self.time_text_embed.forward(&Tensor::cat(&[&t_emb, &st.clip_emb], -1).silu());
        record("mid.adaln_input", &adaln_in);

        // 7-8. Patchify, embed, noise refiner (no padding among image tokens).
        let p = cfg.patch_size;
        let patches = x
            .to_kind(kind)
            .view([b, cfg.in_channels, h, p, w, p])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([b, n_img, cfg.patch_dim()]);
        record("mid.patches", &patches);
        let mut img = self.x_embedder.forward(&patches);
        record("mid.x_embedded", &img);
        for (i, blk) in self.noise_refiner.iter().enumerate() {
            img = blk.forward(&img, None, &st.img_freqs, Some(&adaln_in));
            record(&format!("mid.noise_refiner.{i}"), &img);
        }

        // 9. Joint sequence [valid caption ; image], zero-padded to s_max.
        let rows: Vec<Tensor> = st
            .cap_lens
            .iter()
            .enumerate()
            .map(|(bi, &cl)| {
                let bi = bi as i64;
                let seq = Tensor::cat(&[st.cap.get(bi).narrow(0, 0, cl), img.get(bi)], 0);
                let pad = s_max - (cl + n_img);
                if pad > 0 {
                    seq.constant_pad_nd([0, 0, 0, pad])
                } else {
                    seq
                }
            })
            .collect();
        let mut joint = Tensor::stack(&rows, 0);
        record("mid.joint_input", &joint);

        // 10. Main layers.
        for (i, blk) in self.layers.iter().enumerate() {
            joint = blk.forward(&joint, st.joint_key_mask.as_ref(), &st.joint_freqs, Some(&adaln_in));
            record(&format!("mid.layers.{i}"), &joint);
        }

        // 11-12. Final layer, then unpatchify each sample's image tokens.
        let out = self.final_layer.forward(&joint, &adaln_in);
        record("mid.final_layer", &out);
        let img_tokens: Vec<Tensor> =
            st.cap_lens.iter().enumerate().map(|(bi, &cl)| out.get(bi as i64).narrow(0, cl, n_img)).collect();
        let co = cfg.out_channels();
        let v = Tensor::stack(&img_tokens, 0)
            .view([b, h, w, p, p, co])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, co, h * p, w * p])
            .to_kind(Kind::Float);
        record("out.velocity", &v);
        v
    }
}

/// A batch's conditioning prepared for the denoising steps ([`NextDit::prepare`]): its rows grouped
/// by valid caption length, each group's caption-side state.
#[derive(Debug)]
pub struct Prepared {
    rows: i64,
    latent: [i64; 2],
    /// The preparing model's device and dtype (its tensors are in them).
    device: Device,
    kind: Kind,
    groups: Vec<PreparedGroup>,
}

impl Prepared {
    /// Batch rows.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// Number of separately run row groups (distinct valid caption lengths).
    pub fn groups(&self) -> usize {
        self.groups.len()
    }
}

#[derive(Debug)]
struct PreparedGroup {
    /// The group's batch rows (on the model's device); `None` when the group is the whole batch in order.
    rows: Option<Tensor>,
    state: CaptionState,
}

/// The step-independent state of one batch in the reference layout.
#[derive(Debug)]
struct CaptionState {
    cap_lens: Vec<i64>,
    /// The image in patches.
    h: i64,
    w: i64,
    /// Longest joint sequence.
    s_max: i64,
    /// The context refiner's output `[B, L, dim]`.
    cap: Tensor,
    /// `clip_text_pooled_proj` of the pooled vectors.
    clip_emb: Tensor,
    img_freqs: RopeFreqs,
    joint_freqs: RopeFreqs,
    /// `[B, 1, 1, s_max]`, or `None` when no row is padded.
    joint_key_mask: Option<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_of_a_wider_dtype_are_normalised_before_the_cast() {
        // A bf16 feature row with an activation fp16 cannot hold, into an fp16 model's norm.
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Half);
        let norm = RmsNorm::new(vs.root(), 4, 1e-6);
        tch::no_grad(|| norm.weight.shallow_clone().copy_(&Tensor::from_slice(&[1.0f32, 2.0, 1.0, 0.5])));
        let x = Tensor::from_slice(&[1.0e5f32, 3.0e4, -2.0e4, 1.0]).view([1, 1, 4]).to_kind(Kind::BFloat16);
        assert_eq!(x.to_kind(Kind::Half).isinf().sum(Kind::Int64).int64_value(&[]), 1, "the naive cast overflows");
        let y = norm.forward_into(&x, Kind::Half);
        assert_eq!(y.kind(), Kind::Half);
        let want = rms_normalize(&x.to_kind(Kind::Float), 1e-6) * Tensor::from_slice(&[1.0f32, 2.0, 1.0, 0.5]);
        let diff = (y.to_kind(Kind::Float) - &want).abs().max().double_value(&[]);
        assert!(diff < 2e-3, "fp16 output differs from the f32 norm by {diff}");
        // An input already in the model's dtype takes the fused norm.
        let same = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 1, 4]).to_kind(Kind::Half);
        assert!(norm.forward_into(&same, Kind::Half).equal(&norm.forward(&same)));
    }

    #[test]
    fn official_transformer_config_json_gives_the_newbie_preset() {
        // `transformer/config.json` as written by the official converter (spec §1).
        let text = r#"{"model_type":"nextdit_clip","patch_size":2,"dim":2304,"n_layers":36,"n_heads":24,"n_kv_heads":8,"in_channels":16,"axes_dims":[32,32,32],"axes_lens":[1024,512,512],"clip_text_dim":1024,"clip_img_dim":1024,"_class_name":"NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP"}"#;
        let cfg: DitConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg, DitConfig::newbie_exp0_1());
        assert_eq!((cfg.head_dim(), cfg.ffn_hidden(), cfg.t_emb_dim(), cfg.n_rep()), (96, 9216, 1024, 3));
    }

    #[test]
    fn diffusers_config_names_are_accepted() {
        let text = r#"{"_class_name":"Lumina2Transformer2DModel","hidden_size":64,"num_layers":2,"num_refiner_layers":2,"num_attention_heads":4,"num_kv_heads":2,"multiple_of":96,"cap_feat_dim":40,"axes_dim_rope":[4,6,6],"axes_lens":[64,32,32],"pooled_projection_dim":24,"patch_size":2,"in_channels":16}"#;
        let cfg: DitConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg, DitConfig::tiny());
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut c = DitConfig::tiny();
        c.axes_dims = vec![4, 6, 8];
        assert!(c.validate().is_err());
        let mut c = DitConfig::tiny();
        c.n_kv_heads = 3;
        assert!(c.validate().is_err());
    }

    #[test]
    fn block_parameter_counts_match_the_spec() {
        // Spec §3: 87,312,576 per modulated block, 77,866,176 per context-refiner block.
        let cfg = DitConfig::newbie_exp0_1();
        let count = |prefix: &str| -> i64 {
            cfg.param_shapes().iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, s)| s.iter().product::<i64>()).sum()
        };
        assert_eq!(count("layers.7."), 87_312_576);
        assert_eq!(count("noise_refiner.1."), 87_312_576);
        assert_eq!(count("context_refiner.0."), 77_866_176);
    }
}
