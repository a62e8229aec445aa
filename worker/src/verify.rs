//! Numerical self-check against a golden reference set.
//!
//! A golden directory holds, per component `c` in `dit`, `gemma3`, `jina`, `vae`, the files
//! `<c>.json` (configuration and descriptions), `<c>_weights.safetensors` (parameters under the
//! released checkpoint names) and `<c>_io.safetensors` (inputs `in.*`, intermediates `mid.*`,
//! outputs `out.*`, and for the DiT the sampling runs `sample*.*`). [`verify_dir`] loads every
//! component present through this crate's model code on the requested device and precision, runs
//! the stored inputs, and compares each stored intermediate and output with what the model
//! produced, on the rows that carry meaning (padding rows are excluded, per component rules
//! below). Every size comes from the sidecar and the tensors themselves; only tensors present in
//! the io file are compared, so a set that omits some intermediates is checked on what it has.
//!
//! Valid rows: DiT context-refiner outputs use the caption mask; the joint-sequence tensors
//! (`mid.joint_input`, `mid.joint_freqs_cis`, `mid.layers.*`, `mid.final_layer`) use the joint mask
//! (`cap_len_b + N_img` leading rows of sample `b`); Gemma hidden states and Jina token states use
//! the attention mask; everything else is compared whole. Integer tensors (masks, position ids,
//! per-step flags) and the sampler's time grid and seeded noise must match exactly.
//!
//! The tolerances live in [`Tolerance`] and [`tolerance_for`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::model::dit::{DitConfig, NextDit};
use crate::model::gemma3::{Gemma3Config, Gemma3TextModel};
use crate::model::jina::{self, JinaConfig, JinaTextModel};
use crate::model::loading::{self, LoadOptions};
use crate::model::sampler::{self, Conditioning, SampleItem, SampleParams, SamplerKind, StepControl};
use crate::model::vae::{VaeConfig, VaeDecoder};

/// The components a golden directory may hold, in the order they are checked.
pub const COMPONENTS: [&str; 4] = ["dit", "gemma3", "jina", "vae"];

/// Acceptance rule for one compared tensor.
///
/// * fp32 ([`Tolerance::Elementwise`] with `atol = rtol = 1e-4`): the rule the golden set's README
///   suggests for an fp32 libtorch implementation. Independent fp32 implementations agree with the
///   goldens to about 5e-6 on values of magnitude 1 to 10, so 1e-4 leaves a 20x margin while a
///   misplaced norm, mask or RoPE pairing moves values by O(1). On CUDA this only holds with TF32
///   disabled (TF32 keeps 10 mantissa bits and gives errors around 1e-3).
/// * bf16/fp16, DiT and sampler ([`Tolerance::DepthScaled`]): `max |a-b| <= 4·ε·√D·A` and
///   `mean |a-b| <= ε·√D·A / 4`, A = the golden tensor's absolute maximum over the compared
///   elements, D = residual depth (refiner blocks of both streams, main blocks, final layer), ε the
///   format's machine epsilon (2^-7 for bf16, 2^-10 for fp16). Each block rounds its input,
///   weights, matmul outputs and residual sum, adding relative errors of order ε; independent
///   roundings accumulate like a random walk (√D). Most elements stay well inside ε·√D (the mean
///   bound); a few, where a norm or gate amplifies, reach a few times it (the max bound). On the
///   public set (D = 7) that is max <= 0.083·A; observed about 0.011·A, while a wrong norm, gate,
///   RoPE pairing or mask moves the output by 0.3 to 1.0·A. The sampler's guided velocity
///   `v_u + s·(v_c - v_u)` and the latents built from it carry the cond/uncond errors amplified by up
///   to `2s - 1`; their depth is multiplied by `(2s - 1)^2` for that reason (s = cfg_scale).
/// * bf16/fp16, text encoders and VAE ([`Tolerance::RelativeL2`]): relative L2 error
///   `||a-b|| / ||b|| <= 4e-2` and elementwise `|a-b| <= 0.3 + 0.05·|b|`. bf16 keeps 8 significand
///   bits, so each rounding contributes up to 2^-9 ≈ 2e-3 relative error; over the 4 to 25 layers
///   of these models that adds up to about 1% (observed 1.2e-2 for the VAE); the L2 bound is ~3x
///   that, while a wrong layer, norm or mask moves the output by tens of percent. The elementwise
///   bound lets single values drift several times the average, but not by O(1). fp16 (11
///   significand bits) uses the same bounds, which are looser than it needs.
/// * [`Tolerance::Exact`]: integer tensors, the time grid and the seeded noise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Tolerance {
    Exact,
    Elementwise { atol: f64, rtol: f64 },
    DepthScaled { eps: f64, depth: f64 },
    RelativeL2 { max_rel_l2: f64, atol: f64, rtol: f64 },
}

