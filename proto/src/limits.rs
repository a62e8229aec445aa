//! Render-parameter limits and defaults.
//!
//! The coordinator rejects a submission that breaks one of these; the worker checks them again before it
//! renders. Sizes follow the model's training buckets (`newbie-model.md` §6.5): each side a multiple of
//! 16 px (8x VAE downsampling times the 2x2 patch), at most 4,096 patches of 16x16 px, aspect ratio <= 4.

use crate::pb::{Precision, RenderParams, Sampler};

/// Most prompts in one job.
pub const MAX_PROMPTS_PER_JOB: u64 = 1_000_000;
/// Pixel granularity of width and height.
pub const SIZE_MULTIPLE: u32 = 16;
/// Most 2x2 latent patches (16x16 px each) in one image: 4,096 = 1024x1024 px.
pub const MAX_PATCHES: u32 = 4096;
/// Largest ratio between the longer and the shorter side.
pub const MAX_ASPECT: u32 = 4;
/// Denoising steps allowed.
pub const MIN_STEPS: u32 = 1;
pub const MAX_STEPS: u32 = 200;
/// Guidance scale allowed.
pub const MAX_CFG: f32 = 30.0;
/// Guidance scale of a job that names none.
pub const DEFAULT_CFG_SCALE: f32 = 5.0;
/// CFG truncation of a job that names none: guidance on every step.
pub const DEFAULT_CFG_TRUNC: f32 = 1.0;
/// Default render attempts per task.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Most render attempts a job may allow per task.
pub const MAX_ATTEMPTS: u32 = 100;

/// Name of the real model preset.
pub const MODEL_NEWBIE: &str = "newbie-exp0.1";
/// Name of the small random-weight preset used by tests and the demo.
pub const MODEL_TINY: &str = "tiny";

/// A parameter outside its limit. The message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitError(pub String);

/// Checks width and height against the size rules.
pub fn check_size(width: u32, height: u32) -> Result<(), LimitError> {
    if width == 0 || height == 0 {
        return Err(LimitError(format!("size {width}x{height}: width and height must be positive")));
    }
    if !width.is_multiple_of(SIZE_MULTIPLE) || !height.is_multiple_of(SIZE_MULTIPLE) {
        return Err(LimitError(format!(
            "size {width}x{height}: width and height must be multiples of {SIZE_MULTIPLE} px"
        )));
    }
    let patches = u64::from(width / SIZE_MULTIPLE) * u64::from(height / SIZE_MULTIPLE);
    if patches > u64::from(MAX_PATCHES) {
        return Err(LimitError(format!(
            "size {width}x{height}: {patches} patches of 16x16 px exceed the limit of {MAX_PATCHES} (1024x1024)"
        )));
    }
    let (long, short) = (width.max(height), width.min(height));
    if long > short * MAX_ASPECT {
        return Err(LimitError(format!(
            "size {width}x{height}: aspect ratio exceeds the limit of {MAX_ASPECT}:1"
        )));
    }
    Ok(())
}

/// Checks the step count.
pub fn check_steps(steps: u32) -> Result<(), LimitError> {
    if !(MIN_STEPS..=MAX_STEPS).contains(&steps) {
        return Err(LimitError(format!("steps {steps}: must be between {MIN_STEPS} and {MAX_STEPS}")));
    }
    Ok(())
}

/// Checks the guidance settings.
pub fn check_guidance(cfg_scale: f32, cfg_trunc: f32, renorm_cfg: f32, shift: f32) -> Result<(), LimitError> {
    if !(0.0..=MAX_CFG).contains(&cfg_scale) {
        return Err(LimitError(format!("cfg_scale {cfg_scale}: must be between 0 and {MAX_CFG}")));
    }
    if !(0.0..=1.0).contains(&cfg_trunc) {
        return Err(LimitError(format!("cfg_trunc {cfg_trunc}: must be between 0 and 1")));
    }
    if !(0.0..=10.0).contains(&renorm_cfg) {
        return Err(LimitError(format!("renorm_cfg {renorm_cfg}: must be between 0 and 10")));
    }
    if !(shift > 0.0 && shift <= 100.0) {
        return Err(LimitError(format!("shift {shift}: must be in (0, 100]")));
    }
    Ok(())
}

