//! Parity of the text encoders (Gemma 3, Jina CLIP v2) and the FLUX VAE decoder against the golden
//! reference tensors in `tests/fixtures/goldens/` (or the directory named by `FARM_GOLDENS_DIR`).
//!
//! Every size comes from the JSON sidecars and the tensors themselves, so another golden set with
//! other sizes, sequence lengths and batch sizes runs unchanged.
//!
//! fp32 tolerance (README of the goldens): `|a - b| <= 1e-4 + 1e-4 * |b|` on valid rows.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use farm_worker::model::gemma3::{self, Gemma3Config, Gemma3TextModel, PromptFormat, SYSTEM_PROMPT_TEXT};
use farm_worker::model::jina::{self, JinaConfig, JinaTextModel};
use farm_worker::model::loading::LoadError;
use farm_worker::model::tokenizer::{ByteTokenizer, TextTokenizer};
use farm_worker::model::vae::{self, VaeConfig, VaeDecoder, WeightsError};
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn goldens_dir() -> PathBuf {
    match std::env::var_os("FARM_GOLDENS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens"),
    }
}

fn golden(name: &str) -> PathBuf {
    goldens_dir().join(name)
}

fn sidecar(component: &str) -> serde_json::Value {
    let path = golden(&format!("{component}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("sidecar JSON")
}

fn read_io(component: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(golden(&format!("{component}_io.safetensors")))
        .expect("io file")
        .into_iter()
        .collect()
}

fn get<'a>(io: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    io.get(key)
        .unwrap_or_else(|| panic!("golden tensor {key} missing"))
}

/// Keeps the rows of `t` [B, L, ...] where `mask` [B, L] is 1, flattened to [N, rest].
fn valid_rows(t: &Tensor, mask: &Tensor) -> Tensor {
    let size = t.size();
    let rest: i64 = size[2..].iter().product();
    let flat = t.reshape([size[0] * size[1], rest]);
    let idx = mask.reshape([-1]).nonzero().squeeze_dim(1);
    flat.index_select(0, &idx)
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise (both cast to f32 on the CPU) and returns
/// the largest absolute difference.
fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(actual.size(), expected.size(), "{name}: shape");
    let a = actual.to_device(Device::Cpu).to_kind(Kind::Float);
    let b = expected.to_device(Device::Cpu).to_kind(Kind::Float);
    let diff = (&a - &b).abs();
    let bound = b.abs() * rtol + atol;
    let excess = (&diff - &bound).max().double_value(&[]);
    let max_diff = diff.max().double_value(&[]);
    assert!(
        excess <= 0.0,
        "{name}: max |a-b| = {max_diff:e} exceeds {atol:e} + {rtol:e}*|b| (worst excess {excess:e})"
    );
    max_diff
}

fn assert_close_f32(name: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    assert_close(name, actual, expected, 1e-4, 1e-4)
}

/// bf16 runs (weights and activations in bf16; norm statistics, RoPE and softmax in f32) against
/// the fp32 goldens. bf16 keeps 8 significand bits, so every stored weight and every layer output
/// carries a relative rounding error of up to 2^-9 ≈ 2e-3; over the 4 to 25 layers of these models
/// the errors add up like a random walk to about 1% of the signal (observed on the public set:
/// relative L2 error 1.2e-2 for the VAE, see the per-test output). Two bounds:
/// * relative L2 error `||a - b|| / ||b|| <= 4e-2`: ~3x the observed drift, while a wrong layer, norm
///   or mask moves the output by tens of percent;
/// * elementwise `|a - b| <= 0.3 + 0.05 |b|` for outputs of magnitude 1 to 10: single values may
///   drift several times the average, but not by O(1).
fn assert_close_bf16(name: &str, actual: &Tensor, expected: &Tensor) {
    let a = actual.to_device(Device::Cpu).to_kind(Kind::Float);
    let b = expected.to_device(Device::Cpu).to_kind(Kind::Float);
    let rel = (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]);
    let max_diff = assert_close(name, &a, &b, 0.3, 0.05);
    let used = ((&a - &b).abs() / (b.abs() * 0.05 + 0.3)).max().double_value(&[]);
    eprintln!(
        "{name}: bf16 relative L2 error {rel:.3e}, max |a-b| {max_diff:.3e}, {:.0}% of the elementwise bound",
        used * 100.0
    );
    assert!(rel <= 4e-2, "{name}: bf16 relative L2 error {rel:e} > 4e-2");
}

// ---------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------

fn vae_config() -> VaeConfig {
    serde_json::from_value(sidecar("vae")["config"].clone()).expect("vae config")
}

