//! FLUX.1 VAE decoder: the decoder half of diffusers' `AutoencoderKL` with 16 latent channels.
//!
//! Layout (diffusers `Decoder`): `conv_in` → mid block (resnet, single-head self-attention, resnet) →
//! up blocks from the lowest resolution up (each `layers_per_block + 1` resnets, nearest ×2 upsample +
//! 3×3 conv in all but the last) → GroupNorm → SiLU → `conv_out`. Field paths equal the diffusers key
//! names (`decoder.up_blocks.{i}.resnets.{j}.conv1.weight`, ...); Black Forest Labs' single-file
//! `ae.safetensors` (LDM names, reversed up index, 1×1-conv attention) is read through [`bfl_key_map`].
//!
//! NewBie decodes a sampled latent `z` as `vae.decode(z / scaling_factor + shift_factor)` and hands
//! `clamp((x + 1) / 2, 0, 1)` to the image encoder ([`VaeDecoder::decode_latents`], [`to_rgb8`]).
//!
//! The VAE is small and its BFL layout needs a reshape of the attention weights, so it is read with
//! the small strict loader in this file ([`read_safetensors_filtered`], [`copy_strict`]); the text
//! encoders use the streaming loader of `loading.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// Errors and strict loading
// ---------------------------------------------------------------------------------------------

/// Errors while building a model or loading its weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Errors of the shared strict loader (`loading.rs`), used by the text encoders.
    #[error(transparent)]
    Load(#[from] super::loading::LoadError),
    #[error("no .safetensors file at {0}")]
    NoWeights(PathBuf),
    #[error("checkpoint keys do not match the model: {} missing {missing:?}; {} unexpected {unexpected:?}", missing.len(), unexpected.len())]
    KeyMismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("shape mismatch for {key}: model expects {expected:?}, checkpoint has {found:?}")]
    Shape {
        key: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
}

/// The safetensors files of a checkpoint: `path` itself if it is a file, else every
/// `*.safetensors` directly inside the directory (sorted, so shards load in order).
pub fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(WeightsError::NoWeights(path.to_path_buf()));
    }
    Ok(files)
}

/// Reads every tensor of `files`, renaming each key through `rename`; keys for which `rename`
/// returns `None` are dropped right away (parts of a checkpoint that this model does not use).
pub fn read_safetensors_filtered(
    files: &[PathBuf],
    mut rename: impl FnMut(&str) -> Option<String>,
) -> Result<BTreeMap<String, Tensor>, WeightsError> {
    let mut out = BTreeMap::new();
    for file in files {
        for (name, tensor) in Tensor::read_safetensors(file)? {
            if let Some(new_name) = rename(&name) {
                out.insert(new_name, tensor);
            }
        }
    }
    Ok(out)
}

/// Copies `tensors` into the variables of `vs`, failing unless both key sets are equal and every
/// shape matches; values are converted to the store's dtype. Freezes the store afterwards.
pub fn copy_strict(vs: &mut nn::VarStore, tensors: BTreeMap<String, Tensor>) -> Result<(), WeightsError> {
    let vars = vs.variables();
    let model_keys: BTreeSet<&String> = vars.keys().collect();
    let file_keys: BTreeSet<&String> = tensors.keys().collect();
    let missing: Vec<String> = model_keys.difference(&file_keys).map(|k| k.to_string()).collect();
    let unexpected: Vec<String> = file_keys.difference(&model_keys).map(|k| k.to_string()).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(WeightsError::KeyMismatch { missing, unexpected });
    }
    for (key, src) in &tensors {
        let dst = &vars[key];
        if dst.size() != src.size() {
            return Err(WeightsError::Shape {
                key: key.clone(),
                expected: dst.size(),
                found: src.size(),
            });
        }
    }
    tch::no_grad(|| -> Result<(), WeightsError> {
        for (key, src) in tensors {
            let mut dst = vars[&key].shallow_clone();
            dst.f_copy_(&src)?;
        }
        Ok(())
    })?;
    vs.freeze();
    Ok(())
}

/// Builds a model on a fresh var store of `kind` on `device` with random weights drawn from `seed`,
/// then freezes it. Shared by the random-weight constructors of the text encoders and the VAE.
pub fn random_frozen<M>(
    device: Device,
    kind: Kind,
    seed: i64,
    build: impl FnOnce(&nn::Path) -> Result<M, WeightsError>,
) -> Result<M, WeightsError> {
    super::rng::seeded(seed, || {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = build(&vs.root())?;
        vs.freeze();
        Ok(model)
    })
}

