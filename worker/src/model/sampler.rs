//! Flow-matching sampler of NewBie-image (spec §6), apart from the network.
//!
//! Convention (official `transport/`): `x_t = t·x_data + (1-t)·x_noise`, t = 0 is pure noise and
//! t = 1 is data, the model predicts the velocity `x_data - x_noise` and gets t unscaled.
//!
//! * Schedule: `t_k = u/(u + shift·(1-u))`, `u = k/N`, computed in f32 from `linspace(0, 1, N+1)`
//!   exactly like the reference ([`time_grid`]).
//! * Euler: `x_{k+1} = x_k + (t_{k+1} - t_k)·v(x_k, t_k)`. Midpoint (torchdiffeq fixed grid, the
//!   official demo's solver): `x_{k+1} = x_k + dt·v(x_k + dt/2·v(x_k, t_k), t_k + dt/2)`.
//! * CFG (`NextDiT_CLIP.forward_with_cfg`): at an evaluation time `t < cfg_trunc` the model runs on
//!   `[cond_0..cond_n, uncond_0..uncond_n]` in ONE forward pass and `v = v_u + s·(v_c - v_u)`; then,
//!   if `renorm_cfg > 0`, per sample, when `‖v‖ ≥ ‖v_c‖·renorm_cfg` (L2 over C,H,W), `v` is rescaled
//!   to norm `‖v_c‖·renorm_cfg`. At `t ≥ cfg_trunc` only the conditional half runs and `v = v_c`.
//! * The latent state and all sampler arithmetic are f32, whatever the model's dtype.
//! * After every step a callback sees the step (and each item's tensors) and may drop items (a
//!   cancelled image): the remaining items continue, unchanged by the removal because samples never
//!   interact inside the model.
//! * Noise: [`seeded_noise`] draws each item's noise alone on the CPU from its own seed, so it does not
//!   depend on the batch composition and equals PyTorch's `torch.manual_seed(seed);
//!   torch.randn(1, C, H, W)` (checked against the goldens).


use tch::{Device, Kind, Tensor};

use super::dit::{NextDit, Prepared};

/// Conditioning rows for the DiT: caption features `[R, L, D]`, right-padded mask `[R, L]`
/// (nonzero = valid) and pooled text vectors `[R, P]`.
#[derive(Debug)]
pub struct Conditioning {
    pub cap_feats: Tensor,
    pub cap_mask: Tensor,
    pub pooled: Tensor,
}

impl Clone for Conditioning {
    fn clone(&self) -> Self {
        Self {
            cap_feats: self.cap_feats.shallow_clone(),
            cap_mask: self.cap_mask.shallow_clone(),
            pooled: self.pooled.shallow_clone(),
        }
    }
}

impl Conditioning {
    pub fn rows(&self) -> i64 {
        self.cap_feats.size()[0]
    }

    /// Concatenates rows, right-padding every caption to the longest (padded rows masked out).
    pub fn cat(parts: &[&Conditioning]) -> Conditioning {
        let l = parts.iter().map(|c| c.cap_feats.size()[1]).max().unwrap_or(0);
        let pad = |c: &Conditioning| {
            let extra = l - c.cap_feats.size()[1];
            if extra == 0 {
                (c.cap_feats.shallow_clone(), c.cap_mask.shallow_clone())
            } else {
                (c.cap_feats.constant_pad_nd([0, 0, 0, extra]), c.cap_mask.constant_pad_nd([0, extra]))
            }
        };
        let (feats, masks): (Vec<Tensor>, Vec<Tensor>) = parts.iter().map(|c| pad(c)).unzip();
        let pooled: Vec<&Tensor> = parts.iter().map(|c| &c.pooled).collect();
        Conditioning { cap_feats: Tensor::cat(&feats, 0), cap_mask: Tensor::cat(&masks, 0), pooled: Tensor::cat(&pooled, 0) }
    }