/// fp32 rule: `|a - b| <= 1e-4 + 1e-4·|b|`.
pub const FP32: Tolerance = Tolerance::Elementwise { atol: 1e-4, rtol: 1e-4 };

/// Machine epsilon (spacing above 1) of a reduced float format; `None` for fp32/fp64.
pub fn reduced_eps(kind: Kind) -> Option<f64> {
    match kind {
        Kind::BFloat16 => Some(2f64.powi(-7)),
        Kind::Half => Some(2f64.powi(-10)),
        _ => None,
    }
}

/// Which family a compared tensor belongs to, for [`tolerance_for`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    /// DiT forward tensors; `depth` = refiner blocks of both streams + main blocks + final layer.
    Dit { depth: f64 },
    /// Sampler tensors built from a guided velocity with this CFG scale.
    Guided { depth: f64, cfg_scale: f64 },
    /// Text encoders and VAE.
    Other,
}

/// The rule for a float tensor of `family` computed in `kind`.
pub fn tolerance_for(kind: Kind, family: Family) -> Tolerance {
    let Some(eps) = reduced_eps(kind) else { return FP32 };
    match family {
        Family::Dit { depth } => Tolerance::DepthScaled { eps, depth },
        Family::Guided { depth, cfg_scale } => {
            let amp = (2.0 * cfg_scale - 1.0).max(1.0);
            Tolerance::DepthScaled { eps, depth: depth * amp * amp }
        }
        Family::Other => Tolerance::RelativeL2 { max_rel_l2: 4e-2, atol: 0.3, rtol: 0.05 },
    }
}

impl Tolerance {
    /// Short human-readable form.
    pub fn describe(&self) -> String {
        match *self {
            Tolerance::Exact => "exact".into(),
            Tolerance::Elementwise { atol, rtol } => format!("|d| <= {atol:e} + {rtol:e}|b|"),
            Tolerance::DepthScaled { eps, depth } => {
                let s = eps * depth.sqrt();
                format!("max <= {:.3}A, mean <= {:.4}A", 4.0 * s, s / 4.0)
            }
            Tolerance::RelativeL2 { max_rel_l2, atol, rtol } => format!("L2 <= {max_rel_l2:e}, |d| <= {atol} + {rtol}|b|"),
        }
    }
}

/// Outcome of one compared tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCheck {
    pub tensor: String,
    /// Elements compared (after the valid-row mask).
    pub compared: i64,
    pub max_abs: f64,
    /// Largest `|a - b| / |b|` over compared elements with `|b| >= 1e-3` (0 when there are none).
    pub max_rel: f64,
    pub mean_abs: f64,
    /// Largest fraction of the tolerance used (<= 1 passes; the worst of the rule's bounds).
    pub used: f64,
    pub tolerance: Tolerance,
    pub tolerance_text: String,
    pub pass: bool,
    /// Why it failed when the numbers alone do not say (shape mismatch, not produced, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// All checks of one component.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    pub component: String,
    pub checks: Vec<TensorCheck>,
    /// Set when the component could not be run at all (missing file, bad config, load failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pass: bool,
}

/// The whole self-check.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub goldens: PathBuf,
    pub device: String,
    pub precision: String,
    pub components: Vec<ComponentReport>,
    pub pass: bool,
}

impl VerifyReport {
    /// (component, tensor) of every failed check; a component that did not run is listed with the
    /// tensor `<component>` and its error.
    pub fn failures(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for c in &self.components {
            if let Some(e) = &c.error {
                out.push((c.component.clone(), format!("<component>: {e}")));
            }
            for t in c.checks.iter().filter(|t| !t.pass) {
                out.push((c.component.clone(), t.tensor.clone()));
            }
        }
        out
    }