/// Reads and parses a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WeightsError> {
    let text = std::fs::read_to_string(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| WeightsError::Json {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Mirror of diffusers' `AutoencoderKL` `config.json`. Missing fields take diffusers' defaults;
/// unknown fields (`_class_name`, `_diffusers_version`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: i64,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// GroupNorm epsilon of every decoder norm (diffusers hard-codes 1e-6 in the VAE blocks).
const VAE_NORM_EPS: f64 = 1e-6;

impl VaeConfig {
    /// FLUX.1-dev `vae/config.json` (black-forest-labs/FLUX.1-dev), the VAE NewBie-image-Exp0.1 ships.
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 16,
            norm_num_groups: 32,
            sample_size: 1024,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            force_upcast: true,
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    /// A random-weight decoder small enough for CPU tests (same structure as [`VaeConfig::flux`]).
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![16, 24, 32, 32],
            norm_num_groups: 8,
            sample_size: 64,
            ..Self::flux()
        }
    }

    /// Reads a diffusers `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self, WeightsError> {
        read_json(path)
    }

    fn validate(&self) -> Result<(), WeightsError> {
        let bad = |m: String| Err(WeightsError::Unsupported(m));
        if self.act_fn != "silu" {
            return bad(format!("act_fn {:?} (only silu)", self.act_fn));
        }
        if self.block_out_channels.is_empty() {
            return bad("empty block_out_channels".into());
        }
        if self.up_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return bad(format!("up_block_types {:?}", self.up_block_types));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "{c} channels not divisible by {} groups",
                self.norm_num_groups
            ));
        }
        Ok(())
    }

    /// Spatial upsampling factor of the decoder (8 for FLUX).
    pub fn upsampling_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

/// GroupNorm with the statistics and affine transform computed in f32, cast back to the input dtype.
#[derive(Debug)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: i64,
}

impl GroupNorm {
    fn new(vs: nn::Path, num_groups: i64, channels: i64) -> Self {
        Self {
            weight: vs.ones("weight", &[channels]),
            bias: vs.zeros("bias", &[channels]),
            num_groups,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_f32(x).to_kind(x.kind())
    }

    /// `SiLU(norm(x))` with both in f32, rounded once to `x`'s dtype: under the reference's autocast
    /// the norm's output stays f32 and the SiLU runs on it before the next conv casts.
    fn forward_silu(&self, x: &Tensor) -> Tensor {
        self.forward_f32(x).silu().to_kind(x.kind())
    }

    fn forward_f32(&self, x: &Tensor) -> Tensor {
        let w = self.weight.to_kind(Kind::Float);
        let b = self.bias.to_kind(Kind::Float);
        x.to_kind(Kind::Float).group_norm(self.num_groups, Some(&w), Some(&b), VAE_NORM_EPS, true)
    }
}

fn conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: k / 2,
        ..Default::default()
    };
    nn::conv2d(vs, c_in, c_out, k, cfg)
}

/// diffusers `ResnetBlock2D` without time embedding: `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`,
/// with a 1×1 `conv_shortcut` on `x` when the channel count changes.
#[derive(Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: nn::Conv2D,
    norm2: GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(vs: nn::Path, cfg: &VaeConfig, c_in: i64, c_out: i64) -> Self {
        let g = cfg.norm_num_groups;
        Self {
            norm1: GroupNorm::new(&vs / "norm1", g, c_in),
            conv1: conv(&vs / "conv1", c_in, c_out, 3),
            norm2: GroupNorm::new(&vs / "norm2", g, c_out),
            conv2: conv(&vs / "conv2", c_out, c_out, 3),
            conv_shortcut: (c_in != c_out).then(|| conv(&vs / "conv_shortcut", c_in, c_out, 1)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward_silu(x));
        let h = self.conv2.forward(&self.norm2.forward_silu(&h));
        match &self.conv_shortcut {
            Some(sc) => sc.forward(x) + h,
            None => x + h,
        }
    }
}

/// diffusers `Attention` as used in the VAE mid block: GroupNorm, one head spanning all channels,
/// q/k/v/out linears with bias, scale `1/sqrt(C)`, residual add.
#[derive(Debug)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl MidAttention {
    fn new(vs: nn::Path, cfg: &VaeConfig, c: i64) -> Self {
        let lin = |name: &str| nn::linear(&vs / name, c, c, Default::default());
        Self {
            group_norm: GroupNorm::new(&vs / "group_norm", cfg.norm_num_groups, c),
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: nn::linear(&vs / "to_out" / 0, c, c, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input must be [B,C,H,W]");
        let tokens = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2); // [B, HW, C]
        let q = self.to_q.forward(&tokens).unsqueeze(1);
        let k = self.to_k.forward(&tokens).unsqueeze(1);
        let v = self.to_v.forward(&tokens).unsqueeze(1);
        // The fused kernel avoids materialising the [HW, HW] score matrix (16384² at 1024²).
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false)
            .squeeze_dim(1);
        let o = self.to_out.forward(&o).transpose(1, 2).reshape([b, c, h, w]);
        o + x
    }
}

