//! Text to RGB images: the whole NewBie-image chain behind one [`Pipeline`].
//!
//! Per batch ([`Pipeline::render`]):
//!
//! 1. **Text.** Each prompt and negative prompt is checked with `farm_proto::prompt::parse_prompt`
//!    (the trimmed text is what the encoders see). Gemma gets the training system prompt for the
//!    prompt's kind (XML or plain) followed by the prompt; Jina gets the prompt alone. A non-empty
//!    negative prompt gets its positive prompt's system prompt, as the reference prepends one system
//!    prompt to both. An empty text (the usual negative) goes to both encoders as `""`, without a
//!    system prompt (spec §7.2, §7.3).
//!    A prompt the parser rejects for anything but emptiness is still rendered verbatim, the system
//!    prompt chosen by `looks_like_xml` (the coordinator validates prompts; the worker stays lenient).
//! 2. **Encode, cached.** Every encoder input is looked up in an LRU cache keyed by
//!    (text, encoder role); the empty text is pinned and never evicted. Missing texts are encoded one
//!    at a time (Gemma: BOS, right padding to a multiple of 8, at most 512 tokens, `hidden_states[-2]`),
//!    so an encoding never depends on which other prompts shared its batch. Only the valid caption
//!    rows are kept; the cache lives on the CPU in the pipeline dtype.
//! 3. **Sample.** Per item, noise `[1, 16, H/8, W/8]` from its own seed ([`seeded_noise`]); the sampler
//!    runs the conditional and unconditional rows of every active item in one DiT forward per model
//!    evaluation and lets the step callback drop items.
//! 4. **Check and decode.** A NaN or infinity in a final latent fails the batch with
//!    [`PipelineError::Numerical`]; otherwise the latents are decoded by the VAE in batches
//!    (`z / scaling_factor + shift_factor`, spec §6.6) and converted to RGB8.
//!
//! Everything runs under `tch::no_grad`. Model inputs are cast to the pipeline dtype explicitly; the
//! latent state stays f32 in the sampler. The VAE runs in f32 when the pipeline dtype is `Half` (its
//! config asks for `force_upcast`), in the pipeline dtype otherwise.
//!
//! libtorch failures (e.g. CUDA running out of memory) surface in tch as panics from the infallible
//! tensor ops; [`Pipeline::render`] catches them at its boundary and maps a message containing
//! "out of memory" to [`PipelineError::OutOfMemory`], anything else to [`PipelineError::Other`].
//!
//! # Presets
//!
//! * [`Preset::NewbieExp01`]: the released model. With `model_dir` it reads the published folder
//!   layout (see [`Pipeline::load`]); without it, every part gets random weights of the real sizes
//!   (benchmarks only).
//! * [`Preset::Tiny`]: random weights only: the DiT's tiny config (dim 64), a 4-layer Gemma 3 whose
//!   hidden size is the DiT's `cap_feat_dim`, a small pooled-text encoder whose output size is the
//!   DiT's `clip_text_dim`, the tiny VAE and byte tokenizers. A 256x256, 8-step image takes a fraction
//!   of a second on a CPU.
//!
//! # Weights hash
//!
//! [`Pipeline::weights_hash`] is a hex SHA-256. For loaded weights it covers, per component in the
//! order transformer, text encoder, pooled-text encoder, VAE: the component name, its `config.json`
//! bytes when present, and for every safetensors file (sorted by name) its file name, its size and its
//! header (the 8-byte length plus the JSON header, which lists every tensor's name, dtype, shape and
//! offsets) — cheap to compute, and it changes when any file is replaced by a different export.
//! For random weights it covers the tag `random`, the preset name and the seed; `tiny` draws its
//! weights on the CPU and copies them to the device, so they are the same everywhere, while the
//! full-size random preset draws them on the device and adds the device type (CPU or CUDA) to the hash.
//!
//! # Offloading
//!
//! With [`PipelineOptions::offload_text_encoders`], the text encoders are loaded into host memory
//! and kept there: when a batch needs encodings the cache does not hold, each encoder's weights are
//! copied onto the device, it runs, and its weights go back to (pinned) host memory, so the device
//! holds one encoder at a time and only while it encodes (the DiT and the VAE stay resident). The
//! freed device memory returns to libtorch's caching allocator, where the DiT's activations reuse
//! it. On a CPU device there is nothing to move.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use farm_proto::prompt::{
    codes, looks_like_xml, parse_prompt, PromptLimits, TEXT_SYSTEM_PROMPT, XML_SYSTEM_PROMPT,
};
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use super::dit::{DitConfig, NextDit};
use super::gemma3::{gemma_inputs, Gemma3Config, Gemma3TextModel};
use super::jina::{jina_inputs, JinaConfig, JinaTextModel};
use super::loading;
use super::sdpa;
use super::sampler::{sample, seeded_noise, Conditioning, SampleItem, SampleParams, StepControl};
use super::tokenizer::{ByteTokenizer, HfTokenizer, TextTokenizer};
use super::vae::{to_rgb8, VaeConfig, VaeDecoder, WeightsError};

/// Model presets the worker can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// NewBie-image-Exp0.1.
    NewbieExp01,
    /// Small random-weight model for tests and demos.
    Tiny,
}

impl Preset {
    /// `"newbie-exp0.1"` or `"tiny"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            farm_proto::limits::MODEL_NEWBIE => Some(Preset::NewbieExp01),
            farm_proto::limits::MODEL_TINY => Some(Preset::Tiny),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Preset::NewbieExp01 => farm_proto::limits::MODEL_NEWBIE,
            Preset::Tiny => farm_proto::limits::MODEL_TINY,
        }
    }
}

/// How to build a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub preset: Preset,
    /// Checkpoint folder; `None` = random weights (always for `tiny`; for `newbie-exp0.1` only for
    /// benchmarks).
    pub model_dir: Option<PathBuf>,
    pub device: Device,
    /// Weight and activation dtype: `BFloat16` (default), `Half` or `Float`.
    pub kind: Kind,
    /// Keep the text encoders off the device between encodes (for 16 GB cards).
    pub offload_text_encoders: bool,
    /// Seed of the random weights.
    pub seed: i64,
    /// Entries of the text-encoding LRU cache (the empty text is kept in addition).
    pub text_cache_size: usize,
}

