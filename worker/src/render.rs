//! What the worker's GPU thread drives: a [`Renderer`] turns a batch of tasks of one shape into RGB
//! images, calling back after every denoising step.
//!
//! [`ModelRenderer`] runs the NewBie pipeline. [`SyntheticRenderer`] draws a deterministic pattern
//! without any model; it exists only for control-plane load tests of the coordinator.

use farm_proto::pb::{Precision, RenderParams, Sampler};

use crate::model::pipeline::{ImageRequest, Pipeline, PipelineError, RenderSettings};
use crate::model::sampler::{SampleParams, SamplerKind};

/// One image of a batch.
#[derive(Debug, Clone)]
pub struct RenderItem {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Why a batch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("numerical anomaly: {0}")]
    Numerical(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("render failed: {0}")]
    Failed(String),
}

impl RenderError {
    /// The `kind` reported to the coordinator.
    pub fn kind(&self) -> &'static str {
        match self {
            RenderError::OutOfMemory(_) => "out_of_memory",
            RenderError::Numerical(_) => "numerical_anomaly",
            RenderError::Invalid(_) | RenderError::Failed(_) => "render",
        }
    }
    /// Whether another attempt (elsewhere, or later) can help.
    pub fn retryable(&self) -> bool {
        !matches!(self, RenderError::Invalid(_))
    }
}

impl From<PipelineError> for RenderError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::OutOfMemory(m) => RenderError::OutOfMemory(m),
            PipelineError::Numerical(m) => RenderError::Numerical(m),
            PipelineError::Invalid(m) => RenderError::Invalid(m),
            other => RenderError::Failed(other.to_string()),
        }
    }
}

/// What the worker tells the coordinator about its renderer.
#[derive(Debug, Clone)]
pub struct RendererInfo {
    pub model_name: String,
    pub model_hash: String,
    pub device: String,
    pub device_name: String,
    pub vram_total_bytes: u64,
    pub vram_free_bytes: u64,
    pub precision: Precision,
    pub max_pixels: u64,
}

pub trait Renderer: Send {
    fn info(&self) -> RendererInfo;
    /// Renders `items` with `params`. After every step `on_step(step, total)` returns the indices of
    /// items to drop (cancelled); those come back as `None`.
    fn render(
        &mut self,
        items: &[RenderItem],
        params: &RenderParams,
        on_step: &mut dyn FnMut(usize, usize) -> Vec<usize>,
    ) -> Result<Vec<Option<Image>>, RenderError>;
}

pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Bf16 | Precision::Unspecified => "bf16",
        Precision::Fp16 => "fp16",
        Precision::Fp32 => "fp32",
    }
}

pub fn sampler_name(s: i32) -> &'static str {
    match Sampler::try_from(s).unwrap_or(Sampler::Unspecified) {
        Sampler::Midpoint => "midpoint",
        _ => "euler",
    }
}

/// The NewBie pipeline, resident on its device.
pub struct ModelRenderer {
    pub pipeline: Pipeline,
    pub precision: Precision,
    pub device_label: String,
}

impl ModelRenderer {
    pub fn sample_params(p: &RenderParams) -> SampleParams {
        SampleParams {
            steps: p.steps as usize,
            shift: f64::from(p.shift),
            cfg_scale: f64::from(farm_proto::limits::cfg_scale(p)),
            cfg_trunc: f64::from(farm_proto::limits::cfg_trunc(p)),
            renorm_cfg: f64::from(p.renorm_cfg),
            kind: if p.sampler == Sampler::Midpoint as i32 { SamplerKind::Midpoint } else { SamplerKind::Euler },
        }
    }
}

impl Renderer for ModelRenderer {
    fn info(&self) -> RendererInfo {
        let (device_name, total, free) = crate::device::describe(self.pipeline.device());
        RendererInfo {
            model_name: self.pipeline.model_name().to_string(),
            model_hash: self.pipeline.weights_hash().to_string(),
            device: self.device_label.clone(),
            device_name,
            vram_total_bytes: total,
            vram_free_bytes: free,
            precision: self.precision,
            max_pixels: 1024 * 1024,
        }
    }

