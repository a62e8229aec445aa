//! `farm-worker`: loads the NewBie pipeline once, keeps it resident, and renders what the coordinator
//! assigns until stopped (SIGTERM/SIGINT drain: the running batch finishes and uploads, queued tasks go
//! back, exit 0).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use farm_proto::pb::{Precision, RenderParams};
use farm_worker::device::parse_device;
use farm_worker::model::pipeline::{Pipeline, PipelineOptions, Preset};
use farm_worker::render::{ModelRenderer, RenderItem, Renderer, SyntheticRenderer};
use farm_worker::runtime::{coordinator_endpoint, run, Refused, RenderStalled, RunEnd, WorkerOptions};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    Bf16,
    Fp16,
    Fp32,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum RendererArg {
    /// The NewBie-image pipeline (default).
    Model,
    /// A deterministic pattern without a model, for control-plane load tests only (a prompt
    /// containing "[synthetic:nan]" fails its batch and one containing "[synthetic:hang]" hangs it,
    /// to exercise failure handling and the stall watchdog).
    Synthetic,
}

#[derive(Parser, Debug)]
#[command(name = "farm-worker", version, about = "GPU worker of the NewBie-image render farm")]
struct Args {
    /// Coordinator gRPC endpoint.
    #[arg(long, env = "FARM_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// PEM file of the CA that signed the coordinator's TLS certificate (for an https:// coordinator;
    /// without it the system's roots are trusted).
    #[arg(long, env = "FARM_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// Worker token (`farm-coordinator token create --role worker`).
    #[arg(long, env = "FARM_WORKER_TOKEN", value_parser = farm_worker::runtime::parse_token)]
    token: String,
    /// Model preset: newbie-exp0.1 (needs --model-dir) or tiny (random weights, for tests and demos).
    #[arg(long, default_value = "newbie-exp0.1")]
    model: String,
    /// Checkpoint directory in the published layout (transformer/, text_encoder/, clip_model/, vae/).
    #[arg(long, env = "FARM_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N (one process per GPU).
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Numerical precision of the model.
    #[arg(long, value_enum, default_value = "bf16")]
    precision: PrecisionArg,
    /// Most images rendered together in one batch.
    #[arg(long, default_value_t = 4)]
    max_batch: u32,
    /// Name shown in listings (default: host name and device).
    #[arg(long)]
    name: Option<String>,
    /// Keep the text encoders on the CPU between prompts (for 16 GB cards).
    #[arg(long)]
    offload_text_encoders: bool,
    /// Attention kernel tried first on CUDA: auto (measured after the model loads: libtorch's order
    /// against cuDNN first on one 1024x1024 forward pass, the faster one kept if its output agrees),
    /// default (libtorch's order: flash, efficient, math, cudnn), cudnn, flash, efficient or math.
    /// Inputs the chosen kernel cannot take run on the next one in libtorch's order. See
    /// worker/bench/README.md for measurements.
    #[arg(long, env = "FARM_ATTENTION_BACKEND", default_value = "auto")]
    attention_backend: farm_worker::model::sdpa::Preference,
    /// Renderer behind the worker.
    #[arg(long, value_enum, default_value = "model")]
    renderer: RendererArg,
    /// Simulated milliseconds per step of the synthetic renderer.
    #[arg(long, default_value_t = 0)]
    synthetic_step_ms: u64,
    /// Simulated milliseconds after the last step of the synthetic renderer (as a VAE decode).
    #[arg(long, default_value_t = 0)]
    synthetic_decode_ms: u64,
    /// Longest wait between reconnect attempts, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    max_backoff_ms: u64,
    /// Upload attempts per result; waits between them double from 1 s up to 30 s. After the last
    /// one the task goes back to the farm without charge (claimed again after 30 s) and is
    /// rendered again.
    #[arg(long, env = "FARM_UPLOAD_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    upload_attempts: u32,
    /// Longest drain after SIGTERM, in seconds: the running batch finishes and uploads, then the
    /// worker exits; past this it exits with what is left (those tasks go back to the farm without
    /// charge). Keep it below the grace period of the process manager. A second SIGTERM or Ctrl-C
    /// exits at once.
    #[arg(long, env = "FARM_DRAIN_TIMEOUT_S", default_value_t = 240)]
    drain_timeout_s: u64,
    /// Stall watchdog, in seconds: a batch that goes this long without finishing a denoising step
    /// (or its decode) is reported failed (charged, retryable elsewhere) and the worker drains and
    /// exits with status 3, for its supervisor to restart it; a wedged GPU cannot be recovered from
    /// inside the process. 0 turns the watchdog off (e.g. for the full model on a CPU).
    #[arg(long, env = "FARM_STALL_TIMEOUT_S", default_value_t = 600)]
    stall_timeout_s: u64,
    /// Skip the warm-up render at start.
    #[arg(long)]
    no_warmup: bool,
    /// Before connecting, check the model code against this golden directory on --device in
    /// --precision (see docs/verify.md); a failing node exits instead of joining.
    #[arg(long, env = "FARM_VERIFY_ON_START")]
    verify_on_start: Option<PathBuf>,
}

