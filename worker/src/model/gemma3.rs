//! Gemma 3 text model (the language model of `google/gemma-3-4b-it`), as NewBie's caption encoder.
//!
//! NewBie feeds the DiT with `hidden_states[-2]`: the output of the second-to-last decoder layer,
//! before the final norm. [`Gemma3TextModel::forward`] returns exactly that (and skips the last
//! layer); [`Gemma3TextModel::hidden_states`] returns all of them for tests.
//!
//! Arithmetic that matters (transformers `Gemma3TextModel`):
//! * embeddings × `sqrt(hidden_size)`, the factor rounded to the weight dtype first (50.5 in bf16);
//! * every RMSNorm scales by `(1 + w)`, statistics and scale in f32, then cast back;
//! * sandwich norms around attention and MLP; q/k RMSNorm over `head_dim`; GQA;
//! * causal mask, plus a sliding window on local layers: query i sees key j iff
//!   `i - window < j <= i` (and j is not padding);
//! * NeoX rotate-half RoPE; local layers theta 1e4, global layers theta 1e6 with linear scaling
//!   (inverse frequencies divided by the factor); attention scale `query_pre_attn_scalar^-0.5`.
//!
//! The module paths are the text model's own names (`embed_tokens`, `layers.{i}.self_attn.q_proj`,
//! ...); checkpoints that nest them (`language_model.model.` in the `-it` release) are accepted by
//! [`Gemma3TextModel::load`]. The prompt preparation of NewBie (system prompts, BOS, 512-token cap,
//! right padding to a multiple of 8) is at the bottom of this file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::loading::{load_checkpoint, KeyTarget, LoadOptions};
use super::tokenizer::{pad_right, TextTokenizer, TokenizerError};
use super::vae::{random_frozen, read_json, WeightsError};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// One entry of `rope_parameters` (transformers ≥ 5 layout, keyed by layer type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
}

fn default_rope_type() -> String {
    "default".into()
}

/// Legacy `rope_scaling` entry (transformers 4.x configs, e.g. the released gemma-3-4b-it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// transformers also reads the older key `type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
}

/// Special token ids as configuration files write them: one id, or a list (`gemma-3-1b-it` has
/// `"eos_token_id": [1, 106]`), or `null`. Informational only: the tokenizer files give the ids used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

/// Mirror of transformers' `Gemma3TextConfig` (`text_config` of a `Gemma3Config`). Missing fields
/// take transformers' defaults, so both the 4.x layout (`rope_theta`, `rope_local_base_freq`,
/// `rope_scaling`, `sliding_window_pattern`) and the 5.x layout (`layer_types`,
/// `rope_parameters`) parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gemma3Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<BTreeMap<String, RopeParameters>>,
    pub rope_theta: f64,
    pub rope_local_base_freq: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub hidden_activation: String,
    pub max_position_embeddings: i64,
    pub pad_token_id: Option<TokenIds>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub attention_bias: bool,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub use_bidirectional_attention: bool,
}

impl Default for Gemma3Config {
    /// transformers' `Gemma3TextConfig.__init__` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 262_208,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            query_pre_attn_scalar: 256.0,
            sliding_window: 4096,
            layer_types: None,
            sliding_window_pattern: None,
            rope_parameters: None,
            rope_theta: 1_000_000.0,
            rope_local_base_freq: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            hidden_activation: "gelu_pytorch_tanh".into(),
            max_position_embeddings: 131_072,
            pad_token_id: Some(TokenIds::One(0)),
            bos_token_id: Some(TokenIds::One(2)),
            eos_token_id: Some(TokenIds::One(1)),
            attention_bias: false,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            use_bidirectional_attention: false,
        }
    }
}

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

/// Attention setup of one decoder layer, resolved from either config layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttention {
    /// `Some(window)` on local layers.
    pub sliding_window: Option<i64>,
    pub rope_theta: f64,
    /// Linear RoPE scaling factor (positions divided by it); 1 when unscaled.
    pub rope_linear_factor: f64,
}

