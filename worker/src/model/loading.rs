//! Strict safetensors loading into a `tch::nn::VarStore`.
//!
//! tch's own loaders ignore unexpected keys and adopt the file's dtype. Here every tensor of the
//! checkpoint (one file, several shards, or a sharded index) is mapped to a model key, the key sets
//! are compared both ways, shapes are checked, and only then is data read, one tensor at a time
//! (never the whole file in memory), converted to the dtype and device of the model's variable.
//!
//! Key mapping, in order: the first matching prefix of [`LoadOptions::strip_prefixes`] is removed
//! (e.g. ComfyUI's `model.diffusion_model.`), then the [`LoadOptions::rename`] hook maps the key to a
//! [`KeyTarget`]: one model key, one part of a model key assembled from several file tensors (by
//! default concatenated along dim 0, e.g. diffusers' `to_q`/`to_k`/`to_v` into `qkv`; the
//! [`LoadOptions::combine`] hook can merge differently, e.g. a LoRA), or a deliberate skip.
//!
//! [`dit_diffusers_options`] is the diffusers `Lumina2Transformer2DModel` layout of the DiT
//! (spec §3 / [DF-conv]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{nn::VarStore, Device, Kind, TchError, Tensor};

/// Where one file tensor goes in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTarget {
    /// The whole model tensor of that name.
    Key(String),
    /// Part `index` of `count` parts that together form the model tensor `key`.
    Part { key: String, index: usize, count: usize },
    /// Not needed by the model (e.g. a vision tower); reported in [`LoadReport::skipped`].
    Skip,
}

/// Maps a (prefix-stripped) file key to its target.
pub type RenameFn = Arc<dyn Fn(&str) -> KeyTarget + Send + Sync>;
/// Builds a model tensor from its parts (in part order). Errors are reported with the key.
pub type CombineFn = Arc<dyn Fn(&str, Vec<Tensor>) -> Result<Tensor, String> + Send + Sync>;

/// How to read a checkpoint into a model.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Candidate key prefixes; the first one a key starts with is removed from it.
    pub strip_prefixes: Vec<String>,
    /// Key map applied after prefix stripping; `None` = identity.
    pub rename: Option<RenameFn>,
    /// How parts are merged; `None` = concatenation along dim 0.
    pub combine: Option<CombineFn>,
    /// Model keys that a checkpoint may lack (they keep the value set at construction).
    pub allow_missing: BTreeSet<String>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("strip_prefixes", &self.strip_prefixes)
            .field("rename", &self.rename.as_ref().map(|_| "<fn>"))
            .field("combine", &self.combine.as_ref().map(|_| "<fn>"))
            .field("allow_missing", &self.allow_missing)
            .finish()
    }
}

impl LoadOptions {
    pub fn with_strip_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.strip_prefixes.push(prefix.into());
        self
    }
}

/// What a successful load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub files: Vec<PathBuf>,
    /// Number of model tensors written.
    pub loaded: usize,
    /// File keys skipped by the rename hook.
    pub skipped: Vec<String>,
    /// Allowed-missing model keys that the checkpoint did not provide.
    pub missing_allowed: Vec<String>,
    /// Count of file tensors per stored dtype (e.g. `BF16`), before conversion.
    pub file_dtypes: BTreeMap<String, usize>,
    pub bytes_read: u64,
}