impl PipelineOptions {
    /// Defaults: CPU, bf16, no offloading, seed 0, 1024 cache entries.
    pub fn new(preset: Preset) -> Self {
        Self {
            preset,
            model_dir: None,
            device: Device::Cpu,
            kind: Kind::BFloat16,
            offload_text_encoders: false,
            seed: 0,
            text_cache_size: 1024,
        }
    }
}

/// One image to render.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
}

/// Settings shared by every image of a batch.
#[derive(Debug, Clone)]
pub struct RenderSettings {
    pub width: u32,
    pub height: u32,
    pub sample: SampleParams,
}

/// An RGB8 image, rows top to bottom, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot load the model: {0}")]
    Load(String),
    /// NaN/Inf in a final latent.
    #[error("numerical anomaly: {0}")]
    Numerical(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Other(String),
}

impl PipelineError {
    /// A runtime failure: out of memory if libtorch says so, otherwise `Other`.
    fn runtime(msg: impl Into<String>) -> Self {
        let msg = msg.into();
        if is_oom_message(&msg) {
            PipelineError::OutOfMemory(msg)
        } else {
            PipelineError::Other(msg)
        }
    }

    /// A loading failure; out of memory while loading is still reported as such.
    fn load(msg: impl Into<String>) -> Self {
        let msg = msg.into();
        if is_oom_message(&msg) {
            PipelineError::OutOfMemory(msg)
        } else {
            PipelineError::Load(msg)
        }
    }
}

fn is_oom_message(msg: &str) -> bool {
    msg.to_ascii_lowercase().contains("out of memory")
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        torch_message(s)
    } else if let Some(s) = payload.downcast_ref::<String>() {
        torch_message(s)
    } else {
        "libtorch operation failed".to_string()
    }
}

/// The first line of libtorch's error inside a tch panic message (`... Torch("<error>\nException
/// raised from ...")`), without the C++ stack trace.
fn torch_message(msg: &str) -> String {
    let body = msg.split_once("Torch(\"").map_or(msg, |(_, rest)| rest);
    match [body.find("\\n"), body.find('\n')].into_iter().flatten().min() {
        Some(end) => body[..end].trim().to_string(),
        None => body.strip_suffix("\")").unwrap_or(body).trim().to_string(),
    }
}

/// Runs `f`, turning a panic (how tch reports libtorch errors from infallible ops) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, PipelineError>) -> Result<T, PipelineError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(PipelineError::runtime(format!("{what}: {}", panic_message(payload.as_ref())))),
    }
}

// ---------------------------------------------------------------------------------------------
// Text cache
// ---------------------------------------------------------------------------------------------

/// Which encoder an encoding belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum TextRole {
    /// Gemma caption features `[1, L, cap_feat_dim]` (valid rows only).
    Caption,
    /// Pooled text vector `[1, clip_text_dim]`.
    Pooled,
}

type CacheKey = (String, TextRole);

/// LRU of encodings (CPU tensors). Entries for the empty text are pinned outside the LRU.
struct TextCache {
    capacity: usize,
    entries: HashMap<CacheKey, (Tensor, u64)>,
    order: BTreeMap<u64, CacheKey>,
    pinned: HashMap<CacheKey, Tensor>,
    tick: u64,
    hits: u64,
    misses: u64,
}