/// `farm-worker verify`: the numerical self-check on its own.
#[derive(Parser, Debug)]
#[command(name = "farm-worker verify", about = "Check the model code against a golden reference directory")]
struct VerifyArgs {
    /// Directory with <c>.json, <c>_weights.safetensors and <c>_io.safetensors for c in dit, gemma3, jina, vae.
    #[arg(long)]
    goldens: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the parameters.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Attention kernel tried first on CUDA (as `farm-worker --attention-backend`), so that the check
    /// covers the kernel the node renders with.
    #[arg(long, env = "FARM_ATTENTION_BACKEND", default_value = "default")]
    attention_backend: farm_worker::model::sdpa::Preference,
}

fn precision_kind(p: PrecisionArg) -> tch::Kind {
    match p {
        PrecisionArg::Bf16 => tch::Kind::BFloat16,
        PrecisionArg::Fp16 => tch::Kind::Half,
        PrecisionArg::Fp32 => tch::Kind::Float,
    }
}

/// Parses the device, turns TF32 off for fp32 on CUDA, loads the CUDA backend and checks the device exists.
fn verify_device(device: &str, precision: PrecisionArg) -> anyhow::Result<tch::Device> {
    let dev = parse_device(device).map_err(anyhow::Error::msg)?;
    if let tch::Device::Cuda(i) = dev {
        if matches!(precision, PrecisionArg::Fp32) {
            farm_worker::verify::disable_tf32_for_process();
        }
        farm_worker::device::load_cuda_backend();
        if !tch::Cuda::is_available() || i >= tch::Cuda::device_count() as usize {
            anyhow::bail!("--device {device}: no such CUDA device on this machine");
        }
    }
    Ok(dev)
}

fn verify_command() -> anyhow::Result<()> {
    let v = VerifyArgs::parse_from(std::env::args().skip(1));
    // Bad arguments exit 2, like clap's own refusals; 1 means a check failed.
    let usage = |e: String| -> ! {
        eprintln!("error: {e}");
        std::process::exit(2)
    };
    farm_worker::model::sdpa::prefer(v.attention_backend).unwrap_or_else(|e| usage(e));
    let device = verify_device(&v.device, v.precision).unwrap_or_else(|e| usage(e.to_string()));
    let report = match farm_worker::verify::verify_dir(&v.goldens, device, precision_kind(v.precision)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if v.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_table());
    }
    std::process::exit(if report.pass { 0 } else { 1 });
}

