//! The whole text-to-image chain on the `tiny` preset (random weights, CPU).
//!
//! Batch independence is checked as "at most 1 LSB per channel": batching pads captions to a common
//! length and changes matrix shapes, which may move the last bits of f32 sums; a channel byte may
//! then round differently by one. Everything else that must be equal is compared exactly.

use farm_worker::model::pipeline::{
    ImageRequest, Pipeline, PipelineError, PipelineOptions, Preset, RenderSettings, RgbImage,
};
use farm_worker::model::sampler::{SampleParams, SamplerKind};
use tch::{Device, Kind};

fn tiny(kind: Kind) -> Pipeline {
    // The tiny model's tensors are too small to gain from intra-op threads; on a busy machine
    // spinning OpenMP workers only slow it down.
    tch::set_num_threads(1);
    let opts = PipelineOptions {
        preset: Preset::Tiny,
        model_dir: None,
        device: Device::Cpu,
        kind,
        offload_text_encoders: false,
        seed: 7,
        text_cache_size: 16,
    };
    Pipeline::load(&opts).expect("tiny pipeline")
}

fn settings(width: u32, height: u32, steps: usize) -> RenderSettings {
    RenderSettings {
        width,
        height,
        sample: SampleParams {
            steps,
            shift: 3.0,
            cfg_scale: 4.0,
            cfg_trunc: 1.0,
            renorm_cfg: 0.0,
            kind: SamplerKind::Euler,
        },
    }
}

fn req(prompt: &str, seed: u64) -> ImageRequest {
    ImageRequest { prompt: prompt.to_string(), negative_prompt: String::new(), seed }
}

fn render_all(p: &mut Pipeline, reqs: &[ImageRequest], s: &RenderSettings) -> Vec<RgbImage> {
    p.render(reqs, s, &mut |_, _| Vec::new())
        .expect("render")
        .into_iter()
        .map(|i| i.expect("not dropped"))
        .collect()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height, a.pixels.len()), (b.width, b.height, b.pixels.len()));
    a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn distinct_values(img: &RgbImage) -> usize {
    let mut seen = [false; 256];
    for &p in &img.pixels {
        seen[p as usize] = true;
    }
    seen.iter().filter(|&&s| s).count()
}

const A: &str = "1girl, solo, long hair, smile";
const B: &str = "<character_1><n>miku</n><gender>1girl</gender></character_1><general_tags><style>anime</style></general_tags>";
const C: &str = "a cat sitting on a windowsill at sunset";