impl Gemma3Config {
    /// `google/gemma-3-4b-it` text config (its `config.json` `text_config` over the
    /// `Gemma3TextConfig` defaults; spec §7.1): 34 layers, hidden 2560, 8 heads / 4 KV heads of 256,
    /// window 1024 on 5 of every 6 layers, RoPE 1e4 local / 1e6 ×1/8 linear global.
    pub fn gemma3_4b() -> Self {
        let layer_types = (0..34)
            .map(|i| if (i + 1) % 6 == 0 { FULL } else { SLIDING }.to_string())
            .collect();
        Self {
            hidden_size: 2560,
            intermediate_size: 10240,
            num_hidden_layers: 34,
            sliding_window: 1024,
            layer_types: Some(layer_types),
            rope_parameters: Some(BTreeMap::from([
                (
                    SLIDING.to_string(),
                    RopeParameters {
                        rope_type: "default".into(),
                        rope_theta: 10_000.0,
                        factor: None,
                    },
                ),
                (
                    FULL.to_string(),
                    RopeParameters {
                        rope_type: "linear".into(),
                        rope_theta: 1_000_000.0,
                        factor: Some(8.0),
                    },
                ),
            ])),
            ..Self::default()
        }
    }

    /// A random-weight model for CPU tests and the `tiny` pipeline: the layout of the golden set
    /// (hidden 64, 4 heads of 24 ≠ hidden/heads, 2 KV heads, window 4, every 3rd layer global).
    pub fn tiny() -> Self {
        let layer_types = (0..4)
            .map(|i| if (i + 1) % 3 == 0 { FULL } else { SLIDING }.to_string())
            .collect();
        Self {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 24,
            query_pre_attn_scalar: 24.0,
            sliding_window: 4,
            max_position_embeddings: 1024,
            ..Self::gemma3_4b()
        }
        .with_layer_types(layer_types)
    }

    fn with_layer_types(mut self, layer_types: Vec<String>) -> Self {
        self.layer_types = Some(layer_types);
        self
    }

    /// Reads a `config.json`: either a text config or a multimodal `Gemma3Config` holding one
    /// under `text_config`.
    pub fn from_json_file(path: &Path) -> Result<Self, WeightsError> {
        let value: serde_json::Value = read_json(path)?;
        let text = value.get("text_config").cloned().unwrap_or(value);
        serde_json::from_value(text).map_err(|source| WeightsError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Per-layer attention type and RoPE, from `layer_types` / `rope_parameters` when present,
    /// else from `sliding_window_pattern` (default 6) / `rope_theta`, `rope_local_base_freq`,
    /// `rope_scaling`.
    pub fn layer_attention(&self) -> Result<Vec<LayerAttention>, WeightsError> {
        let n = self.num_hidden_layers as usize;
        let types: Vec<String> = match &self.layer_types {
            Some(t) if t.len() == n => t.clone(),
            Some(t) => {
                return Err(WeightsError::Unsupported(format!(
                    "{} layer_types for {n} layers",
                    t.len()
                )))
            }
            None => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1) as usize;
                (0..n)
                    .map(|i| if (i + 1) % pattern == 0 { FULL } else { SLIDING }.to_string())
                    .collect()
            }
        };
        types
            .iter()
            .map(|t| {
                let sliding = match t.as_str() {
                    SLIDING => true,
                    FULL => false,
                    other => return Err(WeightsError::Unsupported(format!("layer type {other:?}"))),
                };
                let (theta, factor) = match &self.rope_parameters {
                    Some(params) => {
                        let p = params.get(t).ok_or_else(|| {
                            WeightsError::Unsupported(format!("no rope_parameters for {t}"))
                        })?;
                        (p.rope_theta, rope_factor(&p.rope_type, p.factor)?)
                    }
                    None if sliding => (self.rope_local_base_freq, 1.0),
                    None => match &self.rope_scaling {
                        Some(s) => (self.rope_theta, rope_factor(&s.rope_type, s.factor)?),
                        None => (self.rope_theta, 1.0),
                    },
                };
                Ok(LayerAttention {
                    sliding_window: sliding.then_some(self.sliding_window),
                    rope_theta: theta,
                    rope_linear_factor: factor,
                })
            })
            .collect()
    }

    fn validate(&self) -> Result<(), WeightsError> {
        let bad = |m: String| Err(WeightsError::Unsupported(m));
        if !matches!(self.hidden_activation.as_str(), "gelu_pytorch_tanh" | "gelu_tanh") {
            return bad(format!("hidden_activation {:?}", self.hidden_activation));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad("num_attention_heads not a multiple of num_key_value_heads".into());
        }
        if self.use_bidirectional_attention {
            return bad("use_bidirectional_attention".into());
        }
        if self.head_dim % 2 != 0 {
            return bad("odd head_dim".into());
        }
        self.layer_attention().map(|_| ())
    }
}