    /// The rows `idx` (in that order), with the caption trimmed to the longest remaining valid length.
    pub fn select(&self, idx: &[i64]) -> Conditioning {
        let dev = self.cap_feats.device();
        let i = Tensor::from_slice(idx).to_device(dev);
        let mask = self.cap_mask.index_select(0, &i);
        let longest = mask.ne(0).sum_dim_intlist(Some(&[1i64][..]), false, Kind::Int64).max().int64_value(&[]);
        let keep = longest.max(1);
        Conditioning {
            cap_feats: self.cap_feats.index_select(0, &i).narrow(1, 0, keep),
            cap_mask: mask.narrow(1, 0, keep),
            pooled: self.pooled.index_select(0, &Tensor::from_slice(idx).to_device(self.pooled.device())),
        }
    }
}

/// Error from a denoiser or from bad sampler inputs.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("denoiser failed: {0}")]
    Denoiser(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("invalid sampler input: {0}")]
    Input(String),
}

/// The network as the sampler sees it: a velocity for latents `x` `[B, C, H, W]` (f32) at times
/// `t` `[B]` (f32, Lumina time) under conditioning rows (B rows). Returns f32 `[B, C, H, W]`.
///
/// The conditioning of a batch is the same at every step, so the sampler hands it to [`Self::prepare`]
/// once (the CFG batch and, when CFG is truncated, the conditional rows alone, each when first used;
/// again only when items are dropped) and passes the result to every [`Self::velocity`] call: a
/// network does its step-independent work there.
pub trait Denoiser {
    /// What the network keeps of a batch's conditioning between steps.
    type Prepared;
    /// Prepares `cond` for latents of spatial size `latent` (`[H, W]`).
    fn prepare(&self, cond: &Conditioning, latent: [i64; 2]) -> Result<Self::Prepared, SampleError>;
    fn velocity(&self, x: &Tensor, t: &Tensor, cond: &Self::Prepared) -> Result<Tensor, SampleError>;
}

/// The DiT does its caption side (context refiner, pooled projection, RoPE factors, masks and the
/// caption-length read-back) in `prepare`, so a step launches only timestep-dependent work.
impl Denoiser for NextDit {
    type Prepared = Prepared;

    fn prepare(&self, cond: &Conditioning, latent: [i64; 2]) -> Result<Prepared, SampleError> {
        NextDit::prepare(self, &cond.cap_feats, &cond.cap_mask, &cond.pooled, latent)
            .map_err(|e| SampleError::Denoiser(Box::new(e)))
    }

    fn velocity(&self, x: &Tensor, t: &Tensor, cond: &Prepared) -> Result<Tensor, SampleError> {
        let v = self.forward_prepared(x, t, cond).map_err(|e| SampleError::Denoiser(Box::new(e)))?;
        Ok(v.to_device(x.device()).to_kind(Kind::Float))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    Euler,
    Midpoint,
}

/// Sampling settings. Defaults (spec §6.4 "suggested Rust defaults"): Euler, 28 steps, shift 6,
/// CFG 5.0 on every step (cfg_trunc 1.0), renorm off.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleParams {
    pub steps: usize,
    pub shift: f64,
    pub cfg_scale: f64,
    /// CFG runs at evaluation times `t < cfg_trunc` (t = 0 noise); 1.0 keeps it on every step.
    pub cfg_trunc: f64,
    /// `0` disables the renorm clamp.
    pub renorm_cfg: f64,
    pub kind: SamplerKind,
}

impl Default for SampleParams {
    fn default() -> Self {
        Self { steps: 28, shift: 6.0, cfg_scale: 5.0, cfg_trunc: 1.0, renorm_cfg: 0.0, kind: SamplerKind::Euler }
    }
}

impl SampleParams {
    /// The official gradio demo ([NB-demo]): midpoint, 18 grid points (17 intervals), CFG 5, cfg_trunc 0.25, no renorm, shift 6.
    pub fn official_demo() -> Self {
        Self { steps: 17, shift: 6.0, cfg_scale: 5.0, cfg_trunc: 0.25, renorm_cfg: 0.0, kind: SamplerKind::Midpoint }
    }

    /// Model evaluations per step (1 for Euler, 2 for midpoint).
    pub fn evals_per_step(&self) -> usize {
        match self.kind {
            SamplerKind::Euler => 1,
            SamplerKind::Midpoint => 2,
        }
    }
}