#[test]
fn batch_of_three_non_square_images() {
    let mut p = tiny(Kind::Float);
    assert_eq!(p.model_name(), "tiny");
    assert_eq!(p.weights_hash().len(), 64);
    assert_eq!((p.device(), p.kind()), (Device::Cpu, Kind::Float));
    let s = settings(64, 96, 4);
    let mut calls = Vec::new();
    let out = p
        .render(&[req(A, 1), req(B, 2), req(C, 3)], &s, &mut |step, total| {
            calls.push((step, total));
            Vec::new()
        })
        .unwrap();
    assert_eq!(calls, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert_eq!(out.len(), 3);
    let imgs: Vec<RgbImage> = out.into_iter().map(Option::unwrap).collect();
    for img in &imgs {
        assert_eq!((img.width, img.height), (64, 96));
        assert_eq!(img.pixels.len(), 64 * 96 * 3);
        assert!(distinct_values(img) > 8, "image is (nearly) constant: {} values", distinct_values(img));
    }
    assert!(max_diff(&imgs[0], &imgs[1]) > 0 && max_diff(&imgs[1], &imgs[2]) > 0);
}

#[test]
fn same_seed_is_reproducible_and_other_seed_differs() {
    let mut p = tiny(Kind::Float);
    let s = settings(64, 96, 4);
    let first = render_all(&mut p, &[req(A, 11)], &s);
    let again = render_all(&mut p, &[req(A, 11)], &s);
    assert_eq!(first, again);
    // A second pipeline from the same weight seed gives the same pixels (and the same hash).
    let mut q = tiny(Kind::Float);
    assert_eq!(q.weights_hash(), p.weights_hash());
    assert_eq!(render_all(&mut q, &[req(A, 11)], &s), first);
    let other = render_all(&mut p, &[req(A, 12)], &s);
    assert!(max_diff(&first[0], &other[0]) > 8, "a different seed must change the image");
    // The prompt matters too.
    let other_prompt = render_all(&mut p, &[req(C, 11)], &s);
    assert!(max_diff(&first[0], &other_prompt[0]) > 0);
}

#[test]
fn batch_results_match_single_renders() {
    let s = settings(64, 96, 4);
    // Fresh pipelines, so that the single render encodes its prompt itself rather than reusing
    // the batch's cached encoding.
    let batch = render_all(&mut tiny(Kind::Float), &[req(A, 21), req(B, 22)], &s);
    let alone_a = render_all(&mut tiny(Kind::Float), &[req(A, 21)], &s);
    let alone_b = render_all(&mut tiny(Kind::Float), &[req(B, 22)], &s);
    let (da, db) = (max_diff(&batch[0], &alone_a[0]), max_diff(&batch[1], &alone_b[0]));
    assert!(da <= 1 && db <= 1, "batch vs single: {da} / {db} LSB");
}

#[test]
fn dropping_an_item_leaves_the_others_untouched() {
    let mut p = tiny(Kind::Float);
    let s = settings(64, 96, 4);
    let reqs = [req(A, 31), req(B, 32), req(C, 33)];
    let full = render_all(&mut p, &reqs, &s);
    let mut seen = Vec::new();
    let out = p
        .render(&reqs, &s, &mut |step, _| {
            seen.push(step);
            if step == 2 {
                vec![1]
            } else {
                Vec::new()
            }
        })
        .unwrap();
    assert_eq!(seen, vec![1, 2, 3, 4]);
    assert!(out[1].is_none());
    let (d0, d2) = (max_diff(out[0].as_ref().unwrap(), &full[0]), max_diff(out[2].as_ref().unwrap(), &full[2]));
    assert!(d0 <= 1 && d2 <= 1, "after a drop: {d0} / {d2} LSB");
    // Dropping everything returns no image at all.
    let none = p.render(&reqs, &s, &mut |_, _| vec![0, 1, 2]).unwrap();
    assert!(none.iter().all(Option::is_none));
}

#[test]
fn invalid_sizes_are_rejected() {
    let mut p = tiny(Kind::Float);
    for (w, h) in [(65, 96), (64, 100), (0, 64), (2048, 2048), (1024, 128)] {
        match p.render(&[req(A, 1)], &settings(w, h, 2), &mut |_, _| Vec::new()) {
            Err(PipelineError::Invalid(_)) => {}
            other => panic!("{w}x{h}: expected Invalid, got {other:?}"),
        }
    }
    assert!(matches!(
        p.render(&[req(A, 1)], &settings(64, 64, 0), &mut |_, _| Vec::new()),
        Err(PipelineError::Invalid(_))
    ));
    assert!(p.render(&[], &settings(64, 64, 2), &mut |_, _| Vec::new()).unwrap().is_empty());
}

#[test]
fn text_cache_hits_on_repeated_prompts() {
    let mut p = tiny(Kind::Float);
    let s = settings(32, 32, 1);
    assert_eq!(p.text_cache_stats(), (0, 0));
    render_all(&mut p, &[req(A, 1)], &s);
    // Prompt and empty negative, each for both encoders.
    assert_eq!(p.text_cache_stats(), (0, 4));
    render_all(&mut p, &[req(A, 2)], &s);
    assert_eq!(p.text_cache_stats(), (4, 4));
    // A new prompt misses for itself only; the empty negative stays cached.
    render_all(&mut p, &[req(C, 3), req(A, 4)], &s);
    assert_eq!(p.text_cache_stats(), (8, 6));
}

/// A 64x64 render of the tiny pipeline in `kind` gives a full image with varied pixels.
fn assert_renders_in(kind: Kind) {
    let mut p = tiny(kind);
    assert_eq!(p.kind(), kind);
    let img = render_all(&mut p, &[ImageRequest { prompt: A.into(), negative_prompt: "lowres, blurry".into(), seed: 5 }], &settings(64, 64, 4));
    assert_eq!(img[0].pixels.len(), 64 * 64 * 3);
    assert!(distinct_values(&img[0]) > 8);
}

#[test]
fn bf16_render_is_finite() {
    assert_renders_in(Kind::BFloat16);
}

/// fp16: Gemma runs in bf16 and its features reach the fp16 DiT through the f32 normalisation.
#[test]
fn fp16_render_is_finite() {
    assert_renders_in(Kind::Half);
}

#[test]
fn tiny_256_render_is_fast() {
    let mut p = tiny(Kind::Float);
    let s = settings(256, 256, 8);
    render_all(&mut p, &[req(A, 1)], &s);
    let t = std::time::Instant::now();
    render_all(&mut p, &[req(A, 2)], &s);
    let took = t.elapsed();
    eprintln!("tiny 256x256, 8 steps, one image: {took:?}");
    // About 1 s on one busy core; the bound only catches gross regressions.
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

#[test]
fn non_finite_latents_are_reported() {
    let mut p = tiny(Kind::Float);
    let mut s = settings(32, 32, 3);
    s.sample.cfg_scale = 1e38;
    match p.render(&[req(A, 1), req(C, 2)], &s, &mut |_, _| Vec::new()) {
        Err(PipelineError::Numerical(m)) => assert!(m.contains("[0, 1]"), "{m}"),
        other => panic!("expected Numerical, got {:?}", other.map(|v| v.len())),
    }
}

#[test]
fn random_newbie_preset_refuses_a_model_dir_for_tiny_and_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = PipelineOptions {
        preset: Preset::Tiny,
        model_dir: Some(dir.path().to_path_buf()),
        device: Device::Cpu,
        kind: Kind::Float,
        offload_text_encoders: false,
        seed: 0,
        text_cache_size: 4,
    };
    assert!(matches!(Pipeline::load(&opts), Err(PipelineError::Load(_))));
    opts.preset = Preset::NewbieExp01;
    match Pipeline::load(&opts) {
        Err(PipelineError::Load(m)) => assert!(m.contains("transformer"), "{m}"),
        other => panic!("expected Load, got {other:?}"),
    }
    assert!(matches!(Pipeline::load(&PipelineOptions { kind: Kind::Int, ..opts }), Err(PipelineError::Load(_))));
}

/// Writes a checkpoint folder in the published layout with tiny sizes and random weights, under
/// the real key prefixes.
mod layout {
    use std::collections::BTreeMap;
    use std::path::Path;

    use farm_worker::model::dit::{DitConfig, NextDit};
    use farm_worker::model::gemma3::{Gemma3Config, Gemma3TextModel};
    use farm_worker::model::jina::{JinaConfig, JinaTextModel};
    use farm_worker::model::vae::{VaeConfig, VaeDecoder};
    use tch::{nn, Device, Tensor};

    fn save(vs: &nn::VarStore, prefix: &str, path: &Path) {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let named: Vec<(String, Tensor)> = vars.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        Tensor::write_safetensors(&named, path).unwrap();
    }

    fn write_json(path: &Path, v: &serde_json::Value) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
    }

    /// A word-level `tokenizer.json` with the given special tokens first.
    fn tokenizer(path: &Path, specials: &[&str]) {
        let mut vocab = serde_json::Map::new();
        let words = ["1girl", "solo", "smile", "cat", "sunset", "lowres", "<unk>"];
        for (i, w) in specials.iter().chain(words.iter()).enumerate() {
            vocab.insert(w.to_string(), serde_json::json!(i));
        }
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        write_json(
            path,
            &serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
            }),
        );
    }

    pub fn write(root: &Path, jina_folder: &str) {
        let mut dit = DitConfig::tiny();
        dit.axes_lens = vec![256, 64, 64];
        let gemma = Gemma3Config { hidden_size: dit.cap_feat_dim, ..Gemma3Config::tiny() };
        let mut jina = JinaConfig::tiny();
        jina.text_config.embed_dim = dit.clip_text_dim;
        jina.hf_model_config_kwargs.hidden_size = dit.clip_text_dim;
        let vae = VaeConfig { block_out_channels: vec![8, 8, 16, 16], norm_num_groups: 4, layers_per_block: 1, ..VaeConfig::tiny() };

        tch::manual_seed(100);
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = NextDit::new(vs.root(), &dit).unwrap();
        NextDit::randomize(&vs, 101);
        save(&vs, "", &root.join("transformer/diffusion_pytorch_model.safetensors"));
        write_json(&root.join("transformer/config.json"), &serde_json::to_value(&dit).unwrap());

        let vs = nn::VarStore::new(Device::Cpu);
        let _m = Gemma3TextModel::new(&vs.root(), &gemma).unwrap();
        save(&vs, "language_model.model.", &root.join("text_encoder/model.safetensors"));
        write_json(&root.join("text_encoder/config.json"), &serde_json::json!({ "text_config": gemma }));
        tokenizer(&root.join("tokenizer/tokenizer.json"), &["<pad>", "<eos>", "<bos>"]);

        let vs = nn::VarStore::new(Device::Cpu);
        let _m = JinaTextModel::new(&vs.root(), &jina).unwrap();
        save(&vs, "text_model.transformer.roberta.", &root.join(jina_folder).join("model.safetensors"));
        let mut text_config = serde_json::to_value(&jina.text_config).unwrap();
        text_config["hf_model_config_kwargs"] = serde_json::to_value(&jina.hf_model_config_kwargs).unwrap();
        write_json(&root.join(jina_folder).join("config.json"), &serde_json::json!({ "text_config": text_config }));
        tokenizer(&root.join(jina_folder).join("tokenizer.json"), &["<s>", "<pad>", "</s>"]);

        let vs = nn::VarStore::new(Device::Cpu);
        let _m = VaeDecoder::new(&vs.root(), &vae).unwrap();
        save(&vs, "", &root.join("vae/diffusion_pytorch_model.safetensors"));
        write_json(&root.join("vae/config.json"), &serde_json::to_value(&vae).unwrap());
    }
}