/// A shape that does not match the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub key: String,
    pub expected: Vec<i64>,
    pub found: Vec<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("checkpoint file not found: {}", .0.display())]
    NotFound(PathBuf),
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid safetensors file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: tensor {key} has unsupported dtype {dtype}", path.display())]
    UnsupportedDtype { path: PathBuf, key: String, dtype: String },
    #[error("{}: invalid shard index: {msg}", path.display())]
    Index { path: PathBuf, msg: String },
    #[error("no .safetensors file in {}", .0.display())]
    NoCheckpoint(PathBuf),
    #[error("model key {key} is provided twice (file keys {first} and {second})")]
    Duplicate { key: String, first: String, second: String },
    #[error("checkpoint keys do not match the model:\n{}", format_key_lists(missing, unexpected, incomplete))]
    KeyMismatch { missing: Vec<String>, unexpected: Vec<String>, incomplete: Vec<String> },
    #[error("checkpoint shapes do not match the model:\n{}", format_shapes(.0))]
    ShapeMismatch(Vec<ShapeMismatch>),
    #[error("combining the parts of {key}: {msg}")]
    Combine { key: String, msg: String },
    #[error("torch error while loading {key}: {source}")]
    Torch { key: String, source: tch::TchError },
}

const LIST_LIMIT: usize = 40;

fn format_list(title: &str, keys: &[String], out: &mut String) {
    if keys.is_empty() {
        return;
    }
    out.push_str(&format!("  {title} ({}):\n", keys.len()));
    for k in keys.iter().take(LIST_LIMIT) {
        out.push_str(&format!("    {k}\n"));
    }
    if keys.len() > LIST_LIMIT {
        out.push_str(&format!("    ... and {} more\n", keys.len() - LIST_LIMIT));
    }
}

fn format_key_lists(missing: &[String], unexpected: &[String], incomplete: &[String]) -> String {
    let mut s = String::new();
    format_list("missing from the checkpoint", missing, &mut s);
    format_list("unexpected in the checkpoint", unexpected, &mut s);
    format_list("incomplete multi-part tensors", incomplete, &mut s);
    s
}

fn format_shapes(m: &[ShapeMismatch]) -> String {
    let mut s = String::new();
    for x in m.iter().take(LIST_LIMIT) {
        s.push_str(&format!("    {}: model {:?}, checkpoint {:?}\n", x.key, x.expected, x.found));
    }
    if m.len() > LIST_LIMIT {
        s.push_str(&format!("    ... and {} more\n", m.len() - LIST_LIMIT));
    }
    s
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// Maps a safetensors dtype string to a tch kind.
pub fn kind_of_dtype(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::NotFound(path.to_path_buf())
        } else {
            LoadError::Io { path: path.to_path_buf(), source }
        }
    }
}

/// Reads the header of a safetensors file (no tensor data).
pub fn read_header(path: &Path) -> Result<Vec<TensorEntry>, LoadError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let fmt = |msg: String| LoadError::Format { path: path.to_path_buf(), msg };
    let mut len_buf = [0u8; 8];
    f.read_exact(&mut len_buf).map_err(|e| fmt(format!("short header: {e}")))?;
    let n = u64::from_le_bytes(len_buf);
    if n > file_len.saturating_sub(8) || n > 512 << 20 {
        return Err(fmt(format!("header length {n} exceeds the file ({file_len} bytes)")));
    }
    let mut hdr = vec![0u8; n as usize];
    f.read_exact(&mut hdr).map_err(io_err(path))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&hdr).map_err(|e| fmt(format!("header json: {e}")))?;
    let base = 8 + n;
    let mut out = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().ok_or_else(|| fmt(format!("{name}: no dtype")))?.to_string();
        let shape: Vec<i64> = v["shape"]
            .as_array()
            .ok_or_else(|| fmt(format!("{name}: no shape")))?
            .iter()
            .map(|d| d.as_i64().ok_or_else(|| fmt(format!("{name}: bad shape"))))
            .collect::<Result<_, _>>()?;
        let offs = v["data_offsets"].as_array().ok_or_else(|| fmt(format!("{name}: no data_offsets")))?;
        let (s, e) = match (offs.first().and_then(|x| x.as_u64()), offs.get(1).and_then(|x| x.as_u64())) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => return Err(fmt(format!("{name}: bad data_offsets"))),
        };
        let kind = kind_of_dtype(&dtype)
            .ok_or_else(|| LoadError::UnsupportedDtype { path: path.to_path_buf(), key: name.clone(), dtype: dtype.clone() })?;
        let numel: i64 = shape.iter().product();
        if (e - s) as i64 != numel * kind.elt_size_in_bytes() as i64 || base + e > file_len {
            return Err(fmt(format!("{name}: data range {s}..{e} does not fit shape {shape:?} {dtype} or the file")));
        }
        out.push(TensorEntry { name, dtype, kind, shape, start: base + s, end: base + e });
    }
    Ok(out)
}

