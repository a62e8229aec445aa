//! `newbie-bench`: speed of the Next-DiT denoising step, and a side-by-side with PyTorch eager.
//!
//! Denoise mode (default): builds the DiT (random weights or a checkpoint), warms up, then times
//! `--steps` sampler steps with CFG (cond + uncond of `--batch` images in one forward pass of
//! 2·batch rows) and prints seconds per step, images/s extrapolated to 28 steps, peak device memory,
//! achieved TFLOP/s from an analytic FLOP count, and a raw matmul rate measured in the same process.
//!
//! Variants mode (`--variants LIST`): one model, one CFG-shaped batch (cond and uncond rows), and
//! forward passes timed round-robin over the listed ways of running the blocks (see `Variant`), so
//! that every variant sees the same machine state; prints each median, its ratio to the first
//! variant, its TFLOP/s and fraction of the matmul rate, and its largest output difference from the
//! first variant.
//!
//! Prepared-conditioning mode (`--prepare-baseline`): sampler steps with the caption side prepared
//! once per batch (`NextDit::prepare`, what the worker runs) against the same steps with it
//! recomputed at every step, alternating rounds; prints both medians and their ratio.
//!
//! Compare mode (`--compare-pytorch SCRIPT`): runs the same forward pass (same weights, same inputs,
//! written to a temporary folder) in this crate and in the PyTorch eager script, prints both times,
//! their ratio and the largest output difference.
//!
//! FLOP count of one forward pass, per batch row (multiply-add = 2 FLOPs; element-wise work,
//! norms, softmax and RoPE are not counted):
//!   block(S)  = 2·S·d·(H + 2·Hkv)·hd + 4·S²·H·hd + 2·S·d·(H·hd) + 6·S·d·F + 2·t·4d
//!   forward   = Σ_context-refiner block(L) + Σ_noise-refiner block(N) + Σ_layers block(L + N)
//!             + 2·N·(p²C)·d + 2·L·c·d + 2·(L+N)·d·(p²C)
//! with d = dim, H/Hkv heads, hd = head_dim, F = FFN hidden, t = t-embedding width, L = valid caption
//! tokens, N = image tokens, c = caption feature width, p = patch, C = latent channels.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use farm_worker::model::dit::{DitConfig, Kernels, NextDit};
use farm_worker::model::sdpa;
use farm_worker::model::loading;
use farm_worker::model::sampler::{self, Conditioning, Denoiser, SampleError, SampleItem, SampleParams, SamplerKind, StepControl};
use serde_json::json;
use tch::{nn::VarStore, Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(name = "newbie-bench", about = "Next-DiT denoising-step benchmark and PyTorch eager comparison")]
struct Args {
    /// DiT preset: newbie-exp0.1 or tiny.
    #[arg(long, default_value = "newbie-exp0.1")]
    preset: String,
    /// A transformer config.json that replaces the preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use random weights (the default when --weights is absent).
    #[arg(long)]
    random_weights: bool,
    /// DiT checkpoint (file, shard index or folder) instead of random weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// cuda, cuda:N or cpu.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// bf16, fp16 or fp32.
    #[arg(long, default_value = "bf16")]
    precision: String,
    /// Image width in pixels (latent = width/8).
    #[arg(long, default_value_t = 1024)]
    width: i64,
    #[arg(long, default_value_t = 1024)]
    height: i64,
    /// Timed denoising steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Images per batch (the CFG batch has twice as many rows).
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Classifier-free guidance on every step (cond + uncond in one pass).
    #[arg(long)]
    cfg: bool,
    /// Caption tokens of the conditional rows.
    #[arg(long, default_value_t = 256)]
    cap_len: i64,
    /// Caption tokens of the unconditional rows (default: --cap-len; shorter means padding and a masked attention kernel).
    #[arg(long)]
    uncond_len: Option<i64>,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Side of the square matmul used for the raw rate (default 8192 on CUDA, 1024 on CPU).
    #[arg(long)]
    matmul_size: Option<i64>,
    #[arg(long, default_value_t = 10)]
    matmul_iters: usize,
    /// libtorch intra-op threads (CPU).
    #[arg(long)]
    threads: Option<i32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Compare mode: the PyTorch eager script (worker/bench/pytorch_dit.py).
    #[arg(long)]
    compare_pytorch: Option<PathBuf>,
    /// Python interpreter for --compare-pytorch.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Timed forward passes in compare and variants mode (per variant).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Attention backend tried first on CUDA: default (libtorch's order), cudnn, flash, efficient, math.
    #[arg(long, default_value = "default")]
    attention_backend: sdpa::Preference,
    /// Block kernels: fused (default), unfused (the baseline), fused+gqa (GQA inside SDPA).
    #[arg(long, default_value = "fused")]
    kernels: String,
    /// Variants mode: comma-separated variants, each `fused` or `unfused`, optionally `+gqa` and
    /// `+BACKEND` (e.g. `unfused,fused,fused+cudnn,fused+gqa+cudnn`); the first is the baseline.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Variants mode: also time one main block's matmuls and its attention call (per backend, with
    /// materialised and native GQA) at the run's shapes, and split the forward pass into matmuls,
    /// attention and the rest.
    #[arg(long)]
    breakdown: bool,
    /// Prepared-conditioning mode: sampler steps with the caption side prepared once per batch
    /// against the same steps with it recomputed at every step (the baseline), alternating for
    /// --iters rounds of --steps steps each; prints both medians and their ratio.
    #[arg(long, conflicts_with_all = ["variants", "compare_pytorch"])]
    prepare_baseline: bool,
}