    /// One table per component and a summary line.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "golden set {} on {} in {}", self.goldens.display(), self.device, self.precision);
        for c in &self.components {
            let _ = writeln!(s, "\n== {} ==", c.component);
            if let Some(e) = &c.error {
                let _ = writeln!(s, "ERROR: {e}");
            }
            if !c.checks.is_empty() {
                let w = c.checks.iter().map(|t| t.tensor.len()).max().unwrap_or(6).max(6);
                let _ = writeln!(s, "{:<w$}  {:>10}  {:>10}  {:<36}  {:>6}  result", "tensor", "max abs", "max rel", "tolerance", "used");
                for t in &c.checks {
                    let _ = writeln!(
                        s,
                        "{:<w$}  {:>10.3e}  {:>10.3e}  {:<36}  {:>5.0}%  {}{}",
                        t.tensor,
                        t.max_abs,
                        t.max_rel,
                        t.tolerance_text,
                        t.used * 100.0,
                        if t.pass { "pass" } else { "FAIL" },
                        t.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
                    );
                }
            }
            let n_fail = c.checks.iter().filter(|t| !t.pass).count();
            let _ = writeln!(
                s,
                "{}: {} ({} of {} tensors passed)",
                c.component,
                if c.pass { "PASS" } else { "FAIL" },
                c.checks.len() - n_fail,
                c.checks.len()
            );
        }
        let _ = writeln!(s, "\noverall: {}", if self.pass { "PASS" } else { "FAIL" });
        for (c, t) in self.failures() {
            let _ = writeln!(s, "failed: {c} {t}");
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("report serialises")
    }
}

/// Errors that stop the whole check (per-component problems are reported in the component).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{}: no golden component found (expected <c>.json, <c>_weights.safetensors, <c>_io.safetensors for c in dit, gemma3, jina, vae)", .0.display())]
    NoComponents(PathBuf),
}

/// Short name of a precision.
pub fn precision_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        Kind::Float => "fp32",
        Kind::Double => "fp64",
        _ => "other",
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        d => format!("{d:?}"),
    }
}

/// Runs every component present in `dir` on `device` with parameters in `kind` and compares
/// against the stored tensors. Fails only when `dir` holds no component; everything else (including
/// a component that cannot be loaded) is recorded in the report, whose `pass` is the verdict.
pub fn verify_dir(dir: &Path, device: Device, kind: Kind) -> Result<VerifyReport, VerifyError> {
    if !dir.is_dir() {
        return Err(VerifyError::NotADirectory(dir.to_path_buf()));
    }
    let mut components = Vec::new();
    for c in COMPONENTS {
        let files = [format!("{c}.json"), format!("{c}_weights.safetensors"), format!("{c}_io.safetensors")];
        if !files.iter().any(|f| dir.join(f).exists()) {
            continue;
        }
        let mut checks = Checks::new(kind);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_component(c, dir, device, kind, &mut checks)));
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(p) => Some(panic_message(p)),
        };
        let pass = error.is_none() && !checks.list.is_empty() && checks.list.iter().all(|t| t.pass);
        let error = error.or_else(|| checks.list.is_empty().then(|| "no golden tensor to compare".to_string()));
        components.push(ComponentReport { component: c.to_string(), checks: checks.list, error, pass });
    }
    if components.is_empty() {
        return Err(VerifyError::NoComponents(dir.to_path_buf()));
    }
    let pass = components.iter().all(|c| c.pass);
    Ok(VerifyReport {
        goldens: dir.to_path_buf(),
        device: device_name(device),
        precision: precision_name(kind).to_string(),
        components,
        pass,
    })
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

struct Checks {
    kind: Kind,
    list: Vec<TensorCheck>,
}

impl Checks {
    fn new(kind: Kind) -> Self {
        Self { kind, list: Vec::new() }
    }

    fn fail(&mut self, tensor: &str, tolerance: Tolerance, note: String) {
        self.list.push(TensorCheck {
            tensor: tensor.to_string(),
            compared: 0,
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            mean_abs: f64::NAN,
            used: f64::NAN,
            tolerance,
            tolerance_text: tolerance.describe(),
            pass: false,
            note: Some(note),
        });
    }