/// `--verify-on-start`: the self-check before joining; `Ok((true, now_ms))` on a pass.
fn start_check(dir: &std::path::Path, device: &str, precision: PrecisionArg) -> anyhow::Result<(bool, i64)> {
    let dev = verify_device(device, precision)?;
    let started = Instant::now();
    let report = farm_worker::verify::verify_dir(dir, dev, precision_kind(precision)).map_err(|e| anyhow::anyhow!("--verify-on-start: {e}"))?;
    if !report.pass {
        eprint!("{}", report.to_table());
        let failed: Vec<String> = report.failures().into_iter().map(|(c, t)| format!("{c} {t}")).collect();
        anyhow::bail!("numerical self-check against {} failed: {}; not joining", dir.display(), failed.join(", "));
    }
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    tracing::info!(goldens = %dir.display(), ms = started.elapsed().as_millis() as u64, "numerical self-check passed");
    Ok((true, now_ms))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "worker".into())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().nth(1).as_deref() == Some("verify") {
        return verify_command();
    }
    let a = Args::parse();
    // The coordinator's address and TLS settings are checked before the model loads.
    let ca_cert_pem = match &a.ca_cert {
        Some(p) => {
            let pem = std::fs::read_to_string(p).with_context(|| format!("--ca-cert {}: cannot read the CA certificate", p.display()))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                anyhow::bail!("--ca-cert {}: not a PEM certificate (no -----BEGIN CERTIFICATE----- block)", p.display());
            }
            Some(pem)
        }
        None => None,
    };
    coordinator_endpoint(&a.coordinator, ca_cert_pem.as_deref()).map_err(anyhow::Error::msg)?;
    // Set before the self-check, so that it checks the attention kernel the renders will use.
    farm_worker::model::sdpa::prefer(a.attention_backend).map_err(anyhow::Error::msg)?;
    tracing::info!(attention_backend = %a.attention_backend, "attention backend order set");
    // What the renders run with: the flag's order, or what `auto` measures (libtorch's order until then).
    let mut attention_in_use = match a.attention_backend {
        farm_worker::model::sdpa::Preference::Auto => farm_worker::model::sdpa::Preference::Default,
        fixed => fixed,
    };
    let mut verified = match &a.verify_on_start {
        Some(dir) => Some(start_check(dir, &a.device, a.precision)?),
        None => None,
    };
    farm_worker::device::load_cuda_backend();
    if a.max_batch == 0 || a.max_batch > 256 {
        anyhow::bail!("--max-batch must be between 1 and 256");
    }
    let precision = match a.precision {
        PrecisionArg::Bf16 => Precision::Bf16,
        PrecisionArg::Fp16 => Precision::Fp16,
        PrecisionArg::Fp32 => Precision::Fp32,
    };
    let mut renderer: Box<dyn Renderer> = match a.renderer {
        RendererArg::Synthetic => Box::new(SyntheticRenderer {
            step_ms: a.synthetic_step_ms,
            decode_ms: a.synthetic_decode_ms,
            model_name: a.model.clone(),
        }),
        RendererArg::Model => {
            let preset = Preset::parse(&a.model).with_context(|| format!("--model {}: expected newbie-exp0.1 or tiny", a.model))?;
            if preset == Preset::NewbieExp01 && a.model_dir.is_none() {
                anyhow::bail!("--model newbie-exp0.1 needs --model-dir DIR (the checkpoint in its published layout)");
            }
            let device = parse_device(&a.device).map_err(anyhow::Error::msg)?;
            if let tch::Device::Cuda(i) = device {
                if !tch::Cuda::is_available() || i >= tch::Cuda::device_count() as usize {
                    anyhow::bail!("--device {}: no such CUDA device on this machine", a.device);
                }
            }
            let kind = match precision {
                Precision::Fp16 => tch::Kind::Half,
                Precision::Fp32 => tch::Kind::Float,
                _ => tch::Kind::BFloat16,
            };
            let started = Instant::now();
            let pipeline = Pipeline::load(&PipelineOptions {
                preset,
                model_dir: a.model_dir.clone(),
                device,
                kind,
                offload_text_encoders: a.offload_text_encoders,
                seed: 0,
                text_cache_size: 1024,
            })
            .map_err(|e| anyhow::anyhow!("loading the model: {e}"))?;
            tracing::info!(model = %pipeline.model_name(), hash = %pipeline.weights_hash(), load_ms = started.elapsed().as_millis() as u64,
                           "model loaded and resident");
            if a.attention_backend == farm_worker::model::sdpa::Preference::Auto && device != tch::Device::Cpu {
                let started = Instant::now();
                match pipeline.tune_attention(1024, 256) {
                    Ok((chosen, trials)) => {
                        for t in &trials {
                            tracing::info!(candidate = %t.preference, ms = t.median_s.map(|s| s * 1e3), deviation = t.deviation,
                                           agrees = t.agrees, "attention kernel trial");
                        }
                        tracing::info!(attention_backend = %chosen, ms = started.elapsed().as_millis() as u64, "attention kernel chosen");
                        attention_in_use = chosen;
                        // The self-check ran under libtorch's order; check again under the one chosen.
                        if let (Some(dir), true) = (&a.verify_on_start, chosen != farm_worker::model::sdpa::Preference::Default) {
                            verified = Some(start_check(dir, &a.device, a.precision)?);
                        }
                    }
                    Err(e) => {
                        farm_worker::model::sdpa::prefer(farm_worker::model::sdpa::Preference::Default).map_err(anyhow::Error::msg)?;
                        tracing::warn!(error = %e, "measuring the attention kernels failed; libtorch's default order is kept");
                    }
                }
            }
            Box::new(ModelRenderer { pipeline, precision, device_label: a.device.clone() })
        }
    };
    if !a.no_warmup {
        let started = Instant::now();
        let params = RenderParams { width: 64, height: 64, steps: 1, cfg_scale: Some(5.0), cfg_trunc: Some(1.0), shift: 6.0, sampler: 1, ..Default::default() };
        let item = RenderItem { prompt: "warm-up".into(), negative_prompt: String::new(), seed: 0 };
        renderer.render(&[item], &params, &mut |_, _| Vec::new()).map_err(|e| anyhow::anyhow!("warm-up render failed: {e}"))?;
        tracing::info!(ms = started.elapsed().as_millis() as u64, "warm-up done");
    }
    let opts = WorkerOptions {
        attention_backend: attention_in_use.to_string(),
        coordinator: a.coordinator,
        token: a.token,
        name: a.name.unwrap_or_else(|| format!("{}/{}", host_name(), a.device)),
        max_batch: a.max_batch,
        max_backoff: Duration::from_millis(a.max_backoff_ms.max(100)),
        upload_attempts: a.upload_attempts,
        drain_timeout: Duration::from_secs(a.drain_timeout_s),
        verified,
        ca_cert_pem,
        stall_timeout: (a.stall_timeout_s > 0).then(|| Duration::from_secs(a.stall_timeout_s)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let end = rt.block_on(async move {
        let shutdown = async {
            stop_signal().await;
            tracing::info!("stop requested: draining (a second stop request exits at once)");
            tokio::spawn(async {
                stop_signal().await;
                tracing::warn!("second stop request: exiting without draining");
                // Without libtorch's exit-time teardown: a render may still be running.
                unsafe { libc::_exit(130) }
            });
        };
        run(opts, renderer, shutdown).await
    });
    // Plain exit would run libtorch's and CUDA's exit-time teardown under a GPU thread that is
    // still rendering (a drain that timed out) or stuck (a stall), which can wait for it for ever.
    match end {
        Ok(RunEnd::Drained) => Ok(()),
        Ok(RunEnd::GpuBusy) => unsafe { libc::_exit(0) },
        Err(e) => {
            if let Some(stalled) = e.downcast_ref::<RenderStalled>() {
                tracing::error!("{stalled}; exiting with status 3");
                unsafe { libc::_exit(3) }
            }
            // Any other end of the session (the coordinator refused the worker at a reconnect,
            // say) can come while a batch is rendering: the same unsafe teardown applies.
            eprintln!("Error: {e:?}");
            let status = if e.downcast_ref::<Refused>().is_some() { Refused::EXIT_STATUS } else { 1 };
            unsafe { libc::_exit(status) }
        }
    }
}

/// The next SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
