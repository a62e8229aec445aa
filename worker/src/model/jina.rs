//! Jina CLIP v2 text tower: NewBie's pooled text vector for the DiT's AdaLN input.
//!
//! `get_text_features(ids)` of `jinaai/jina-clip-v2` on NewBie's path: an XLM-RoBERTa encoder
//! (jina-embeddings-v3 "flash" variant) with
//! * embeddings = word + token-type(0), then `emb_ln`; no absolute positions;
//! * NeoX rotate-half rotary on q and k over the whole head, base `rotary_emb_base` (20000);
//! * post-LN blocks: `x = norm1(x + out_proj(attn(x)))`, `x = norm2(x + fc2(gelu(fc1(x))))`;
//! * the `retrieval.query` LoRA active on every linear and embedding;
//! * mean pooling over the non-pad tokens (`<s>` and `</s>` included), identity projection and
//!   no L2 normalisation.
//!
//! The checkpoint stores each LoRA-adapted weight un-merged as a torch parametrization
//! (`<m>.parametrizations.weight.{original,0.lora_A,0.lora_B}`); loading ([`load_options`],
//! [`merge_lora`]) folds the chosen adapter into `<m>.weight`, so inference runs a plain encoder:
//! linear `W + s · B[t] @ A[t]`, embedding `W + s · A[t] @ B[t]`, `s = lora_alpha / lora_rank`.
//! Module paths are the encoder's own names below `text_model.transformer.roberta.`.

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

/// `text_config` of jina-clip-v2's `config.json` (the fields the text tower uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JinaTextConfig {
    /// Output dimension (= hidden size with the identity projection).
    pub embed_dim: i64,
    pub hf_model_name_or_path: String,
    pub default_instruction_task: Option<String>,
    pub default_lora_task: Option<String>,
    pub pooler_type: Option<String>,
    pub proj_type: Option<String>,
    pub proj_bias: bool,
}

impl Default for JinaTextConfig {
    fn default() -> Self {
        Self {
            embed_dim: 1024,
            hf_model_name_or_path: "jinaai/jina-embeddings-v3".into(),
            default_instruction_task: None,
            default_lora_task: Some("retrieval.query".into()),
            pooler_type: Some("mean_pooler".into()),
            proj_type: None,
            proj_bias: false,
        }
    }
}

/// The XLM-RoBERTa (jina-embeddings-v3) encoder config with jina-clip-v2's
/// `hf_model_config_kwargs` applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JinaEncoderConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub type_vocab_size: i64,
    pub pad_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub position_embedding_type: String,
    pub rotary_emb_base: f64,
    pub max_position_embeddings: i64,
    pub lora_adaptations: Vec<String>,
    pub lora_rank: i64,
    pub lora_alpha: f64,
}

impl Default for JinaEncoderConfig {
    /// jina-embeddings-v3's encoder with jina-clip-v2's adapter overrides (one adapter,
    /// `retrieval.query`, rank 4, alpha 4).
    fn default() -> Self {
        Self {
            vocab_size: 250_002,
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            type_vocab_size: 1,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
            position_embedding_type: "rotary".into(),
            rotary_emb_base: 20_000.0,
            max_position_embeddings: 8194,
            lora_adaptations: vec!["retrieval.query".into()],
            lora_rank: 4,
            lora_alpha: 4.0,
        }
    }
}

/// Configuration of the Jina CLIP v2 text tower, laid out like the golden sidecar:
/// `text_config` + the resolved encoder kwargs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JinaConfig {
    pub text_config: JinaTextConfig,
    pub hf_model_config_kwargs: JinaEncoderConfig,
}

impl JinaConfig {
    /// `jinaai/jina-clip-v2`: `config.json` `text_config` (embed_dim 1024, `retrieval.query` LoRA,
    /// mean pooler, no projection) over jina-embeddings-v3's encoder (24 × 1024, 16 heads, FFN 4096,
    /// rotary base 20000); spec §7.3.
    pub fn jina_clip_v2() -> Self {
        Self {
            text_config: JinaTextConfig::default(),
            hf_model_config_kwargs: JinaEncoderConfig::default(),
        }
    }