/// diffusers `UNetMidBlock2D` (no time embedding): resnet → attention → resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attention: Option<MidAttention>,
}

impl MidBlock {
    fn new(vs: nn::Path, cfg: &VaeConfig, c: i64) -> Self {
        let resnets = (0..2)
            .map(|j| ResnetBlock::new(&vs / "resnets" / j, cfg, c, c))
            .collect();
        let attention = cfg
            .mid_block_add_attention
            .then(|| MidAttention::new(&vs / "attentions" / 0, cfg, c));
        Self { resnets, attention }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x);
        if let Some(attn) = &self.attention {
            h = attn.forward(&h);
        }
        self.resnets[1].forward(&h)
    }
}

/// diffusers `UpDecoderBlock2D`: resnets, then (except in the last block) nearest ×2 + 3×3 conv.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler_conv: Option<nn::Conv2D>,
}

impl UpBlock {
    fn new(vs: nn::Path, cfg: &VaeConfig, c_in: i64, c_out: i64, add_upsample: bool) -> Self {
        let resnets = (0..cfg.layers_per_block + 1)
            .map(|j| {
                let c = if j == 0 { c_in } else { c_out };
                ResnetBlock::new(&vs / "resnets" / j, cfg, c, c_out)
            })
            .collect();
        let upsampler_conv = add_upsample.then(|| conv(&vs / "upsamplers" / 0 / "conv", c_out, c_out, 3));
        Self {
            resnets,
            upsampler_conv,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        if let Some(conv) = &self.upsampler_conv {
            let (_, _, hh, ww) = h.size4().expect("[B,C,H,W]");
            h = conv.forward(&h.upsample_nearest2d([hh * 2, ww * 2], 2.0, 2.0));
        }
        h
    }
}

/// diffusers `Decoder` (the `decoder.*` subtree).
#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = reversed[0];
        let n = reversed.len();
        let up_blocks = (0..n)
            .map(|i| {
                let c_in = if i == 0 { top } else { reversed[i - 1] };
                UpBlock::new(&vs / "up_blocks" / i, cfg, c_in, reversed[i], i + 1 < n)
            })
            .collect();
        let bottom = cfg.block_out_channels[0];
        Self {
            conv_in: conv(&vs / "conv_in", cfg.latent_channels, top, 3),
            mid_block: MidBlock::new(&vs / "mid_block", cfg, top),
            up_blocks,
            conv_norm_out: GroupNorm::new(&vs / "conv_norm_out", cfg.norm_num_groups, bottom),
            conv_out: conv(&vs / "conv_out", bottom, cfg.out_channels, 3),
        }
    }

    fn forward(&self, z: &Tensor, inspect: &mut dyn FnMut(&str, &Tensor)) -> Tensor {
        let h = self.conv_in.forward(z);
        inspect("conv_in", &h);
        let mut h = self.mid_block.forward(&h);
        inspect("mid_block", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward(&h);
            inspect(&format!("up_blocks.{i}"), &h);
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h))
    }
}

// ---------------------------------------------------------------------------------------------
// Public model
// ---------------------------------------------------------------------------------------------

/// The VAE decoder with NewBie's latent normalisation.
#[derive(Debug)]
pub struct VaeDecoder {
    post_quant_conv: Option<nn::Conv2D>,
    decoder: Decoder,
    config: VaeConfig,
    kind: Kind,
    device: Device,
}

/// Key naming of a VAE checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeKeyFormat {
    /// diffusers `vae/diffusion_pytorch_model.safetensors`.
    Diffusers,
    /// Black Forest Labs `ae.safetensors` (LDM names).
    Bfl,
}