/// One way of running the forward pass: the block kernels and the attention backend order.
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    kernels: Kernels,
    attention: sdpa::Preference,
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut kernels = Kernels::default();
        let mut attention = sdpa::Preference::Default;
        for part in s.split('+').map(str::trim) {
            match part {
                "fused" => kernels.fused = true,
                "unfused" => kernels.fused = false,
                "gqa" => kernels.native_gqa = true,
                other => attention = other.parse().map_err(|e: String| anyhow!("variant {s:?}: {e}"))?,
            }
        }
        Ok(Self { name: s.trim().to_string(), kernels, attention })
    }
}

impl Variant {
    fn apply(&self, model: &mut NextDit) -> Result<()> {
        model.set_kernels(self.kernels);
        sdpa::prefer(self.attention).map_err(anyhow::Error::msg)
    }
}

/// Parses the device; for CUDA, makes sure libtorch's CUDA backend is loaded: the linker drops
/// `libtorch_cuda.so` from the binary's dependencies (no symbol of it is referenced directly, and
/// Rust links with `--as-needed`), so without this libtorch reports no CUDA device.
fn parse_device(s: &str) -> Result<Device> {
    let device = farm_worker::device::parse_device(s).map_err(anyhow::Error::msg)?;
    if let Device::Cuda(_) = device {
        if !farm_worker::device::load_cuda_backend() {
            bail!("cannot load libtorch_cuda.so: put the CUDA build of libtorch's lib folder on LD_LIBRARY_PATH");
        }
        if !tch::Cuda::is_available() {
            bail!("CUDA requested but libtorch reports no CUDA device");
        }
    }
    Ok(device)
}

fn parse_kind(s: &str) -> Result<Kind> {
    match s {
        "bf16" => Ok(Kind::BFloat16),
        "fp16" => Ok(Kind::Half),
        "fp32" => Ok(Kind::Float),
        _ => bail!("unknown precision {s} (bf16, fp16, fp32)"),
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Analytic FLOPs of one forward row (see the module docs).
fn forward_flops(cfg: &DitConfig, cap_len: i64, n_img: i64) -> f64 {
    let (d, h, kvh, hd, f, t) =
        (cfg.dim as f64, cfg.n_heads as f64, cfg.n_kv_heads as f64, cfg.head_dim() as f64, cfg.ffn_hidden() as f64, cfg.t_emb_dim() as f64);
    let block = |s: f64| 2.0 * s * d * (h + 2.0 * kvh) * hd + 4.0 * s * s * h * hd + 2.0 * s * d * h * hd + 6.0 * s * d * f + 8.0 * t * d;
    let (l, n) = (cap_len as f64, n_img as f64);
    let pd = cfg.patch_dim() as f64;
    cfg.n_refiner_layers as f64 * (block(l) + block(n))
        + cfg.n_layers as f64 * block(l + n)
        + 2.0 * n * pd * d
        + 2.0 * l * cfg.cap_feat_dim as f64 * d
        + 2.0 * (l + n) * d * pd
}

/// Device memory in use (bytes, whole device) from the CUDA driver (`cuMemGetInfo_v2`), falling back
/// to `nvidia-smi`. Includes the CUDA context and the caching allocator's reserve.
fn device_memory_used(device: Device) -> Option<u64> {
    let Device::Cuda(index) = device else { return None };
    driver_memory_used().or_else(|| farm_worker::device::used_vram_bytes(Device::Cuda(index)))
}

fn driver_memory_used() -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    // SAFETY: dlopen/dlsym of the CUDA driver; the symbol has the documented C signature
    // `CUresult cuMemGetInfo_v2(size_t *free, size_t *total)` and libtorch has made a context current
    // on this thread by the time this is called.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        let lib = if lib.is_null() { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW) } else { lib };
        if lib.is_null() {
            return None;
        }
        let sym = libc::dlsym(lib, c"cuMemGetInfo_v2".as_ptr());
        if sym.is_null() {
            return None;
        }
        let f: MemGetInfo = std::mem::transmute(sym);
        let (mut free, mut total) = (0usize, 0usize);
        (f(&mut free, &mut total) == 0).then(|| (total - free) as u64)
    }
}

/// Raw `n×n×n` matmul rate (TFLOP/s) in `kind` on `device`.
fn matmul_tflops(device: Device, kind: Kind, n: i64, iters: usize) -> f64 {
    tch::no_grad(|| {
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        for _ in 0..3 {
            let _ = a.matmul(&b);
        }
        sync(device);
        let start = Instant::now();
        for _ in 0..iters {
            let _ = a.matmul(&b);
        }
        sync(device);
        2.0 * (n as f64).powi(3) * iters as f64 / start.elapsed().as_secs_f64() / 1e12
    })
}

fn config_of(args: &Args) -> Result<DitConfig> {
    if let Some(p) = &args.config {
        return Ok(DitConfig::from_json_file(p)?);
    }
    match args.preset.as_str() {
        "newbie-exp0.1" | "newbie_exp0_1" => Ok(DitConfig::newbie_exp0_1()),
        "tiny" => Ok(DitConfig::tiny()),
        p => bail!("unknown preset {p} (newbie-exp0.1, tiny)"),
    }
}