impl TextCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            pinned: HashMap::new(),
            tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Looks `key` up, counting a hit or a miss and refreshing its recency.
    fn get(&mut self, key: &CacheKey) -> Option<Tensor> {
        if let Some(t) = self.pinned.get(key) {
            self.hits += 1;
            return Some(t.shallow_clone());
        }
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(key) {
            Some((t, last)) => {
                self.order.remove(last);
                *last = tick;
                self.order.insert(tick, key.clone());
                self.hits += 1;
                Some(t.shallow_clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    fn insert(&mut self, key: CacheKey, value: Tensor) {
        if key.0.is_empty() {
            self.pinned.insert(key, value);
            return;
        }
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some((_, old)) = self.entries.insert(key.clone(), (value, self.tick)) {
            self.order.remove(&old);
        }
        self.order.insert(self.tick, key);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.entries.remove(&oldest);
        }
    }

    fn len(&self) -> usize {
        self.entries.len() + self.pinned.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Text encoders
// ---------------------------------------------------------------------------------------------

/// `[1, P]` pooled vector of one text from the Jina CLIP v2 text tower.
fn encode_pooled(model: &JinaTextModel, tok: &dyn TextTokenizer, text: &str) -> Result<Tensor, PipelineError> {
    let ids = jina_inputs(tok, &[text]).map_err(|e| PipelineError::Other(format!("tokenizing: {e}")))?;
    Ok(model.forward(&ids))
}

/// A text encoder whose weights can move between host and device memory.
trait Movable: Sized {
    /// What the encoder is called in messages.
    const NAME: &'static str;
    fn to_device(&mut self, device: Device) -> Result<(), WeightsError>;
    fn own_variables(self, vs: nn::VarStore) -> Self;

    fn move_to(&mut self, device: Device) -> Result<(), PipelineError> {
        Movable::to_device(self, device)
            .map_err(|e| PipelineError::runtime(format!("moving the {} to {device:?}: {e}", Self::NAME)))
    }
}

impl Movable for Gemma3TextModel {
    const NAME: &'static str = "Gemma 3 text encoder";
    fn to_device(&mut self, device: Device) -> Result<(), WeightsError> {
        Gemma3TextModel::to_device(self, device)
    }
    fn own_variables(self, vs: nn::VarStore) -> Self {
        Gemma3TextModel::own_variables(self, vs)
    }
}

impl Movable for JinaTextModel {
    const NAME: &'static str = "Jina CLIP text encoder";
    fn to_device(&mut self, device: Device) -> Result<(), WeightsError> {
        JinaTextModel::to_device(self, device)
    }
    fn own_variables(self, vs: nn::VarStore) -> Self {
        JinaTextModel::own_variables(self, vs)
    }
}

/// A random encoder, drawn where it would run (so offloading does not change its weights), then
/// moved to `dev` (the CPU when offloaded).
fn random_encoder<T: Movable>(
    device: Device,
    kind: Kind,
    seed: i64,
    draw_on_cpu: bool,
    dev: Device,
    build: impl Fn(&nn::Path) -> Result<T, WeightsError>,
) -> Result<T, PipelineError> {
    let (m, vars) = random_module(T::NAME, device, kind, seed, draw_on_cpu, build, |_| {})?;
    let mut m = m.own_variables(vars);
    m.move_to(dev)?;
    Ok(m)
}

/// An encoder kept on the device, or kept in host memory and moved onto the device only while it
/// encodes.
enum Slot<T> {
    Resident(T),
    Offloaded { model: std::sync::Mutex<T>, device: Device },
}

/// Moves an offloaded encoder back to host memory when its use ends, also when the use panics.
struct BackToHost<'a, T: Movable>(std::sync::MutexGuard<'a, T>);

impl<T: Movable> Drop for BackToHost<'_, T> {
    fn drop(&mut self) {
        if let Err(e) = self.0.move_to(Device::Cpu) {
            tracing::error!(error = %e, "could not move a text encoder back to host memory");
        }
    }
}

impl<T: Movable> Slot<T> {
    /// Builds the encoder with `load` on `device`, or on the CPU when it is offloaded (on a CPU
    /// device an offloaded encoder's moves are no-ops).
    fn new(offload: bool, device: Device, load: impl FnOnce(Device) -> Result<T, PipelineError>) -> Result<Self, PipelineError> {
        if offload {
            Ok(Slot::Offloaded { model: std::sync::Mutex::new(load(Device::Cpu)?), device })
        } else {
            Ok(Slot::Resident(load(device)?))
        }
    }

    /// Runs `f` with the encoder on the device (moving it there first and back after if offloaded).
    fn with<R>(&self, f: impl FnOnce(&T) -> Result<R, PipelineError>) -> Result<R, PipelineError> {
        match self {
            Slot::Resident(m) => f(m),
            Slot::Offloaded { model, device } => {
                let mut guard = BackToHost(model.lock().unwrap_or_else(|p| p.into_inner()));
                guard.0.move_to(*device)?;
                f(&guard.0)
            }
        }
    }
}

struct TextEncoders {
    caption_tok: Box<dyn TextTokenizer>,
    pooled_tok: Box<dyn TextTokenizer>,
    caption: Slot<Gemma3TextModel>,
    pooled: Slot<JinaTextModel>,
}

/// What the two encoders receive for one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EncoderTexts {
    /// System prompt + prompt, or `""`.
    caption: String,
    /// The prompt alone.
    pooled: String,
}

/// A prompt's text as the encoders see it and the system prompt of its kind; `None` when it is empty.
fn prompt_text(prompt: &str) -> Option<(String, &'static str)> {
    let limits = PromptLimits { max_bytes: usize::MAX, max_depth: usize::MAX, max_characters: usize::MAX };
    match parse_prompt(prompt, &limits) {
        Ok(p) => Some((p.text.clone(), p.system_prompt())),
        Err(d) if d.code == codes::EMPTY => None,
        Err(_) => {
            let text = prompt.trim().to_string();
            let system = if looks_like_xml(&text) { XML_SYSTEM_PROMPT } else { TEXT_SYSTEM_PROMPT };
            Some((text, system))
        }
    }
}

fn texts_with(text: Option<(String, &'static str)>, system: Option<&'static str>) -> EncoderTexts {
    match text {
        None => EncoderTexts { caption: String::new(), pooled: String::new() },
        Some((text, own)) => EncoderTexts { caption: format!("{}{text}", system.unwrap_or(own)), pooled: text },
    }
}

/// Builds the encoder inputs of a prompt (see the module docs).
fn encoder_texts(prompt: &str) -> EncoderTexts {
    texts_with(prompt_text(prompt), None)
}

/// Builds the encoder inputs of a negative prompt: the system prompt is its positive prompt's.
fn negative_texts(negative: &str, positive: &str) -> EncoderTexts {
    texts_with(prompt_text(negative), prompt_text(positive).map(|(_, system)| system))
}

// ---------------------------------------------------------------------------------------------
// Pipeline
// ---------------------------------------------------------------------------------------------

/// Images per VAE decode call (bounds the decoder's activation memory).
const VAE_CHUNK: i64 = 4;

/// The loaded model: text encoders, DiT, VAE and the text cache.
pub struct Pipeline {
    preset: Preset,
    weights_hash: String,
    device: Device,
    kind: Kind,
    dit_config: DitConfig,
    dit: NextDit,
    _dit_vars: nn::VarStore,
    vae: VaeDecoder,
    text: TextEncoders,
    cache: TextCache,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("preset", &self.preset)
            .field("weights_hash", &self.weights_hash)
            .field("device", &self.device)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Sizes of the `tiny` preset, consistent across the parts.
fn tiny_configs() -> (DitConfig, Gemma3Config, JinaConfig, VaeConfig) {
    let mut dit = DitConfig::tiny();
    // Caption positions include the Gemma system prompt (one byte token per character); the
    // image axes admit every size the limits allow (up to 128 patches per side).
    dit.axes_lens = vec![1024, 128, 128];
    let caption = Gemma3Config {
        hidden_size: dit.cap_feat_dim,
        intermediate_size: 2 * dit.cap_feat_dim,
        ..Gemma3Config::tiny()
    };
    let mut pooled = JinaConfig::tiny();
    pooled.text_config.embed_dim = dit.clip_text_dim;
    pooled.hf_model_config_kwargs.hidden_size = dit.clip_text_dim;
    pooled.hf_model_config_kwargs.intermediate_size = 4 * dit.clip_text_dim;
    // Lighter than `VaeConfig::tiny()` (same structure): the decoder dominates a small render.
    let vae = VaeConfig {
        block_out_channels: vec![8, 8, 16, 16],
        norm_num_groups: 4,
        layers_per_block: 1,
        ..VaeConfig::tiny()
    };
    (dit, caption, pooled, vae)
}

fn check_kind(kind: Kind) -> Result<(), PipelineError> {
    match kind {
        Kind::BFloat16 | Kind::Half | Kind::Float => Ok(()),
        k => Err(PipelineError::Load(format!("unsupported dtype {k:?} (use BFloat16, Half or Float)"))),
    }
}

/// The dtype Gemma 3 runs in and its caption features keep: the pipeline's, except bf16 for an fp16
/// pipeline. Gemma 3's activations overflow fp16 (transformers issue #36822: NaN outputs in fp16;
/// its residual stream holds values far above fp16's 65504). The DiT normalises the bf16 features in
/// f32 before casting them to fp16 (`RmsNorm::forward_into`).
pub fn caption_encoder_kind(kind: Kind) -> Kind {
    if kind == Kind::Half {
        Kind::BFloat16
    } else {
        kind
    }
}

/// The transformer's latents are the VAE's: their channel counts must agree.
fn check_latent_channels(dit: &DitConfig, vae: &VaeConfig) -> Result<(), PipelineError> {
    if dit.in_channels != vae.latent_channels {
        return Err(PipelineError::Load(format!(
            "the VAE decodes {}-channel latents, the transformer produces in_channels {}",
            vae.latent_channels, dit.in_channels
        )));
    }
    Ok(())
}

fn vae_kind(kind: Kind, cfg: &VaeConfig) -> Kind {
    if kind == Kind::Half && cfg.force_upcast {
        Kind::Float
    } else {
        kind
    }
}

/// Hash of random weights: the tag `random`, the preset, the seed and, where the weights are drawn
/// on the target device (see [`random_module`]), the device type.
fn random_hash(preset: Preset, seed: i64, drawn_on: Option<Device>) -> String {
    let mut h = Sha256::new();
    h.update(b"random\0");
    h.update(preset.name().as_bytes());
    h.update(b"\0");
    h.update(seed.to_le_bytes());
    if let Some(d) = drawn_on {
        h.update(if d.is_cuda() { &b"\0cuda"[..] } else { &b"\0cpu"[..] });
    }
    hex::encode(h.finalize())
}

/// Builds a module with random weights from `seed`. With `draw_on_cpu` the values are drawn on the
/// CPU and copied to `device`, so a seed gives the same weights on every device (libtorch's CPU and
/// CUDA generators differ); otherwise they are drawn on `device` directly (full-size random models,
/// whose weights then depend on the device type). `randomize` may redraw values after `build`'s own
/// initialisation. Returns the module and its (frozen) variables.
fn random_module<T, E: std::fmt::Display>(
    what: &str,
    device: Device,
    kind: Kind,
    seed: i64,
    draw_on_cpu: bool,
    build: impl Fn(&nn::Path) -> Result<T, E>,
    randomize: impl FnOnce(&nn::VarStore),
) -> Result<(T, nn::VarStore), PipelineError> {
    let err = |e: String| PipelineError::load(format!("{what}: {e}"));
    super::rng::seeded(seed, || {
        let source_device = if draw_on_cpu { Device::Cpu } else { device };
        let mut source = nn::VarStore::new(source_device);
        source.set_kind(kind);
        let module = build(&source.root()).map_err(|e| err(e.to_string()))?;
        randomize(&source);
        if source_device == device {
            source.freeze();
            return Ok((module, source));
        }
        let mut target = nn::VarStore::new(device);
        target.set_kind(kind);
        let module = build(&target.root()).map_err(|e| err(e.to_string()))?;
        target.copy(&source).map_err(|e| err(e.to_string()))?;
        target.freeze();
        Ok((module, target))
    })
}

impl Pipeline {
    /// Builds the pipeline.
    ///
    /// With `model_dir` (only `newbie-exp0.1`), the published layout is read:
    /// * `transformer/`: `config.json` (optional; the preset's values otherwise) and
    ///   `diffusion_pytorch_model*.safetensors` (one file, shards or an index; original, ComfyUI or
    ///   diffusers key names);
    /// * `text_encoder/`: the Gemma 3 `-it` checkpoint (`config.json` + safetensors) and its tokenizer
    ///   in `tokenizer/tokenizer.json` or `text_encoder/tokenizer.json`;
    /// * `clip_model/` or `text_encoder_2/`: Jina CLIP v2 and its tokenizer;
    /// * `vae/`: the FLUX VAE.
    ///
    /// A missing folder or file is reported by path.
    pub fn load(opts: &PipelineOptions) -> Result<Pipeline, PipelineError> {
        check_kind(opts.kind)?;
        guarded("loading the model", || tch::no_grad(|| match (&opts.model_dir, opts.preset) {
            (None, preset) => Self::load_random(opts, preset),
            (Some(_), Preset::Tiny) => {
                Err(PipelineError::Load("the tiny preset has random weights only; give no model directory".into()))
            }
            (Some(dir), Preset::NewbieExp01) => Self::load_dir(opts, dir),
        }))
    }

    fn load_random(opts: &PipelineOptions, preset: Preset) -> Result<Pipeline, PipelineError> {
        let (dit_cfg, caption_cfg, pooled_cfg, vae_cfg) = match preset {
            Preset::Tiny => tiny_configs(),
            Preset::NewbieExp01 => {
                (DitConfig::newbie_exp0_1(), Gemma3Config::gemma3_4b(), JinaConfig::jina_clip_v2(), VaeConfig::flux())
            }
        };
        check_latent_channels(&dit_cfg, &vae_cfg)?;
        if caption_cfg.hidden_size != dit_cfg.cap_feat_dim || pooled_cfg.text_config.embed_dim != dit_cfg.clip_text_dim {
            return Err(PipelineError::Load("inconsistent random-weight configurations".into()));
        }
        let (device, kind, seed) = (opts.device, opts.kind, opts.seed);
        let offload = opts.offload_text_encoders;
        let on_cpu = preset == Preset::Tiny;
        let (dit, dit_vars) = random_module(
            "transformer",
            device,
            kind,
            seed,
            on_cpu,
            |p| NextDit::new(p.clone(), &dit_cfg),
            |vs| NextDit::randomize(vs, seed),
        )?;
        let (vae, _) = random_module(
            "VAE",
            device,
            vae_kind(kind, &vae_cfg),
            seed.wrapping_add(3),
            on_cpu,
            |p| VaeDecoder::new(p, &vae_cfg),
            |_| {},
        )?;
        let caption = Slot::new(offload, device, |dev| {
            random_encoder(device, caption_encoder_kind(kind), seed.wrapping_add(1), on_cpu, dev, |p| {
                Gemma3TextModel::new(p, &caption_cfg)
            })
        })?;
        let pooled = Slot::new(offload, device, |dev| {
            random_encoder(device, kind, seed.wrapping_add(2), on_cpu, dev, |p| JinaTextModel::new(p, &pooled_cfg))
        })?;
        let text = TextEncoders {
            caption_tok: Box::new(ByteTokenizer::gemma(caption_cfg.vocab_size as usize)),
            pooled_tok: Box::new(ByteTokenizer::xlm_roberta(pooled_cfg.hf_model_config_kwargs.vocab_size as usize)),
            caption,
            pooled,
        };
        Ok(Pipeline {
            preset,
            weights_hash: random_hash(preset, seed, (!on_cpu).then_some(device)),
            device,
            kind,
            dit_config: dit_cfg,
            dit,
            _dit_vars: dit_vars,
            vae,
            text,
            cache: TextCache::new(opts.text_cache_size),
        })
    }

    fn load_dir(opts: &PipelineOptions, dir: &Path) -> Result<Pipeline, PipelineError> {
        let (device, kind) = (opts.device, opts.kind);
        let offload = opts.offload_text_encoders;
        let need_dir = |names: &[&str]| -> Result<PathBuf, PipelineError> {
            names.iter().map(|n| dir.join(n)).find(|p| p.is_dir()).ok_or_else(|| {
                let list: Vec<String> = names.iter().map(|n| dir.join(n).display().to_string()).collect();
                PipelineError::Load(format!("missing model folder {}", list.join(" or ")))
            })
        };
        let need_file = |candidates: &[PathBuf], what: &str| -> Result<PathBuf, PipelineError> {
            candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
                let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
                PipelineError::Load(format!("missing {what}: {}", list.join(" or ")))
            })
        };
        let transformer_dir = need_dir(&["transformer"])?;
        let text_dir = need_dir(&["text_encoder"])?;
        let pooled_dir = need_dir(&["clip_model", "text_encoder_2"])?;
        let vae_dir = need_dir(&["vae"])?;
        need_file(&[text_dir.join("config.json")], "text encoder config")?;
        let caption_tok_path =
            need_file(&[dir.join("tokenizer").join("tokenizer.json"), text_dir.join("tokenizer.json")], "Gemma tokenizer")?;
        let pooled_tok_path = need_file(
            &[pooled_dir.join("tokenizer.json"), dir.join("tokenizer_2").join("tokenizer.json")],
            "Jina CLIP tokenizer",
        )?;

        let mut hasher = Sha256::new();
        for (name, path) in
            [("transformer", &transformer_dir), ("text_encoder", &text_dir), ("clip", &pooled_dir), ("vae", &vae_dir)]
        {
            hash_component(&mut hasher, name, path)?;
        }
        let weights_hash = hex::encode(hasher.finalize());

        // DiT.
        let cfg_path = transformer_dir.join("config.json");
        let mut dit_cfg = if cfg_path.is_file() {
            DitConfig::from_json_file(&cfg_path).map_err(|e| PipelineError::Load(format!("{}: {e}", cfg_path.display())))?
        } else {
            DitConfig::newbie_exp0_1()
        };
        let caption_cfg = Gemma3Config::from_json_file(&text_dir.join("config.json"))
            .map_err(|e| PipelineError::load(format!("text encoder: {e}")))?;
        // The released config.json has no cap_feat_dim: it is the text encoder's hidden size.
        dit_cfg.cap_feat_dim = caption_cfg.hidden_size;
        let pooled_cfg_path = pooled_dir.join("config.json");
        let pooled_cfg = if pooled_cfg_path.is_file() {
            JinaConfig::from_clip_config_json(&pooled_cfg_path)
                .map_err(|e| PipelineError::load(format!("Jina CLIP text encoder: {e}")))?
        } else {
            JinaConfig::jina_clip_v2()
        };
        if pooled_cfg.text_config.embed_dim != dit_cfg.clip_text_dim {
            return Err(PipelineError::Load(format!(
                "the Jina CLIP text encoder produces {}-d vectors, the transformer expects clip_text_dim {}",
                pooled_cfg.text_config.embed_dim, dit_cfg.clip_text_dim
            )));
        }
        let vae_cfg_path = vae_dir.join("config.json");
        let vae_cfg = if vae_cfg_path.is_file() {
            VaeConfig::from_json_file(&vae_cfg_path).map_err(|e| PipelineError::load(format!("VAE: {e}")))?
        } else {
            VaeConfig::flux()
        };
        check_latent_channels(&dit_cfg, &vae_cfg)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let dit = NextDit::new(vs.root(), &dit_cfg).map_err(|e| PipelineError::load(format!("transformer: {e}")))?;
        loading::load_dit(&mut vs, &transformer_dir)
            .map_err(|e| PipelineError::load(format!("transformer ({}): {e}", transformer_dir.display())))?;
        vs.freeze();

        // VAE.
        let vae = VaeDecoder::load(&vae_dir, &vae_cfg, device, vae_kind(kind, &vae_cfg))
            .map_err(|e| PipelineError::load(format!("VAE ({}): {e}", vae_dir.display())))?;

        // Text encoders.
        let caption_tok = HfTokenizer::gemma(&caption_tok_path)
            .map_err(|e| PipelineError::Load(format!("Gemma tokenizer: {e}")))?;
        let pooled_tok = HfTokenizer::xlm_roberta(&pooled_tok_path)
            .map_err(|e| PipelineError::Load(format!("Jina CLIP tokenizer: {e}")))?;
        let caption = Slot::new(offload, device, |dev| {
            Gemma3TextModel::load(&text_dir, &caption_cfg, dev, caption_encoder_kind(kind))
                .map_err(|e| PipelineError::load(format!("text encoder ({}): {e}", text_dir.display())))
        })?;
        let pooled = Slot::new(offload, device, |dev| {
            JinaTextModel::load(&pooled_dir, &pooled_cfg, dev, kind)
                .map_err(|e| PipelineError::load(format!("Jina CLIP text encoder ({}): {e}", pooled_dir.display())))
        })?;
        let text = TextEncoders { caption_tok: Box::new(caption_tok), pooled_tok: Box::new(pooled_tok), caption, pooled };
        Ok(Pipeline {
            preset: Preset::NewbieExp01,
            weights_hash,
            device,
            kind,
            dit_config: dit_cfg,
            dit,
            _dit_vars: vs,
            vae,
            text,
            cache: TextCache::new(opts.text_cache_size),
        })
    }

    /// Measures which attention kernel order runs the DiT fastest on this device and leaves
    /// libtorch set to it: libtorch's default order against cuDNN first, on one CFG-shaped forward
    /// pass at `side`×`side` pixels with `cap_len` caption tokens (deterministic inputs), three timed
    /// calls each. cuDNN is chosen only if it is faster and its output agrees with the default's
    /// (within 5 % of the output's magnitude in 16-bit precision, 1e-3 in fp32). On the CPU the order
    /// does not matter and nothing is measured.
    pub fn tune_attention(&self, side: i64, cap_len: i64) -> Result<(sdpa::Preference, Vec<sdpa::Trial>), PipelineError> {
        if self.device == Device::Cpu {
            sdpa::prefer(sdpa::Preference::Default).map_err(PipelineError::Other)?;
            return Ok((sdpa::Preference::Default, Vec::new()));
        }
        self.measure_attention(side, cap_len)
    }

    /// The measurement of [`Self::tune_attention`], on any device.
    pub fn measure_attention(&self, side: i64, cap_len: i64) -> Result<(sdpa::Preference, Vec<sdpa::Trial>), PipelineError> {
        let device = self.device;
        let cfg = &self.dit_config;
        // Within the positions the model's RoPE tables cover (the tiny preset's are small).
        let f = self.vae_factor();
        let side = side.min(cfg.axes_lens[1].min(cfg.axes_lens[2]) * cfg.patch_size * f);
        let cap_len = cap_len.clamp(1, cfg.axes_lens[0] - 1);
        let unit = f * cfg.patch_size;
        let latent = (side / unit).max(1) * unit / f;
        // Smooth deterministic inputs (the global random generator is left alone).
        let pattern = |dims: &[i64], phase: f64| {
            let n: i64 = dims.iter().product();
            ((Tensor::arange(n, (Kind::Float, device)) * 0.37 + phase).sin()).view(dims)
        };
        let x = pattern(&[2, cfg.in_channels, latent, latent], 0.0);
        let t = Tensor::from_slice(&[0.5f32, 0.5]).to_device(device);
        let cap = pattern(&[2, cap_len, cfg.cap_feat_dim], 1.0);
        let mask = Tensor::ones([2, cap_len], (Kind::Int64, device));
        let pooled = pattern(&[2, cfg.clip_text_dim], 2.0);
        let tolerance = if self.kind == Kind::Float { 1e-3 } else { 0.05 };
        let call = || {
            let v = self.dit.forward(&x, &t, &cap, &mask, &pooled).map_err(|e| e.to_string())?;
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            Ok(v)
        };
        let candidates = [sdpa::Preference::Default, sdpa::Preference::First(sdpa::Backend::Cudnn)];
        guarded("choosing the attention kernel", || {
            tch::no_grad(|| sdpa::choose_fastest(&candidates, 3, tolerance, call).map_err(PipelineError::Other))
        })
    }

    pub fn model_name(&self) -> &str {
        self.preset.name()
    }

    /// Hex SHA-256 identifying the weights (see the module docs for what it covers).
    pub fn weights_hash(&self) -> &str {
        &self.weights_hash
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn preset(&self) -> Preset {
        self.preset
    }

    /// Text-cache lookups so far: `(hits, misses)`; one lookup per encoder per distinct text of a batch.
    pub fn text_cache_stats(&self) -> (u64, u64) {
        (self.cache.hits, self.cache.misses)
    }

    /// Encodings held by the text cache (pinned empty-text entries included).
    pub fn text_cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Pixels per latent position along each side (the VAE's upsampling factor, 8 for FLUX).
    fn vae_factor(&self) -> i64 {
        self.vae.config().upsampling_factor()
    }

    /// Checks `width` x `height` against the farm's size limits, the model's size unit (VAE factor
    /// times patch size) and the DiT's position range.
    pub fn check_size(&self, width: u32, height: u32) -> Result<(), PipelineError> {
        farm_proto::limits::check_size(width, height).map_err(|e| PipelineError::Invalid(e.to_string()))?;
        let unit = (self.vae_factor() * self.dit_config.patch_size) as u32;
        if !width.is_multiple_of(unit) || !height.is_multiple_of(unit) {
            return Err(PipelineError::Invalid(format!(
                "size {width}x{height}: this model needs multiples of {unit} (VAE factor {} x patch size {})",
                self.vae_factor(),
                self.dit_config.patch_size
            )));
        }
        let (ph, pw) = (height / unit, width / unit);
        let (lh, lw) = (self.dit_config.axes_lens[1], self.dit_config.axes_lens[2]);
        if i64::from(ph) > lh || i64::from(pw) > lw {
            return Err(PipelineError::Invalid(format!(
                "size {width}x{height}: {pw}x{ph} patches exceed the model's position range {lw}x{lh}"
            )));
        }
        Ok(())
    }

    fn check_settings(&self, s: &RenderSettings) -> Result<(), PipelineError> {
        self.check_size(s.width, s.height)?;
        let p = &s.sample;
        if p.steps == 0 {
            return Err(PipelineError::Invalid("steps must be at least 1".into()));
        }
        if p.steps > farm_proto::limits::MAX_STEPS as usize {
            return Err(PipelineError::Invalid(format!("{} steps exceed {}", p.steps, farm_proto::limits::MAX_STEPS)));
        }
        for (name, v) in [("cfg_scale", p.cfg_scale), ("cfg_trunc", p.cfg_trunc), ("renorm_cfg", p.renorm_cfg), ("shift", p.shift)] {
            if !v.is_finite() {
                return Err(PipelineError::Invalid(format!("{name} must be finite, got {v}")));
            }
        }
        if p.shift <= 0.0 {
            return Err(PipelineError::Invalid(format!("shift must be positive, got {}", p.shift)));
        }
        if p.renorm_cfg < 0.0 {
            return Err(PipelineError::Invalid(format!("renorm_cfg must not be negative, got {}", p.renorm_cfg)));
        }
        Ok(())
    }

    /// Renders one batch; every request has the same settings. `on_step(step, total_steps)` is
    /// called after every denoising step (`step` = steps completed, 1..=total) and returns the
    /// request indices to drop (cancelled; unknown or already dropped indices are ignored). Dropped
    /// requests come back as `None`, the others as `Some(image)`, unaffected by the drop.
    pub fn render(
        &mut self,
        reqs: &[ImageRequest],
        settings: &RenderSettings,
        on_step: &mut dyn FnMut(usize, usize) -> Vec<usize>,
    ) -> Result<Vec<Option<RgbImage>>, PipelineError> {
        self.check_settings(settings)?;
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        guarded("rendering", || tch::no_grad(|| self.render_inner(reqs, settings, on_step)))
    }

    fn render_inner(
        &mut self,
        reqs: &[ImageRequest],
        settings: &RenderSettings,
        on_step: &mut dyn FnMut(usize, usize) -> Vec<usize>,
    ) -> Result<Vec<Option<RgbImage>>, PipelineError> {
        // 1-2. Text.
        let conds: Vec<EncoderTexts> = reqs.iter().map(|r| encoder_texts(&r.prompt)).collect();
        let unconds: Vec<EncoderTexts> = reqs.iter().map(|r| negative_texts(&r.negative_prompt, &r.prompt)).collect();
        let encoded = self.encode(conds.iter().chain(unconds.iter()))?;
        let conditioning = |t: &EncoderTexts| -> Conditioning {
            // In the caption encoder's dtype: the DiT normalises them before its own cast.
            let feats = encoded[&(t.caption.clone(), TextRole::Caption)].to_device(self.device);
            let len = feats.size()[1];
            Conditioning {
                cap_mask: Tensor::ones([1, len], (Kind::Int64, self.device)),
                cap_feats: feats,
                pooled: encoded[&(t.pooled.clone(), TextRole::Pooled)].to_device(self.device).to_kind(self.kind),
            }
        };

        // 3. Sample.
        let channels = self.dit_config.in_channels;
        let f = self.vae_factor();
        let (lh, lw) = (i64::from(settings.height) / f, i64::from(settings.width) / f);
        let items: Vec<SampleItem> = reqs
            .iter()
            .zip(conds.iter().zip(&unconds))
            .map(|(r, (c, u))| SampleItem {
                noise: seeded_noise(r.seed, channels, lh, lw),
                cond: conditioning(c),
                uncond: conditioning(u),
            })
            .collect();
        let n = reqs.len();
        let total = settings.sample.steps;
        let outputs = sample(&self.dit, items, &settings.sample, |info| {
            let dropped: Vec<usize> =
                on_step(info.step + 1, total).into_iter().filter(|i| info.active.contains(i)).collect();
            if dropped.is_empty() {
                StepControl::Continue
            } else {
                StepControl::Drop(dropped)
            }
        })
        .map_err(|e| PipelineError::runtime(format!("sampling: {e}")))?;
        let mut result: Vec<Option<RgbImage>> = vec![None; n];
        if outputs.is_empty() {
            return Ok(result);
        }

        // 4. Check and decode.
        let latents: Vec<&Tensor> = outputs.iter().map(|o| &o.latent).collect();
        let z = Tensor::cat(&latents, 0);
        let finite = Vec::<bool>::try_from(
            z.isfinite().flatten(1, -1).all_dim(1, false).to_device(Device::Cpu),
        )
        .map_err(|e| PipelineError::Other(format!("latent check: {e}")))?;
        let bad: Vec<usize> = outputs.iter().zip(&finite).filter(|(_, ok)| !**ok).map(|(o, _)| o.item).collect();
        if !bad.is_empty() {
            return Err(PipelineError::Numerical(format!("NaN or Inf in the final latent of request(s) {bad:?}")));
        }
        let mut images = Vec::with_capacity(outputs.len());
        let count = z.size()[0];
        let mut start = 0;
        while start < count {
            let len = VAE_CHUNK.min(count - start);
            let img = self.vae.decode_latents_in_dtype(&z.narrow(0, start, len));
            images.extend(to_rgb8(&img));
            start += len;
        }
        for (o, pixels) in outputs.iter().zip(images) {
            let expected = settings.width as usize * settings.height as usize * 3;
            if pixels.len() != expected {
                return Err(PipelineError::Other(format!("decoded image has {} bytes, expected {expected}", pixels.len())));
            }
            result[o.item] = Some(RgbImage { width: settings.width, height: settings.height, pixels });
        }
        Ok(result)
    }

    /// Encodings (CPU) of every text the batch needs, from the cache or freshly computed.
    fn encode<'a>(
        &mut self,
        texts: impl Iterator<Item = &'a EncoderTexts>,
    ) -> Result<HashMap<CacheKey, Tensor>, PipelineError> {
        let mut found: HashMap<CacheKey, Tensor> = HashMap::new();
        let mut missing: Vec<CacheKey> = Vec::new();
        for t in texts {
            for key in [(t.caption.clone(), TextRole::Caption), (t.pooled.clone(), TextRole::Pooled)] {
                if found.contains_key(&key) || missing.contains(&key) {
                    continue;
                }
                match self.cache.get(&key) {
                    Some(v) => {
                        found.insert(key, v);
                    }
                    None => missing.push(key),
                }
            }
        }
        let kind = self.kind;
        let captions: Vec<&CacheKey> = missing.iter().filter(|k| k.1 == TextRole::Caption).collect();
        let pooled: Vec<&CacheKey> = missing.iter().filter(|k| k.1 == TextRole::Pooled).collect();
        let text = &self.text;
        if !captions.is_empty() {
            let fresh = text.caption.with(|m| {
                captions
                    .iter()
                    .map(|k| {
                        let inputs = gemma_inputs(text.caption_tok.as_ref(), &[k.0.as_str()])
                            .map_err(|e| PipelineError::Other(format!("tokenizing: {e}")))?;
                        let valid = inputs.attention_mask.sum(Kind::Int64).int64_value(&[]);
                        let h = m
                            .forward(&inputs.input_ids, &inputs.attention_mask)
                            .narrow(1, 0, valid)
                            .to_kind(caption_encoder_kind(kind))
                            .to_device(Device::Cpu);
                        Ok(((*k).clone(), finite_encoding::<Gemma3TextModel>(h, &k.0)?))
                    })
                    .collect::<Result<Vec<_>, PipelineError>>()
            })?;
            found.extend(fresh);
        }
        if !pooled.is_empty() {
            let fresh = text.pooled.with(|m| {
                pooled
                    .iter()
                    .map(|k| {
                        let v = encode_pooled(m, text.pooled_tok.as_ref(), &k.0)?.to_kind(kind).to_device(Device::Cpu);
                        Ok(((*k).clone(), finite_encoding::<JinaTextModel>(v, &k.0)?))
                    })
                    .collect::<Result<Vec<_>, PipelineError>>()
            })?;
            found.extend(fresh);
        }
        for key in missing {
            let v = found[&key].shallow_clone();
            self.cache.insert(key, v);
        }
        Ok(found)
    }
}

/// Encoder `E`'s encoding of `text`, checked on the host copy in the dtype it is kept in: refused
/// with [`PipelineError::Numerical`] when it holds NaN or Inf, so that a broken encoding is never
/// cached (the empty negative prompt's is kept for good).
fn finite_encoding<E: Movable>(v: Tensor, text: &str) -> Result<Tensor, PipelineError> {
    if v.isfinite().all().int64_value(&[]) != 0 {
        return Ok(v);
    }
    let shown: String = text.chars().take(60).collect();
    let more = if text.chars().count() > 60 { "…" } else { "" };
    Err(PipelineError::Numerical(format!("NaN or Inf in the {} output ({:?}) for {shown:?}{more}", E::NAME, v.kind())))
}

/// Adds one checkpoint component to the weights hash: name, `config.json` bytes, and per
/// safetensors file (sorted) its name, size and header.
fn hash_component(h: &mut Sha256, name: &str, dir: &Path) -> Result<(), PipelineError> {
    let io = |p: &Path, e: std::io::Error| PipelineError::Load(format!("{}: {e}", p.display()));
    h.update(name.as_bytes());
    h.update(b"\0");
    let config = dir.join("config.json");
    if config.is_file() {
        let bytes = std::fs::read(&config).map_err(|e| io(&config, e))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PipelineError::Load(format!("no .safetensors file in {}", dir.display())));
    }
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|e| io(&f, e))?;
        let size = file.metadata().map_err(|e| io(&f, e))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| io(&f, e))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > size.saturating_sub(8) || header_len > 100 << 20 {
            return Err(PipelineError::Load(format!("{}: not a safetensors file (header length {header_len})", f.display())));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| io(&f, e))?;
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(b"\0");
        h.update(size.to_le_bytes());
        h.update(len);
        h.update(&header);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_runs_the_caption_encoder_in_bf16_and_other_kinds_as_they_are() {
        // Gemma's activations overflow fp16; the other precisions run it in their own dtype.
        assert_eq!(caption_encoder_kind(Kind::Half), Kind::BFloat16);
        assert_eq!(caption_encoder_kind(Kind::BFloat16), Kind::BFloat16);
        assert_eq!(caption_encoder_kind(Kind::Float), Kind::Float);
    }

    fn t(v: f32) -> Tensor {
        Tensor::from_slice(&[v])
    }

    #[test]
    fn lru_evicts_least_recent_and_pins_empty_text() {
        let mut c = TextCache::new(2);
        let k = |s: &str| (s.to_string(), TextRole::Caption);
        c.insert(k(""), t(0.0));
        c.insert(k("a"), t(1.0));
        c.insert(k("b"), t(2.0));
        assert!(c.get(&k("a")).is_some()); // a is now the most recent
        c.insert(k("c"), t(3.0)); // evicts b
        assert!(c.get(&k("b")).is_none());
        assert!(c.get(&k("a")).is_some());
        assert!(c.get(&k("c")).is_some());
        assert!(c.get(&k("")).is_some());
        assert_eq!(c.get(&("a".to_string(), TextRole::Pooled)).map(|_| ()), None);
        assert_eq!(c.len(), 3);
        assert_eq!((c.hits, c.misses), (4, 2));
    }

    #[test]
    fn encoder_texts_follow_the_training_recipe() {
        let plain = encoder_texts("  1girl, solo  ");
        assert_eq!(plain.pooled, "1girl, solo");
        assert_eq!(plain.caption, format!("{TEXT_SYSTEM_PROMPT}1girl, solo"));
        let xml = encoder_texts("<character_1><n>x</n></character_1>");
        assert_eq!(xml.caption, format!("{XML_SYSTEM_PROMPT}<character_1><n>x</n></character_1>"));
        let empty = encoder_texts("   ");
        assert_eq!(empty, EncoderTexts { caption: String::new(), pooled: String::new() });
        let broken = encoder_texts("<a>unclosed");
        assert!(broken.caption.starts_with(XML_SYSTEM_PROMPT));
        assert_eq!(broken.pooled, "<a>unclosed");
        // A negative takes its positive's system prompt; an empty one stays empty.
        let neg = negative_texts("lowres, bad hands", "<character_1><n>x</n></character_1>");
        assert_eq!(neg.caption, format!("{XML_SYSTEM_PROMPT}lowres, bad hands"));
        assert_eq!(neg.pooled, "lowres, bad hands");
        let neg = negative_texts("<style>sketch</style>", "1girl, solo");
        assert_eq!(neg.caption, format!("{TEXT_SYSTEM_PROMPT}<style>sketch</style>"));
        assert_eq!(negative_texts("  ", "1girl"), EncoderTexts { caption: String::new(), pooled: String::new() });
    }

    #[test]
    fn presets_parse_and_name() {
        for p in [Preset::NewbieExp01, Preset::Tiny] {
            assert_eq!(Preset::parse(p.name()), Some(p));
        }
        assert_eq!(Preset::parse("newbie-exp0.1"), Some(Preset::NewbieExp01));
        assert_eq!(Preset::parse("other"), None);
    }

    #[test]
    fn torch_panics_are_reduced_to_the_error_line() {
        let raw = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 MiB.\\nException raised from malloc\\nframe #0: x\")";
        assert_eq!(torch_message(raw), "CUDA out of memory. Tried to allocate 2.00 MiB.");
        assert_eq!(torch_message("plain failure"), "plain failure");
        assert_eq!(torch_message("x: Torch(\"bad shape (see docs)\")"), "bad shape (see docs)");
        let e = guarded("rendering", || -> Result<(), PipelineError> { panic!("{}", raw) }).unwrap_err();
        match e {
            PipelineError::OutOfMemory(m) => assert_eq!(m, "rendering: CUDA out of memory. Tried to allocate 2.00 MiB."),
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn non_finite_encodings_are_refused_with_the_encoder_named() {
        let ok = Tensor::from_slice(&[1.0f32, -2.0]).to_kind(Kind::Half);
        assert!(finite_encoding::<Gemma3TextModel>(ok, "a").is_ok());
        // 70000 does not fit fp16: the conversion gives Inf, as an overflowing activation would.
        let over = Tensor::from_slice(&[1.0f32, 70000.0]).to_kind(Kind::Half);
        match finite_encoding::<Gemma3TextModel>(over, "1girl, solo") {
            Err(PipelineError::Numerical(m)) => {
                assert!(m.contains("Gemma 3") && m.contains("1girl, solo") && m.contains("Half"), "{m}")
            }
            other => panic!("expected a numerical error, got {other:?}"),
        }
        let nan = Tensor::from_slice(&[f32::NAN]);
        match finite_encoding::<JinaTextModel>(nan, "x") {
            Err(PipelineError::Numerical(m)) => assert!(m.contains("Jina"), "{m}"),
            other => panic!("expected a numerical error, got {other:?}"),
        }
    }

    #[test]
    fn oom_messages_are_recognised() {
        assert!(matches!(PipelineError::runtime("CUDA out of memory. Tried to allocate"), PipelineError::OutOfMemory(_)));
        assert!(matches!(PipelineError::runtime("shape mismatch"), PipelineError::Other(_)));
    }
}