/// The `steps + 1` times `t_0 = 0 … t_N = 1`: `linspace(0, 1, N+1)` in f32, then
/// `t / (t + shift - shift·t)` in f32 (bit-identical to the reference grid).
pub fn time_grid(steps: usize, shift: f64) -> Vec<f32> {
    let u = Tensor::linspace(0.0, 1.0, steps as i64 + 1, (Kind::Float, Device::Cpu));
    let t = &u / (&u + shift - &u * shift);
    Vec::<f32>::try_from(t).expect("f32 grid")
}

/// Initial noise `[1, C, H, W]` (f32, CPU) of one item: torch's CPU generator seeded with `seed`
/// (reinterpreted as i64), one `randn` draw of exactly this item's shape. Same value as PyTorch's
/// `torch.manual_seed(seed); torch.randn(1, C, H, W)`, and independent of any other item.
pub fn seeded_noise(seed: u64, channels: i64, height: i64, width: i64) -> Tensor {
    super::rng::seeded(seed as i64, || Tensor::randn([1, channels, height, width], (Kind::Float, Device::Cpu)))
}

/// One image to sample: its initial noise `[1, C, H, W]` and one row each of conditional and
/// unconditional conditioning.
#[derive(Debug)]
pub struct SampleItem {
    pub noise: Tensor,
    pub cond: Conditioning,
    pub uncond: Conditioning,
}

/// A finished item: its index in the input `items` and its final latent `[1, C, H, W]` (f32).
#[derive(Debug)]
pub struct SampleOutput {
    pub item: usize,
    pub latent: Tensor,
}

/// What the callback wants after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepControl {
    Continue,
    /// Drop these items (input indices); the others continue.
    Drop(Vec<usize>),
    /// Drop every remaining item.
    Stop,
}

/// One item's view of a step (for midpoint, the evaluation at the interval midpoint).
#[derive(Debug)]
pub struct StepRecord {
    pub v_cond: Tensor,
    /// `None` where CFG was truncated and no unconditional pass ran.
    pub v_uncond: Option<Tensor>,
    /// The guided velocity used for the update.
    pub velocity: Tensor,
    pub latent_after: Tensor,
    pub cfg_applied: bool,
    pub renorm_applied: bool,
}

/// What the callback sees after step `step` (0-based) of `steps`.
#[derive(Debug)]
pub struct StepInfo<'a> {
    pub step: usize,
    pub steps: usize,
    /// Time at the start and end of the step.
    pub t: f32,
    pub t_next: f32,
    /// Input indices of the items that took part in this step, in batch order.
    pub active: &'a [usize],
    eval: &'a Evaluation,
    latent: &'a Tensor,
}

impl StepInfo<'_> {
    fn row(&self, item: usize) -> Option<i64> {
        self.active.iter().position(|&i| i == item).map(|p| p as i64)
    }

    /// The latent of `item` after this step, `[1, C, H, W]`.
    pub fn latent(&self, item: usize) -> Option<Tensor> {
        self.row(item).map(|r| self.latent.narrow(0, r, 1))
    }

    /// Everything about `item` at this step (`None` if it was not active).
    pub fn record(&self, item: usize) -> Option<StepRecord> {
        let r = self.row(item)?;
        let e = self.eval;
        Some(StepRecord {
            v_cond: e.v_cond.narrow(0, r, 1),
            v_uncond: e.v_uncond.as_ref().map(|v| v.narrow(0, r, 1)),
            velocity: e.v.narrow(0, r, 1),
            latent_after: self.latent.narrow(0, r, 1),
            cfg_applied: e.cfg_applied,
            renorm_applied: e.renorm_fired.as_ref().is_some_and(|f| f.get(r).to_kind(Kind::Int64).int64_value(&[]) != 0),
        })
    }
}

#[derive(Debug)]
struct Evaluation {
    v: Tensor,
    v_cond: Tensor,
    v_uncond: Option<Tensor>,
    cfg_applied: bool,
    /// Per row, whether the renorm clamp fired (`[n]`, bool), read only when a caller asks, so that a
    /// step reads nothing back from the device; `None` where renorm did not run.
    renorm_fired: Option<Tensor>,
}