/// Fills zero/unspecified fields with the defaults of the real model (1024x1024, 28 Euler steps,
/// CFG 5 on every step, no renorm, shift 6, bf16). `cfg_scale` and `cfg_trunc` carry presence, so
/// only unset ones take the default and an explicit 0 stays 0.
pub fn with_defaults(p: &RenderParams) -> RenderParams {
    RenderParams {
        width: if p.width == 0 { 1024 } else { p.width },
        height: if p.height == 0 { 1024 } else { p.height },
        steps: if p.steps == 0 { 28 } else { p.steps },
        cfg_scale: Some(p.cfg_scale.unwrap_or(DEFAULT_CFG_SCALE)),
        cfg_trunc: Some(p.cfg_trunc.unwrap_or(DEFAULT_CFG_TRUNC)),
        renorm_cfg: p.renorm_cfg,
        shift: if p.shift == 0.0 { 6.0 } else { p.shift },
        sampler: if p.sampler == Sampler::Unspecified as i32 { Sampler::Euler as i32 } else { p.sampler },
        precision: if p.precision == Precision::Unspecified as i32 {
            Precision::Bf16 as i32
        } else {
            p.precision
        },
        model: if p.model.is_empty() { MODEL_NEWBIE.to_string() } else { p.model.clone() },
    }
}

/// The guidance scale of `p`, the default when unset.
pub fn cfg_scale(p: &RenderParams) -> f32 {
    p.cfg_scale.unwrap_or(DEFAULT_CFG_SCALE)
}

/// The CFG truncation of `p`, the default when unset.
pub fn cfg_trunc(p: &RenderParams) -> f32 {
    p.cfg_trunc.unwrap_or(DEFAULT_CFG_TRUNC)
}

/// Checks every limit of a complete parameter set.
pub fn check_params(p: &RenderParams) -> Result<(), LimitError> {
    check_size(p.width, p.height)?;
    check_steps(p.steps)?;
    check_guidance(cfg_scale(p), cfg_trunc(p), p.renorm_cfg, p.shift)?;
    if Sampler::try_from(p.sampler).is_err() || p.sampler == 0 {
        return Err(LimitError(format!("sampler {}: unknown", p.sampler)));
    }
    if Precision::try_from(p.precision).is_err() || p.precision == 0 {
        return Err(LimitError(format!("precision {}: unknown", p.precision)));
    }
    if p.model.is_empty() || p.model.len() > 128 {
        return Err(LimitError("model: name must be 1 to 128 bytes".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(check_size(1024, 1024).is_ok());
        assert!(check_size(2048, 512).is_ok());
        assert!(check_size(1000, 1024).unwrap_err().0.contains("multiples of 16"));
        assert!(check_size(1040, 1024).unwrap_err().0.contains("4096"));
        assert!(check_size(1024, 240).unwrap_err().0.contains("aspect"));
        assert!(check_size(0, 64).is_err());
    }

    #[test]
    fn steps_and_guidance() {
        assert!(check_steps(0).is_err());
        assert!(check_steps(201).unwrap_err().0.contains("200"));
        assert!(check_steps(200).is_ok());
        assert!(check_guidance(31.0, 1.0, 0.0, 6.0).is_err());
        assert!(check_guidance(5.0, 1.0, 0.0, 6.0).is_ok());
    }

    #[test]
    fn defaults_fill_zero_fields_only() {
        let p = with_defaults(&RenderParams { width: 256, ..Default::default() });
        assert_eq!((p.width, p.height, p.steps), (256, 1024, 28));
        assert_eq!(p.model, MODEL_NEWBIE);
        assert_eq!((p.cfg_scale, p.cfg_trunc), (Some(DEFAULT_CFG_SCALE), Some(DEFAULT_CFG_TRUNC)));
        assert!(check_params(&p).is_ok());
        // An explicit zero is a value: no guidance at all, or guidance on no step.
        let q = with_defaults(&RenderParams { cfg_scale: Some(0.0), cfg_trunc: Some(0.0), ..Default::default() });
        assert_eq!((q.cfg_scale, q.cfg_trunc), (Some(0.0), Some(0.0)));
        assert!(check_params(&q).is_ok());
    }
}