    /// A random-weight tower for CPU tests and the `tiny` pipeline (the golden set's layout).
    pub fn tiny() -> Self {
        Self {
            text_config: JinaTextConfig {
                embed_dim: 64,
                ..JinaTextConfig::default()
            },
            hf_model_config_kwargs: JinaEncoderConfig {
                vocab_size: 512,
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 256,
                max_position_embeddings: 2050,
                ..JinaEncoderConfig::default()
            },
        }
    }

    /// Reads jina-clip-v2's `config.json`: `text_config`, whose `hf_model_config_kwargs` override
    /// the jina-embeddings-v3 encoder defaults of [`JinaConfig::jina_clip_v2`] (the encoder's own
    /// config lives in another repository and is not needed).
    pub fn from_clip_config_json(path: &Path) -> Result<Self, WeightsError> {
        let value: serde_json::Value = read_json(path)?;
        let json_err = |source| WeightsError::Json {
            path: path.to_path_buf(),
            source,
        };
        let text = value
            .get("text_config")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let text_config: JinaTextConfig = if text.is_null() {
            JinaTextConfig::default()
        } else {
            serde_json::from_value(text.clone()).map_err(json_err)?
        };
        let mut encoder = serde_json::to_value(JinaEncoderConfig::default()).expect("serialisable");
        if let Some(serde_json::Value::Object(kwargs)) = text.get("hf_model_config_kwargs") {
            let obj = encoder.as_object_mut().expect("object");
            for (k, v) in kwargs {
                obj.insert(k.clone(), v.clone());
            }
        }
        let hf_model_config_kwargs = serde_json::from_value(encoder).map_err(json_err)?;
        Ok(Self {
            text_config,
            hf_model_config_kwargs,
        })
    }

    /// Index of the default LoRA task in `lora_adaptations` (the adapter axis of the LoRA tensors).
    pub fn lora_task_index(&self) -> Result<Option<usize>, WeightsError> {
        match &self.text_config.default_lora_task {
            None => Ok(None),
            Some(task) => self
                .hf_model_config_kwargs
                .lora_adaptations
                .iter()
                .position(|t| t == task)
                .map(Some)
                .ok_or_else(|| {
                    WeightsError::Unsupported(format!("LoRA task {task:?} not in lora_adaptations"))
                }),
        }
    }

    /// `lora_alpha / lora_rank`.
    pub fn lora_scaling(&self) -> f64 {
        let e = &self.hf_model_config_kwargs;
        e.lora_alpha / e.lora_rank as f64
    }

    pub fn head_dim(&self) -> i64 {
        let e = &self.hf_model_config_kwargs;
        e.hidden_size / e.num_attention_heads
    }