fn rope_factor(rope_type: &str, factor: Option<f64>) -> Result<f64, WeightsError> {
    match rope_type {
        "default" => Ok(1.0),
        "linear" => Ok(factor.unwrap_or(1.0)),
        other => Err(WeightsError::Unsupported(format!("rope_type {other:?}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

/// Gemma RMSNorm: `x * rsqrt(mean(x²) + eps) * (1 + w)` in f32, cast back to the input dtype.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: vs.zeros("weight", &[dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let ms = xf.square().mean_dim(-1, true, Kind::Float);
        let y = xf * (ms + self.eps).rsqrt();
        (y * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(x.kind())
    }
}

fn linear_no_bias(vs: nn::Path, c_in: i64, c_out: i64) -> nn::Linear {
    nn::linear(
        vs,
        c_in,
        c_out,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

/// cos / sin tables [L, head_dim] (f32) for NeoX rotate-half RoPE at positions 0..L-1.
fn rope_tables(len: i64, head_dim: i64, theta: f64, linear_factor: f64, device: Device) -> (Tensor, Tensor) {
    let opts = (Kind::Float, device);
    let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float)
        / head_dim as f64;
    let inv_freq = Tensor::from(theta)
        .to_kind(Kind::Float)
        .to_device(device)
        .pow(&exponents)
        .reciprocal()
        / linear_factor;
    let pos = Tensor::arange(len, opts);
    let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0); // [L, D/2]
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// `x * cos + rotate_half(x) * sin` in f32 for x [B, H, L, D]; returns the input dtype.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let half = xf.size()[3] / 2;
    let x1 = xf.narrow(-1, 0, half);
    let x2 = xf.narrow(-1, half, half);
    let rotated = Tensor::cat(&[&(-&x2), &x1], -1);
    (xf * cos + rotated * sin).to_kind(x.kind())
}

/// Additive attention bias [B, 1, L, L] (f32): 0 where query i may see key j, the most negative
/// finite f32 elsewhere (finite so that fully masked padding rows stay NaN-free).
fn attention_bias(attention_mask: &Tensor, window: Option<i64>) -> Tensor {
    let device = attention_mask.device();
    let (b, l) = attention_mask.size2().expect("attention mask must be [B, L]");
    let idx = Tensor::arange(l, (Kind::Int64, device));
    let i = idx.view([l, 1]);
    let j = idx.view([1, l]);
    let mut allowed = j.le_tensor(&i);
    if let Some(w) = window {
        allowed = allowed.logical_and(&j.gt_tensor(&(&i - w)));
    }
    let key_valid = attention_mask.ne(0).view([b, 1, 1, l]);
    let allowed = allowed.view([1, 1, l, l]).logical_and(&key_valid);
    Tensor::zeros([b, 1, l, l], (Kind::Float, device)).masked_fill(&allowed.logical_not(), f32::MIN as f64)
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &Gemma3Config) -> Self {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let lin = |name: &str, i: i64, o: i64| {
            nn::linear(
                &vs / name,
                i,
                o,
                nn::LinearConfig {
                    bias: cfg.attention_bias,
                    ..Default::default()
                },
            )
        };
        Self {
            q_proj: lin("q_proj", h, cfg.num_attention_heads * d),
            k_proj: lin("k_proj", h, cfg.num_key_value_heads * d),
            v_proj: lin("v_proj", h, cfg.num_key_value_heads * d),
            o_proj: lin("o_proj", cfg.num_attention_heads * d, h),
            q_norm: RmsNorm::new(&vs / "q_norm", d, cfg.rms_norm_eps),
            k_norm: RmsNorm::new(&vs / "k_norm", d, cfg.rms_norm_eps),
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        }
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), bias: &Tensor) -> Tensor {
        let (b, l, _) = x.size3().expect("[B, L, H]");
        let heads = |t: Tensor, n: i64| t.view([b, l, n, self.head_dim]).transpose(1, 2);
        let q = self.q_norm.forward(&heads(self.q_proj.forward(x), self.n_heads));
        let k = self
            .k_norm
            .forward(&heads(self.k_proj.forward(x), self.n_kv_heads));
        let v = heads(self.v_proj.forward(x), self.n_kv_heads);
        let q = apply_rope(&q, &rope.0, &rope.1);
        let k = apply_rope(&k, &rope.0, &rope.1);
        // GQA: KV head j serves query heads j*n_rep .. j*n_rep + n_rep - 1.
        let n_rep = self.n_heads / self.n_kv_heads;
        let repeat = |t: Tensor| {
            t.unsqueeze(2)
                .expand([b, self.n_kv_heads, n_rep, l, self.head_dim], false)
                .reshape([b, self.n_heads, l, self.head_dim])
        };
        let (k, v) = (repeat(k), repeat(v));
        let mut scores = q
            .to_kind(Kind::Float)
            .matmul(&k.to_kind(Kind::Float).transpose(-2, -1))
            * self.scale;
        if let Some(cap) = self.softcap {
            scores = (scores / cap).tanh() * cap;
        }
        let probs = (scores + bias).softmax(-1, Kind::Float).to_kind(v.kind());
        let o = probs
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, l, self.n_heads * self.head_dim]);
        self.o_proj.forward(&o)
    }
}