#[test]
fn published_layout_loads_and_renders() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    layout::write(dir.path(), "clip_model");
    let opts = PipelineOptions {
        preset: Preset::NewbieExp01,
        model_dir: Some(dir.path().to_path_buf()),
        device: Device::Cpu,
        kind: Kind::Float,
        offload_text_encoders: false,
        seed: 0,
        text_cache_size: 8,
    };
    let mut p = Pipeline::load(&opts).expect("load the published layout");
    assert_eq!(p.model_name(), "newbie-exp0.1");
    let hash = p.weights_hash().to_string();
    assert_eq!(hash.len(), 64);
    let reqs = [
        ImageRequest { prompt: "1girl, solo, smile".into(), negative_prompt: "lowres".into(), seed: 3 },
        req("<character_1><n>cat</n></character_1>", 4),
    ];
    let s = settings(64, 48, 2);
    let imgs = render_all(&mut p, &reqs, &s);
    assert!(imgs.iter().all(|i| i.pixels.len() == 64 * 48 * 3 && distinct_values(i) > 8));

    // Offloaded text encoders (kept in host memory, moved for each encode) give the same pixels.
    let mut q = Pipeline::load(&PipelineOptions { offload_text_encoders: true, ..opts.clone() }).unwrap();
    assert_eq!(q.weights_hash(), hash);
    assert_eq!(render_all(&mut q, &reqs, &s), imgs);

    // The hash follows the files: a different VAE export changes it.
    let vae = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&vae).unwrap();
    let renamed: Vec<(String, tch::Tensor)> = tensors.into_iter().map(|(k, v)| (k, v.to_kind(Kind::Half))).collect();
    tch::Tensor::write_safetensors(&renamed, &vae).unwrap();
    let r = Pipeline::load(&opts).unwrap();
    assert_ne!(r.weights_hash(), hash);

    // The diffusers-style folder name for Jina is accepted; a missing VAE folder is named.
    let other = tempfile::tempdir().unwrap();
    layout::write(other.path(), "text_encoder_2");
    Pipeline::load(&PipelineOptions { model_dir: Some(other.path().to_path_buf()), ..opts.clone() }).unwrap();
    std::fs::remove_dir_all(other.path().join("vae")).unwrap();
    match Pipeline::load(&PipelineOptions { model_dir: Some(other.path().to_path_buf()), ..opts }) {
        Err(PipelineError::Load(m)) => assert!(m.contains("vae"), "{m}"),
        r => panic!("expected a Load error, got {r:?}"),
    }
}