/// Whether CFG runs at evaluation time `t`: `t < cfg_trunc` compared in f32, as the reference
/// compares its f32 time tensor with the Python float (so a `cfg_trunc` of 0.7 is off at t = 0.7f32).
fn cfg_active(t: f32, cfg_trunc: f64) -> bool {
    t < cfg_trunc as f32
}

/// The conditioning of the active items: the conditional rows alone and the CFG batch (conditional
/// rows, then unconditional), each prepared by the network on first use.
struct ActiveConds<P> {
    cond: Conditioning,
    cfg: Conditioning,
    cond_prepared: Option<P>,
    cfg_prepared: Option<P>,
}

/// `slot`'s prepared conditioning, preparing `cond` first if it is empty.
fn prepared<'a, D: Denoiser + ?Sized>(
    model: &D,
    slot: &'a mut Option<D::Prepared>,
    cond: &Conditioning,
    latent: [i64; 2],
) -> Result<&'a D::Prepared, SampleError> {
    if slot.is_none() {
        *slot = Some(model.prepare(cond, latent)?);
    }
    Ok(slot.as_ref().expect("filled above"))
}

/// One guided velocity evaluation for the active items at time `t`.
fn guided_velocity<D: Denoiser + ?Sized>(
    model: &D,
    x: &Tensor,
    t: f32,
    conds: &mut ActiveConds<D::Prepared>,
    p: &SampleParams,
) -> Result<Evaluation, SampleError> {
    let xs = x.size();
    let (n, latent) = (xs[0], [xs[2], xs[3]]);
    if cfg_active(t, p.cfg_trunc) {
        let cfg_batch = prepared(model, &mut conds.cfg_prepared, &conds.cfg, latent)?;
        let xx = Tensor::cat(&[x, x], 0);
        let tt = Tensor::full([2 * n], t as f64, (Kind::Float, x.device()));
        let out = model.velocity(&xx, &tt, cfg_batch)?.to_kind(Kind::Float);
        let v_c = out.narrow(0, 0, n);
        let v_u = out.narrow(0, n, n);
        let mut v = &v_u + (&v_c - &v_u) * p.cfg_scale;
        let mut renorm_fired = None;
        if p.renorm_cfg > 0.0 {
            let dims: &[i64] = &[1, 2, 3];
            let max_norm = v_c.norm_scalaropt_dim(2.0, dims, true) * p.renorm_cfg;
            let norm = v.norm_scalaropt_dim(2.0, dims, true);
            let fire = norm.ge_tensor(&max_norm);
            v = v.where_self(&fire.logical_not(), &(&v * (&max_norm / &norm)));
            renorm_fired = Some(fire.flatten(0, -1));
        }
        Ok(Evaluation { v, v_cond: v_c, v_uncond: Some(v_u), cfg_applied: true, renorm_fired })
    } else {
        let cond = prepared(model, &mut conds.cond_prepared, &conds.cond, latent)?;
        let tt = Tensor::full([n], t as f64, (Kind::Float, x.device()));
        let v_c = model.velocity(x, &tt, cond)?.to_kind(Kind::Float);
        Ok(Evaluation { v: v_c.shallow_clone(), v_cond: v_c, v_uncond: None, cfg_applied: false, renorm_fired: None })
    }
}