/// `down(gelu_tanh(gate(x)) * up(x))`.
#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(vs: nn::Path, cfg: &Gemma3Config) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Self {
            gate_proj: linear_no_bias(&vs / "gate_proj", h, i),
            up_proj: linear_no_bias(&vs / "up_proj", h, i),
            down_proj: linear_no_bias(&vs / "down_proj", i, h),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x).gelu("tanh");
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    attention: LayerAttention,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &Gemma3Config, attention: LayerAttention) -> Self {
        let norm = |name: &str| RmsNorm::new(&vs / name, cfg.hidden_size, cfg.rms_norm_eps);
        Self {
            input_layernorm: norm("input_layernorm"),
            self_attn: Attention::new(&vs / "self_attn", cfg),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            mlp: Mlp::new(&vs / "mlp", cfg),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
            attention,
        }
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), bias: &Tensor) -> Tensor {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), rope, bias);
        let x = x + self.post_attention_layernorm.forward(&h);
        let h = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&x));
        &x + self.post_feedforward_layernorm.forward(&h)
    }
}

// ---------------------------------------------------------------------------------------------
// Public model
// ---------------------------------------------------------------------------------------------

/// Key prefixes under which checkpoints store the text model; each key loses the first one it
/// starts with.
const TEXT_PREFIXES: [&str; 4] = [
    "language_model.model.", // google/gemma-3-*-it safetensors (Gemma3ForConditionalGeneration)
    "model.language_model.", // the same, saved by transformers >= 4.52
    "language_model.",       // Gemma3Model saved by transformers >= 4.52
    "model.",                // Gemma3ForCausalLM (text-only checkpoints)
];

/// Parts of multimodal / causal-LM checkpoints that the caption encoder does not use (keys after
/// prefix stripping).
fn is_unused_checkpoint_key(key: &str) -> bool {
    ["vision_tower.", "multi_modal_projector.", "lm_head."]
        .iter()
        .any(|p| key.starts_with(p))
}

/// Strict-loading options for Gemma 3 text weights: prefixes stripped, vision tower, projector
/// and `lm_head` skipped, everything else must match the model exactly.
pub fn load_options() -> LoadOptions {
    LoadOptions {
        strip_prefixes: TEXT_PREFIXES.iter().map(|p| p.to_string()).collect(),
        rename: Some(Arc::new(|k: &str| {
            if is_unused_checkpoint_key(k) {
                KeyTarget::Skip
            } else {
                KeyTarget::Key(k.to_string())
            }
        })),
        ..LoadOptions::default()
    }
}

/// Gemma 3 text model returning NewBie's caption features.
#[derive(Debug)]
pub struct Gemma3TextModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    config: Gemma3Config,
    device: Device,
    kind: Kind,
    /// What [`Self::to_device`] moves: the variable store, when this model owns it (loaded or
    /// given with [`Self::own_variables`]), and its host copies.
    weights: super::loading::MovableWeights,
}