    fn validate(&self) -> Result<(), WeightsError> {
        let e = &self.hf_model_config_kwargs;
        let t = &self.text_config;
        let bad = |m: String| Err(WeightsError::Unsupported(m));
        if e.hidden_act != "gelu" {
            return bad(format!("hidden_act {:?}", e.hidden_act));
        }
        if e.position_embedding_type != "rotary" {
            return bad(format!("position_embedding_type {:?}", e.position_embedding_type));
        }
        if e.hidden_size % e.num_attention_heads != 0 || self.head_dim() % 2 != 0 {
            return bad("hidden_size / num_attention_heads must be an even integer".into());
        }
        if t.proj_type.as_deref().is_some_and(|p| p != "identity") || t.embed_dim != e.hidden_size {
            return bad(format!(
                "projection {:?} to {} (only identity)",
                t.proj_type, t.embed_dim
            ));
        }
        if t.pooler_type.as_deref().is_some_and(|p| p != "mean_pooler") {
            return bad(format!("pooler_type {:?}", t.pooler_type));
        }
        if t.default_instruction_task.is_some() {
            return bad("instruction prefixes".into());
        }
        self.lora_task_index().map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA merge
// ---------------------------------------------------------------------------------------------

const PARAM_ORIGINAL: &str = ".parametrizations.weight.original";
const PARAM_LORA_A: &str = ".parametrizations.weight.0.lora_A";
const PARAM_LORA_B: &str = ".parametrizations.weight.0.lora_B";

/// One LoRA-parametrized weight merged with adapter `task`: linear `W + s · B[t] @ A[t]`,
/// embedding (`module` contains `embeddings`) `W + s · A[t] @ B[t]`, in f32, returned in `W`'s
/// dtype. `task = None` returns `W`.
pub fn merge_lora(
    module: &str,
    base: &Tensor,
    lora_a: &Tensor,
    lora_b: &Tensor,
    task: Option<usize>,
    scaling: f64,
) -> Result<Tensor, String> {
    let Some(t) = task else {
        return Ok(base.shallow_clone());
    };
    let n = lora_a.size()[0];
    if t as i64 >= n || lora_b.size()[0] != n {
        return Err(format!("{module}: LoRA task index {t} but {n} adapters stored"));
    }
    let a = lora_a.get(t as i64).to_kind(Kind::Float);
    let b = lora_b.get(t as i64).to_kind(Kind::Float);
    let delta = if module.contains("embeddings") {
        a.matmul(&b)
    } else {
        b.matmul(&a)
    };
    if delta.size() != base.size() {
        return Err(format!(
            "{module}: LoRA delta {:?} does not match the weight {:?}",
            delta.size(),
            base.size()
        ));
    }
    Ok((base.to_kind(Kind::Float) + delta * scaling).to_kind(base.kind()))
}

/// Folds LoRA adapter `task` into every parametrized weight of an in-memory state dict:
/// `<m>.parametrizations.weight.{original,0.lora_A,0.lora_B}` become `<m>.weight` (see
/// [`merge_lora`]); other tensors pass through unchanged. Loading does the same tensor by tensor
/// through [`load_options`].
pub fn merge_lora_weights(
    mut tensors: BTreeMap<String, Tensor>,
    task: Option<usize>,
    scaling: f64,
) -> Result<BTreeMap<String, Tensor>, WeightsError> {
    let modules: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(PARAM_ORIGINAL).map(str::to_string))
        .collect();
    for module in modules {
        let base = tensors
            .remove(&format!("{module}{PARAM_ORIGINAL}"))
            .expect("listed");
        let a_key = format!("{module}{PARAM_LORA_A}");
        let b_key = format!("{module}{PARAM_LORA_B}");
        let (a, b) = match (tensors.remove(&a_key), tensors.remove(&b_key)) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => {
                let missing = [(a.is_none(), a_key), (b.is_none(), b_key)]
                    .into_iter()
                    .filter_map(|(gone, k)| gone.then_some(k))
                    .collect();
                return Err(WeightsError::KeyMismatch {
                    missing,
                    unexpected: vec![],
                });
            }
        };
        let merged = merge_lora(&module, &base, &a, &b, task, scaling).map_err(WeightsError::Unsupported)?;
        tensors.insert(format!("{module}.weight"), merged);
    }
    Ok(tensors)
}

/// Key prefixes under which checkpoints store the encoder; each key loses the first one it starts
/// with.
const ENCODER_PREFIXES: [&str; 2] = [
    "text_model.transformer.roberta.", // jinaai/jina-clip-v2 model.safetensors
    "roberta.",                        // jinaai/jina-embeddings-v3
];

/// Tensors of a jina-clip-v2 checkpoint that the text features do not use (after prefix
/// stripping): the vision tower, the logit scale and the unused CLS pooler.
fn is_unused_checkpoint_key(key: &str) -> bool {
    key.starts_with("vision_model.") || key == "logit_scale" || key.starts_with("pooler.")
}