fn vae_fp32() -> VaeDecoder {
    VaeDecoder::load(
        &golden("vae_weights.safetensors"),
        &vae_config(),
        Device::Cpu,
        Kind::Float,
    )
    .expect("load VAE")
}

fn check_vae_decode(vae: &VaeDecoder, io: &HashMap<String, Tensor>) {
    let mut stages = BTreeMap::new();
    let decoded = vae.decode_inspect(get(io, "mid.vae_input"), &mut |name, t| {
        stages.insert(name.to_string(), t.shallow_clone());
    });
    let expected_stages: Vec<&String> = io.keys().filter(|k| k.starts_with("mid.")).collect();
    for key in expected_stages {
        let stage = &key["mid.".len()..];
        if stage == "vae_input" {
            continue;
        }
        let ours = stages.get(stage).unwrap_or_else(|| panic!("no stage {stage}"));
        assert_close_f32(key, ours, get(io, key));
    }
    assert_close_f32("out.decoded", &decoded, get(io, "out.decoded"));
}

#[test]
fn vae_decode_matches_golden_fp32() {
    let io = read_io("vae");
    let vae = vae_fp32();
    assert_close_f32(
        "mid.vae_input",
        &vae.unnormalize_latents(get(&io, "in.latent")),
        get(&io, "mid.vae_input"),
    );
    check_vae_decode(&vae, &io);

    let image = vae.decode_latents(get(&io, "in.latent"));
    assert_close_f32("decode_latents", &image, get(&io, "out.decoded"));
    let image01 = ((&image + 1.0) / 2.0).clamp(0.0, 1.0);
    assert_close_f32("out.image01", &image01, get(&io, "out.image01"));
}

#[test]
fn vae_config_from_sidecar_uses_newbie_constants() {
    let sc = sidecar("vae");
    let cfg = vae_config();
    assert_eq!(
        cfg.scaling_factor,
        sc["newbie_decode"]["scaling_factor"].as_f64().unwrap()
    );
    assert_eq!(cfg.shift_factor, sc["newbie_decode"]["shift_factor"].as_f64());
    let flux = VaeConfig::flux();
    assert_eq!((flux.scaling_factor, flux.shift_factor), (0.3611, Some(0.1159)));
    assert_eq!(flux.latent_channels, 16);
    assert!(!flux.use_post_quant_conv);
}

#[test]
fn vae_rgb8_matches_golden_image() {
    let io = read_io("vae");
    let vae = vae_fp32();
    let rgb = vae::to_rgb8(&vae.decode_latents(get(&io, "in.latent")));
    let expected = get(&io, "out.image01");
    let (b, c, h, w) = expected.size4().unwrap();
    assert_eq!(c, 3);
    assert_eq!(rgb.len(), b as usize);
    // Expected bytes from the golden [0,1] image as the reference converts it (`mul(255).byte()`),
    // laid out HWC; values within the fp32 tolerance of an integer may land one step away.
    let exp = (expected * 255.0)
        .trunc()
        .to_kind(Kind::Int64)
        .permute([0, 2, 3, 1])
        .contiguous();
    for (i, img) in rgb.iter().enumerate() {
        assert_eq!(img.len() as i64, h * w * 3);
        let ours = Tensor::from_slice(img).to_kind(Kind::Int64);
        let theirs = exp.get(i as i64).reshape([-1]);
        let worst = (ours - theirs).abs().max().int64_value(&[]);
        assert!(worst <= 1, "image {i}: byte difference {worst}");
    }
}

#[test]
fn rgb8_conversion_clamps_truncates_and_interleaves() {
    // One 2x2 image: R varies over pixels, G = -1 (black), B = +1 (white).
    let r = Tensor::from_slice(&[-2.0f32, 0.0, 0.5, 2.0]).reshape([1, 1, 2, 2]);
    let g = Tensor::full([1, 1, 2, 2], -1.0, (Kind::Float, Device::Cpu));
    let b = Tensor::full([1, 1, 2, 2], 1.0, (Kind::Float, Device::Cpu));
    let img = Tensor::cat(&[r, g, b], 1);
    let rgb = vae::to_rgb8(&img);
    // Truncated as the reference's `mul(255).byte()`: 0 -> 127.5 -> 127; 0.5 -> 191.25 -> 191.
    assert_eq!(rgb, vec![vec![0, 0, 255, 127, 0, 255, 191, 0, 255, 255, 0, 255]]);
    // A bf16 image is shifted in bf16, as the reference's autocast decode is: 1 - 2^-8 plus 1 rounds
    // to 2 (white), where f32 arithmetic gives 0.998 -> 254.
    let x = Tensor::full([1, 3, 1, 1], 1.0 - 2f64.powi(-8), (Kind::Float, Device::Cpu));
    assert_eq!(vae::to_rgb8(&x), vec![vec![254; 3]]);
    assert_eq!(vae::to_rgb8(&x.to_kind(Kind::BFloat16)), vec![vec![255; 3]]);
}