impl Gemma3TextModel {
    /// Builds the model under `vs` with keys `embed_tokens.weight`, `layers.{i}.*`, `norm.weight`.
    /// Holds libtorch's global generator while tch's initialisers draw (see [`super::rng`]).
    pub fn new(vs: &nn::Path, cfg: &Gemma3Config) -> Result<Self, WeightsError> {
        cfg.validate()?;
        let _generator = super::rng::lock();
        let attention = cfg.layer_attention()?;
        let embed_tokens = vs.sub("embed_tokens").var(
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            nn::Init::Randn {
                mean: 0.0,
                stdev: (cfg.hidden_size as f64).powf(-0.5),
            },
        );
        let layers = attention
            .into_iter()
            .enumerate()
            .map(|(i, a)| DecoderLayer::new(vs / "layers" / i, cfg, a))
            .collect();
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(vs / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            config: cfg.clone(),
            device: vs.device(),
            kind: vs.kind(),
            weights: Default::default(),
        })
    }

    /// A frozen model with random weights drawn from `seed`.
    pub fn random(cfg: &Gemma3Config, device: Device, kind: Kind, seed: i64) -> Result<Self, WeightsError> {
        random_frozen(device, kind, seed, |root| Self::new(root, cfg))
    }

    /// Loads the text weights from a safetensors file, a shard index or a directory of shards
    /// (see [`load_options`]); tensors are read one at a time and converted to `kind` on `device`.
    pub fn load(
        weights: &Path,
        cfg: &Gemma3Config,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightsError> {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = Self::new(&vs.root(), cfg)?;
        load_checkpoint(&mut vs, weights, &load_options())?;
        vs.freeze();
        Ok(model.own_variables(vs))
    }

    /// Takes ownership of the variable store the model was built in, so that it can be moved.
    pub fn own_variables(mut self, vs: nn::VarStore) -> Self {
        self.device = vs.device();
        self.weights = super::loading::MovableWeights::owning(vs);
        self
    }

    /// Moves the weights to `device`; used to keep the text encoders in host memory between
    /// encodes (see [`super::loading::MovableWeights::to_device`]). Needs the model's own variable
    /// store.
    pub fn to_device(&mut self, device: Device) -> Result<(), WeightsError> {
        self.weights.to_device(device)?;
        self.device = device;
        Ok(())
    }

    /// Loads a checkpoint folder: `config.json` (text or multimodal config) and its safetensors.
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self, WeightsError> {
        let cfg = Gemma3Config::from_json_file(&dir.join("config.json"))?;
        Self::load(dir, &cfg, device, kind)
    }

    pub fn config(&self) -> &Gemma3Config {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Token embeddings × sqrt(hidden_size), the factor rounded to the weight dtype first.
    fn embed(&self, input_ids: &Tensor) -> Tensor {
        let scale = Tensor::from((self.config.hidden_size as f64).sqrt() as f32).to_kind(self.kind);
        let e = Tensor::embedding(
            &self.embed_tokens,
            &input_ids.to_device(self.device),
            -1,
            false,
            false,
        );
        e * scale.to_device(self.device)
    }

    /// Runs the first `n_layers` decoder layers; collects every intermediate when `all` is set.
    fn run(&self, input_ids: &Tensor, attention_mask: &Tensor, n_layers: usize, all: bool) -> Vec<Tensor> {
        tch::no_grad(|| {
            let mask = attention_mask.to_device(self.device);
            let len = input_ids.size()[1];
            let mut rope_cache: Vec<((u64, u64), (Tensor, Tensor))> = Vec::new();
            let mut bias_cache: Vec<(Option<i64>, Tensor)> = Vec::new();
            let mut h = self.embed(input_ids);
            let mut out = Vec::new();
            if all {
                out.push(h.shallow_clone());
            }
            for layer in &self.layers[..n_layers] {
                let a = layer.attention;
                let key = (a.rope_theta.to_bits(), a.rope_linear_factor.to_bits());
                if !rope_cache.iter().any(|(k, _)| *k == key) {
                    let t = rope_tables(
                        len,
                        self.config.head_dim,
                        a.rope_theta,
                        a.rope_linear_factor,
                        self.device,
                    );
                    rope_cache.push((key, t));
                }
                if !bias_cache.iter().any(|(w, _)| *w == a.sliding_window) {
                    bias_cache.push((a.sliding_window, attention_bias(&mask, a.sliding_window)));
                }
                let rope = &rope_cache.iter().find(|(k, _)| *k == key).unwrap().1;
                let bias = &bias_cache.iter().find(|(w, _)| *w == a.sliding_window).unwrap().1;
                h = layer.forward(&h, rope, bias);
                if all {
                    out.push(h.shallow_clone());
                }
            }
            if !all {
                out.push(h);
            }
            out
        })
    }

    /// NewBie's caption features: `hidden_states[-2]` [B, L, hidden] for `input_ids` [B, L] and
    /// `attention_mask` [B, L] (1 = token, 0 = right padding), in the model dtype. Rows at padding
    /// positions hold values that must be ignored.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let n = self.layers.len().saturating_sub(1);
        self.run(input_ids, attention_mask, n, false)
            .pop()
            .expect("one output")
    }

    /// All of transformers' `hidden_states`: the scaled embeddings, the output of every layer but
    /// the last, and the final-norm output of the last layer (`num_hidden_layers + 1` tensors).
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Vec<Tensor> {
        let mut out = self.run(input_ids, attention_mask, self.layers.len(), true);
        let last = out.pop().expect("at least the embeddings");
        out.push(tch::no_grad(|| self.norm.forward(&last)));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt preparation (NewBie finetune.py `T2IItemProcessor` / demo.py)
// ---------------------------------------------------------------------------------------------

/// Training system prompt for XML captions (note the trailing space); defined once, with the prompt
/// language, in `farm_proto::prompt`.
pub const SYSTEM_PROMPT_XML: &str = farm_proto::prompt::XML_SYSTEM_PROMPT;

/// Training system prompt for plain-text / tag captions (note the trailing space).
pub const SYSTEM_PROMPT_TEXT: &str = farm_proto::prompt::TEXT_SYSTEM_PROMPT;

/// Longest Gemma sequence, BOS included.
pub const MAX_GEMMA_TOKENS: usize = 512;

/// Padded length is rounded up to a multiple of this.
pub const GEMMA_PAD_MULTIPLE: usize = 8;

/// How a prompt is written; selects the system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat {
    Xml,
    Text,
}

impl PromptFormat {
    /// XML when the prompt contains markup, by the same rule the renderer and the coordinator use
    /// ([`farm_proto::prompt::looks_like_xml`]).
    pub fn detect(prompt: &str) -> Self {
        if farm_proto::prompt::looks_like_xml(prompt) {
            PromptFormat::Xml
        } else {
            PromptFormat::Text
        }
    }

    pub fn system_prompt(self) -> &'static str {
        match self {
            PromptFormat::Xml => SYSTEM_PROMPT_XML,
            PromptFormat::Text => SYSTEM_PROMPT_TEXT,
        }
    }
}