fn build_model(args: &Args, cfg: &DitConfig, device: Device, kind: Kind) -> Result<(VarStore, NextDit)> {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let model = NextDit::new(vs.root(), cfg)?;
    match &args.weights {
        Some(path) if !args.random_weights => {
            let r = loading::load_dit(&mut vs, path)?;
            eprintln!("loaded {} tensors from {} file(s)", r.loaded, r.files.len());
        }
        _ => NextDit::randomize(&vs, 1234),
    }
    let mut model = model;
    let variant: Variant = format!("{}+{}", args.kernels, args.attention_backend).parse()?;
    variant.apply(&mut model)?;
    Ok((vs, model))
}

fn random_cond(cfg: &DitConfig, len: i64, seed: i64, device: Device) -> Conditioning {
    tch::manual_seed(seed);
    Conditioning {
        cap_feats: Tensor::randn([1, len, cfg.cap_feat_dim], (Kind::Float, device)),
        cap_mask: Tensor::ones([1, len], (Kind::Int64, device)),
        pooled: Tensor::randn([1, cfg.clip_text_dim], (Kind::Float, device)),
    }
}

/// `--batch` items of random conditioning (`--cap-len`, uncond `--uncond-len`) and seeded noise.
fn bench_items(args: &Args, cfg: &DitConfig, (lh, lw): (i64, i64), device: Device, seed0: u64) -> Vec<SampleItem> {
    let uncond_len = args.uncond_len.unwrap_or(args.cap_len);
    (0..args.batch)
        .map(|i| SampleItem {
            noise: sampler::seeded_noise(seed0 + i as u64, cfg.in_channels, lh, lw).to_device(device),
            cond: random_cond(cfg, args.cap_len, 10 + i, device),
            uncond: random_cond(cfg, uncond_len, 1000 + i, device),
        })
        .collect()
}

/// Euler, shift 6, CFG 5 on every step with `--cfg` (else never).
fn bench_params(args: &Args, steps: usize) -> SampleParams {
    SampleParams {
        steps,
        shift: 6.0,
        cfg_scale: 5.0,
        cfg_trunc: if args.cfg { 1.0 } else { 0.0 },
        renorm_cfg: 0.0,
        kind: SamplerKind::Euler,
    }
}

/// The baseline of `--prepare-baseline`: a denoiser that keeps nothing between steps, so every
/// velocity is a whole `NextDit::forward` (caption side, RoPE factors and the caption-length read
/// back from the device included).
struct EveryStep<'a>(&'a NextDit);

impl Denoiser for EveryStep<'_> {
    type Prepared = Conditioning;

    fn prepare(&self, cond: &Conditioning, _latent: [i64; 2]) -> Result<Conditioning, SampleError> {
        Ok(cond.clone())
    }

    fn velocity(&self, x: &Tensor, t: &Tensor, c: &Conditioning) -> Result<Tensor, SampleError> {
        let v = self.0.forward(x, t, &c.cap_feats, &c.cap_mask, &c.pooled).map_err(|e| SampleError::Denoiser(Box::new(e)))?;
        Ok(v.to_device(x.device()).to_kind(Kind::Float))
    }
}

/// Seconds per step of `steps` sampler steps (one device sync at the end, none between steps) and
/// the final latents.
fn time_steps<D: Denoiser>(denoiser: &D, items: Vec<SampleItem>, params: &SampleParams, device: Device) -> Result<(f64, Tensor)> {
    sync(device);
    let start = Instant::now();
    let out = sampler::sample(denoiser, items, params, |_| StepControl::Continue)?;
    let latents = Tensor::cat(&out.iter().map(|o| &o.latent).collect::<Vec<_>>(), 0);
    sync(device);
    Ok((start.elapsed().as_secs_f64() / params.steps as f64, latents))
}

fn prepare_bench(args: &Args) -> Result<()> {
    let Setup { device, kind, cfg, lh, lw, .. } = setup(args)?;
    let (_vs, model) = build_model(args, &cfg, device, kind)?;
    let baseline = EveryStep(&model);
    let items = |seed0: u64| bench_items(args, &cfg, (lh, lw), device, seed0);
    if args.warmup > 0 {
        let _ = time_steps(&model, items(1), &bench_params(args, args.warmup), device)?;
        let _ = time_steps(&baseline, items(1), &bench_params(args, args.warmup), device)?;
    }
    let params = bench_params(args, args.steps);
    let (mut prepared_s, mut every_s) = (Vec::new(), Vec::new());
    let mut max_diff = 0f64;
    for _ in 0..args.iters.max(1) {
        let (a, la) = time_steps(&model, items(100), &params, device)?;
        let (b, lb) = time_steps(&baseline, items(100), &params, device)?;
        prepared_s.push(a);
        every_s.push(b);
        max_diff = max_diff.max((la - lb).abs().max().double_value(&[]));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut prepared_s), median(&mut every_s));
    let report = json!({
        "mode": "prepare-baseline",
        "preset": args.config.as_ref().map(|p| p.display().to_string()).unwrap_or(args.preset.clone()),
        "device": args.device, "precision": args.precision,
        "width": args.width, "height": args.height,
        "cap_len": args.cap_len, "uncond_len": args.uncond_len.unwrap_or(args.cap_len),
        "batch": args.batch, "cfg": args.cfg, "steps_per_round": args.steps, "rounds": prepared_s.len(),
        "s_per_step_prepared_once": a,
        "s_per_step_prepared_every_step": b,
        "ratio": a / b,
        "final_latent_max_abs_diff": max_diff,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("newbie-bench prepare-baseline: {} on {} in {}, batch {}, CFG {}, {} rounds of {} steps",
            report["preset"], args.device, args.precision, args.batch, args.cfg, prepared_s.len(), args.steps);
        println!("  conditioning prepared once   {:.4} s/step (median)", a);
        println!("  prepared at every step       {:.4} s/step (median, baseline)", b);
        println!("  ratio {:.3}; final latents differ by at most {max_diff:.3e}", a / b);
    }
    Ok(())
}