/// CUDA checks; a no-op where libtorch sees no CUDA device. `FARM_GPU_FULL=1` adds a render with
/// the full-size `newbie-exp0.1` preset (random weights, about 17 GB of device memory).
#[test]
fn cuda_render_offload_and_out_of_memory() {
    farm_worker::device::load_cuda_backend();
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let cuda = Device::Cuda(0);
    let opts = |kind: Kind, offload: bool| PipelineOptions {
        preset: Preset::Tiny,
        model_dir: None,
        device: cuda,
        kind,
        offload_text_encoders: offload,
        seed: 7,
        text_cache_size: 16,
    };
    let s = settings(64, 96, 4);
    let reqs = [req(A, 41), req(B, 42)];

    // fp32 on the GPU against the CPU (kernels differ, so only closeness is expected).
    let mut gpu = Pipeline::load(&opts(Kind::Float, false)).unwrap();
    let on_gpu = render_all(&mut gpu, &reqs, &s);
    let on_cpu = render_all(&mut tiny(Kind::Float), &reqs, &s);
    // Checked at the end, so that a mismatch does not hide the other results.
    let means: Vec<f64> = on_gpu
        .iter()
        .zip(&on_cpu)
        .map(|(g, c)| {
            let mean = g.pixels.iter().zip(&c.pixels).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>() / g.pixels.len() as f64;
            eprintln!("cuda vs cpu fp32: max {} LSB, mean {mean:.3} LSB", max_diff(g, c));
            mean
        })
        .collect();
    // Same seed twice on the GPU, and offloaded text encoders, give the same pixels.
    assert_eq!(render_all(&mut gpu, &reqs, &s), on_gpu);
    let mut off = Pipeline::load(&opts(Kind::Float, true)).unwrap();
    assert_eq!(render_all(&mut off, &reqs, &s), on_gpu);

    // bf16 on the GPU: finite, structured images.
    let mut bf = Pipeline::load(&opts(Kind::BFloat16, false)).unwrap();
    for img in render_all(&mut bf, &reqs, &s) {
        assert!(distinct_values(&img) > 8);
    }

    if std::env::var("FARM_GPU_FULL").is_ok_and(|v| v == "1") {
        drop((off, bf));
        for offload in [false, true] {
            let t = std::time::Instant::now();
            let mut full = Pipeline::load(&PipelineOptions {
                preset: Preset::NewbieExp01,
                kind: Kind::BFloat16,
                ..opts(Kind::BFloat16, offload)
            })
            .unwrap();
            let load = t.elapsed();
            let s = RenderSettings { width: 1024, height: 1024, sample: SampleParams { steps: 8, ..SampleParams::default() } };
            for round in 0..2 {
                let t = std::time::Instant::now();
                let r = full.render(&[req(A, 1), req(B, 2)], &s, &mut |_, _| Vec::new());
                let took = t.elapsed();
                match r {
                    Ok(imgs) => eprintln!(
                        "newbie-exp0.1 random bf16 offload={offload}: load {load:?}, round {round}: 2 images 1024x1024 8 steps in {took:?}, distinct values {:?}",
                        imgs.iter().map(|i| distinct_values(i.as_ref().unwrap())).collect::<Vec<_>>()
                    ),
                    Err(e) => eprintln!("newbie-exp0.1 random bf16 offload={offload}: round {round}: {e} after {took:?}"),
                }
            }
            let (_, total, free) = farm_worker::device::describe(cuda);
            eprintln!("device memory in use after the renders: {:.1} GiB", (total - free) as f64 / (1u64 << 30) as f64);
        }
    }
    // Out of memory (last, since the caching allocator keeps what the hog held): take device
    // memory in chunks until none is left (cached blocks included), then ask for a large batch.
    let mut hog = Vec::new();
    for chunk in [1i64 << 30, 32 << 20] {
        while let Ok(t) = tch::Tensor::f_empty([chunk], (Kind::Uint8, cuda)) {
            hog.push(t);
        }
    }
    eprintln!("holding {} chunks", hog.len());
    let big: Vec<ImageRequest> = (0..48).map(|i| req(A, i)).collect();
    match gpu.render(&big, &settings(1024, 1024, 2), &mut |_, _| Vec::new()) {
        Err(PipelineError::OutOfMemory(m)) => eprintln!("out of memory reported: {m}"),
        other => panic!("expected OutOfMemory, got {:?}", other.map(|v| v.len())),
    }
    drop(hog);
    // The pipeline stays usable.
    assert_eq!(render_all(&mut gpu, &reqs, &s), on_gpu);
    assert!(means.iter().all(|m| *m < 2.0), "CUDA and CPU images differ by {means:?} LSB on average");
}