/// The text Gemma sees: system prompt + prompt, or the empty string for an empty prompt (the
/// unconditional / empty negative gets no system prompt).
pub fn gemma_prompt_text(prompt: &str, format: PromptFormat) -> String {
    if prompt.is_empty() {
        String::new()
    } else {
        format!("{}{prompt}", format.system_prompt())
    }
}

/// Token ids [B, L] and attention mask [B, L] (both int64, 1 = token) for Gemma.
#[derive(Debug)]
pub struct GemmaInputs {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

/// Tokenizes already-prefixed texts (see [`gemma_prompt_text`]) for Gemma: BOS first, no EOS,
/// truncated to [`MAX_GEMMA_TOKENS`], right padded with PAD to the longest sequence rounded up to a
/// multiple of [`GEMMA_PAD_MULTIPLE`].
pub fn gemma_inputs(tokenizer: &dyn TextTokenizer, texts: &[&str]) -> Result<GemmaInputs, TokenizerError> {
    let ids = tokenizer.special_ids();
    let bos = ids.bos.ok_or(TokenizerError::MissingSpecial("bos"))?;
    let pad = ids.pad.ok_or(TokenizerError::MissingSpecial("pad"))?;
    let seqs = texts
        .iter()
        .map(|t| {
            let mut seq = vec![bos];
            seq.extend(tokenizer.encode(t)?);
            seq.truncate(MAX_GEMMA_TOKENS);
            Ok(seq)
        })
        .collect::<Result<Vec<_>, TokenizerError>>()?;
    let (input_ids, attention_mask) = pad_right(&seqs, pad, GEMMA_PAD_MULTIPLE);
    Ok(GemmaInputs {
        input_ids,
        attention_mask,
    })
}

/// [`gemma_inputs`] for a batch of user prompts: the system prompt is chosen per prompt
/// ([`PromptFormat::detect`]) and left out for empty prompts.
pub fn gemma_inputs_for_prompts(
    tokenizer: &dyn TextTokenizer,
    prompts: &[&str],
) -> Result<GemmaInputs, TokenizerError> {
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| gemma_prompt_text(p, PromptFormat::detect(p)))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    gemma_inputs(tokenizer, &refs)
}