fn latent_dims(args: &Args, cfg: &DitConfig) -> Result<(i64, i64)> {
    let unit = 8 * cfg.patch_size;
    if args.width % unit != 0 || args.height % unit != 0 {
        bail!("width and height must be multiples of {unit} pixels");
    }
    Ok((args.height / 8, args.width / 8))
}

/// What every mode sets up first: the device, the precision, libtorch's thread count, the DiT
/// configuration and the latent size.
struct Setup {
    device: Device,
    kind: Kind,
    cfg: DitConfig,
    lh: i64,
    lw: i64,
    n_img: i64,
}

fn setup(args: &Args) -> Result<Setup> {
    let device = parse_device(&args.device)?;
    let kind = parse_kind(&args.precision)?;
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let cfg = config_of(args)?;
    let (lh, lw) = latent_dims(args, &cfg)?;
    let n_img = (lh / cfg.patch_size) * (lw / cfg.patch_size);
    Ok(Setup { device, kind, cfg, lh, lw, n_img })
}

fn denoise_bench(args: &Args) -> Result<()> {
    let Setup { device, kind, cfg, lh, lw, n_img } = setup(args)?;
    let uncond_len = args.uncond_len.unwrap_or(args.cap_len);
    let mem_before = device_memory_used(device);
    let t_build = Instant::now();
    let (_vs, model) = build_model(args, &cfg, device, kind)?;
    sync(device);
    let build_s = t_build.elapsed().as_secs_f64();
    let mem_weights = device_memory_used(device);

    let items = |seed0: u64| bench_items(args, &cfg, (lh, lw), device, seed0);
    let params = |steps: usize| bench_params(args, steps);
    let mut peak = mem_weights.unwrap_or(0);
    if args.warmup > 0 {
        sampler::sample(&model, items(1), &params(args.warmup), |_| {
            sync(device);
            if let Some(m) = device_memory_used(device) {
                peak = peak.max(m);
            }
            StepControl::Continue
        })?;
    }
    sync(device);
    let allocator_before = farm_worker::device::allocator_memory(device);
    farm_worker::device::reset_peak_memory(device);
    let mut step_s = Vec::with_capacity(args.steps);
    let start = Instant::now();
    let mut last = start;
    sampler::sample(&model, items(100), &params(args.steps), |_| {
        sync(device);
        let now = Instant::now();
        step_s.push((now - last).as_secs_f64());
        last = now;
        StepControl::Continue
    })?;
    let total = start.elapsed().as_secs_f64();
    let allocator = farm_worker::device::allocator_memory(device);
    if let Some(m) = device_memory_used(device) {
        peak = peak.max(m);
    }
    let per_step = total / args.steps as f64;
    let min_step = step_s.iter().cloned().fold(f64::INFINITY, f64::min);
    let rows_flops = args.batch as f64
        * (forward_flops(&cfg, args.cap_len, n_img) + if args.cfg { forward_flops(&cfg, uncond_len, n_img) } else { 0.0 });
    let achieved = rows_flops / per_step / 1e12;
    let images_per_s = args.batch as f64 / (28.0 * per_step);
    let mm_n = args.matmul_size.unwrap_or(if device == Device::Cpu { 1024 } else { 8192 });
    let mm = matmul_tflops(device, kind, mm_n, args.matmul_iters);

    let report = json!({
        "preset": args.config.as_ref().map(|p| p.display().to_string()).unwrap_or(args.preset.clone()),
        "params": cfg.param_count(),
        "device": args.device,
        "precision": args.precision,
        "width": args.width, "height": args.height,
        "latent": [cfg.in_channels, lh, lw],
        "image_tokens": n_img,
        "cap_len": args.cap_len, "uncond_len": uncond_len,
        "batch": args.batch, "cfg": args.cfg,
        "rows_per_forward": if args.cfg { 2 * args.batch } else { args.batch },
        "steps_timed": args.steps, "warmup_steps": args.warmup,
        "build_and_init_s": build_s,
        "s_per_step": per_step,
        "s_per_step_min": min_step,
        "images_per_s_at_28_steps": images_per_s,
        "s_per_image_at_28_steps": 1.0 / images_per_s,
        "tflop_per_step": rows_flops / 1e12,
        "achieved_tflops": achieved,
        "matmul_size": mm_n,
        "matmul_tflops": mm,
        "fraction_of_matmul_rate": achieved / mm,
        "device_memory_before_bytes": mem_before,
        "device_memory_after_weights_bytes": mem_weights,
        "device_memory_peak_bytes": (peak > 0).then_some(peak),
        "allocator_allocated_before_steps_bytes": allocator_before.map(|m| m.allocated),
        "allocator_peak_allocated_bytes": allocator.map(|m| m.allocated_peak),
        "allocator_peak_reserved_bytes": allocator.map(|m| m.reserved_peak),
        "memory_note": "allocator_*: libtorch's CUDA caching allocator over the timed steps (tensors, and tensors plus its cache); device_memory_*: whole-device memory in use from the CUDA driver (cuMemGetInfo) or nvidia-smi, sampled after each step: includes the CUDA context and the caching allocator's reserve",
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let gib = |b: Option<u64>| b.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "n/a".into());
        println!("newbie-bench: {} ({} params) on {} in {}", report["preset"], cfg.param_count(), args.device, args.precision);
        println!("  image {}x{} -> latent {}x{} -> {} image tokens; caption {} (uncond {}) tokens", args.width, args.height, lh, lw, n_img, args.cap_len, uncond_len);
        println!("  batch {} image(s), CFG {}, {} rows per forward", args.batch, args.cfg, report["rows_per_forward"]);
        println!("  s/step            {per_step:.4} (min {min_step:.4}) over {} steps after {} warm-up", args.steps, args.warmup);
        println!("  images/s @28 steps {images_per_s:.4}  ({:.2} s per image)", 1.0 / images_per_s);
        println!("  achieved          {achieved:.1} TFLOP/s ({:.2} TFLOP per step, analytic)", rows_flops / 1e12);
        println!("  raw matmul        {mm:.1} TFLOP/s ({mm_n}^3, {}) -> fraction {:.3}", args.precision, achieved / mm);
        println!("  device memory     before {}, with weights {}, peak {}", gib(mem_before), gib(mem_weights), gib((peak > 0).then_some(peak)));
        println!(
            "  allocator         tensors {} before the steps, peak {}; reserved peak {}",
            gib(allocator_before.map(|m| m.allocated)),
            gib(allocator.map(|m| m.allocated_peak)),
            gib(allocator.map(|m| m.reserved_peak))
        );
    }
    Ok(())
}