/// Reads one tensor's data (CPU tensor of the stored dtype).
pub fn read_tensor(file: &mut File, path: &Path, e: &TensorEntry) -> Result<Tensor, LoadError> {
    let mut buf = vec![0u8; (e.end - e.start) as usize];
    file.seek(SeekFrom::Start(e.start)).map_err(io_err(path))?;
    file.read_exact(&mut buf).map_err(io_err(path))?;
    Tensor::f_from_data_size(&buf, &e.shape, e.kind).map_err(|source| LoadError::Torch { key: e.name.clone(), source })
}

/// Reads every tensor of the given files (small checkpoints, tests, goldens).
pub fn read_all(files: &[PathBuf]) -> Result<Vec<(String, Tensor)>, LoadError> {
    let mut out = Vec::new();
    for path in files {
        let entries = read_header(path)?;
        let mut f = File::open(path).map_err(io_err(path))?;
        for e in &entries {
            out.push((e.name.clone(), read_tensor(&mut f, path, e)?));
        }
    }
    Ok(out)
}

/// The safetensors files of a checkpoint given as a file, a `*.safetensors.index.json` shard index
/// (its `weight_map` values, relative to the index), or a folder (its index if there is one,
/// otherwise every `*.safetensors` in it, sorted).
pub fn resolve_checkpoint(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        let mut indexes = Vec::new();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io_err(path))? {
            let p = entry.map_err(io_err(path))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".safetensors.index.json") {
                indexes.push(p);
            } else if name.ends_with(".safetensors") {
                files.push(p);
            }
        }
        indexes.sort();
        files.sort();
        return match (indexes.first(), files.is_empty()) {
            (Some(index), _) => resolve_checkpoint(index),
            (None, false) => Ok(files),
            (None, true) => Err(LoadError::NoCheckpoint(path.to_path_buf())),
        };
    }
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let idx = |msg: String| LoadError::Index { path: path.to_path_buf(), msg };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| idx(e.to_string()))?;
        let map = v["weight_map"].as_object().ok_or_else(|| idx("no weight_map object".into()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = map
            .values()
            .map(|f| f.as_str().map(|s| dir.join(s)).ok_or_else(|| idx("weight_map value is not a string".into())))
            .collect::<Result<BTreeSet<_>, _>>()?
            .into_iter()
            .collect();
        files.sort();
        for f in &files {
            if !f.exists() {
                return Err(LoadError::NotFound(f.clone()));
            }
        }
        return Ok(files);
    }
    Ok(vec![path.to_path_buf()])
}

struct Source {
    file: usize,
    entry: TensorEntry,
}

/// Parts of one model tensor: part index -> (file key, where it is).
type Parts = BTreeMap<usize, (String, Source)>;