impl VaeDecoder {
    /// Builds the decoder under `vs` (root path: keys `decoder.*`, `post_quant_conv.*`). Parameters
    /// take the store's device and dtype and tch's default initialisation.
    /// Holds libtorch's global generator while tch's initialisers draw (see [`super::rng`]).
    pub fn new(vs: &nn::Path, cfg: &VaeConfig) -> Result<Self, WeightsError> {
        cfg.validate()?;
        let _generator = super::rng::lock();
        let post_quant_conv = cfg.use_post_quant_conv.then(|| {
            conv(
                vs / "post_quant_conv",
                cfg.latent_channels,
                cfg.latent_channels,
                1,
            )
        });
        Ok(Self {
            post_quant_conv,
            decoder: Decoder::new(vs / "decoder", cfg),
            config: cfg.clone(),
            kind: vs.kind(),
            device: vs.device(),
        })
    }

    /// A frozen decoder with random weights drawn from `seed` (for the `tiny` pipeline).
    pub fn random(cfg: &VaeConfig, device: Device, kind: Kind, seed: i64) -> Result<Self, WeightsError> {
        random_frozen(device, kind, seed, |root| Self::new(root, cfg))
    }

    /// Loads a decoder from one safetensors file or a directory of them, in either key format
    /// (detected from the keys). `encoder.*` and `quant_conv.*` are skipped; every decoder key
    /// must be present and nothing else may be.
    pub fn load(weights: &Path, cfg: &VaeConfig, device: Device, kind: Kind) -> Result<Self, WeightsError> {
        let files = safetensors_files(weights)?;
        let keep_post_quant = cfg.use_post_quant_conv;
        let raw = read_safetensors_filtered(&files, |k| {
            let skip = k.starts_with("encoder.")
                || k.starts_with("quant_conv.")
                || (!keep_post_quant && k.starts_with("post_quant_conv."));
            (!skip).then(|| k.to_string())
        })?;
        let tensors = match detect_key_format(raw.keys().map(String::as_str)) {
            VaeKeyFormat::Diffusers => raw,
            VaeKeyFormat::Bfl => from_bfl_names(raw, cfg),
        };
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = Self::new(&vs.root(), cfg)?;
        copy_strict(&mut vs, tensors)?;
        Ok(model)
    }

    /// Loads a diffusers `vae/` folder (`config.json` + safetensors) or a folder / file holding
    /// BFL's `ae.safetensors`; without a `config.json` the FLUX configuration is assumed.
    pub fn load_dir(path: &Path, device: Device, kind: Kind) -> Result<Self, WeightsError> {
        let config_path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.with_file_name("config.json")
        };
        let cfg = if config_path.is_file() {
            VaeConfig::from_json_file(&config_path)?
        } else {
            VaeConfig::flux()
        };
        Self::load(path, &cfg, device, kind)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `vae.decode(z).sample`: VAE-space latent [B, latent_channels, h, w] → image
    /// [B, out_channels, 8h, 8w] in the model dtype. Each image is decoded on its own: convolution
    /// kernels choose batch-size-dependent algorithms, and decoding one at a time keeps an image's
    /// pixels independent of the rest of the batch (the decoder's cost is per pixel, so batching
    /// would gain little).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let n = z.size()[0];
        let images: Vec<Tensor> = (0..n)
            .map(|i| self.decode_inspect(&z.narrow(0, i, 1), &mut |_, _| {}))
            .collect();
        Tensor::cat(&images, 0)
    }

    /// The whole batch in one pass, calling `inspect` with the output of `conv_in`, `mid_block` and each
    /// `up_blocks.{i}` (diffusers order, 0 = lowest resolution).
    pub fn decode_inspect(&self, z: &Tensor, inspect: &mut dyn FnMut(&str, &Tensor)) -> Tensor {
        tch::no_grad(|| {
            let mut z = z.to_device(self.device).to_kind(self.kind);
            if let Some(pq) = &self.post_quant_conv {
                z = pq.forward(&z);
            }
            self.decoder.forward(&z, inspect)
        })
    }

    /// The DiT latent → VAE latent normalisation `z / scaling_factor + shift_factor`, in f32.
    pub fn unnormalize_latents(&self, z: &Tensor) -> Tensor {
        let z = z.to_kind(Kind::Float) / self.config.scaling_factor;
        z + self.config.shift_factor.unwrap_or(0.0)
    }

    /// NewBie's decode: `vae.decode(z / scaling_factor + shift_factor)` for a sampled DiT latent
    /// `z` [B, 16, h, w]; returns the image [B, 3, 8h, 8w] in f32, roughly in [-1, 1].
    pub fn decode_latents(&self, z: &Tensor) -> Tensor {
        self.decode_latents_in_dtype(z).to_kind(Kind::Float)
    }

    /// [`Self::decode_latents`] in the decoder's dtype, the input [`to_rgb8`] rounds like the
    /// reference does.
    pub fn decode_latents_in_dtype(&self, z: &Tensor) -> Tensor {
        self.decode(&self.unnormalize_latents(z))
    }
}