/// The attention-kernel measurement runs the pipeline's DiT under both orders, compares them and
/// leaves libtorch set to the one it chose (on the CPU both run the same kernel, so they agree
/// exactly and either may be chosen).
#[test]
fn attention_measurement_compares_both_orders_and_sets_the_choice() {
    use farm_worker::model::sdpa::{self, Backend, Preference};
    let p = tiny(Kind::Float);
    let (chosen, trials) = p.measure_attention(128, 16).unwrap();
    assert_eq!(trials.iter().map(|t| t.preference).collect::<Vec<_>>(), [Preference::Default, Preference::First(Backend::Cudnn)]);
    for t in &trials {
        assert!(t.agrees && t.deviation == 0.0 && t.median_s.is_some_and(|s| s > 0.0), "{t:?}");
    }
    assert!(chosen == Preference::Default || chosen == Preference::First(Backend::Cudnn));
    assert_eq!(sdpa::priority_order(), chosen.order(), "libtorch is left at the chosen order");
    // On the CPU the tuning itself measures nothing and keeps libtorch's order.
    let (kept, none) = p.tune_attention(128, 16).unwrap();
    assert_eq!((kept, none.len()), (Preference::Default, 0));
    assert_eq!(sdpa::priority_order(), sdpa::DEFAULT_ORDER.to_vec());
}