/// Loads `files` into the variables of `vs`, strictly (see the module docs). On error nothing useful
/// can be assumed about the variables' contents.
pub fn load_strict(vs: &mut VarStore, files: &[PathBuf], opts: &LoadOptions) -> Result<LoadReport, LoadError> {
    let mut report = LoadReport { files: files.to_vec(), ..Default::default() };
    // Model key -> parts (index, source); `count` per key for multi-part tensors.
    let mut groups: BTreeMap<String, (usize, Parts)> = BTreeMap::new();
    let mut duplicate: Option<LoadError> = None;
    for (fi, path) in files.iter().enumerate() {
        for entry in read_header(path)? {
            *report.file_dtypes.entry(entry.dtype.clone()).or_default() += 1;
            let stripped = opts
                .strip_prefixes
                .iter()
                .find_map(|p| entry.name.strip_prefix(p.as_str()))
                .unwrap_or(&entry.name)
                .to_string();
            let target = match &opts.rename {
                Some(f) => f(&stripped),
                None => KeyTarget::Key(stripped),
            };
            let (key, index, count) = match target {
                KeyTarget::Skip => {
                    report.skipped.push(entry.name.clone());
                    continue;
                }
                KeyTarget::Key(k) => (k, 0, 1),
                KeyTarget::Part { key, index, count } => (key, index, count),
            };
            let g = groups.entry(key.clone()).or_insert_with(|| (count, BTreeMap::new()));
            g.0 = g.0.max(count);
            if let Some((first, _)) = g.1.get(&index) {
                duplicate.get_or_insert(LoadError::Duplicate { key, first: first.clone(), second: entry.name.clone() });
                continue;
            }
            g.1.insert(index, (entry.name.clone(), Source { file: fi, entry }));
        }
    }
    if let Some(e) = duplicate {
        return Err(e);
    }

    let vars = vs.variables();
    let mut missing = Vec::new();
    for k in vars.keys() {
        if !groups.contains_key(k) {
            if opts.allow_missing.contains(k) {
                report.missing_allowed.push(k.clone());
            } else {
                missing.push(k.clone());
            }
        }
    }
    let mut unexpected: Vec<String> = groups.keys().filter(|k| !vars.contains_key(*k)).cloned().collect();
    let mut incomplete: Vec<String> = groups
        .iter()
        .filter(|(_, (count, parts))| parts.len() != *count || parts.keys().any(|i| i >= count))
        .map(|(k, (count, parts))| format!("{k}: {} of {count} parts", parts.len()))
        .collect();
    missing.sort();
    unexpected.sort();
    incomplete.sort();
    report.missing_allowed.sort();
    report.skipped.sort();
    if !missing.is_empty() || !unexpected.is_empty() || !incomplete.is_empty() {
        return Err(LoadError::KeyMismatch { missing, unexpected, incomplete });
    }

    // Shapes, before any data is read. Parts concatenated along dim 0 (the default combine) must add up.
    let mut shape_errors = Vec::new();
    for (key, (_, parts)) in &groups {
        let expected = vars[key].size();
        let found: Vec<i64> = if parts.len() == 1 {
            parts.values().next().map(|(_, s)| s.entry.shape.clone()).unwrap_or_default()
        } else if opts.combine.is_none() {
            let shapes: Vec<&Vec<i64>> = parts.values().map(|(_, s)| &s.entry.shape).collect();
            let tails_agree = shapes.iter().all(|s| !s.is_empty() && s[1..] == shapes[0][1..]);
            if tails_agree {
                let mut cat = shapes[0].clone();
                cat[0] = shapes.iter().map(|s| s[0]).sum();
                cat
            } else {
                shapes.iter().flat_map(|s| s.iter().copied().chain([-1])).collect()
            }
        } else {
            continue; // checked after combining
        };
        if found != expected {
            shape_errors.push(ShapeMismatch { key: key.clone(), expected, found });
        }
    }
    if !shape_errors.is_empty() {
        return Err(LoadError::ShapeMismatch(shape_errors));
    }

    let mut handles: HashMap<usize, File> = HashMap::new();
    for (key, (_, parts)) in groups {
        let mut tensors = Vec::with_capacity(parts.len());
        for (_, (_, src)) in parts {
            let path = &files[src.file];
            let f = match handles.entry(src.file) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(File::open(path).map_err(io_err(path))?),
            };
            report.bytes_read += src.entry.end - src.entry.start;
            tensors.push(read_tensor(f, path, &src.entry)?);
        }
        let tensor = if tensors.len() == 1 {
            tensors.pop().expect("one part")
        } else if let Some(c) = &opts.combine {
            c(&key, tensors).map_err(|msg| LoadError::Combine { key: key.clone(), msg })?
        } else {
            Tensor::f_cat(&tensors, 0).map_err(|source| LoadError::Torch { key: key.clone(), source })?
        };
        let mut var = vars[&key].shallow_clone();
        if tensor.size() != var.size() {
            return Err(LoadError::ShapeMismatch(vec![ShapeMismatch { key, expected: var.size(), found: tensor.size() }]));
        }
        // copy_ converts dtype and moves to the variable's device.
        tch::no_grad(|| var.f_copy_(&tensor)).map_err(|source| LoadError::Torch { key: key.clone(), source })?;
        report.loaded += 1;
    }
    Ok(report)
}