/// Strict-loading options for the text tower of `cfg`: prefixes stripped, unused parts skipped,
/// each parametrized weight assembled from its three tensors (original, `lora_A`, `lora_B`) and
/// merged with the default LoRA task; plain (pre-merged) `<m>.weight` tensors load as they are.
pub fn load_options(cfg: &JinaConfig) -> Result<LoadOptions, WeightsError> {
    let task = cfg.lora_task_index()?;
    let scaling = cfg.lora_scaling();
    let part = |module: &str, index| KeyTarget::Part {
        key: format!("{module}.weight"),
        index,
        count: 3,
    };
    Ok(LoadOptions {
        strip_prefixes: ENCODER_PREFIXES.iter().map(|p| p.to_string()).collect(),
        rename: Some(Arc::new(move |k: &str| {
            if is_unused_checkpoint_key(k) {
                KeyTarget::Skip
            } else if let Some(m) = k.strip_suffix(PARAM_ORIGINAL) {
                part(m, 0)
            } else if let Some(m) = k.strip_suffix(PARAM_LORA_A) {
                part(m, 1)
            } else if let Some(m) = k.strip_suffix(PARAM_LORA_B) {
                part(m, 2)
            } else {
                KeyTarget::Key(k.to_string())
            }
        })),
        combine: Some(Arc::new(move |key: &str, parts: Vec<Tensor>| {
            let module = key.strip_suffix(".weight").unwrap_or(key);
            match parts.as_slice() {
                [base, a, b] => merge_lora(module, base, a, b, task, scaling),
                _ => Err(format!(
                    "{} parts instead of original, lora_A, lora_B",
                    parts.len()
                )),
            }
        })),
        ..LoadOptions::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

/// LayerNorm with statistics in f32, cast back to the input dtype.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: vs.ones("weight", &[dim]),
            bias: vs.zeros("bias", &[dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *x.size().last().expect("non-scalar");
        let w = self.weight.to_kind(Kind::Float);
        let b = self.bias.to_kind(Kind::Float);
        x.to_kind(Kind::Float)
            .layer_norm([dim], Some(&w), Some(&b), self.eps, true)
            .to_kind(x.kind())
    }
}

#[derive(Debug)]
struct Embeddings {
    word_embeddings: Tensor,
    token_type_embeddings: Tensor,
}

impl Embeddings {
    fn new(vs: nn::Path, cfg: &JinaEncoderConfig) -> Self {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        Self {
            word_embeddings: (&vs / "word_embeddings").var(
                "weight",
                &[cfg.vocab_size, cfg.hidden_size],
                init,
            ),
            token_type_embeddings: (&vs / "token_type_embeddings").var(
                "weight",
                &[cfg.type_vocab_size, cfg.hidden_size],
                init,
            ),
        }
    }

    /// word(ids) + token_type(0).
    fn forward(&self, ids: &Tensor) -> Tensor {
        let words = Tensor::embedding(&self.word_embeddings, ids, -1, false, false);
        words + self.token_type_embeddings.get(0)
    }
}

/// cos / sin [L, head_dim] (f32) for NeoX rotate-half rotary at positions 0..L-1.
fn rotary_tables(len: i64, head_dim: i64, base: f64, device: Device) -> (Tensor, Tensor) {
    let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Float, device)) / head_dim as f64;
    let inv_freq = Tensor::from(base as f32)
        .to_device(device)
        .pow(&exponents)
        .reciprocal();
    let pos = Tensor::arange(len, (Kind::Float, device));
    let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let half = *xf.size().last().unwrap() / 2;
    let rotated = Tensor::cat(&[&(-xf.narrow(-1, half, half)), &xf.narrow(-1, 0, half)], -1);
    (xf * cos + rotated * sin).to_kind(x.kind())
}

#[derive(Debug)]
struct Mixer {
    /// Checkpoint name `Wqkv`.
    wqkv: nn::Linear,
    out_proj: nn::Linear,
    n_heads: i64,
    head_dim: i64,
}

impl Mixer {
    fn new(vs: nn::Path, cfg: &JinaEncoderConfig) -> Self {
        let h = cfg.hidden_size;
        Self {
            wqkv: nn::linear(&vs / "Wqkv", h, 3 * h, Default::default()),
            out_proj: nn::linear(&vs / "out_proj", h, h, Default::default()),
            n_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        }
    }

    fn forward(&self, x: &Tensor, rotary: &(Tensor, Tensor), bias: &Tensor) -> Tensor {
        let (b, l, h) = x.size3().expect("[B, L, H]");
        // Output rows are [q | k | v], each head-major.
        let qkv = self
            .wqkv
            .forward(x)
            .view([b, l, 3, self.n_heads, self.head_dim])
            .permute([2, 0, 3, 1, 4]);
        let q = apply_rotary(&qkv.get(0), &rotary.0, &rotary.1);
        let k = apply_rotary(&qkv.get(1), &rotary.0, &rotary.1);
        let v = qkv.get(2);
        let scores = q
            .to_kind(Kind::Float)
            .matmul(&k.to_kind(Kind::Float).transpose(-2, -1))
            / (self.head_dim as f64).sqrt();
        let probs = (scores + bias).softmax(-1, Kind::Float).to_kind(v.kind());
        let o = probs.matmul(&v).transpose(1, 2).reshape([b, l, h]);
        self.out_proj.forward(&o)
    }
}

#[derive(Debug)]
struct MlpBlock {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl MlpBlock {
    fn new(vs: nn::Path, cfg: &JinaEncoderConfig) -> Self {
        Self {
            fc1: nn::linear(
                &vs / "fc1",
                cfg.hidden_size,
                cfg.intermediate_size,
                Default::default(),
            ),
            fc2: nn::linear(
                &vs / "fc2",
                cfg.intermediate_size,
                cfg.hidden_size,
                Default::default(),
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("none"))
    }
}

/// Post-LN encoder block.
#[derive(Debug)]
struct Block {
    mixer: Mixer,
    norm1: LayerNorm,
    mlp: MlpBlock,
    norm2: LayerNorm,
}

impl Block {
    fn new(vs: nn::Path, cfg: &JinaEncoderConfig) -> Self {
        Self {
            mixer: Mixer::new(&vs / "mixer", cfg),
            norm1: LayerNorm::new(&vs / "norm1", cfg.hidden_size, cfg.layer_norm_eps),
            mlp: MlpBlock::new(&vs / "mlp", cfg),
            norm2: LayerNorm::new(&vs / "norm2", cfg.hidden_size, cfg.layer_norm_eps),
        }
    }

    fn forward(&self, x: &Tensor, rotary: &(Tensor, Tensor), bias: &Tensor) -> Tensor {
        let x = self.norm1.forward(&(x + self.mixer.forward(x, rotary, bias)));
        self.norm2.forward(&(&x + self.mlp.forward(&x)))
    }
}

// ---------------------------------------------------------------------------------------------
// Public model
// ---------------------------------------------------------------------------------------------

/// Intermediate activations of one forward pass (for parity tests).
#[derive(Debug)]
pub struct JinaTrace {
    /// word + token-type embeddings, before `emb_ln`.
    pub embeddings: Tensor,
    /// `emb_ln` output (input of layer 0).
    pub emb_ln: Tensor,
    /// Output of every encoder block.
    pub layers: Vec<Tensor>,
    /// Mean-pooled output [B, embed_dim].
    pub pooled: Tensor,
}

/// The Jina CLIP v2 text tower returning the pooled text vector.
#[derive(Debug)]
pub struct JinaTextModel {
    embeddings: Embeddings,
    emb_ln: LayerNorm,
    layers: Vec<Block>,
    config: JinaConfig,
    device: Device,
    kind: Kind,
    /// What [`Self::to_device`] moves: the variable store, when this model owns it (loaded or
    /// given with [`Self::own_variables`]), and its host copies.
    weights: super::loading::MovableWeights,
}

impl JinaTextModel {
    /// Builds the encoder under `vs` with keys `embeddings.*`, `emb_ln.*`, `encoder.layers.{i}.*`
    /// (merged weights: `<m>.weight`).
    /// Holds libtorch's global generator while tch's initialisers draw (see [`super::rng`]).
    pub fn new(vs: &nn::Path, cfg: &JinaConfig) -> Result<Self, WeightsError> {
        cfg.validate()?;
        let _generator = super::rng::lock();
        let e = &cfg.hf_model_config_kwargs;
        let layers = (0..e.num_hidden_layers)
            .map(|i| Block::new(vs / "encoder" / "layers" / i, e))
            .collect();
        Ok(Self {
            embeddings: Embeddings::new(vs / "embeddings", e),
            emb_ln: LayerNorm::new(vs / "emb_ln", e.hidden_size, e.layer_norm_eps),
            layers,
            config: cfg.clone(),
            device: vs.device(),
            kind: vs.kind(),
            weights: Default::default(),
        })
    }

    /// A frozen tower with random (already merged) weights drawn from `seed`.
    pub fn random(cfg: &JinaConfig, device: Device, kind: Kind, seed: i64) -> Result<Self, WeightsError> {
        random_frozen(device, kind, seed, |root| Self::new(root, cfg))
    }

    /// Loads the text tower from a safetensors file, shard index or directory with
    /// [`load_options`]: the default LoRA task merged into the parametrized weights, the vision
    /// tower, `logit_scale` and the unused pooler skipped, every other key checked strictly.
    pub fn load(weights: &Path, cfg: &JinaConfig, device: Device, kind: Kind) -> Result<Self, WeightsError> {
        let opts = load_options(cfg)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = Self::new(&vs.root(), cfg)?;
        load_checkpoint(&mut vs, weights, &opts)?;
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

    /// Loads a jina-clip-v2 folder (`config.json` + safetensors).
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self, WeightsError> {
        let cfg = JinaConfig::from_clip_config_json(&dir.join("config.json"))?;
        Self::load(dir, &cfg, device, kind)
    }

    pub fn config(&self) -> &JinaConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Pooled text features [B, embed_dim] (model dtype) for `input_ids` [B, L]; the attention mask
    /// is `input_ids != pad_token_id`, as in the reference.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.forward_trace(input_ids).pooled
    }

    /// [`JinaTextModel::forward`] with every intermediate activation.
    pub fn forward_trace(&self, input_ids: &Tensor) -> JinaTrace {
        tch::no_grad(|| {
            let e = &self.config.hf_model_config_kwargs;
            let ids = input_ids.to_device(self.device);
            let (b, l) = ids.size2().expect("input_ids must be [B, L]");
            let valid = ids.ne(e.pad_token_id);
            let bias = Tensor::zeros([b, 1, 1, l], (Kind::Float, self.device))
                .masked_fill(&valid.logical_not().view([b, 1, 1, l]), f32::MIN as f64);
            let rotary = rotary_tables(l, self.config.head_dim(), e.rotary_emb_base, self.device);

            let embeddings = self.embeddings.forward(&ids);
            let emb_ln = self.emb_ln.forward(&embeddings);
            let mut layers = Vec::with_capacity(self.layers.len());
            let mut x = emb_ln.shallow_clone();
            for block in &self.layers {
                x = block.forward(&x, &rotary, &bias);
                layers.push(x.shallow_clone());
            }
            let m = valid.to_kind(Kind::Float).unsqueeze(-1);
            let sum = (x.to_kind(Kind::Float) * &m).sum_dim_intlist(1, false, Kind::Float);
            let pooled = (sum / m.sum_dim_intlist(1, false, Kind::Float)).to_kind(self.kind);
            JinaTrace {
                embeddings,
                emb_ln,
                layers,
                pooled,
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Input preparation
// ---------------------------------------------------------------------------------------------

/// Longest Jina sequence, `<s>` and `</s>` included (NewBie demo / finetune `max_length`).
pub const MAX_JINA_TOKENS: usize = 2048;

/// Token ids [B, L] (int64) for Jina: `<s>` text `</s>`, the text truncated so the whole fits in
/// [`MAX_JINA_TOKENS`], right padded with `<pad>` to the longest. The texts are the user prompts
/// as given (no system prompt; an empty negative becomes `<s></s>`).
pub fn jina_inputs(tokenizer: &dyn TextTokenizer, texts: &[&str]) -> Result<Tensor, TokenizerError> {
    let ids = tokenizer.special_ids();
    let bos = ids.bos.ok_or(TokenizerError::MissingSpecial("bos"))?;
    let eos = ids.eos.ok_or(TokenizerError::MissingSpecial("eos"))?;
    let pad = ids.pad.ok_or(TokenizerError::MissingSpecial("pad"))?;
    let seqs = texts
        .iter()
        .map(|t| {
            let mut body = tokenizer.encode(t)?;
            body.truncate(MAX_JINA_TOKENS - 2);
            let mut seq = Vec::with_capacity(body.len() + 2);
            seq.push(bos);
            seq.extend(body);
            seq.push(eos);
            Ok(seq)
        })
        .collect::<Result<Vec<_>, TokenizerError>>()?;
    Ok(pad_right(&seqs, pad, 1).0)
}