/// Recognises BFL (LDM) key names by their mid-block resnet names.
pub fn detect_key_format<'a>(mut keys: impl Iterator<Item = &'a str>) -> VaeKeyFormat {
    if keys.any(|k| k.starts_with("decoder.mid.") || k.starts_with("decoder.up.")) {
        VaeKeyFormat::Bfl
    } else {
        VaeKeyFormat::Diffusers
    }
}

/// diffusers name → BFL `ae.safetensors` name for every decoder parameter of `cfg`.
pub fn bfl_key_map(cfg: &VaeConfig) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut add = |d: String, b: String| {
        for p in ["weight", "bias"] {
            map.insert(format!("{d}.{p}"), format!("{b}.{p}"));
        }
    };
    let resnet = |add: &mut dyn FnMut(String, String), d: &str, b: &str, shortcut: bool| {
        for part in ["norm1", "conv1", "norm2", "conv2"] {
            add(format!("{d}.{part}"), format!("{b}.{part}"));
        }
        if shortcut {
            add(format!("{d}.conv_shortcut"), format!("{b}.nin_shortcut"));
        }
    };
    add("decoder.conv_in".into(), "decoder.conv_in".into());
    add("decoder.conv_out".into(), "decoder.conv_out".into());
    add("decoder.conv_norm_out".into(), "decoder.norm_out".into());
    if cfg.use_post_quant_conv {
        add("post_quant_conv".into(), "post_quant_conv".into());
    }
    for (j, b) in ["block_1", "block_2"].iter().enumerate() {
        resnet(
            &mut add,
            &format!("decoder.mid_block.resnets.{j}"),
            &format!("decoder.mid.{b}"),
            false,
        );
    }
    if cfg.mid_block_add_attention {
        for (d, b) in [
            ("group_norm", "norm"),
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
        ] {
            add(
                format!("decoder.mid_block.attentions.0.{d}"),
                format!("decoder.mid.attn_1.{b}"),
            );
        }
    }
    let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
    let n = reversed.len();
    for i in 0..n {
        let c_in = if i == 0 { reversed[0] } else { reversed[i - 1] };
        let bfl = n - 1 - i;
        for j in 0..(cfg.layers_per_block + 1) as usize {
            let shortcut = j == 0 && c_in != reversed[i];
            resnet(
                &mut add,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                &format!("decoder.up.{bfl}.block.{j}"),
                shortcut,
            );
        }
        if i + 1 < n {
            add(
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                format!("decoder.up.{bfl}.upsample.conv"),
            );
        }
    }
    map
}

/// Renames BFL tensors to diffusers names and turns the 1×1-conv attention weights [C,C,1,1] into
/// linear weights [C,C]. Keys the map does not know are kept so that the strict check reports them.
fn from_bfl_names(raw: BTreeMap<String, Tensor>, cfg: &VaeConfig) -> BTreeMap<String, Tensor> {
    let inverse: BTreeMap<String, String> = bfl_key_map(cfg).into_iter().map(|(d, b)| (b, d)).collect();
    raw.into_iter()
        .map(|(k, t)| match inverse.get(&k) {
            Some(d) => {
                let t = if d.contains(".attentions.0.") && t.dim() == 4 {
                    t.flatten(1, 3)
                } else {
                    t
                };
                (d.clone(), t)
            }
            None => (k, t),
        })
        .collect()
}

/// Converts images [B, 3, H, W] in [-1, 1] to interleaved RGB bytes (one `Vec` of H·W·3 bytes per
/// image, rows top to bottom): `clamp((x + 1) / 2, 0, 1)` in the image's dtype (a bf16 decode's sum
/// is rounded to bf16, as under the reference's autocast), then `trunc(· 255)` in f32, as the
/// official demo converts its decode (`to_pil_image` of a float tensor is `mul(255).byte()`), so the
/// bytes equal the reference's for the same decoded image.
pub fn to_rgb8(image: &Tensor) -> Vec<Vec<u8>> {
    tch::no_grad(|| {
        let x = image.to_device(Device::Cpu);
        let x = ((x + 1.0) / 2.0).clamp(0.0, 1.0).to_kind(Kind::Float) * 255.0;
        let bytes = x.trunc().to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous();
        let b = bytes.size()[0];
        (0..b)
            .map(|i| {
                let img = bytes.get(i);
                let mut out = vec![0u8; img.numel()];
                img.copy_data(&mut out, img.numel());
                out
            })
            .collect()
    })
}