/// Samples every item; returns the items that were not dropped, with their final latents.
/// The latent state lives on the device of the items' conditioning (`cond.cap_feats`).
pub fn sample<D, F>(model: &D, items: Vec<SampleItem>, p: &SampleParams, mut on_step: F) -> Result<Vec<SampleOutput>, SampleError>
where
    D: Denoiser + ?Sized,
    F: FnMut(&StepInfo<'_>) -> StepControl,
{
    if items.is_empty() {
        return Ok(Vec::new());
    }
    if p.steps == 0 {
        return Err(SampleError::Input("steps must be at least 1".into()));
    }
    let shape = items[0].noise.size();
    if shape.len() != 4 || shape[0] != 1 {
        return Err(SampleError::Input(format!("noise must be [1,C,H,W], got {shape:?}")));
    }
    for (i, it) in items.iter().enumerate() {
        if it.noise.size() != shape {
            return Err(SampleError::Input(format!("item {i}: noise shape {:?} differs from {shape:?}", it.noise.size())));
        }
        if it.cond.rows() != 1 || it.uncond.rows() != 1 {
            return Err(SampleError::Input(format!("item {i}: cond and uncond must hold one row each")));
        }
    }
    let device = items[0].cond.cap_feats.device();
    let grid = time_grid(p.steps, p.shift);

    let conds: Vec<&Conditioning> = items.iter().map(|it| &it.cond).collect();
    let unconds: Vec<&Conditioning> = items.iter().map(|it| &it.uncond).collect();
    let all_cond = Conditioning::cat(&conds);
    let all_uncond = Conditioning::cat(&unconds);
    let noises: Vec<&Tensor> = items.iter().map(|it| &it.noise).collect();
    let mut x = Tensor::cat(&noises, 0).to_device(device).to_kind(Kind::Float);
    let mut active: Vec<usize> = (0..items.len()).collect();
    let mut batch_conds: Option<ActiveConds<D::Prepared>> = None;

    for k in 0..p.steps {
        let (t0, t1) = (grid[k], grid[k + 1]);
        let dt = t1 - t0;
        if batch_conds.is_none() {
            let idx: Vec<i64> = active.iter().map(|&i| i as i64).collect();
            let c = all_cond.select(&idx);
            let u = all_uncond.select(&idx);
            let cfg = Conditioning::cat(&[&c, &u]);
            batch_conds = Some(ActiveConds { cond: c, cfg, cond_prepared: None, cfg_prepared: None });
        }
        let conds = batch_conds.as_mut().expect("set above");
        let eval = match p.kind {
            SamplerKind::Euler => guided_velocity(model, &x, t0, conds, p)?,
            SamplerKind::Midpoint => {
                let half = dt * 0.5;
                let first = guided_velocity(model, &x, t0, conds, p)?;
                let x_mid = &x + &first.v * (half as f64);
                guided_velocity(model, &x_mid, t0 + half, conds, p)?
            }
        };
        x = &x + &eval.v * (dt as f64);
        let info = StepInfo { step: k, steps: p.steps, t: t0, t_next: t1, active: &active, eval: &eval, latent: &x };
        let control = on_step(&info);
        let drop: Vec<usize> = match control {
            StepControl::Continue => Vec::new(),
            StepControl::Drop(d) => d,
            StepControl::Stop => active.clone(),
        };
        if !drop.is_empty() {
            let keep: Vec<i64> =
                active.iter().enumerate().filter(|(_, i)| !drop.contains(i)).map(|(r, _)| r as i64).collect();
            if keep.len() < active.len() {
                active.retain(|i| !drop.contains(i));
                if active.is_empty() {
                    return Ok(Vec::new());
                }
                x = x.index_select(0, &Tensor::from_slice(&keep).to_device(device));
                batch_conds = None;
            }
        }
    }
    Ok(active.iter().enumerate().map(|(r, &item)| SampleOutput { item, latent: x.narrow(0, r as i64, 1) }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn cfg_truncation_compares_in_f32() {
        // 0.7 is not exact in f32: the f32 time 0.7 equals f32(0.7) and is not below it, while the
        // f64 0.7 is above it.
        assert!(!cfg_active(0.7f32, 0.7));
        assert!(cfg_active(0.69f32, 0.7));
        assert!(!cfg_active(1.0, 1.0) && cfg_active(0.999, 1.0));
    }

    /// Velocity `a_row·(target - x)` with a per-row constant `a_row` taken from the pooled vector,
    /// and records every batch size it sees and the rows of every conditioning it prepares.
    struct Toy {
        batches: RefCell<Vec<i64>>,
        prepared: RefCell<Vec<i64>>,
    }

    impl Toy {
        fn new() -> Self {
            Self { batches: RefCell::new(Vec::new()), prepared: RefCell::new(Vec::new()) }
        }
    }

    impl Denoiser for Toy {
        type Prepared = Conditioning;

        fn prepare(&self, cond: &Conditioning, _latent: [i64; 2]) -> Result<Conditioning, SampleError> {
            self.prepared.borrow_mut().push(cond.rows());
            Ok(cond.clone())
        }

        fn velocity(&self, x: &Tensor, _t: &Tensor, cond: &Conditioning) -> Result<Tensor, SampleError> {
            self.batches.borrow_mut().push(x.size()[0]);
            let a = cond.pooled.select(1, 0).view([-1, 1, 1, 1]);
            Ok((Tensor::ones_like(x) * 2.0 - x) * a)
        }
    }

    fn cond(a: f64, len: i64) -> Conditioning {
        Conditioning {
            cap_feats: Tensor::ones([1, len, 3], (Kind::Float, Device::Cpu)),
            cap_mask: Tensor::ones([1, len], (Kind::Int64, Device::Cpu)),
            pooled: Tensor::full([1, 2], a, (Kind::Float, Device::Cpu)),
        }
    }

    fn item(seed: u64, ac: f64, au: f64) -> SampleItem {
        SampleItem { noise: seeded_noise(seed, 2, 3, 4), cond: cond(ac, 2), uncond: cond(au, 5) }
    }

    fn params(kind: SamplerKind) -> SampleParams {
        SampleParams { steps: 4, shift: 3.0, cfg_scale: 2.0, cfg_trunc: 0.5, renorm_cfg: 0.0, kind }
    }

    #[test]
    fn grid_endpoints_and_monotonic() {
        let g = time_grid(28, 6.0);
        assert_eq!(g.len(), 29);
        assert_eq!(g[0], 0.0);
        assert_eq!(g[28], 1.0);
        assert!(g.windows(2).all(|w| w[1] > w[0]));
        assert!((g[1] - 0.006135).abs() < 1e-6 && (g[27] - 0.818182).abs() < 1e-6);
    }

    /// Reference Euler loop written out by hand for one item, in f64.
    fn manual_euler(noise: &Tensor, ac: f64, au: f64, p: &SampleParams) -> Tensor {
        let g = time_grid(p.steps, p.shift);
        let mut x = noise.to_kind(Kind::Double);
        for k in 0..p.steps {
            let vc = (Tensor::ones_like(&x) * 2.0 - &x) * ac;
            let v = if (g[k] as f64) < p.cfg_trunc {
                let vu = (Tensor::ones_like(&x) * 2.0 - &x) * au;
                &vu + (&vc - &vu) * p.cfg_scale
            } else {
                vc
            };
            x = &x + v * ((g[k + 1] - g[k]) as f64);
        }
        x.to_kind(Kind::Float)
    }

    #[test]
    fn euler_with_cfg_and_truncation_matches_hand_loop() {
        let toy = Toy::new();
        let p = params(SamplerKind::Euler);
        let items = vec![item(1, 0.7, 0.2), item(2, 1.3, 0.4)];
        let e0 = manual_euler(&items[0].noise, 0.7, 0.2, &p);
        let e1 = manual_euler(&items[1].noise, 1.3, 0.4, &p);
        let mut flags = Vec::new();
        let out = sample(&toy, items, &p, |info| {
            flags.push(info.record(0).unwrap().cfg_applied);
            StepControl::Continue
        })
        .unwrap();
        assert!((&out[0].latent - e0).abs().max().double_value(&[]) < 1e-5);
        assert!((&out[1].latent - e1).abs().max().double_value(&[]) < 1e-5);
        // shift 3, 4 steps: t = 0, 0.1, 0.25, 0.5 -> CFG (one batch of 2*2 rows) on the first three steps.
        assert_eq!(flags, vec![true, true, true, false]);
        assert_eq!(*toy.batches.borrow(), vec![4, 4, 4, 2]);
        // Each batch is prepared once, when first used: the CFG batch at step 0, the conditional
        // rows alone at step 3.
        assert_eq!(*toy.prepared.borrow(), vec![4, 2]);
    }

    #[test]
    fn midpoint_matches_hand_loop() {
        // v = a·(2 - x) with CFG combining a_c and a_u into a = a_u + s·(a_c - a_u) while t < cfg_trunc.
        let p = params(SamplerKind::Midpoint);
        let toy = Toy::new();
        let it = item(9, 0.8, 0.3);
        let mut x = it.noise.to_kind(Kind::Double);
        let g = time_grid(p.steps, p.shift);
        let a = |t: f64| if t < p.cfg_trunc { 0.3 + p.cfg_scale * (0.8 - 0.3) } else { 0.8 };
        for k in 0..p.steps {
            let (t0, dt) = (g[k] as f64, (g[k + 1] - g[k]) as f64);
            let half = (g[k + 1] - g[k]) * 0.5;
            let v0 = (Tensor::ones_like(&x) * 2.0 - &x) * a(t0);
            let xm = &x + v0 * (half as f64);
            let tm = (g[k] + half) as f64;
            let vm = (Tensor::ones_like(&xm) * 2.0 - &xm) * a(tm);
            x = &x + vm * dt;
        }
        let out = sample(&toy, vec![it], &p, |_| StepControl::Continue).unwrap();
        assert!((&out[0].latent - x.to_kind(Kind::Float)).abs().max().double_value(&[]) < 1e-5);
        assert_eq!(toy.batches.borrow().len(), 2 * p.steps);
    }

    #[test]
    fn dropping_an_item_leaves_the_others_unchanged() {
        let p = params(SamplerKind::Midpoint);
        let toy = Toy::new();
        let full = sample(&toy, vec![item(1, 0.7, 0.2), item(2, 1.3, 0.4), item(3, 0.9, 0.1)], &p, |_| StepControl::Continue).unwrap();
        let toy2 = Toy::new();
        let part = sample(&toy2, vec![item(1, 0.7, 0.2), item(2, 1.3, 0.4), item(3, 0.9, 0.1)], &p, |info| {
            if info.step == 1 {
                StepControl::Drop(vec![1])
            } else {
                StepControl::Continue
            }
        })
        .unwrap();
        assert_eq!(part.iter().map(|o| o.item).collect::<Vec<_>>(), vec![0, 2]);
        // Midpoint evaluations at t = 0, .05 | .1, .175 | .25, .375 | .5, .75 against cfg_trunc 0.5:
        // the 3-item CFG batch, again for the 2 items left after the drop, then their conditional rows.
        assert_eq!(*toy2.prepared.borrow(), vec![6, 4, 2]);
        assert_eq!(*toy.prepared.borrow(), vec![6, 3]);
        for o in &part {
            let f = full.iter().find(|f| f.item == o.item).unwrap();
            assert!((&o.latent - &f.latent).abs().max().double_value(&[]) < 1e-6);
        }
        // 2 evaluations per midpoint step; CFG batch 6 rows, then 4 after the drop.
        let b = toy2.batches.borrow();
        assert_eq!(b[0], 6);
        assert_eq!(b[4], 4);
        let stopped = sample(&toy, vec![item(1, 0.7, 0.2)], &p, |_| StepControl::Stop).unwrap();
        assert!(stopped.is_empty());
    }

    #[test]
    fn renorm_clamps_per_sample() {
        // Item 0: guided velocity much larger than cond -> clamped; item 1: cond == uncond -> not.
        let p = SampleParams { steps: 1, shift: 1.0, cfg_scale: 4.0, cfg_trunc: 1.0, renorm_cfg: 1.0, kind: SamplerKind::Euler };
        let toy = Toy::new();
        let items = vec![item(5, 1.0, 0.0), item(6, 0.5, 0.5)];
        let mut rec = Vec::new();
        sample(&toy, items, &p, |info| {
            rec.push((info.record(0).unwrap(), info.record(1).unwrap()));
            StepControl::Continue
        })
        .unwrap();
        let (r0, r1) = &rec[0];
        assert!(r0.renorm_applied);
        let n = |t: &Tensor| t.square().sum(Kind::Double).sqrt().double_value(&[]);
        assert!((n(&r0.velocity) - n(&r0.v_cond)).abs() < 1e-4 * n(&r0.v_cond));
        // cond == uncond: v == v_c, so ||v|| >= ||v_c|| holds with equality and the clamp fires
        // without changing anything.
        assert!((&r1.velocity - &r1.v_cond).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn noise_depends_only_on_the_seed() {
        let a = seeded_noise(42, 16, 4, 6);
        let _ = seeded_noise(7, 16, 4, 6);
        let b = seeded_noise(42, 16, 4, 6);
        assert_eq!((&a - &b).abs().max().double_value(&[]), 0.0);
        assert!((&a - seeded_noise(43, 16, 4, 6)).abs().max().double_value(&[]) > 0.1);
    }
}