    /// Compares a float tensor with the family's rule for this run's precision.
    fn float(&mut self, name: &str, ours: &Tensor, gold: &Tensor, rows: Option<&Tensor>, family: Family) {
        let tol = tolerance_for(self.kind, family);
        self.compare(name, ours, gold, rows, tol);
    }

    /// Compares `ours` with `gold` (both any device/kind) on the elements selected by `rows`
    /// (`[B, S]`, nonzero = compare, broadcast over trailing axes).
    fn compare(&mut self, name: &str, ours: &Tensor, gold: &Tensor, rows: Option<&Tensor>, tol: Tolerance) {
        if ours.size() != gold.size() {
            self.fail(name, tol, format!("shape {:?}, golden {:?}", ours.size(), gold.size()));
            return;
        }
        let a = ours.to_device(Device::Cpu).to_kind(Kind::Double);
        let b = gold.to_device(Device::Cpu).to_kind(Kind::Double);
        let (a, b) = match rows {
            Some(r) => {
                let mut m = r.to_device(Device::Cpu).ne(0);
                while m.dim() < a.dim() {
                    m = m.unsqueeze(-1);
                }
                let m = m.expand_as(&a);
                (a.masked_select(&m), b.masked_select(&m))
            }
            None => (a.flatten(0, -1), b.flatten(0, -1)),
        };
        let n = a.numel() as i64;
        let d = (&a - &b).abs();
        let finite = n == 0 || bool::try_from(a.isfinite().all()).unwrap_or(false);
        let (max_abs, mean_abs) = if n == 0 { (0.0, 0.0) } else { (d.max().double_value(&[]), d.mean(Kind::Double).double_value(&[])) };
        let babs = b.abs();
        let sig = babs.ge(1e-3);
        let max_rel = if n == 0 || sig.sum(Kind::Int64).int64_value(&[]) == 0 {
            0.0
        } else {
            (&d / babs.clamp_min(1e-3)).masked_select(&sig).max().double_value(&[])
        };
        let mut note = None;
        // Worst |d| / (atol + rtol|b|) over the compared elements.
        let elementwise = |atol: f64, rtol: f64| if n == 0 { 0.0 } else { (&d / (&babs * rtol + atol)).max().double_value(&[]) };
        let ratio = |x: f64, bound: f64| if bound > 0.0 { x / bound } else if x == 0.0 { 0.0 } else { f64::INFINITY };
        let used = match tol {
            Tolerance::Exact => ratio(max_abs, 0.0),
            Tolerance::Elementwise { atol, rtol } => elementwise(atol, rtol),
            Tolerance::DepthScaled { eps, depth } => {
                let amax = if n == 0 { 0.0 } else { babs.max().double_value(&[]) };
                let s = eps * depth.sqrt() * amax;
                let used = ratio(max_abs, 4.0 * s).max(ratio(mean_abs, s / 4.0));
                if used > 1.0 {
                    note = Some(format!("A = {amax:.4}, max {:.3}A, mean {:.4}A", max_abs / amax, mean_abs / amax));
                }
                used
            }
            Tolerance::RelativeL2 { max_rel_l2, atol, rtol } => {
                let bn = b.norm().double_value(&[]);
                let dn = (&a - &b).norm().double_value(&[]);
                let rel = if bn > 0.0 { dn / bn } else { dn };
                let used = elementwise(atol, rtol).max(rel / max_rel_l2);
                if used > 1.0 {
                    note = Some(format!("relative L2 {rel:.3e}"));
                }
                used
            }
        };
        let pass = finite && used <= 1.0;
        if !finite {
            note = Some("non-finite values".into());
        }
        self.list.push(TensorCheck {
            tensor: name.to_string(),
            compared: n,
            max_abs,
            max_rel,
            mean_abs,
            used,
            tolerance: tol,
            tolerance_text: tol.describe(),
            pass,
            note,
        });
    }

    /// Exact comparison (integer tensors, flags, time grid, seeded noise).
    fn exact(&mut self, name: &str, ours: &Tensor, gold: &Tensor) {
        self.compare(name, ours, gold, None, Tolerance::Exact);
    }
}

// ---------------------------------------------------------------------------------------------
// Golden files
// ---------------------------------------------------------------------------------------------

struct Golden {
    json: serde_json::Value,
    weights: PathBuf,
    io: HashMap<String, Tensor>,
}