/// Variants mode (see the module docs).
fn variants_bench(args: &Args) -> Result<()> {
    let variants: Vec<Variant> = args.variants.iter().map(|v| v.parse()).collect::<Result<_>>()?;
    let Setup { device, kind, cfg, lh, lw, n_img } = setup(args)?;
    let uncond_len = args.uncond_len.unwrap_or(args.cap_len).min(args.cap_len);
    let (_vs, mut model) = build_model(args, &cfg, device, kind)?;

    // Rows 2i and 2i+1: the cond and uncond of image i (the uncond caption right-padded).
    let rows = 2 * args.batch;
    tch::manual_seed(7);
    let x = Tensor::randn([rows, cfg.in_channels, lh, lw], (Kind::Float, device));
    let t = Tensor::full([rows], 0.3, (Kind::Float, device));
    let cap = Tensor::randn([rows, args.cap_len, cfg.cap_feat_dim], (Kind::Float, device));
    let mask: Vec<i64> = (0..rows)
        .flat_map(|r| (0..args.cap_len).map(move |i| (r % 2 == 0 || i < uncond_len) as i64))
        .collect();
    let mask = Tensor::from_slice(&mask).view([rows, args.cap_len]).to_device(device);
    let pooled = Tensor::randn([rows, cfg.clip_text_dim], (Kind::Float, device));
    let flops = args.batch as f64 * (forward_flops(&cfg, args.cap_len, n_img) + forward_flops(&cfg, uncond_len, n_img));

    // A variant whose forward pass fails (a kernel refusing the inputs raises inside libtorch) is
    // reported with its error and left out of the later rounds; the others still run.
    let mut errors: Vec<Option<String>> = variants.iter().map(|_| None).collect();
    let forward = |model: &mut NextDit, v: &Variant| -> Result<Tensor, String> {
        v.apply(model).map_err(|e| e.to_string())?;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let out = model.forward(&x, &t, &cap, &mask, &pooled);
            sync(device);
            out
        }));
        match run {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())),
        }
    };
    let mut outputs: Vec<Option<Tensor>> = variants.iter().map(|_| None).collect();
    for (i, v) in variants.iter().enumerate() {
        for _ in 0..args.warmup.max(1) {
            match forward(&mut model, v) {
                Ok(out) => outputs[i] = Some(out),
                Err(e) => {
                    eprintln!("variant {}: {}", v.name, e.lines().next().unwrap_or(""));
                    errors[i] = Some(e);
                    outputs[i] = None;
                    break;
                }
            }
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(args.iters); variants.len()];
    for _ in 0..args.iters {
        for (i, v) in variants.iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            let start = Instant::now();
            match forward(&mut model, v) {
                Ok(_) => times[i].push(start.elapsed().as_secs_f64()),
                Err(e) => errors[i] = Some(e),
            }
        }
    }
    sdpa::prefer(args.attention_backend).map_err(anyhow::Error::msg)?;
    let mm_n = args.matmul_size.unwrap_or(if device == Device::Cpu { 1024 } else { 8192 });
    let mm = matmul_tflops(device, kind, mm_n, args.matmul_iters);
    let median = |v: &[f64]| -> Option<f64> {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let Some(base_median) = median(&times[0]).filter(|_| errors[0].is_none()) else {
        bail!("the first variant ({}) failed: {}", variants[0].name, errors[0].as_deref().unwrap_or("no timing"));
    };
    let breakdown = if args.breakdown {
        let shape = BlockShape { rows, cap_len: args.cap_len, uncond_len, n_img };
        Some(block_breakdown(&cfg, &shape, &variants[0], kind, device, args.iters.max(3), base_median)?)
    } else {
        None
    };
    let base_out = outputs[0].take().expect("the first variant ran").to_device(Device::Cpu);
    let out_absmax = base_out.abs().max().double_value(&[]);
    let mut report = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        if let Some(e) = &errors[i] {
            report.push(json!({ "variant": v.name, "error": e.lines().next().unwrap_or("") }));
            continue;
        }
        let Some(med) = median(&times[i]) else {
            report.push(json!({ "variant": v.name, "error": "no timed run" }));
            continue;
        };
        let diff = match outputs[i].take() {
            Some(o) => (o.to_device(Device::Cpu) - &base_out).abs().max().double_value(&[]),
            None => 0.0,
        };
        report.push(json!({
            "variant": v.name,
            "ms_median": med * 1e3,
            "ratio_to_first": med / base_median,
            "achieved_tflops": flops / med / 1e12,
            "fraction_of_matmul_rate": flops / med / 1e12 / mm,
            "max_abs_diff_to_first": diff,
        }));
    }
    let preset = args.config.as_ref().map(|p| p.display().to_string()).unwrap_or(args.preset.clone());
    let summary = json!({
        "preset": preset, "device": args.device, "precision": args.precision,
        "rows": rows, "image_tokens": n_img, "cap_len": args.cap_len, "uncond_len": uncond_len,
        "iters": args.iters, "tflop_per_forward": flops / 1e12,
        "matmul_size": mm_n, "matmul_tflops": mm, "output_absmax": out_absmax,
        "variants": report,
        "breakdown": breakdown,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "forward pass variants: {} on {} in {}, {rows} rows ({} image tokens, captions {}/{}), {} rounds, raw matmul {mm:.1} TFLOP/s",
            preset, args.device, args.precision, n_img, args.cap_len, uncond_len, args.iters
        );
        println!("  {:<28} {:>10} {:>8} {:>9} {:>9} {:>12}", "variant", "ms", "ratio", "TFLOP/s", "fraction", "max |diff|");
        for r in &report {
            if let Some(e) = r["error"].as_str() {
                println!("  {:<28} failed: {e}", r["variant"].as_str().unwrap_or(""));
                continue;
            }
            println!(
                "  {:<28} {:>10.3} {:>8.3} {:>9.1} {:>9.3} {:>12.3e}",
                r["variant"].as_str().unwrap_or(""),
                r["ms_median"].as_f64().unwrap_or(0.0),
                r["ratio_to_first"].as_f64().unwrap_or(0.0),
                r["achieved_tflops"].as_f64().unwrap_or(0.0),
                r["fraction_of_matmul_rate"].as_f64().unwrap_or(0.0),
                r["max_abs_diff_to_first"].as_f64().unwrap_or(0.0),
            );
        }
        println!("  (output absmax {out_absmax:.3}; ratio below 1 = faster than the first variant)");
        if let Some(b) = &breakdown {
            println!("  breakdown of the first variant's forward pass ({:.3} ms):", b["forward_ms"].as_f64().unwrap_or(0.0));
            println!("    {:<56} {:>9} {:>9} {:>7} {:>10}", "component (one main block)", "ms/call", "TFLOP/s", "calls", "ms/main");
            for c in b["components"].as_array().into_iter().flatten() {
                println!(
                    "    {:<56} {:>9.3} {:>9.1} {:>7} {:>10.2}",
                    c["name"].as_str().unwrap_or(""),
                    c["ms_per_call"].as_f64().unwrap_or(0.0),
                    c["tflops"].as_f64().unwrap_or(0.0),
                    c["calls_per_forward"].as_i64().unwrap_or(0),
                    c["ms_per_forward"].as_f64().unwrap_or(0.0),
                );
            }
            println!(
                "    all blocks: matmuls {:.2} ms + attention ({}) {:.2} ms; the rest (norms, RoPE, modulation, copies, embedders, final layer, gaps) {:.2} ms",
                b["matmul_ms"].as_f64().unwrap_or(0.0),
                b["attention_used"].as_str().unwrap_or(""),
                b["attention_ms"].as_f64().unwrap_or(0.0),
                b["rest_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(())
}

/// Times `f` (after one untimed call) and returns the median seconds per call.
fn time_call(device: Device, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    sync(device);
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            sync(device);
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn attention_label(pref: &str, native_gqa: bool) -> String {
    format!("attention {pref}{}", if native_gqa { " + native GQA" } else { "" })
}

/// The batch a breakdown is measured for.
struct BlockShape {
    rows: i64,
    cap_len: i64,
    uncond_len: i64,
    n_img: i64,
}

/// One main block's matmuls and attention at the run's shapes (the rows of each caption length
/// as one batch, as the forward pass groups them), against the measured forward pass of `first`;
/// the attention time counted is that of `first`'s backend and GQA choice.
fn block_breakdown(
    cfg: &DitConfig,
    shape: &BlockShape,
    first: &Variant,
    kind: Kind,
    device: Device,
    iters: usize,
    forward_s: f64,
) -> Result<serde_json::Value> {
    let BlockShape { rows, cap_len, uncond_len, n_img } = *shape;
    let (d, h, kvh, hd, f) = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim(), cfg.ffn_hidden());
    // Groups of rows by sequence length: all rows at once when cond and uncond captions are equal.
    let groups: Vec<(i64, i64)> =
        if cap_len == uncond_len { vec![(rows, cap_len + n_img)] } else { vec![(rows / 2, cap_len + n_img), (rows / 2, uncond_len + n_img)] };
    let tokens: i64 = groups.iter().map(|(r, s)| r * s).sum();
    let n_layers = cfg.n_layers;
    let mut components = Vec::new();
    let mut matmul_s = 0.0;
    for (name, k, n, calls) in [
        ("qkv projection", d, (h + 2 * kvh) * hd, 1),
        ("attention output projection", h * hd, d, 1),
        ("FFN w1 and w3 (each)", d, f, 2),
        ("FFN w2", f, d, 1),
    ] {
        let x = Tensor::randn([tokens, k], (kind, device));
        let w = Tensor::randn([n, k], (kind, device)) / (k as f64).sqrt();
        let s = time_call(device, iters, || {
            let _ = x.linear(&w, None::<&Tensor>);
        });
        let per_forward = s * (calls * n_layers) as f64;
        matmul_s += per_forward;
        components.push(json!({
            "name": format!("{name} [{tokens}x{k}]x[{k}x{n}]"),
            "ms_per_call": s * 1e3,
            "tflops": 2.0 * (tokens * k * n) as f64 / s / 1e12,
            "calls_per_forward": calls * n_layers,
            "ms_per_forward": per_forward * 1e3,
        }));
    }
    let mut attention: Vec<(String, f64)> = Vec::new();
    let n_rep = h / kvh;
    for pref in ["default", "cudnn", "flash", "efficient"] {
        for native_gqa in [false, true] {
            let p: sdpa::Preference = pref.parse().map_err(anyhow::Error::msg)?;
            sdpa::prefer(p).map_err(anyhow::Error::msg)?;
            let inputs: Vec<(Tensor, Tensor, Tensor)> = groups
                .iter()
                .map(|&(r, s)| {
                    let kv_heads = if native_gqa { kvh } else { h };
                    (
                        Tensor::randn([r, h, s, hd], (kind, device)),
                        Tensor::randn([r, kv_heads, s, hd], (kind, device)),
                        Tensor::randn([r, kv_heads, s, hd], (kind, device)),
                    )
                })
                .collect();
            let run = || {
                for (q, k, v) in &inputs {
                    let _ = Tensor::scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        None::<&Tensor>,
                        0.0,
                        false,
                        Some(1.0 / (hd as f64).sqrt()),
                        native_gqa && n_rep > 1,
                    );
                }
            };
            let s = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| time_call(device, iters, run))) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let flops: f64 = groups.iter().map(|&(r, s)| 4.0 * (r * s * s * h * hd) as f64).sum();
            let name = attention_label(pref, native_gqa);
            components.push(json!({
                "name": name,
                "ms_per_call": s * 1e3,
                "tflops": flops / s / 1e12,
                "calls_per_forward": n_layers,
                "ms_per_forward": s * n_layers as f64 * 1e3,
            }));
            attention.push((name, s * n_layers as f64));
        }
    }
    sdpa::prefer(sdpa::Preference::Default).map_err(anyhow::Error::msg)?;
    // The refiner blocks, from the main block's figures: matmul time scales with tokens, attention
    // time with the sum over rows of the squared sequence length.
    let n_ref = cfg.n_refiner_layers;
    let half = rows / 2;
    let caption_tokens = if cap_len == uncond_len { rows * cap_len } else { half * (cap_len + uncond_len) };
    let caption_sq = if cap_len == uncond_len { rows * cap_len * cap_len } else { half * (cap_len * cap_len + uncond_len * uncond_len) };
    let main_sq: i64 = groups.iter().map(|(r, s)| r * s * s).sum();
    let matmul_scale = (n_layers * tokens + n_ref * (rows * n_img + caption_tokens)) as f64 / (n_layers * tokens) as f64;
    let attention_scale = (n_layers * main_sq + n_ref * (rows * n_img * n_img + caption_sq)) as f64 / (n_layers * main_sq) as f64;
    let matmul_s = matmul_s * matmul_scale;
    let wanted = attention_label(&first.attention.to_string(), first.kernels.native_gqa);
    let (used, attention_s) = attention
        .iter()
        .find(|(n, _)| *n == wanted)
        .cloned()
        .unwrap_or_else(|| (format!("{wanted}: failed"), 0.0));
    Ok(json!({
        "forward_ms": forward_s * 1e3,
        "components": components,
        "matmul_ms": matmul_s * 1e3,
        "attention_used": used,
        "attention_ms": attention_s * attention_scale * 1e3,
        "rest_ms": (forward_s - matmul_s - attention_s * attention_scale) * 1e3,
        "note": "matmul_ms and attention_ms cover every block: the main block's figures, refiners scaled by tokens (matmuls) and squared sequence lengths (attention); the rest is norms, RoPE, modulation, copies, embedders, the final layer and gaps",
    }))
}