/// Resolves `path` with [`resolve_checkpoint`] and loads it with [`load_strict`].
pub fn load_checkpoint(vs: &mut VarStore, path: &Path, opts: &LoadOptions) -> Result<LoadReport, LoadError> {
    let files = resolve_checkpoint(path)?;
    load_strict(vs, &files, opts)
}

/// Prefix of DiT keys in ComfyUI single-file checkpoints.
pub const COMFYUI_DIT_PREFIX: &str = "model.diffusion_model.";

/// Options for the DiT in its original key names (the official release), also accepting ComfyUI's
/// `model.diffusion_model.` prefix.
pub fn dit_original_options() -> LoadOptions {
    LoadOptions::default().with_strip_prefix(COMFYUI_DIT_PREFIX)
}

/// Maps one diffusers `Lumina2Transformer2DModel` key (with NewBie's pooled path) to the original
/// `NextDiT_CLIP` name (spec §3 [DF-conv], [DF-PR]). Unknown keys are passed through unchanged, so
/// that the strict comparison reports them as unexpected.
pub fn dit_diffusers_key(key: &str) -> KeyTarget {
    const TOP: &[(&str, &str)] = &[
        ("time_caption_embed.caption_embedder.", "cap_embedder."),
        ("time_caption_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
        ("time_caption_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
        ("time_caption_embed.clip_text_pooled_proj.", "clip_text_pooled_proj."),
        ("time_caption_embed.time_text_embed.", "time_text_embed."),
        ("norm_out.linear_1.", "final_layer.adaLN_modulation.1."),
        ("norm_out.linear_2.", "final_layer.linear."),
    ];
    for (from, to) in TOP {
        if let Some(rest) = key.strip_prefix(from) {
            return KeyTarget::Key(format!("{to}{rest}"));
        }
    }
    for stack in ["noise_refiner.", "context_refiner.", "layers."] {
        let Some(rest) = key.strip_prefix(stack) else { continue };
        let Some((idx, inner)) = rest.split_once('.') else { continue };
        if idx.parse::<usize>().is_err() {
            continue;
        }
        let blk = format!("{stack}{idx}.");
        let qkv = |index: usize| KeyTarget::Part { key: format!("{blk}attention.qkv.weight"), index, count: 3 };
        const INNER: &[(&str, &str)] = &[
            ("attn.to_out.0.", "attention.out."),
            ("attn.norm_q.", "attention.q_norm."),
            ("attn.norm_k.", "attention.k_norm."),
            ("feed_forward.linear_1.", "feed_forward.w1."),
            ("feed_forward.linear_2.", "feed_forward.w2."),
            ("feed_forward.linear_3.", "feed_forward.w3."),
            ("norm1.linear.", "adaLN_modulation.1."),
            ("norm1.norm.", "attention_norm1."),
            ("norm1.", "attention_norm1."),
            ("norm2.", "attention_norm2."),
            ("ffn_norm1.", "ffn_norm1."),
            ("ffn_norm2.", "ffn_norm2."),
        ];
        match inner {
            "attn.to_q.weight" => return qkv(0),
            "attn.to_k.weight" => return qkv(1),
            "attn.to_v.weight" => return qkv(2),
            _ => {}
        }
        for (from, to) in INNER {
            if let Some(tail) = inner.strip_prefix(from) {
                return KeyTarget::Key(format!("{blk}{to}{tail}"));
            }
        }
    }
    KeyTarget::Key(key.to_string())
}

/// Options for a diffusers-layout `transformer/` folder of the DiT (also as a single file under
/// ComfyUI's prefix). `norm_final.weight` (unused by the forward pass) is dropped by the diffusers
/// converter and may therefore be missing.
pub fn dit_diffusers_options() -> LoadOptions {
    LoadOptions {
        rename: Some(Arc::new(dit_diffusers_key)),
        allow_missing: ["norm_final.weight".to_string()].into_iter().collect(),
        ..LoadOptions::default()
    }
    .with_strip_prefix(COMFYUI_DIT_PREFIX)
}

/// Chooses the DiT key layout of a checkpoint from its key names: diffusers if any key belongs to
/// `time_caption_embed.` (after the ComfyUI prefix), otherwise the original names.
pub fn dit_options_for(files: &[PathBuf]) -> Result<LoadOptions, LoadError> {
    for f in files {
        for e in read_header(f)? {
            let k = e.name.strip_prefix(COMFYUI_DIT_PREFIX).unwrap_or(&e.name);
            if k.starts_with("time_caption_embed.") {
                return Ok(dit_diffusers_options());
            }
        }
    }
    Ok(dit_original_options())
}

/// Loads a DiT checkpoint (file, shard index or folder; original, ComfyUI-prefixed or diffusers
/// names, detected from the keys) into the variables of a `NextDit` built in `vs`.
pub fn load_dit(vs: &mut VarStore, path: &Path) -> Result<LoadReport, LoadError> {
    let files = resolve_checkpoint(path)?;
    let opts = dit_options_for(&files)?;
    load_strict(vs, &files, &opts)
}

extern "C" {
    fn farm_pin_memory(t: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
}

/// A pinned (page-locked) copy of host tensor `t`, or `None` when pinning is not possible (no CUDA
/// runtime loaded).
pub fn pinned_copy(t: &Tensor) -> Option<Tensor> {
    // SAFETY: `t` is a live tensor for the duration of the call; a non-null result is a new
    // `at::Tensor` allocated for us, which the returned `Tensor` owns and frees.
    let p = unsafe { farm_pin_memory(t.as_ptr()) };
    (!p.is_null()).then(|| unsafe { Tensor::from_ptr(p) })
}

/// Host copies of a variable store's weights (pinned when a CUDA runtime is loaded) that its
/// variables can be switched to without a copy, or replaced with device copies of (one
/// host-to-device copy each). Modules built from the store hold handles to the same tensors, so
/// they follow. The weights are frozen, so the host copies stay valid: moving back to the host
/// copies nothing.
#[derive(Debug)]
pub struct HostWeights {
    vars: Vec<Tensor>,
    host: Vec<Tensor>,
}

impl HostWeights {
    /// Takes the host copies and points the variables at them (freeing whatever the variables held
    /// before, e.g. their device copies or unpinned host storage).
    pub fn new(vs: &VarStore) -> Result<Self, TchError> {
        let vars: Vec<Tensor> = vs.variables().into_values().collect();
        let mut host = Vec::with_capacity(vars.len());
        // One variable at a time, so that at most one extra copy exists at any moment.
        for v in &vars {
            let on_host = if v.device() == Device::Cpu { v.shallow_clone() } else { v.f_to_device(Device::Cpu)? };
            let h = pinned_copy(&on_host).unwrap_or(on_host);
            v.shallow_clone().f_set_data(&h)?;
            host.push(h);
        }
        Ok(Self { vars, host })
    }

    /// Points every variable at its host copy (`Device::Cpu`) or at a fresh copy on `device`. On an
    /// error (out of device memory) the variables moved so far stay moved; callers go back to the
    /// CPU, which cannot fail.
    pub fn to_device(&self, device: Device) -> Result<(), TchError> {
        for (v, h) in self.vars.iter().zip(&self.host) {
            let mut v = v.shallow_clone();
            if device == Device::Cpu {
                v.f_set_data(h)?;
            } else if v.device() != device {
                v.f_set_data(&h.f_to_device(device)?)?;
            }
        }
        Ok(())
    }
}

/// The weights of a model that can move between host and device memory: the variable store they
/// live in, when the model owns it, and the host copies taken at the first move (see
/// [`HostWeights`]). The text encoders hold one each.
#[derive(Debug, Default)]
pub struct MovableWeights {
    vars: Option<VarStore>,
    host: Option<HostWeights>,
}

impl MovableWeights {
    /// Weights that live in `vs`, which the model now owns.
    pub fn owning(vs: VarStore) -> Self {
        Self { vars: Some(vs), host: None }
    }

    /// Moves the weights to `device`. The first call takes host copies of the weights (pinned where
    /// a CUDA runtime is loaded); later moves to the device copy from them and moves back copy
    /// nothing. Fails for a model that does not own its variable store.
    pub fn to_device(&mut self, device: Device) -> Result<(), super::vae::WeightsError> {
        if self.host.is_none() {
            let vars = self.vars.as_ref().ok_or_else(|| {
                super::vae::WeightsError::Unsupported(
                    "moving a model that does not own its variable store (built with new)".into(),
                )
            })?;
            self.host = Some(HostWeights::new(vars)?);
        }
        self.host.as_ref().expect("taken above").to_device(device)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn model() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = root.sub("a").zeros("weight", &[3, 2]);
        let _ = root.sub("b").sub("qkv").zeros("weight", &[5, 2]);
        vs
    }

    fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let p = dir.join(name);
        Tensor::write_safetensors(tensors, &p).unwrap();
        p
    }

    fn val(vs: &VarStore, k: &str) -> Vec<f32> {
        Vec::<f32>::try_from(vs.variables()[k].flatten(0, -1)).unwrap()
    }

    #[test]
    fn loads_converts_dtype_and_strips_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([3, 2]);
        let q = Tensor::arange(10, (Kind::Float, Device::Cpu)).view([5, 2]);
        let f = write(
            dir.path(),
            "m.safetensors",
            &[("model.diffusion_model.a.weight", a.to_kind(Kind::BFloat16)), ("model.diffusion_model.b.qkv.weight", q.to_kind(Kind::Half))],
        );
        let mut vs = model();
        let r = load_strict(&mut vs, &[f], &dit_original_options()).unwrap();
        assert_eq!(r.loaded, 2);
        assert_eq!(r.file_dtypes.get("BF16"), Some(&1));
        assert_eq!(vs.variables()["a.weight"].kind(), Kind::Float);
        assert_eq!(val(&vs, "a.weight"), vec![0., 1., 2., 3., 4., 5.]);
        assert_eq!(val(&vs, "b.qkv.weight")[9], 9.0);
    }

    #[test]
    fn reports_missing_and_unexpected_keys_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "m.safetensors", &[("a.weight", Tensor::zeros([3, 2], (Kind::Float, Device::Cpu))), ("extra.bias", Tensor::zeros([1], (Kind::Float, Device::Cpu)))]);
        let mut vs = model();
        let err = load_strict(&mut vs, &[f], &LoadOptions::default()).unwrap_err();
        match &err {
            LoadError::KeyMismatch { missing, unexpected, .. } => {
                assert_eq!(missing, &vec!["b.qkv.weight".to_string()]);
                assert_eq!(unexpected, &vec!["extra.bias".to_string()]);
            }
            e => panic!("unexpected error {e}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("b.qkv.weight") && msg.contains("extra.bias"), "{msg}");
    }

    #[test]
    fn rejects_wrong_shapes_and_names_absent_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "m.safetensors", &[("a.weight", Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))), ("b.qkv.weight", Tensor::zeros([5, 2], (Kind::Float, Device::Cpu)))]);
        let mut vs = model();
        match load_strict(&mut vs, &[f], &LoadOptions::default()).unwrap_err() {
            LoadError::ShapeMismatch(m) => assert_eq!(m, vec![ShapeMismatch { key: "a.weight".into(), expected: vec![3, 2], found: vec![2, 3] }]),
            e => panic!("unexpected error {e}"),
        }
        let absent = dir.path().join("nope.safetensors");
        let err = load_strict(&mut vs, std::slice::from_ref(&absent), &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, LoadError::NotFound(_)));
        assert!(err.to_string().contains(&absent.display().to_string()));
        assert!(matches!(resolve_checkpoint(&absent), Err(LoadError::NotFound(_))));
    }

    #[test]
    fn concatenates_parts_from_sharded_index() {
        let dir = tempfile::tempdir().unwrap();
        let q = Tensor::arange(10, (Kind::Float, Device::Cpu)).view([5, 2]);
        write(dir.path(), "s1.safetensors", &[("a.weight", Tensor::ones([3, 2], (Kind::Float, Device::Cpu))), ("b.to_q", q.narrow(0, 0, 3))]);
        write(dir.path(), "s2.safetensors", &[("b.to_k", q.narrow(0, 3, 1)), ("b.to_v", q.narrow(0, 4, 1)), ("vision.x", Tensor::zeros([1], (Kind::Float, Device::Cpu)))]);
        let index = serde_json::json!({"metadata": {}, "weight_map": {"a.weight": "s1.safetensors", "b.to_q": "s1.safetensors", "b.to_k": "s2.safetensors", "b.to_v": "s2.safetensors", "vision.x": "s2.safetensors"}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let opts = LoadOptions {
            rename: Some(Arc::new(|k: &str| match k {
                "b.to_q" => KeyTarget::Part { key: "b.qkv.weight".into(), index: 0, count: 3 },
                "b.to_k" => KeyTarget::Part { key: "b.qkv.weight".into(), index: 1, count: 3 },
                "b.to_v" => KeyTarget::Part { key: "b.qkv.weight".into(), index: 2, count: 3 },
                k if k.starts_with("vision.") => KeyTarget::Skip,
                k => KeyTarget::Key(k.into()),
            })),
            ..Default::default()
        };
        let mut vs = model();
        let r = load_checkpoint(&mut vs, dir.path(), &opts).unwrap();
        assert_eq!(r.files.len(), 2);
        assert_eq!(r.skipped, vec!["vision.x".to_string()]);
        assert_eq!(val(&vs, "b.qkv.weight"), (0..10).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn diffusers_names_map_to_original() {
        let cases = [
            ("time_caption_embed.caption_embedder.1.weight", "cap_embedder.1.weight"),
            ("time_caption_embed.timestep_embedder.linear_2.bias", "t_embedder.mlp.2.bias"),
            ("layers.12.attn.to_out.0.weight", "layers.12.attention.out.weight"),
            ("context_refiner.1.norm1.weight", "context_refiner.1.attention_norm1.weight"),
            ("noise_refiner.0.norm1.norm.weight", "noise_refiner.0.attention_norm1.weight"),
            ("noise_refiner.0.norm1.linear.bias", "noise_refiner.0.adaLN_modulation.1.bias"),
            ("layers.0.feed_forward.linear_2.weight", "layers.0.feed_forward.w2.weight"),
            ("norm_out.linear_2.weight", "final_layer.linear.weight"),
            ("x_embedder.weight", "x_embedder.weight"),
        ];
        for (d, o) in cases {
            assert_eq!(dit_diffusers_key(d), KeyTarget::Key(o.into()), "{d}");
        }
        assert_eq!(
            dit_diffusers_key("layers.3.attn.to_v.weight"),
            KeyTarget::Part { key: "layers.3.attention.qkv.weight".into(), index: 2, count: 3 }
        );
    }
}