    fn render(
        &mut self,
        items: &[RenderItem],
        params: &RenderParams,
        on_step: &mut dyn FnMut(usize, usize) -> Vec<usize>,
    ) -> Result<Vec<Option<Image>>, RenderError> {
        let reqs: Vec<ImageRequest> = items
            .iter()
            .map(|i| ImageRequest { prompt: i.prompt.clone(), negative_prompt: i.negative_prompt.clone(), seed: i.seed })
            .collect();
        let settings = RenderSettings { width: params.width, height: params.height, sample: Self::sample_params(params) };
        let out = self.pipeline.render(&reqs, &settings, on_step)?;
        Ok(out
            .into_iter()
            .map(|o| o.map(|img| Image { width: img.width, height: img.height, rgb: img.pixels }))
            .collect())
    }
}

/// A prompt holding this makes the synthetic renderer fail its whole batch with a numerical
/// anomaly, as a prompt whose latent turns NaN fails a model batch (for tests of failure handling).
pub const SYNTHETIC_FAILURE_MARKER: &str = "[synthetic:nan]";

/// A prompt holding this makes the synthetic renderer hang before its first step and never return,
/// as a wedged GPU does (for tests of the worker's stall watchdog).
pub const SYNTHETIC_HANG_MARKER: &str = "[synthetic:hang]";

/// Deterministic pattern images with no model, for control-plane load tests. `step_ms` simulates
/// the time of one denoising step. A prompt containing [`SYNTHETIC_FAILURE_MARKER`] fails its batch;
/// one containing [`SYNTHETIC_HANG_MARKER`] hangs it.
pub struct SyntheticRenderer {
    pub step_ms: u64,
    /// Time spent after the last step, where the model decodes latents to pixels.
    pub decode_ms: u64,
    pub model_name: String,
}

impl Renderer for SyntheticRenderer {
    fn info(&self) -> RendererInfo {
        RendererInfo {
            model_name: self.model_name.clone(),
            model_hash: "synthetic".into(),
            device: "cpu".into(),
            device_name: "synthetic renderer".into(),
            vram_total_bytes: 0,
            vram_free_bytes: 0,
            precision: Precision::Fp32,
            max_pixels: 1024 * 1024,
        }
    }

    fn render(
        &mut self,
        items: &[RenderItem],
        params: &RenderParams,
        on_step: &mut dyn FnMut(usize, usize) -> Vec<usize>,
    ) -> Result<Vec<Option<Image>>, RenderError> {
        let steps = params.steps.max(1) as usize;
        let mut alive = vec![true; items.len()];
        if items.iter().any(|it| it.prompt.contains(SYNTHETIC_HANG_MARKER)) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        for s in 0..steps {
            if self.step_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(self.step_ms));
            }
            for d in on_step(s + 1, steps) {
                if d < alive.len() {
                    alive[d] = false;
                }
            }
        }
        if self.decode_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.decode_ms));
        }
        if let Some(i) = items.iter().position(|it| it.prompt.contains(SYNTHETIC_FAILURE_MARKER)) {
            return Err(RenderError::Numerical(format!("NaN or Inf in the final latent of request(s) [{i}]")));
        }
        // Small images keep load tests about the control plane, not PNG encoding.
        let (w, h) = (16u32, 16u32);
        Ok(items
            .iter()
            .zip(alive)
            .map(|(it, a)| {
                a.then(|| {
                    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
                    let mut x = it.seed ^ 0x9e37_79b9_7f4a_7c15;
                    for _ in 0..w * h * 3 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        rgb.push((x >> 56) as u8);
                    }
                    Image { width: w, height: h, rgb }
                })
            })
            .collect())
    }
}