/// A private temporary folder, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let p = std::env::temp_dir().join(format!("newbie-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compare_pytorch(args: &Args, script: &Path) -> Result<()> {
    let Setup { device, kind, cfg, lh, lw, n_img } = setup(args)?;
    let threads = args.threads.unwrap_or_else(tch::get_num_threads);
    let dir = ScratchDir::new()?;
    let (vs, model) = build_model(args, &cfg, device, kind)?;
    let weights_path = dir.path().join("weights.safetensors");
    let cpu_weights: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.to_device(Device::Cpu))).collect();
    Tensor::write_safetensors(&cpu_weights, &weights_path)?;
    drop(cpu_weights);
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;

    // CFG-shaped batch: row 0 with the full caption, row 1 shorter (padding exercised).
    let uncond_len = args.uncond_len.unwrap_or((args.cap_len / 2).max(1)).min(args.cap_len);
    tch::manual_seed(7);
    let x = Tensor::randn([2, cfg.in_channels, lh, lw], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0.3f32, 0.3]);
    let cap = Tensor::randn([2, args.cap_len, cfg.cap_feat_dim], (Kind::Float, Device::Cpu));
    let mask = Tensor::from_slice(
        &(0..2 * args.cap_len).map(|i| (i < args.cap_len || i - args.cap_len < uncond_len) as i64).collect::<Vec<_>>(),
    )
    .view([2, args.cap_len]);
    let pooled = Tensor::randn([2, cfg.clip_text_dim], (Kind::Float, Device::Cpu));
    let inputs_path = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("x", &x), ("t", &t), ("cap_feats", &cap), ("cap_mask", &mask), ("clip_pooled", &pooled)], &inputs_path)?;

    let (xd, td, cd, md, pd) =
        (x.to_device(device), t.to_device(device), cap.to_device(device), mask.to_device(device), pooled.to_device(device));
    for _ in 0..args.warmup.max(1) {
        let _ = model.forward(&xd, &td, &cd, &md, &pd)?;
    }
    sync(device);
    let mut times = Vec::with_capacity(args.iters);
    let mut out = None;
    for _ in 0..args.iters {
        let s = Instant::now();
        let v = model.forward(&xd, &td, &cd, &md, &pd)?;
        sync(device);
        times.push(s.elapsed().as_secs_f64() * 1e3);
        out = Some(v);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rust_median = times[times.len() / 2];
    let rust_mean = times.iter().sum::<f64>() / times.len() as f64;

    let out_path = dir.path().join("pytorch_out.safetensors");
    let py = Command::new(&args.python)
        .arg(script)
        .args(["--config", &cfg_path.display().to_string()])
        .args(["--weights", &weights_path.display().to_string()])
        .args(["--inputs", &inputs_path.display().to_string()])
        .args(["--out", &out_path.display().to_string()])
        .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.max(1).to_string()])
        .args(["--threads", &threads.to_string(), "--device", &args.device, "--precision", &args.precision])
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !py.status.success() {
        bail!("PyTorch script failed:\n{}", String::from_utf8_lossy(&py.stderr));
    }
    let stdout = String::from_utf8_lossy(&py.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or_else(|| anyhow!("no JSON from the script: {stdout}"))?;
    let pyres: serde_json::Value = serde_json::from_str(line)?;
    let py_median = pyres["ms_median"].as_f64().ok_or_else(|| anyhow!("no ms_median in {line}"))?;
    let py_out = loading::read_all(&[out_path])?.into_iter().find(|(k, _)| k == "velocity").ok_or_else(|| anyhow!("no velocity"))?.1;
    let ours = out.expect("iters >= 1").to_device(Device::Cpu);
    let max_diff = (&ours - &py_out).abs().max().double_value(&[]);
    let absmax = py_out.abs().max().double_value(&[]);

    let report = json!({
        "config": args.config.as_ref().map(|p| p.display().to_string()).unwrap_or(args.preset.clone()),
        "device": args.device, "precision": args.precision, "threads": threads,
        "batch_rows": 2, "latent": [cfg.in_channels, lh, lw], "image_tokens": n_img,
        "cap_len": args.cap_len, "uncond_len": uncond_len, "iters": args.iters,
        "rust_ms_median": rust_median, "rust_ms_mean": rust_mean,
        "pytorch_ms_median": py_median, "pytorch_ms_mean": pyres["ms_mean"],
        "ratio_rust_over_pytorch": rust_median / py_median,
        "output_max_abs_diff": max_diff, "output_absmax": absmax,
        "pytorch": pyres,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("forward pass, {} on {} in {}, {} threads: batch 2 (caption {} / {} tokens), latent {}x{} ({} image tokens), {} iterations",
            report["config"], args.device, args.precision, threads, args.cap_len, uncond_len, lh, lw, n_img, args.iters);
        println!("  farm-worker (tch)  {rust_median:8.3} ms median ({rust_mean:.3} mean)");
        println!("  PyTorch eager      {py_median:8.3} ms median ({} mean)", pyres["ms_mean"]);
        println!("  ratio rust/pytorch {:8.3}  (below 1 = this crate is faster)", rust_median / py_median);
        println!("  outputs agree to   {max_diff:.3e} max abs (output absmax {absmax:.3})");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _guard = tch::no_grad_guard();
    match &args.compare_pytorch {
        Some(script) => compare_pytorch(&args, script),
        None if !args.variants.is_empty() => variants_bench(&args),
        None if args.prepare_baseline => prepare_bench(&args),
        None => denoise_bench(&args),
    }
}
