//! Worker batching benchmark: images/s of the whole pipeline (text encoders, DiT with CFG, VAE) when
//! the same images are rendered one at a time and in batches, in one process, side by side.
//!
//! `batch-bench --preset tiny --device cpu --precision fp32 --size 256 --steps 8 --images 16 --batch 4`
//! prints images/s for batch 1 and for `--batch`, and their ratio. Every image has its own prompt and
//! seed; the text-encoding cache is warmed first so both runs measure rendering, not encoding.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use farm_worker::model::pipeline::{ImageRequest, Pipeline, PipelineOptions, Preset, RenderSettings};
use farm_worker::model::sampler::SampleParams;

#[derive(Parser, Debug)]
#[command(name = "batch-bench", about = "Images/s of the pipeline at batch 1 against a larger batch")]
struct Args {
    /// tiny or newbie-exp0.1 (random weights unless --model-dir).
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long)]
    model_dir: Option<std::path::PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Images rendered in each run (a multiple of --batch).
    #[arg(long, default_value_t = 16)]
    images: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// libtorch intra-op threads (CPU).
    #[arg(long)]
    threads: Option<i32>,
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    farm_worker::device::load_cuda_backend();
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let preset = Preset::parse(&a.preset).context("--preset must be tiny or newbie-exp0.1")?;
    let device = farm_worker::device::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    let kind = match a.precision.as_str() {
        "bf16" => tch::Kind::BFloat16,
        "fp16" => tch::Kind::Half,
        "fp32" => tch::Kind::Float,
        p => bail!("--precision {p}: bf16, fp16 or fp32"),
    };
    if a.batch == 0 || a.images % a.batch != 0 {
        bail!("--images must be a positive multiple of --batch");
    }
    let mut opts = PipelineOptions::new(preset);
    opts.model_dir = a.model_dir.clone();
    opts.device = device;
    opts.kind = kind;
    let mut p = Pipeline::load(&opts).map_err(|e| anyhow::anyhow!("{e}"))?;
    let reqs: Vec<ImageRequest> = (0..a.images)
        .map(|i| ImageRequest {
            prompt: format!("<character_1><n>girl_{i}</n><gender>1girl</gender></character_1>"),
            negative_prompt: String::new(),
            seed: 1000 + i as u64,
        })
        .collect();
    let settings = RenderSettings {
        width: a.size,
        height: a.size,
        sample: SampleParams { steps: a.steps, ..Default::default() },
    };
    let mut none = |_: usize, _: usize| Vec::new();
    // Warm-up: encodes every prompt once (cached) and runs the kernels at both batch sizes.
    for chunk in reqs.chunks(a.batch) {
        p.render(chunk, &settings, &mut none).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    p.render(&reqs[..1], &settings, &mut none).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut run = |batch: usize| -> Result<f64> {
        let t = Instant::now();
        for chunk in reqs.chunks(batch) {
            p.render(chunk, &settings, &mut none).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(a.images as f64 / t.elapsed().as_secs_f64())
    };
    let single = run(1)?;
    let batched = run(a.batch)?;
    let ratio = batched / single;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "preset": a.preset, "device": a.device, "precision": a.precision, "size": a.size,
                "steps": a.steps, "images": a.images, "batch": a.batch,
                "images_per_s_batch1": single, "images_per_s_batched": batched, "ratio": ratio,
            })
        );
    } else {
        println!("preset {} on {} ({}), {}x{} px, {} steps, {} images", a.preset, a.device, a.precision, a.size, a.size, a.steps, a.images);
        println!("batch 1: {single:.3} images/s");
        println!("batch {}: {batched:.3} images/s", a.batch);
        println!("ratio batch {} / batch 1: {ratio:.2}", a.batch);
    }
    Ok(())
}