fn open_golden(c: &str, dir: &Path) -> Result<Golden, String> {
    let json_path = dir.join(format!("{c}.json"));
    let text = std::fs::read_to_string(&json_path).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let file = |key: &str, default: String| dir.join(json["files"][key].as_str().map(str::to_string).unwrap_or(default));
    let weights = file("weights", format!("{c}_weights.safetensors"));
    let io_path = file("io", format!("{c}_io.safetensors"));
    for p in [&weights, &io_path] {
        if !p.is_file() {
            return Err(format!("{}: missing", p.display()));
        }
    }
    let io = Tensor::read_safetensors(&io_path)
        .map_err(|e| format!("{}: {e}", io_path.display()))?
        .into_iter()
        .collect();
    Ok(Golden { json, weights, io })
}

impl Golden {
    fn get(&self, key: &str) -> Result<&Tensor, String> {
        self.io.get(key).ok_or_else(|| format!("golden tensor {key} missing from the io file"))
    }

    fn config<T: serde::de::DeserializeOwned>(&self, value: serde_json::Value, what: &str) -> Result<T, String> {
        serde_json::from_value(value).map_err(|e| format!("{what} in the sidecar: {e}"))
    }

    /// Golden `mid.*` / `out.*` names, sorted.
    fn outputs(&self) -> Vec<String> {
        let mut v: Vec<String> = self.io.keys().filter(|k| k.starts_with("mid.") || k.starts_with("out.")).cloned().collect();
        v.sort();
        v
    }
}

fn run_component(c: &str, dir: &Path, device: Device, kind: Kind, checks: &mut Checks) -> Result<(), String> {
    let g = open_golden(c, dir)?;
    match c {
        "dit" => check_dit(&g, device, kind, checks),
        "gemma3" => check_gemma(&g, device, kind, checks),
        "jina" => check_jina(&g, device, kind, checks),
        "vae" => check_vae(&g, device, kind, checks),
        _ => unreachable!("component list"),
    }
}

// ---------------------------------------------------------------------------------------------
// DiT and sampler
// ---------------------------------------------------------------------------------------------