/// Writes the golden decoder weights under BFL names (with 1×1-conv attention weights) using the
/// map in the sidecar, then loads that file.
#[test]
fn vae_loads_bfl_names() {
    let sc = sidecar("vae");
    let cfg = vae_config();
    let json_map: BTreeMap<String, String> =
        serde_json::from_value(sc["bfl_key_map"].clone()).expect("bfl_key_map");
    assert_eq!(
        vae::bfl_key_map(&cfg),
        json_map,
        "generated BFL key map differs from the sidecar"
    );

    let weights = Tensor::read_safetensors(golden("vae_weights.safetensors")).unwrap();
    let renamed: Vec<(String, Tensor)> = weights
        .into_iter()
        .map(|(k, t)| {
            let bfl = json_map
                .get(&k)
                .unwrap_or_else(|| panic!("{k} not in map"))
                .clone();
            let t = if bfl.contains(".attn_1.") && t.dim() == 2 {
                t.unsqueeze(-1).unsqueeze(-1)
            } else {
                t
            };
            (bfl, t)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ae.safetensors");
    Tensor::write_safetensors(&renamed, &path).unwrap();

    let vae = VaeDecoder::load(&path, &cfg, Device::Cpu, Kind::Float).expect("load BFL file");
    check_vae_decode(&vae, &read_io("vae"));
}

#[test]
fn vae_loading_is_strict() {
    let cfg = vae_config();
    let weights = Tensor::read_safetensors(golden("vae_weights.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut missing = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect::<Vec<_>>();
    let dropped = missing.pop().unwrap().0;
    let path = dir.path().join("missing.safetensors");
    Tensor::write_safetensors(&missing, &path).unwrap();
    match VaeDecoder::load(&path, &cfg, Device::Cpu, Kind::Float) {
        Err(WeightsError::KeyMismatch { missing, unexpected }) => {
            assert_eq!(missing, vec![dropped]);
            assert!(unexpected.is_empty());
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }

    let mut extra = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect::<Vec<_>>();
    extra.push((
        "decoder.bogus.weight".to_string(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    // Encoder tensors are part of a full VAE file and must be skipped, not reported.
    extra.push((
        "encoder.conv_in.weight".to_string(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let path = dir.path().join("extra.safetensors");
    Tensor::write_safetensors(&extra, &path).unwrap();
    match VaeDecoder::load(&path, &cfg, Device::Cpu, Kind::Float) {
        Err(WeightsError::KeyMismatch { missing, unexpected }) => {
            assert!(missing.is_empty());
            assert_eq!(unexpected, vec!["decoder.bogus.weight".to_string()]);
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }
}

#[test]
fn vae_decode_bf16_within_tolerance() {
    let io = read_io("vae");
    let vae = VaeDecoder::load(
        &golden("vae_weights.safetensors"),
        &vae_config(),
        Device::Cpu,
        Kind::BFloat16,
    )
    .expect("load VAE bf16");
    let image = vae.decode_latents(get(&io, "in.latent"));
    assert_eq!(image.kind(), Kind::Float);
    assert_close_bf16("bf16 out.decoded", &image, get(&io, "out.decoded"));
}

// ---------------------------------------------------------------------------------------------
// Gemma 3
// ---------------------------------------------------------------------------------------------

fn gemma_config() -> Gemma3Config {
    serde_json::from_value(sidecar("gemma3")["config"].clone()).expect("gemma3 config")
}

fn gemma_load(path: &Path, kind: Kind) -> Gemma3TextModel {
    Gemma3TextModel::load(path, &gemma_config(), Device::Cpu, kind).expect("load Gemma 3")
}

/// Compares every hidden state (valid rows) and the caption feature `hidden_states[-2]`.
fn check_gemma(model: &Gemma3TextModel, io: &HashMap<String, Tensor>) {
    let ids = get(io, "in.input_ids");
    let mask = get(io, "in.attention_mask");
    let hs = model.hidden_states(ids, mask);
    assert_eq!(hs.len() as i64, gemma_config().num_hidden_layers + 1);
    for (i, h) in hs.iter().enumerate() {
        let key = format!("mid.hidden_states.{i}");
        if let Some(expected) = io.get(&key) {
            assert_close_f32(&key, &valid_rows(h, mask), &valid_rows(expected, mask));
        }
    }
    assert_close_f32(
        "out.last_hidden_state",
        &valid_rows(hs.last().unwrap(), mask),
        &valid_rows(get(io, "out.last_hidden_state"), mask),
    );
    let feature = model.forward(ids, mask);
    assert_close_f32(
        "out.hidden_states_m2",
        &valid_rows(&feature, mask),
        &valid_rows(get(io, "out.hidden_states_m2"), mask),
    );
}

#[test]
fn gemma3_hidden_states_match_golden_fp32() {
    let model = gemma_load(&golden("gemma3_weights.safetensors"), Kind::Float);
    check_gemma(&model, &read_io("gemma3"));
}

/// Offloading switches a loaded encoder's weights to host copies (`loading::HostWeights`); the
/// model must compute the same after it, and a model without its own variable store cannot move.
#[test]
fn gemma3_moved_to_host_copies_still_matches_golden() {
    let mut model = gemma_load(&golden("gemma3_weights.safetensors"), Kind::Float);
    model.to_device(Device::Cpu).expect("a loaded model owns its variables and can move");
    model.to_device(Device::Cpu).expect("moving again reuses the host copies");
    assert_eq!(model.device(), Device::Cpu);
    check_gemma(&model, &read_io("gemma3"));
    let mut unowned = Gemma3TextModel::random(&gemma_config(), Device::Cpu, Kind::Float, 1).unwrap();
    match unowned.to_device(Device::Cpu) {
        Err(e) => assert!(e.to_string().contains("does not own its variable store"), "{e}"),
        Ok(()) => panic!("a model built without its variable store moved"),
    }
}

/// The same weights under every supported key layout: no prefix (Gemma3TextModel), the newer
/// transformers prefix, and the original prefix next to vision-tower tensors that must be skipped.
#[test]
fn gemma3_loads_with_and_without_checkpoint_prefix() {
    let prefix = sidecar("gemma3")["checkpoint_key_prefix"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let weights = Tensor::read_safetensors(golden("gemma3_weights.safetensors")).unwrap();
    let io = read_io("gemma3");
    let dir = tempfile::tempdir().unwrap();
    for (name, new_prefix, extra) in [
        ("bare", "", false),
        ("new_names", "model.language_model.", true),
        ("original_with_vision", prefix.as_str(), true),
    ] {
        let mut tensors: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(k, t)| {
                let rest = k
                    .strip_prefix(prefix.as_str())
                    .expect("golden keys carry the prefix");
                (format!("{new_prefix}{rest}"), t.shallow_clone())
            })
            .collect();
        if extra {
            let z = Tensor::zeros([3], (Kind::Float, Device::Cpu));
            let vision = if new_prefix.starts_with("model.") {
                "model.vision_tower"
            } else {
                "vision_tower"
            };
            tensors.push((
                format!("{vision}.vision_model.post_layernorm.weight"),
                z.shallow_clone(),
            ));
            tensors.push(("multi_modal_projector.mm_soft_emb_norm.weight".into(), z));
        }
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        // Two shards, as in the real release.
        let half = tensors.len() / 2;
        Tensor::write_safetensors(&tensors[..half], sub.join("model-00001-of-00002.safetensors")).unwrap();
        Tensor::write_safetensors(&tensors[half..], sub.join("model-00002-of-00002.safetensors")).unwrap();
        let model = gemma_load(&sub, Kind::Float);
        check_gemma(&model, &io);
    }

    // A text-model key that is missing is an error, not a silently random weight.
    let partial: Vec<(String, Tensor)> = weights
        .iter()
        .filter(|(k, _)| !k.ends_with("layers.0.self_attn.q_norm.weight"))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let path = dir.path().join("partial.safetensors");
    Tensor::write_safetensors(&partial, &path).unwrap();
    match Gemma3TextModel::load(&path, &gemma_config(), Device::Cpu, Kind::Float) {
        Err(WeightsError::Load(LoadError::KeyMismatch { missing, .. })) => {
            assert_eq!(missing, vec!["layers.0.self_attn.q_norm.weight".to_string()])
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }
}

#[test]
fn gemma3_caption_feature_bf16_within_tolerance() {
    let model = gemma_load(&golden("gemma3_weights.safetensors"), Kind::BFloat16);
    let io = read_io("gemma3");
    let mask = get(&io, "in.attention_mask");
    let feature = model.forward(get(&io, "in.input_ids"), mask);
    assert_eq!(feature.kind(), Kind::BFloat16);
    assert_close_bf16(
        "gemma3 bf16 hidden_states_m2",
        &valid_rows(&feature, mask),
        &valid_rows(get(&io, "out.hidden_states_m2"), mask),
    );
}

#[test]
fn gemma3_config_layouts_resolve_to_the_same_layers() {
    // The golden config (transformers 5 layout) against its rule in the sidecar notes.
    let sc = sidecar("gemma3");
    let cfg = gemma_config();
    let pattern = sc["config_notes"]["sliding_window_pattern"].as_i64().unwrap();
    let layers = cfg.layer_attention().unwrap();
    for (i, l) in layers.iter().enumerate() {
        let full = (i as i64 + 1) % pattern == 0;
        assert_eq!(l.sliding_window.is_none(), full, "layer {i}");
    }

    // gemma-3-4b-it as published (transformers 4 layout: nested text_config, rope_scaling,
    // defaults for everything else) equals the preset.
    let released = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
            "eos_token_id": [1, 106],
            "pad_token_id": null
        },
        "vision_config": {"hidden_size": 1152}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, released.to_string()).unwrap();
    let parsed = Gemma3Config::from_json_file(&path).unwrap();
    let preset = Gemma3Config::gemma3_4b();
    assert_eq!(
        parsed.layer_attention().unwrap(),
        preset.layer_attention().unwrap()
    );
    for (a, b) in [
        (parsed.vocab_size, 262_208),
        (parsed.hidden_size, preset.hidden_size),
        (parsed.num_attention_heads, 8),
        (parsed.num_key_value_heads, 4),
        (parsed.head_dim, 256),
        (preset.num_hidden_layers, 34),
    ] {
        assert_eq!(a, b);
    }
    // The older key `type` in rope_scaling reads the same.
    let mut older = released.clone();
    older["text_config"]["rope_scaling"] = serde_json::json!({"factor": 8.0, "type": "linear"});
    std::fs::write(&path, older.to_string()).unwrap();
    let older = Gemma3Config::from_json_file(&path).unwrap();
    assert_eq!(older.layer_attention().unwrap(), parsed.layer_attention().unwrap());
    let l = preset.layer_attention().unwrap();
    assert_eq!(l.iter().filter(|a| a.sliding_window.is_none()).count(), 5);
    assert_eq!(l[5].rope_theta, 1e6);
    assert_eq!(l[5].rope_linear_factor, 8.0);
    assert_eq!(
        (l[0].rope_theta, l[0].rope_linear_factor, l[0].sliding_window),
        (1e4, 1.0, Some(1024))
    );
}

#[test]
fn gemma3_prompt_preparation() {
    let tok = ByteTokenizer::gemma(Gemma3Config::tiny().vocab_size as usize);
    let xml = "<character_1><n>a</n></character_1>";
    let plain = "1girl, solo";
    assert_eq!(PromptFormat::detect(xml), PromptFormat::Xml);
    assert_eq!(PromptFormat::detect(plain), PromptFormat::Text);
    // Markup after leading tags is XML too, as the renderer decides.
    assert_eq!(PromptFormat::detect("masterpiece, <character_1><n>a</n></character_1>"), PromptFormat::Xml);
    assert_eq!(
        gemma3::gemma_prompt_text(xml, PromptFormat::Xml),
        format!("You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start> {xml}")
    );
    assert_eq!(
        gemma3::gemma_prompt_text(plain, PromptFormat::Text),
        format!("You are an assistant designed to generate high-quality anime images with the highest degree of image-text alignment based on textual prompts. <Prompt Start> {plain}")
    );
    assert_eq!(gemma3::gemma_prompt_text("", PromptFormat::Text), "");

    let inputs = gemma3::gemma_inputs_for_prompts(&tok, &[plain, ""]).unwrap();
    let (b, l) = inputs.input_ids.size2().unwrap();
    assert_eq!(b, 2);
    let expected_len = 1 + SYSTEM_PROMPT_TEXT.len() + plain.len();
    assert_eq!(l as usize, expected_len.div_ceil(8) * 8);
    let lengths = Vec::<i64>::try_from(inputs.attention_mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
    assert_eq!(lengths, vec![expected_len as i64, 1]);
    let row0 = Vec::<i64>::try_from(inputs.input_ids.get(0)).unwrap();
    let row1 = Vec::<i64>::try_from(inputs.input_ids.get(1)).unwrap();
    assert_eq!(row0[0], 2, "BOS first");
    assert_eq!(
        row0[1..expected_len],
        tok.encode(&gemma3::gemma_prompt_text(plain, PromptFormat::Text))
            .unwrap()[..]
    );
    assert!(
        row0[expected_len..].iter().all(|&i| i == 0),
        "right padding with PAD"
    );
    assert_eq!(row1[0], 2);
    assert!(row1[1..].iter().all(|&i| i == 0), "empty negative = BOS only");

    // Capped at 512 tokens including BOS, and 512 is already a multiple of 8.
    let long = "x".repeat(2000);
    let inputs = gemma3::gemma_inputs(&tok, &[long.as_str()]).unwrap();
    assert_eq!(inputs.input_ids.size(), vec![1, gemma3::MAX_GEMMA_TOKENS as i64]);
    assert_eq!(inputs.attention_mask.sum(Kind::Int64).int64_value(&[]), 512);
}

/// The tiny preset runs end to end from random weights and the byte tokenizer.
#[test]
fn gemma3_tiny_runs_from_random_weights() {
    let cfg = Gemma3Config::tiny();
    let model = Gemma3TextModel::random(&cfg, Device::Cpu, Kind::Float, 7).unwrap();
    let tok = ByteTokenizer::gemma(cfg.vocab_size as usize);
    let inputs = gemma3::gemma_inputs_for_prompts(&tok, &["1girl, solo", ""]).unwrap();
    let feature = model.forward(&inputs.input_ids, &inputs.attention_mask);
    let (b, l) = inputs.input_ids.size2().unwrap();
    assert_eq!(feature.size(), vec![b, l, cfg.hidden_size]);
    assert!(bool::try_from(feature.isfinite().all()).unwrap());
    // A row's valid features do not depend on the padding added for the batch.
    let alone = gemma3::gemma_inputs_for_prompts(&tok, &[""]).unwrap();
    let single = model.forward(&alone.input_ids, &alone.attention_mask);
    assert_close_f32(
        "padding independence",
        &single.narrow(1, 0, 1),
        &feature.get(1).unsqueeze(0).narrow(1, 0, 1),
    );
}

// ---------------------------------------------------------------------------------------------
// Jina CLIP v2
// ---------------------------------------------------------------------------------------------

fn jina_config() -> JinaConfig {
    serde_json::from_value(sidecar("jina")).expect("jina config (text_config + hf_model_config_kwargs)")
}

fn jina_load(path: &Path, kind: Kind) -> JinaTextModel {
    JinaTextModel::load(path, &jina_config(), Device::Cpu, kind).expect("load Jina")
}

fn check_jina(model: &JinaTextModel, io: &HashMap<String, Tensor>) {
    let ids = get(io, "in.input_ids");
    let mask = get(io, "in.attention_mask");
    let pad = jina_config().hf_model_config_kwargs.pad_token_id;
    assert!(ids.ne(pad).to_kind(Kind::Int64).equal(mask), "mask = ids != pad");
    let trace = model.forward_trace(ids);
    let rows = |t: &Tensor| valid_rows(t, mask);
    assert_close_f32(
        "mid.embeddings",
        &rows(&trace.embeddings),
        &rows(get(io, "mid.embeddings")),
    );
    assert_close_f32("mid.emb_ln", &rows(&trace.emb_ln), &rows(get(io, "mid.emb_ln")));
    for (i, layer) in trace.layers.iter().enumerate() {
        let key = format!("mid.layers.{i}");
        if let Some(expected) = io.get(&key) {
            assert_close_f32(&key, &rows(layer), &rows(expected));
        }
    }
    assert_close_f32(
        "out.last_hidden_state",
        &rows(trace.layers.last().unwrap()),
        &rows(get(io, "out.last_hidden_state")),
    );
    assert_close_f32("out.text_embeds", &trace.pooled, get(io, "out.text_embeds"));
    assert_close_f32("forward", &model.forward(ids), get(io, "out.text_embeds"));
}

#[test]
fn jina_pooled_output_matches_golden_fp32() {
    let model = jina_load(&golden("jina_weights.safetensors"), Kind::Float);
    check_jina(&model, &read_io("jina"));
}

#[test]
fn jina_lora_merge_matches_golden_merged_weights() {
    let cfg = jina_config();
    let raw: BTreeMap<String, Tensor> = Tensor::read_safetensors(golden("jina_weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let merged = jina::merge_lora_weights(raw, cfg.lora_task_index().unwrap(), cfg.lora_scaling()).unwrap();
    assert!(merged.keys().all(|k| !k.contains(".parametrizations.")));
    let io = read_io("jina");
    let mut expected_keys: Vec<&str> = io.keys().filter_map(|k| k.strip_prefix("merged.")).collect();
    expected_keys.sort();
    assert!(!expected_keys.is_empty());
    for key in &expected_keys {
        let ours = merged
            .get(*key)
            .unwrap_or_else(|| panic!("merge produced no {key}"));
        assert_close_f32(key, ours, get(&io, &format!("merged.{key}")));
    }
    // Every LoRA-merged weight is covered by the helper tensors.
    let sc = sidecar("jina");
    let originals = sc["tensors"]["jina_weights.safetensors"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.strip_suffix(".parametrizations.weight.original"))
        .map(|m| format!("{m}.weight"))
        .collect::<Vec<_>>();
    let mut originals_sorted = originals.clone();
    originals_sorted.sort();
    assert_eq!(
        originals_sorted,
        expected_keys.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );

    // Without the adapter the base weights come back unchanged (and differ from the merged ones).
    let raw: BTreeMap<String, Tensor> = Tensor::read_safetensors(golden("jina_weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let base = jina::merge_lora_weights(
        raw.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(),
        None,
        1.0,
    )
    .unwrap();
    for key in &expected_keys {
        let module = key.strip_suffix(".weight").unwrap();
        let original = &raw[&format!("{module}.parametrizations.weight.original")];
        assert!(base[*key].equal(original));
        assert!(
            !merged[*key].allclose(original, 1e-3, 1e-3, false),
            "{key}: LoRA had no effect"
        );
    }
}

/// Pre-merged weights under the jina-embeddings-v3 prefix, next to the CLIP parts that the text
/// tower skips, load to the same outputs.
#[test]
fn jina_loads_premerged_weights_and_skips_vision() {
    let io = read_io("jina");
    let cfg = jina_config();
    let raw: BTreeMap<String, Tensor> = Tensor::read_safetensors(golden("jina_weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let merged = jina::merge_lora_weights(raw, cfg.lora_task_index().unwrap(), cfg.lora_scaling()).unwrap();
    let mut tensors: Vec<(String, Tensor)> = merged
        .into_iter()
        .map(|(k, t)| {
            (
                format!(
                    "roberta.{}",
                    k.strip_prefix("text_model.transformer.roberta.").unwrap()
                ),
                t,
            )
        })
        .collect();
    tensors.push((
        "logit_scale".into(),
        Tensor::ones([1], (Kind::Float, Device::Cpu)),
    ));
    tensors.push((
        "vision_model.norm.weight".into(),
        Tensor::ones([4], (Kind::Float, Device::Cpu)),
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    Tensor::write_safetensors(&tensors, &path).unwrap();
    check_jina(&jina_load(&path, Kind::Float), &io);

    // An adapter tensor missing from an un-merged checkpoint is reported for its module.
    let unmerged: Vec<(String, Tensor)> = Tensor::read_safetensors(golden("jina_weights.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !(k.contains("layers.1.mlp.fc1") && k.ends_with("lora_B")))
        .collect();
    let unmerged_path = dir.path().join("unmerged.safetensors");
    Tensor::write_safetensors(&unmerged, &unmerged_path).unwrap();
    match JinaTextModel::load(&unmerged_path, &cfg, Device::Cpu, Kind::Float) {
        Err(WeightsError::Load(LoadError::KeyMismatch { incomplete, .. })) => {
            assert_eq!(incomplete.len(), 1);
            assert!(
                incomplete[0].starts_with("encoder.layers.1.mlp.fc1.weight"),
                "{incomplete:?}"
            );
        }
        other => panic!("expected an incomplete LoRA weight, got {other:?}"),
    }

    // A stray encoder tensor is reported.
    tensors.push((
        "roberta.encoder.layers.0.mixer.extra.weight".into(),
        Tensor::ones([4], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, &path).unwrap();
    match JinaTextModel::load(&path, &cfg, Device::Cpu, Kind::Float) {
        Err(WeightsError::Load(LoadError::KeyMismatch {
            unexpected,
            missing,
            incomplete,
        })) => {
            assert!(missing.is_empty() && incomplete.is_empty());
            assert_eq!(
                unexpected,
                vec!["encoder.layers.0.mixer.extra.weight".to_string()]
            );
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }
}

#[test]
fn jina_pooled_output_bf16_within_tolerance() {
    let model = jina_load(&golden("jina_weights.safetensors"), Kind::BFloat16);
    let io = read_io("jina");
    let pooled = model.forward(get(&io, "in.input_ids"));
    assert_eq!(pooled.kind(), Kind::BFloat16);
    assert_close_bf16("jina bf16 text_embeds", &pooled, get(&io, "out.text_embeds"));
}

#[test]
fn jina_config_presets_and_released_layout() {
    let cfg = jina_config();
    let sc = sidecar("jina");
    assert_eq!(
        cfg.lora_task_index().unwrap(),
        Some(sc["derived"]["default_lora_task_index"].as_u64().unwrap() as usize)
    );
    assert_eq!(
        cfg.lora_scaling(),
        sc["derived"]["lora_scaling"].as_f64().unwrap()
    );
    assert_eq!(cfg.head_dim(), sc["derived"]["head_dim"].as_i64().unwrap());

    // jina-clip-v2's config.json: the encoder comes from jina-embeddings-v3, overridden by kwargs.
    let released = serde_json::json!({
        "architectures": ["JinaCLIPModel"],
        "text_config": {
            "embed_dim": 1024,
            "hf_model_name_or_path": "jinaai/jina-embeddings-v3",
            "default_lora_task": "retrieval.query",
            "default_instruction_task": null,
            "pooler_type": "mean_pooler",
            "proj_type": null,
            "proj_bias": false,
            "hf_model_config_kwargs": {
                "load_trained_adapters": false,
                "lora_adaptations": ["retrieval.query"],
                "lora_alpha": 4,
                "lora_rank": 4,
                "use_flash_attn": true
            }
        },
        "vision_config": {"embed_dim": 1024}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, released.to_string()).unwrap();
    let parsed = JinaConfig::from_clip_config_json(&path).unwrap();
    assert_eq!(parsed, JinaConfig::jina_clip_v2());
    let e = &parsed.hf_model_config_kwargs;
    assert_eq!(
        (
            e.hidden_size,
            e.num_hidden_layers,
            e.num_attention_heads,
            e.intermediate_size
        ),
        (1024, 24, 16, 4096)
    );
    assert_eq!((e.rotary_emb_base, e.vocab_size), (20_000.0, 250_002));
    assert_eq!(parsed.lora_scaling(), 1.0);
}

#[test]
fn jina_input_preparation() {
    let tok = ByteTokenizer::xlm_roberta(JinaConfig::tiny().hf_model_config_kwargs.vocab_size as usize);
    let ids = jina::jina_inputs(&tok, &["ab", ""]).unwrap();
    let body = tok.encode("ab").unwrap();
    assert_eq!(ids.size(), vec![2, 4]);
    assert_eq!(
        Vec::<i64>::try_from(ids.get(0)).unwrap(),
        vec![0, body[0], body[1], 2]
    );
    assert_eq!(Vec::<i64>::try_from(ids.get(1)).unwrap(), vec![0, 2, 1, 1]);
    let long = "y".repeat(5000);
    let ids = jina::jina_inputs(&tok, &[long.as_str()]).unwrap();
    assert_eq!(ids.size(), vec![1, jina::MAX_JINA_TOKENS as i64]);
    assert_eq!(
        ids.int64_value(&[0, jina::MAX_JINA_TOKENS as i64 - 1]),
        2,
        "</s> kept after truncation"
    );
}

#[test]
fn jina_tiny_runs_from_random_weights() {
    let cfg = JinaConfig::tiny();
    let model = JinaTextModel::random(&cfg, Device::Cpu, Kind::Float, 3).unwrap();
    let tok = ByteTokenizer::xlm_roberta(cfg.hf_model_config_kwargs.vocab_size as usize);
    let ids = jina::jina_inputs(&tok, &["<character_1>girl</character_1>", ""]).unwrap();
    let pooled = model.forward(&ids);
    assert_eq!(pooled.size(), vec![2, cfg.text_config.embed_dim]);
    assert!(bool::try_from(pooled.isfinite().all()).unwrap());
    // Padding does not change a row's pooled vector.
    let alone = model.forward(&jina::jina_inputs(&tok, &[""]).unwrap());
    assert_close_f32("padding independence", &alone, &pooled.narrow(0, 1, 1));
}

/// An image's pixels do not depend on the other latents decoded with it.
#[test]
fn vae_decode_is_batch_invariant() {
    let io = read_io("vae");
    let vae = vae_fp32();
    let z = get(&io, "in.latent");
    let alone = vae.decode_latents(z);
    let batch = vae.decode_latents(&Tensor::cat(&[&(z.flip([3]) * 0.5), z, &(z * 2.0)], 0));
    assert!(batch.narrow(0, 1, 1).equal(&alone));
    assert_eq!(vae::to_rgb8(&batch)[1], vae::to_rgb8(&alone)[0]);
}