/// `[B, S_max]` joint-sequence mask: sample `b` holds `cap_len_b + n_img` real tokens.
fn joint_mask(cap_mask: &Tensor, n_img: i64) -> Tensor {
    let lens = cap_mask.ne(0).sum_dim_intlist(Some(&[1i64][..]), false, Kind::Int64);
    let s_max = lens.max().int64_value(&[]) + n_img;
    let ar = Tensor::arange(s_max, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    ar.lt_tensor(&(lens + n_img).unsqueeze(1)).to_kind(Kind::Int64)
}

fn check_dit(g: &Golden, device: Device, kind: Kind, checks: &mut Checks) -> Result<(), String> {
    let cfg: DitConfig = g.config(g.json["config"].clone(), "config")?;
    cfg.validate().map_err(|e| format!("config: {e}"))?;
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let model = NextDit::new(vs.root(), &cfg).map_err(|e| format!("building the model: {e}"))?;
    loading::load_strict(&mut vs, std::slice::from_ref(&g.weights), &LoadOptions::default())
        .map_err(|e| format!("loading {}: {e}", g.weights.display()))?;
    let depth = (2 * cfg.n_refiner_layers + cfg.n_layers + 1) as f64;
    let fam = Family::Dit { depth };
    let dev = |t: &Tensor| t.to_device(device);

    if g.io.contains_key("in.x") {
        let (x, t, cap, mask, pooled) = (
            g.get("in.x")?,
            g.get("in.t")?,
            g.get("in.cap_feats")?,
            g.get("in.cap_mask")?,
            g.get("in.clip_text_pooled")?,
        );
        let (v, trace) = model
            .forward_traced(&dev(x), &dev(t), &dev(cap), &dev(mask), &dev(pooled))
            .map_err(|e| format!("forward: {e}"))?;
        let xs = x.size();
        let n_img = (xs[2] / cfg.patch_size) * (xs[3] / cfg.patch_size);
        let jmask = joint_mask(mask, n_img);
        for name in g.outputs() {
            let gold = &g.io[&name];
            let ours = if name == "out.velocity" { Some(&v) } else { trace.get(name.as_str()) };
            let Some(ours) = ours else {
                checks.fail(&name, tolerance_for(kind, fam), "not produced by the model's trace".into());
                continue;
            };
            if gold.kind() == Kind::Int64 {
                checks.exact(&name, ours, gold);
            } else if name.starts_with("mid.context_refiner.") {
                checks.float(&name, ours, gold, Some(mask), fam);
            } else if name == "mid.joint_input"
                || name == "mid.joint_freqs_cis"
                || name == "mid.final_layer"
                || name.starts_with("mid.layers.")
            {
                checks.float(&name, ours, gold, Some(&jmask), fam);
            } else {
                checks.float(&name, ours, gold, None, fam);
            }
        }
        if let Some(gold) = g.io.get("out.velocity") {
            // The serving path: rows grouped by caption length, run unpadded.
            let grouped = model
                .forward(&dev(x), &dev(t), &dev(cap), &dev(mask), &dev(pooled))
                .map_err(|e| format!("forward: {e}"))?;
            checks.float("out.velocity (serving forward)", &grouped, gold, None, fam);
        }
    }

    if let Some(runs) = g.json["sampler"].as_object() {
        let mut names: Vec<&String> = runs.keys().collect();
        names.sort();
        for run in names {
            if g.io.contains_key(&format!("{run}.trajectory")) {
                check_sampler_run(g, run, &model, device, depth, checks)?;
            }
        }
    }
    Ok(())
}

fn check_sampler_run(g: &Golden, run: &str, model: &NextDit, device: Device, depth: f64, checks: &mut Checks) -> Result<(), String> {
    let s = &g.json["sampler"][run];
    let num = |k: &str| s[k].as_f64().ok_or_else(|| format!("sampler.{run}.{k} missing in the sidecar"));
    let p = SampleParams {
        steps: num("steps")? as usize,
        shift: num("shift")?,
        cfg_scale: num("cfg_scale")?,
        cfg_trunc: num("cfg_trunc")?,
        renorm_cfg: num("renorm_cfg")?,
        kind: SamplerKind::Euler,
    };
    let fam = Family::Guided { depth, cfg_scale: p.cfg_scale };
    let kind = checks.kind;
    if let Some(gold) = g.io.get(&format!("{run}.t_grid")) {
        let grid = Tensor::from_slice(&sampler::time_grid(p.steps, p.shift));
        checks.exact(&format!("{run}.t_grid"), &grid, gold);
    }
    let noise = g.get("sample.noise")?;
    if let Some(seed) = s["noise_seed"].as_i64() {
        let n = noise.size();
        if n.len() == 4 {
            let ours = sampler::seeded_noise(seed as u64, n[1], n[2], n[3]);
            checks.exact(&format!("sample.noise (seed {seed}, {run})"), &ours, noise);
        }
    }
    let ci = s["cond_caption_row"].as_i64().unwrap_or(0);
    let ui = s["uncond_caption_row"].as_i64().unwrap_or(1);
    let (caps, masks, pooled) = (g.get("sample.cap_feats")?, g.get("sample.cap_mask")?, g.get("sample.clip_text_pooled")?);
    let row = |i: i64| Conditioning {
        cap_feats: caps.narrow(0, i, 1).to_device(device),
        cap_mask: masks.narrow(0, i, 1).to_device(device),
        pooled: pooled.narrow(0, i, 1).to_device(device),
    };
    let item = SampleItem { noise: noise.to_device(device), cond: row(ci), uncond: row(ui) };
    let mut records: Vec<sampler::StepRecord> = Vec::new();
    let out = sampler::sample(model, vec![item], &p, |info| {
        if let Some(r) = info.record(0) {
            records.push(r);
        }
        StepControl::Continue
    })
    .map_err(|e| format!("{run}: sampling: {e}"))?;
    if records.len() != p.steps || out.len() != 1 {
        checks.fail(&format!("{run}.trajectory"), tolerance_for(kind, fam), format!("{} steps recorded, {} outputs", records.len(), out.len()));
        return Ok(());
    }
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float);
    let flags = |f: &dyn Fn(&sampler::StepRecord) -> bool| Tensor::from_slice(&records.iter().map(|r| f(r) as i64).collect::<Vec<_>>());
    let stack = |f: &dyn Fn(&sampler::StepRecord) -> Tensor| Tensor::stack(&records.iter().map(|r| cpu(&f(r))).collect::<Vec<_>>(), 0);
    let v_cond = stack(&|r| r.v_cond.shallow_clone());
    let v_uncond = stack(&|r| match &r.v_uncond {
        Some(v) => v.shallow_clone(),
        None => r.v_cond.zeros_like(),
    });
    let velocity = stack(&|r| r.velocity.shallow_clone());
    let mut traj = vec![cpu(noise)];
    traj.extend(records.iter().map(|r| cpu(&r.latent_after)));
    let traj = Tensor::stack(&traj, 0);
    let raw = Family::Dit { depth };
    let candidates: [(&str, Tensor, Option<Family>); 6] = [
        ("cfg_applied", flags(&|r| r.cfg_applied), None),
        ("renorm_applied", flags(&|r| r.renorm_applied), None),
        ("v_cond", v_cond, Some(raw)),
        ("v_uncond", v_uncond, Some(raw)),
        ("velocity", velocity, Some(fam)),
        ("trajectory", traj, Some(fam)),
    ];
    for (suffix, ours, family) in candidates {
        let key = format!("{run}.{suffix}");
        let Some(gold) = g.io.get(&key) else { continue };
        match family {
            None => checks.exact(&key, &ours, gold),
            Some(f) => checks.float(&key, &ours, gold, None, f),
        }
    }
    let final_key = format!("{run}.trajectory");
    if let Some(gold) = g.io.get(&final_key) {
        let n = gold.size()[0] - 1;
        if n >= 0 {
            checks.float(&format!("{run} final latent"), &cpu(&out[0].latent), &gold.get(n), None, fam);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Text encoders and VAE
// ---------------------------------------------------------------------------------------------

fn check_gemma(g: &Golden, device: Device, kind: Kind, checks: &mut Checks) -> Result<(), String> {
    let cfg: Gemma3Config = g.config(g.json["config"].clone(), "config")?;
    // The dtype a node of this precision runs Gemma in (bf16 for fp16).
    let kind = crate::model::pipeline::caption_encoder_kind(kind);
    let model = Gemma3TextModel::load(&g.weights, &cfg, device, kind).map_err(|e| format!("loading {}: {e}", g.weights.display()))?;
    let ids = g.get("in.input_ids")?;
    let mask = g.get("in.attention_mask")?;
    let hs = model.hidden_states(&ids.to_device(device), &mask.to_device(device));
    let feature = model.forward(&ids.to_device(device), &mask.to_device(device));
    for name in g.outputs() {
        let ours = if let Some(i) = name.strip_prefix("mid.hidden_states.") {
            i.parse::<usize>().ok().and_then(|i| hs.get(i))
        } else if name == "out.last_hidden_state" {
            hs.last()
        } else if name == "out.hidden_states_m2" {
            Some(&feature)
        } else {
            None
        };
        match ours {
            Some(t) => checks.float(&name, t, &g.io[&name], Some(mask), Family::Other),
            None => checks.fail(&name, tolerance_for(kind, Family::Other), "not produced by the model".into()),
        }
    }
    Ok(())
}

fn check_jina(g: &Golden, device: Device, kind: Kind, checks: &mut Checks) -> Result<(), String> {
    let cfg: JinaConfig = g.config(g.json.clone(), "text_config / hf_model_config_kwargs")?;
    let model = JinaTextModel::load(&g.weights, &cfg, device, kind).map_err(|e| format!("loading {}: {e}", g.weights.display()))?;
    let ids = g.get("in.input_ids")?;
    let pad = cfg.hf_model_config_kwargs.pad_token_id;
    let mask = match g.io.get("in.attention_mask") {
        Some(m) => {
            checks.exact("in.attention_mask (= input_ids != pad)", &ids.ne(pad).to_kind(Kind::Int64), m);
            m.shallow_clone()
        }
        None => ids.ne(pad).to_kind(Kind::Int64),
    };
    let trace = model.forward_trace(&ids.to_device(device));
    for name in g.outputs() {
        let (ours, rows) = match name.as_str() {
            "mid.embeddings" => (Some(&trace.embeddings), true),
            "mid.emb_ln" => (Some(&trace.emb_ln), true),
            "out.last_hidden_state" => (trace.layers.last(), true),
            "out.text_embeds" => (Some(&trace.pooled), false),
            n => (n.strip_prefix("mid.layers.").and_then(|i| i.parse::<usize>().ok()).and_then(|i| trace.layers.get(i)), true),
        };
        match ours {
            Some(t) => checks.float(&name, t, &g.io[&name], rows.then_some(&mask), Family::Other),
            None => checks.fail(&name, tolerance_for(kind, Family::Other), "not produced by the model".into()),
        }
    }
    // LoRA merge helper weights: the merge runs in f32 at load, whatever the model precision.
    let merged_keys: Vec<&String> = g.io.keys().filter(|k| k.starts_with("merged.")).collect();
    if !merged_keys.is_empty() {
        let raw: BTreeMap<String, Tensor> = Tensor::read_safetensors(&g.weights)
            .map_err(|e| format!("{}: {e}", g.weights.display()))?
            .into_iter()
            .collect();
        let task = cfg.lora_task_index().map_err(|e| format!("LoRA task: {e}"))?;
        let merged = jina::merge_lora_weights(raw, task, cfg.lora_scaling()).map_err(|e| format!("LoRA merge: {e}"))?;
        let mut keys = merged_keys.clone();
        keys.sort();
        for key in keys {
            match merged.get(&key["merged.".len()..]) {
                Some(t) => checks.compare(key, t, &g.io[key], None, FP32),
                None => checks.fail(key, FP32, "the merge produced no such weight".into()),
            }
        }
    }
    Ok(())
}

fn check_vae(g: &Golden, device: Device, kind: Kind, checks: &mut Checks) -> Result<(), String> {
    let cfg: VaeConfig = g.config(g.json["config"].clone(), "config")?;
    let vae = VaeDecoder::load(&g.weights, &cfg, device, kind).map_err(|e| format!("loading {}: {e}", g.weights.display()))?;
    let latent = g.get("in.latent")?;
    let vae_input = vae.unnormalize_latents(latent);
    let mut stages: BTreeMap<String, Tensor> = BTreeMap::new();
    let decoded = vae.decode_inspect(&vae_input.to_device(device), &mut |name, t| {
        stages.insert(format!("mid.{name}"), t.shallow_clone());
    });
    let decoded = decoded.to_kind(Kind::Float);
    let image01 = ((&decoded + 1.0) / 2.0).clamp(0.0, 1.0);
    for name in g.outputs() {
        let gold = &g.io[&name];
        match name.as_str() {
            // The normalisation runs in f32 in every precision.
            "mid.vae_input" => checks.compare(&name, &vae_input, gold, None, FP32),
            "out.decoded" => checks.float(&name, &decoded, gold, None, Family::Other),
            "out.image01" => checks.float(&name, &image01, gold, None, Family::Other),
            n => match stages.get(n) {
                Some(t) => checks.float(n, t, gold, None, Family::Other),
                None => checks.fail(n, tolerance_for(kind, Family::Other), "not produced by the decoder".into()),
            },
        }
    }
    Ok(())
}

/// Environment variable honoured by cuBLAS and cuDNN: `0` turns TF32 tensor-core math off for fp32
/// matmuls and convolutions in the whole process.
pub const TF32_OVERRIDE_VAR: &str = "NVIDIA_TF32_OVERRIDE";

/// Turns TF32 off for this process (unless the variable is already set), so that fp32 runs on a
/// GPU meet the fp32 tolerance. tch exposes no switch for libtorch's own TF32 flags (the
/// convolution default allows TF32), so this goes through the CUDA libraries' override, which they
/// read when they initialise: call it before [`crate::device::load_cuda_backend`] and before any
/// CUDA work. Returns whether TF32 is off (the variable is `0`).
pub fn disable_tf32_for_process() -> bool {
    if std::env::var_os(TF32_OVERRIDE_VAR).is_none() {
        std::env::set_var(TF32_OVERRIDE_VAR, "0");
    }
    std::env::var(TF32_OVERRIDE_VAR).map(|v| v == "0").unwrap_or(false)
}

/// Maps a precision name (`fp32`, `bf16`, `fp16`) to the parameter kind.
pub fn parse_precision(s: &str) -> Option<Kind> {
    match s {
        "fp32" => Some(Kind::Float),
        "bf16" => Some(Kind::BFloat16),
        "fp16" => Some(Kind::Half),
        _ => None,
    }
}
