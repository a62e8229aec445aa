//! `farm submit`: stream prompt files to the coordinator as one job.
//!
//! A blocking reader thread walks the inputs through [`farm_proto::batch::BatchReader`], validates every
//! prompt with [`farm_proto::prompt::parse_prompt`] and the render limits, assigns seeds, and hands
//! [`PromptChunk`]s to the gRPC call through a bounded channel, so memory stays flat whatever the batch
//! size. The request stream only ends cleanly when the reader says the input is complete. When the
//! reader finds an invalid prompt it raises the abort signal; the request stream then yields the abort
//! marker (see [`SubmitCodec`]), which fails to encode and resets the HTTP/2 stream as an error, so the
//! coordinator, which stores a job only when the stream ends normally, stores nothing.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_proto::batch::{BatchFormat, BatchPrompt, BatchReader};
use farm_proto::limits;
use farm_proto::pb::{
    submit_job_request, Precision, PromptChunk, PromptIssue, PromptSpec, RenderParams, Sampler, SubmitHeader,
    SubmitEnd, SubmitJobRequest, SubmitJobResponse,
};
use farm_proto::prompt::{check_characters, parse_prompt, Diagnostic, PromptLimits};
use futures::StreamExt;
use indicatif::ProgressBar;
use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use crate::cli::{PrecisionArg, SamplerArg, SeedMode, SubmitArgs};
use crate::connect::{Service, MAX_MESSAGE_BYTES};
use crate::errors::{CliError, CliResult, ErrorKind};
use crate::output;
use crate::ui::Ui;

/// Messages are cut at this many encoded bytes even before `chunk_size` prompts.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Random seeds (and the random base of `increment`) are drawn from `0..RANDOM_SEED_RANGE`.
pub const RANDOM_SEED_RANGE: u64 = 1 << 32;

/// One input: a file or standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    /// The name used in error messages and sent as the prompts' `source`.
    pub fn display_name(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".into(),
            Input::File(p) => p.display().to_string(),
        }
    }
}

/// Expands the command-line paths: `-` is standard input, a directory stands for the batch files in it
/// (recursively, in name order, hidden files skipped, only names with a known batch extension).
pub fn expand_inputs(paths: &[PathBuf]) -> CliResult<Vec<Input>> {
    let mut out = Vec::new();
    let mut stdin_seen = false;
    for p in paths {
        if p.as_os_str() == "-" {
            if stdin_seen {
                return Err(CliError::usage("`-` (standard input) can be given only once"));
            }
            stdin_seen = true;
            out.push(Input::Stdin);
            continue;
        }
        let meta = std::fs::metadata(p).map_err(|e| CliError::usage(format!("{}: {e}", p.display())))?;
        if meta.is_dir() {
            let before = out.len();
            walk_dir(p, &mut out)?;
            if out.len() == before {
                return Err(CliError::usage(format!(
                    "{}: no batch files (.xml, .jsonl, .txt) in directory",
                    p.display()
                )));
            }
        } else {
            out.push(Input::File(p.clone()));
        }
    }
    Ok(out)
}

fn walk_dir(dir: &Path, out: &mut Vec<Input>) -> CliResult<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| CliError::usage(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk_dir(&p, out)?;
        } else if BatchFormat::from_path(&p).is_some() {
            out.push(Input::File(p));
        }
    }
    Ok(())
}

/// How prompts without their own seed get one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedPlan {
    pub mode: SeedMode,
    /// The seed of `fixed`, the base of `increment` (random when --seed was not given).
    pub base: u64,
}

impl SeedPlan {
    pub fn new(mode: SeedMode, seed: Option<u64>, rng: &mut impl Rng) -> Self {
        SeedPlan {
            mode,
            base: seed.unwrap_or_else(|| rng.gen_range(0..RANDOM_SEED_RANGE)),
        }
    }
    /// The seed of the prompt at 0-based position `index` in the submission, unless it sets its own.
    pub fn seed_for(&self, index: u64, own: Option<u64>, rng: &mut impl Rng) -> u64 {
        if let Some(s) = own {
            return s;
        }
        match self.mode {
            SeedMode::Fixed => self.base,
            SeedMode::Increment => self.base.wrapping_add(index),
            SeedMode::Random => rng.gen_range(0..RANDOM_SEED_RANGE),
        }
    }
}

/// Everything the streaming pass needs besides the inputs.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub header: SubmitHeader,
    pub seeds: SeedPlan,
    /// Negative prompt for prompts that do not set one.
    pub negative: Option<String>,
    /// Most prompts per message.
    pub chunk_size: usize,
    /// Most encoded bytes per message (approximate; a single larger prompt still goes alone).
    pub chunk_bytes: usize,
    /// Stop scanning after this many local errors.
    pub max_errors: usize,
    /// While the input is quiet (a slow generator on a pipe), an empty chunk goes out this often,
    /// so that the coordinator's limit between messages (`--submit-idle-timeout-s`, 60 s by
    /// default) does not end a submission that is still being read.
    pub keepalive: Duration,
}

/// Default [`SubmitOptions::keepalive`].
pub const KEEPALIVE: Duration = Duration::from_secs(15);

impl SubmitOptions {
    /// Builds the header and seed plan from the command-line flags.
    pub fn from_args(args: &SubmitArgs, inputs: &[Input], rng: &mut impl Rng) -> Self {
        let defaults = RenderParams {
            width: args.width.unwrap_or(0),
            height: args.height.unwrap_or(0),
            steps: args.steps.unwrap_or(0),
            cfg_scale: args.cfg_scale,
            cfg_trunc: args.cfg_trunc,
            renorm_cfg: args.renorm.unwrap_or(0.0),
            shift: args.shift.unwrap_or(0.0),
            sampler: match args.sampler {
                None => Sampler::Unspecified,
                Some(SamplerArg::Euler) => Sampler::Euler,
                Some(SamplerArg::Midpoint) => Sampler::Midpoint,
            } as i32,
            precision: match args.precision {
                None => Precision::Unspecified,
                Some(PrecisionArg::Bf16) => Precision::Bf16,
                Some(PrecisionArg::Fp16) => Precision::Fp16,
                Some(PrecisionArg::Fp32) => Precision::Fp32,
            } as i32,
            model: args.model.clone().unwrap_or_default(),
        };
        let name = args.name.clone().unwrap_or_else(|| match inputs.first() {
            Some(Input::File(p)) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Some(Input::Stdin) => "stdin".into(),
            None => String::new(),
        });
        SubmitOptions {
            header: SubmitHeader {
                name,
                idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
                priority: args.priority,
                defaults: Some(defaults),
                max_attempts: args.max_attempts.unwrap_or(0),
                validate_only: args.validate_only,
            },
            seeds: SeedPlan::new(args.seed_mode, args.seed, rng),
            negative: args.negative.clone(),
            chunk_size: args.chunk_size as usize,
            chunk_bytes: CHUNK_BYTES,
            max_errors: args.max_errors as usize,
            keepalive: KEEPALIVE,
        }
    }
}

/// What happened to a submission.
#[derive(Debug, Default)]
pub struct SubmitOutcome {
    /// The server's answer; `None` when the stream was aborted because of local errors.
    pub response: Option<SubmitJobResponse>,
    /// Problems found locally (the stream was aborted when non-empty).
    pub local_errors: Vec<PromptIssue>,
    /// Prompts read (and, when there were no local errors, sent).
    pub prompts: u64,
    /// Messages carrying prompts that were handed to the call.
    pub chunks: u64,
    pub elapsed_secs: f64,
    /// Local checking stopped at `--max-errors`, so the error count is not the total.
    pub stopped_at_max_errors: bool,
    /// Inputs whose reading stopped at a syntax error that breaks the file's structure: the rest of
    /// each was not checked.
    pub unread: Vec<String>,
    /// An input that could not be read, after earlier inputs had invalid prompts (reported with them).
    pub failure: Option<String>,
}

impl SubmitOutcome {
    /// Every error, local or from the server.
    pub fn errors(&self) -> Vec<&PromptIssue> {
        self.local_errors
            .iter()
            .chain(self.response.iter().flat_map(|r| r.errors.iter()))
            .collect()
    }
}

enum Feed {
    Chunk(PromptChunk),
    /// The input is complete and valid: the request stream may end.
    Done,
}

/// Counts bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The reader side of a submission; runs on a blocking thread.
struct Producer {
    inputs: Vec<Input>,
    opts: SubmitOptions,
    tx: mpsc::Sender<Feed>,
    abort: watch::Sender<bool>,
    bytes: Arc<AtomicU64>,
    progress: ProgressBar,
    started: Instant,
}

struct ProducerReport {
    errors: Vec<PromptIssue>,
    prompts: u64,
    sent: u64,
    chunks: u64,
    /// An I/O failure (not a validation problem).
    failure: Option<String>,
    /// The inputs held no prompt at all (named for the message); the call was aborted.
    empty: Option<String>,
    /// Checking stopped at `--max-errors`: the rest of the input was not read.
    stopped_at_max_errors: bool,
    /// Inputs whose reading stopped at a fatal syntax error.
    unread: Vec<String>,
}

impl Producer {
    fn run(self) -> ProducerReport {
        let mut report = ProducerReport {
            errors: Vec::new(),
            prompts: 0,
            sent: 0,
            chunks: 0,
            failure: None,
            empty: None,
            stopped_at_max_errors: false,
            unread: Vec::new(),
        };
        let limits = PromptLimits::default();
        let defaults = limits::with_defaults(
            self.opts
                .header
                .defaults
                .as_ref()
                .unwrap_or(&RenderParams::default()),
        );
        let mut rng = rand::thread_rng();
        let mut chunk = PromptChunk {
            prompts: Vec::with_capacity(self.opts.chunk_size),
        };
        let mut chunk_len = 0usize;
        let mut sending = true;
        // A slow input (a generator on a pipe) does not wait for a full chunk: a prompt that comes
        // a keep-alive interval after the last send goes out with the ones before it.
        let mut last_send = Instant::now();

        'inputs: for input in &self.inputs {
            let source = input.display_name();
            let reader: Box<dyn Read + Send> = match input {
                Input::Stdin => Box::new(std::io::stdin()),
                Input::File(p) => match File::open(p) {
                    Ok(f) => Box::new(f),
                    Err(e) => {
                        report.failure = Some(format!("{source}: {e}"));
                        break;
                    }
                },
            };
            let mut buf = BufReader::with_capacity(
                256 * 1024,
                Counting {
                    inner: reader,
                    bytes: self.bytes.clone(),
                },
            );
            let format = match input {
                Input::File(p) => BatchFormat::from_path(p),
                Input::Stdin => None,
            };
            let format = match format {
                Some(f) => f,
                None => match buf.fill_buf() {
                    Ok(head) => BatchFormat::sniff(head),
                    Err(e) => {
                        report.failure = Some(format!("{source}: {e}"));
                        break;
                    }
                },
            };
            for item in BatchReader::new(buf, format).without_validation() {
                let index = report.prompts;
                let bp = match item {
                    Ok(bp) => bp,
                    Err(e) => {
                        if e.in_prompt {
                            // An unreadable prompt record is still a prompt of the batch: the
                            // ones after it keep their numbers.
                            report.prompts += 1;
                        }
                        if e.fatal {
                            report.unread.push(source.clone());
                        }
                        report.errors.push(PromptIssue {
                            index,
                            line: e.line,
                            column: e.column,
                            code: if e.in_prompt { PROMPT_SYNTAX } else { BATCH_SYNTAX }.into(),
                            message: e.message.clone(),
                            source: source.clone(),
                            source_line: e.line,
                        });
                        if sending {
                            sending = false;
                            self.abort.send_replace(true);
                        }
                        if report.errors.len() >= self.opts.max_errors {
                            report.stopped_at_max_errors = true;
                            break 'inputs;
                        }
                        continue;
                    }
                };
                report.prompts += 1;
                if report.prompts > limits::MAX_PROMPTS_PER_JOB {
                    // Stop reading: the whole batch could never be one job.
                    report.errors.push(PromptIssue {
                        index,
                        code: "too_many_prompts".into(),
                        message: format!(
                            "more than {max} prompts: a job holds at most {max} prompts; split the batch into several jobs",
                            max = limits::MAX_PROMPTS_PER_JOB
                        ),
                        source: source.clone(),
                        source_line: bp.line,
                        ..Default::default()
                    });
                    self.abort.send_replace(true);
                    break 'inputs;
                }
                if let Some(issue) = validate(&bp, index, &source, &defaults, &limits) {
                    report.errors.push(issue);
                    if sending {
                        sending = false;
                        self.abort.send_replace(true);
                    }
                    if report.errors.len() >= self.opts.max_errors {
                        report.stopped_at_max_errors = true;
                        break 'inputs;
                    }
                    continue;
                }
                if !sending {
                    continue;
                }
                let spec = self.spec(bp, index, &source, &mut rng);
                let len = spec.encoded_len() + 4;
                if !chunk.prompts.is_empty()
                    && (chunk.prompts.len() >= self.opts.chunk_size
                        || chunk_len + len > self.opts.chunk_bytes)
                {
                    if !self.send(&mut chunk, &mut report) {
                        return report;
                    }
                    chunk_len = 0;
                    last_send = Instant::now();
                }
                chunk_len += len;
                chunk.prompts.push(spec);
                if last_send.elapsed() >= self.opts.keepalive {
                    if !self.send(&mut chunk, &mut report) {
                        return report;
                    }
                    chunk_len = 0;
                    last_send = Instant::now();
                }
            }
        }
        if report.failure.is_some() {
            self.abort.send_replace(true);
            return report;
        }
        if !sending || !report.errors.is_empty() {
            return report;
        }
        if report.prompts == 0 {
            let names: Vec<String> = self
                .inputs
                .iter()
                .map(|i| match i {
                    Input::File(p) => p.display().to_string(),
                    Input::Stdin => "standard input".to_string(),
                })
                .collect();
            report.empty = Some(names.join(", "));
            self.abort.send_replace(true);
            return report;
        }
        if !chunk.prompts.is_empty() && !self.send(&mut chunk, &mut report) {
            return report;
        }
        // Only now may the request stream end normally.
        let _ = self.tx.blocking_send(Feed::Done);
        self.update_progress(report.sent);
        report
    }

    fn spec(&self, bp: BatchPrompt, index: u64, source: &str, rng: &mut impl Rng) -> PromptSpec {
        PromptSpec {
            seed: Some(self.opts.seeds.seed_for(index, bp.seed, rng)),
            width: bp.width,
            height: bp.height,
            steps: bp.steps,
            cfg_scale: bp.cfg_scale,
            negative_prompt: bp
                .negative_prompt
                .or_else(|| self.opts.negative.clone())
                .unwrap_or_default(),
            source: source.to_string(),
            source_line: bp.line,
            text: bp.text,
        }
    }

    /// Hands a full chunk to the call; false when the call is gone (it failed or was aborted).
    fn send(&self, chunk: &mut PromptChunk, report: &mut ProducerReport) -> bool {
        let n = chunk.prompts.len();
        let full = std::mem::replace(
            chunk,
            PromptChunk {
                prompts: Vec::with_capacity(self.opts.chunk_size),
            },
        );
        if self.tx.blocking_send(Feed::Chunk(full)).is_err() {
            return false;
        }
        report.chunks += 1;
        report.sent += n as u64;
        self.update_progress(report.sent);
        true
    }

    fn update_progress(&self, sent: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        if self.progress.length().is_some() {
            self.progress.set_position(self.bytes.load(Ordering::Relaxed));
        }
        self.progress
            .set_message(format!("{sent} prompts, {:.0} prompts/s", sent as f64 / secs));
    }
}

/// Code of a syntax error in a batch file's own structure (outside any prompt record).
pub const BATCH_SYNTAX: &str = "batch_syntax";
/// Code of a prompt record the batch reader could not read (a bad attribute or JSON field, a
/// mismatched tag inside `<prompt>`, an over-long line): its line and column are file positions.
pub const PROMPT_SYNTAX: &str = "prompt_syntax";

/// Checks one prompt: the prompt language, then its effective size, steps and guidance.
fn validate(
    bp: &BatchPrompt,
    index: u64,
    source: &str,
    defaults: &RenderParams,
    limits: &PromptLimits,
) -> Option<PromptIssue> {
    let issue = |line: u32, column: u32, code: &str, message: String| PromptIssue {
        index,
        line,
        column,
        code: code.to_string(),
        message,
        source: source.to_string(),
        source_line: bp.line,
    };
    if let Err(d) = parse_prompt(&bp.text, limits) {
        return Some(issue(d.line, d.column, d.code, d.message));
    }
    if let Some(negative) = bp.negative_prompt.as_deref() {
        if let Err(d) = check_negative(negative, limits) {
            return Some(issue(d.line, d.column, d.code, d.message));
        }
    }
    let width = bp.width.unwrap_or(defaults.width);
    let height = bp.height.unwrap_or(defaults.height);
    if let Err(e) = limits::check_size(width, height) {
        return Some(issue(0, 0, "bad_size", e.0));
    }
    if let Err(e) = limits::check_steps(bp.steps.unwrap_or(defaults.steps)) {
        return Some(issue(0, 0, "bad_steps", e.0));
    }
    let cfg = bp.cfg_scale.unwrap_or(limits::cfg_scale(defaults));
    if let Err(e) = limits::check_guidance(cfg, limits::cfg_trunc(defaults), defaults.renorm_cfg, defaults.shift) {
        return Some(issue(0, 0, "bad_cfg", e.0));
    }
    None
}

/// Checks a negative prompt as the coordinator does: its length, then its characters.
fn check_negative(text: &str, limits: &PromptLimits) -> Result<(), Diagnostic> {
    if text.len() > limits.max_bytes {
        return Err(Diagnostic {
            line: 0,
            column: 0,
            code: "too_large",
            message: format!("negative prompt is {} bytes; the limit is {} bytes", text.len(), limits.max_bytes),
        });
    }
    check_characters(text).map_err(|d| Diagnostic { message: format!("negative prompt: {}", d.message), ..d })
}

/// Checks the job-wide defaults and `--negative` before anything is read.
pub fn check_defaults(opts: &SubmitOptions) -> CliResult<()> {
    let header = &opts.header;
    let d = limits::with_defaults(header.defaults.as_ref().unwrap_or(&RenderParams::default()));
    limits::check_params(&d).map_err(|e| CliError::invalid(format!("invalid job defaults: {e}")))?;
    if let Some(negative) = opts.negative.as_deref() {
        check_negative(negative, &PromptLimits::default())
            .map_err(|d| CliError::invalid(format!("--negative: {}", d.message)))?;
    }
    Ok(())
}

/// Path of the SubmitJob method.
pub const SUBMIT_PATH: &str = "/farm.v1.JobService/SubmitJob";
/// How long an aborted call may take to wind down before it is abandoned.
const ABORT_GRACE: Duration = Duration::from_secs(30);

/// Encodes SubmitJob requests; the abort marker (a request without `msg`, never valid on the wire)
/// fails to encode, which makes the HTTP/2 layer reset the stream with INTERNAL_ERROR.
///
/// Why not just drop the call: dropping resets the stream with CANCEL, and a tonic server reads a
/// CANCEL-reset request stream as a normal end of stream. An encoding error instead reaches the server as
/// a failed stream (`Code::Internal`), so a coordinator that stores a job only after a clean end of the
/// request stream stores nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitCodec;

/// Encoder half of [`SubmitCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitEncoder;

/// Decoder half of [`SubmitCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitDecoder;

impl Codec for SubmitCodec {
    type Encode = SubmitJobRequest;
    type Decode = SubmitJobResponse;
    type Encoder = SubmitEncoder;
    type Decoder = SubmitDecoder;
    fn encoder(&mut self) -> SubmitEncoder {
        SubmitEncoder
    }
    fn decoder(&mut self) -> SubmitDecoder {
        SubmitDecoder
    }
}

impl Encoder for SubmitEncoder {
    type Item = SubmitJobRequest;
    type Error = tonic::Status;
    fn encode(&mut self, item: SubmitJobRequest, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        if item.msg.is_none() {
            return Err(tonic::Status::aborted("submission aborted by the client"));
        }
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding a prompt chunk: {e}")))
    }
}

impl Decoder for SubmitDecoder {
    type Item = SubmitJobResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SubmitJobResponse>, tonic::Status> {
        SubmitJobResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the SubmitJob reply: {e}")))
    }
}

/// The marker that aborts the request stream (see [`SubmitCodec`]).
fn abort_marker() -> SubmitJobRequest {
    SubmitJobRequest { msg: None }
}

struct Feeder {
    rx: mpsc::Receiver<Feed>,
    keepalive: Duration,
    abort: watch::Receiver<bool>,
    finished: bool,
    /// Prompts sent so far, for the end marker.
    sent: u64,
}

/// Streams the inputs as one SubmitJob call. Local validation errors abort the call (nothing is
/// stored) and come back in [`SubmitOutcome::local_errors`]; a gRPC failure is an error.
pub async fn submit_stream(
    service: Service,
    inputs: Vec<Input>,
    opts: SubmitOptions,
    progress: ProgressBar,
) -> CliResult<SubmitOutcome> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<Feed>(4);
    let (abort_tx, abort_rx) = watch::channel(false);
    let bytes = Arc::new(AtomicU64::new(0));
    let header = SubmitJobRequest {
        msg: Some(submit_job_request::Msg::Header(opts.header.clone())),
    };
    let keepalive = opts.keepalive;
    let producer = Producer {
        inputs,
        opts,
        tx,
        abort: abort_tx,
        bytes,
        progress: progress.clone(),
        started,
    };
    let reader = tokio::task::spawn_blocking(move || producer.run());

    // The request stream ends normally only after `Done`. On abort (or when the reader vanished without
    // `Done`) it yields the abort marker at once, ahead of any queued chunk, and ends.
    let feeder = Feeder {
        rx,
        keepalive,
        abort: abort_rx.clone(),
        finished: false,
        sent: 0,
    };
    let chunks = futures::stream::unfold(feeder, |mut f| async move {
        if f.finished {
            return None;
        }
        let next = tokio::select! {
            biased;
            // An error only means the reader finished without aborting: the branch is then disabled.
            Ok(_) = f.abort.wait_for(|a| *a) => None,
            m = tokio::time::timeout(f.keepalive, f.rx.recv()) => match m {
                // The input is quiet: an empty chunk keeps the call alive.
                Err(_) => Some(SubmitJobRequest { msg: Some(submit_job_request::Msg::Chunk(PromptChunk::default())) }),
                Ok(m) => match m {
                Some(Feed::Chunk(c)) => {
                    f.sent += c.prompts.len() as u64;
                    Some(SubmitJobRequest { msg: Some(submit_job_request::Msg::Chunk(c)) })
                }
                // The end marker: without it the coordinator stores nothing.
                Some(Feed::Done) => Some(SubmitJobRequest {
                    msg: Some(submit_job_request::Msg::End(SubmitEnd { prompt_count: f.sent })),
                }),
                None => None,
                },
            },
        };
        match next {
            Some(req) => {
                if matches!(req.msg, Some(submit_job_request::Msg::End(_))) {
                    f.finished = true;
                }
                Some((req, f))
            }
            None => {
                f.finished = true;
                Some((abort_marker(), f))
            }
        }
    });
    let requests = futures::stream::once(async move { header }).chain(chunks);

    let mut call = Box::pin(async move {
        let mut grpc = tonic::client::Grpc::new(service)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
        grpc.client_streaming(
            tonic::Request::new(requests),
            PathAndQuery::from_static(SUBMIT_PATH),
            SubmitCodec,
        )
        .await
    });
    let mut abort_seen = abort_rx;
    let result = tokio::select! {
        r = &mut call => Some(r),
        // After an abort the call normally fails at once (its stream was reset); if it does not wind
        // down in time it is left to the process exit, which closes the connection.
        _ = async {
            if abort_seen.wait_for(|a| *a).await.is_ok() {
                tokio::time::sleep(ABORT_GRACE).await;
            } else {
                futures::future::pending::<()>().await;
            }
        } => None,
    };
    if result.is_none() {
        tokio::spawn(async move {
            let _ = call.await;
        });
    }
    let report = reader
        .await
        .map_err(|e| CliError::failure(format!("reader thread failed: {e}")))?;
    progress.finish_and_clear();
    let elapsed_secs = started.elapsed().as_secs_f64();
    // An unreadable input alone is a failure; after invalid prompts it is reported with them.
    if let Some(f) = &report.failure {
        if report.errors.is_empty() {
            return Err(CliError::failure(f.clone()));
        }
    }
    if let Some(names) = report.empty {
        return Err(CliError::invalid(format!("no prompts in {names}; nothing was submitted")));
    }
    let mut outcome = SubmitOutcome {
        response: None,
        local_errors: report.errors,
        stopped_at_max_errors: report.stopped_at_max_errors,
        prompts: report.prompts,
        chunks: report.chunks,
        elapsed_secs,
        unread: report.unread,
        failure: report.failure,
    };
    match result {
        _ if !outcome.local_errors.is_empty() => {
            // The call was aborted (or the server gave up first); the local errors explain why.
            Ok(outcome)
        }
        None => Err(CliError::failure("the submission was aborted")),
        Some(Ok(resp)) => {
            outcome.response = Some(resp.into_inner());
            Ok(outcome)
        }
        Some(Err(status)) => Err(CliError::from_submit_status(&status)),
    }
}

/// Runs `farm submit`: returns the job id (empty for --validate-only) after printing the outcome.
pub async fn run(service: Service, args: &SubmitArgs, ui: Ui) -> CliResult<Option<String>> {
    let inputs = expand_inputs(&args.files)?;
    let opts = SubmitOptions::from_args(args, &inputs, &mut rand::thread_rng());
    match stream_inputs(service, inputs, &opts, ui).await {
        Ok(outcome) => report(&outcome, &opts, ui),
        // With --json, every invalid-input exit prints the submission object: the problem that is
        // not about one prompt (invalid job defaults, inputs without prompts, a header the
        // coordinator refused) is its one error.
        Err(e) if ui.json && e.kind == ErrorKind::InvalidInput && !e.reported => {
            println!("{}", outcome_json(&request_problem(&e.message), &opts));
            Err(CliError::reported(e.kind, e.message))
        }
        Err(e) => Err(e),
    }
}

/// Code of an invalid request that is not about one prompt.
pub const INVALID_REQUEST: &str = "invalid_request";

/// An outcome whose one error is a problem of the whole request.
pub fn request_problem(message: &str) -> SubmitOutcome {
    SubmitOutcome {
        local_errors: vec![PromptIssue { code: INVALID_REQUEST.into(), message: message.to_string(), ..Default::default() }],
        ..Default::default()
    }
}

async fn stream_inputs(service: Service, inputs: Vec<Input>, opts: &SubmitOptions, ui: Ui) -> CliResult<SubmitOutcome> {
    check_defaults(opts)?;
    let total_bytes: Option<u64> = inputs
        .iter()
        .map(|i| match i {
            Input::File(p) => std::fs::metadata(p).ok().map(|m| m.len()),
            Input::Stdin => None,
        })
        .sum();
    let progress = match total_bytes {
        Some(len) => ui.bar(
            len,
            "{spinner} uploading [{bar:30}] {percent:>3}% {msg} ({elapsed})",
        ),
        None => ui.spinner("{spinner} uploading {msg} ({elapsed})"),
    };
    submit_stream(service, inputs, opts.clone(), progress).await
}

/// The `--json` object of a submission.
pub fn outcome_json(outcome: &SubmitOutcome, opts: &SubmitOptions) -> serde_json::Value {
    let resp = outcome.response.clone().unwrap_or_default();
    serde_json::json!({
        "job_id": if resp.job_id.is_empty() { serde_json::Value::Null } else { resp.job_id.clone().into() },
        "accepted": resp.accepted,
        "prompts": outcome.prompts,
        "duplicate": resp.duplicate,
        "validate_only": opts.header.validate_only,
        "seed_base": opts.seeds.base,
        "warnings": resp.warnings.iter().map(output::issue_json).collect::<Vec<_>>(),
        "errors": outcome.errors().iter().map(|i| output::issue_json(i)).collect::<Vec<_>>(),
        "stopped_at_max_errors": outcome.stopped_at_max_errors,
        "unread": outcome.unread,
        "failure": outcome.failure,
    })
}

/// Prints an outcome; errors become exit code 3.
pub fn report(outcome: &SubmitOutcome, opts: &SubmitOptions, ui: Ui) -> CliResult<Option<String>> {
    let errors = outcome.errors();
    let resp = outcome.response.clone().unwrap_or_default();
    if ui.json {
        println!("{}", outcome_json(outcome, opts));
    }
    if !errors.is_empty() {
        if !ui.json {
            for e in &errors {
                eprintln!("error: {}", format_error(e));
            }
            for source in &outcome.unread {
                eprintln!("note: reading {source} stopped at its syntax error; the rest of it was not checked");
            }
            if let Some(f) = &outcome.failure {
                eprintln!("error: {f}");
            }
        }
        let origin = if outcome.local_errors.is_empty() {
            "the coordinator rejected"
        } else {
            "found"
        };
        // Local checking stops at --max-errors: the count is then a lower bound.
        let stopped = if outcome.stopped_at_max_errors {
            format!(" (stopped after --max-errors {})", opts.max_errors)
        } else {
            String::new()
        };
        let msg = format!(
            "{origin} {} invalid prompt(s){stopped}; nothing was submitted",
            errors.len()
        );
        if !ui.json {
            eprintln!("{msg}");
        }
        // An input that could not be read is a failure (exit 1) even next to invalid prompts.
        let kind = if outcome.failure.is_some() { ErrorKind::Failure } else { ErrorKind::InvalidInput };
        return Err(CliError::reported(kind, msg));
    }
    if ui.chatty() {
        const SHOWN: usize = 20;
        for w in resp.warnings.iter().take(SHOWN) {
            eprintln!("warning: {}", output::format_issue(w));
        }
        if resp.warnings.len() > SHOWN {
            eprintln!("warning: ... and {} more", resp.warnings.len() - SHOWN);
        }
    }
    if opts.header.validate_only {
        if ui.chatty() {
            eprintln!(
                "{} prompts are valid (nothing stored: --validate-only)",
                outcome.prompts
            );
        }
        return Ok(None);
    }
    if !ui.json {
        println!("{}", resp.job_id);
        if ui.chatty() {
            let rate = outcome.prompts as f64 / outcome.elapsed_secs.max(1e-3);
            eprintln!(
                "{} job {} with {} prompts ({:.0} prompts/s)",
                if resp.duplicate { "existing" } else { "submitted" },
                resp.job_id,
                resp.accepted,
                rate
            );
        }
    }
    Ok(Some(resp.job_id))
}

/// A batch syntax error reads `FILE: line L, column C: MESSAGE`, and one inside a prompt record
/// `FILE: line L, column C: prompt #INDEX: MESSAGE [prompt_syntax]` (file positions); prompt
/// problems use [`output::format_issue`].
pub fn format_error(i: &PromptIssue) -> String {
    if i.code == BATCH_SYNTAX {
        format!(
            "{}: line {}, column {}: {}",
            i.source, i.line, i.column, i.message
        )
    } else if i.code == PROMPT_SYNTAX {
        format!(
            "{}: line {}, column {}: prompt #{}: {} [{}]",
            i.source, i.line, i.column, i.index, i.message, i.code
        )
    } else {
        output::format_issue(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn seed_modes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let inc = SeedPlan::new(SeedMode::Increment, Some(100), &mut rng);
        assert_eq!(inc.seed_for(0, None, &mut rng), 100);
        assert_eq!(inc.seed_for(7, None, &mut rng), 107);
        assert_eq!(inc.seed_for(7, Some(3), &mut rng), 3, "a prompt's own seed wins");

        let fixed = SeedPlan::new(SeedMode::Fixed, Some(42), &mut rng);
        assert_eq!(fixed.seed_for(0, None, &mut rng), 42);
        assert_eq!(fixed.seed_for(999, None, &mut rng), 42);
        assert_eq!(fixed.seed_for(999, Some(5), &mut rng), 5);

        let random = SeedPlan::new(SeedMode::Random, Some(1), &mut rng);
        let seeds: std::collections::HashSet<u64> =
            (0..100).map(|i| random.seed_for(i, None, &mut rng)).collect();
        assert!(seeds.len() > 95, "random seeds differ per prompt");
        assert!(seeds.iter().all(|s| *s < RANDOM_SEED_RANGE));
        assert_eq!(random.seed_for(0, Some(9), &mut rng), 9);

        // Without --seed, increment starts from a random base.
        let a = SeedPlan::new(SeedMode::Increment, None, &mut rng);
        let b = SeedPlan::new(SeedMode::Increment, None, &mut rng);
        assert_ne!(a.base, b.base);
        assert_eq!(a.seed_for(5, None, &mut rng), a.base + 5);
        let wrap = SeedPlan {
            mode: SeedMode::Increment,
            base: u64::MAX,
        };
        assert_eq!(wrap.seed_for(1, None, &mut rng), 0);
    }

    #[test]
    fn directories_expand_to_batch_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for f in ["b.jsonl", "a.txt", "sub/c.xml", ".hidden.txt", "notes.md"] {
            std::fs::write(dir.path().join(f), "x\n").unwrap();
        }
        let got = expand_inputs(&[dir.path().to_path_buf(), PathBuf::from("-")]).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|i| match i {
                Input::File(p) => p.strip_prefix(dir.path()).unwrap().display().to_string(),
                Input::Stdin => "-".into(),
            })
            .collect();
        assert_eq!(names, ["a.txt", "b.jsonl", "sub/c.xml", "-"]);
        assert_eq!(
            expand_inputs(&[dir.path().join("missing.txt")])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert!(expand_inputs(&[PathBuf::from("-"), PathBuf::from("-")]).is_err());
    }

    #[test]
    fn outcome_json_fields() {
        let opts = SubmitOptions {
            header: SubmitHeader::default(),
            seeds: SeedPlan {
                mode: SeedMode::Increment,
                base: 9,
            },
            negative: None,
            chunk_size: 10,
            chunk_bytes: CHUNK_BYTES,
            max_errors: 1,
            keepalive: KEEPALIVE,
        };
        let ok = SubmitOutcome {
            response: Some(SubmitJobResponse {
                job_id: "j".into(),
                accepted: 3,
                ..Default::default()
            }),
            prompts: 3,
            ..Default::default()
        };
        let v = outcome_json(&ok, &opts);
        assert_eq!(v["job_id"], "j");
        assert_eq!(v["accepted"], 3);
        assert_eq!(v["seed_base"], 9);
        assert_eq!(v["errors"].as_array().unwrap().len(), 0);
        assert!(report(&ok, &opts, Ui::silent()).is_ok());
        let bad = SubmitOutcome {
            local_errors: vec![PromptIssue {
                index: 4,
                code: "xml_syntax".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = outcome_json(&bad, &opts);
        assert!(v["job_id"].is_null());
        assert_eq!(v["errors"][0]["index"], 4);
        assert_eq!(v["errors"][0]["code"], "xml_syntax");
        assert_eq!(report(&bad, &opts, Ui::silent()).unwrap_err().exit_code(), 3);
    }

    #[test]
    fn header_from_flags() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "farm",
            "submit",
            "x.jsonl",
            "--width",
            "512",
            "--sampler",
            "midpoint",
            "--precision",
            "fp32",
            "--seed",
            "10",
            "--seed-mode",
            "fixed",
            "--max-attempts",
            "2",
            "--negative",
            "ugly",
        ])
        .unwrap();
        let crate::cli::Command::Submit(args) = cli.command else {
            panic!()
        };
        let inputs = vec![Input::File("dir/x.jsonl".into())];
        let opts = SubmitOptions::from_args(&args, &inputs, &mut rand::thread_rng());
        let d = opts.header.defaults.clone().unwrap();
        assert_eq!((d.width, d.height), (512, 0));
        assert_eq!(d.sampler, Sampler::Midpoint as i32);
        assert_eq!(d.precision, Precision::Fp32 as i32);
        assert_eq!(opts.header.name, "x.jsonl");
        assert_eq!(opts.header.max_attempts, 2);
        assert_eq!(
            opts.seeds,
            SeedPlan {
                mode: SeedMode::Fixed,
                base: 10
            }
        );
        assert_eq!(opts.negative.as_deref(), Some("ugly"));
        assert!(check_defaults(&opts).is_ok());
        let mut bad = opts.clone();
        bad.header.defaults.as_mut().unwrap().width = 500;
        assert_eq!(check_defaults(&bad).unwrap_err().exit_code(), 3);
        // `--negative` is checked as the coordinator checks every prompt's negative prompt.
        for negative in ["a\u{7}b".to_string(), "x".repeat(16 * 1024 + 1)] {
            let mut bad = opts.clone();
            bad.negative = Some(negative);
            let e = check_defaults(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 3);
            assert!(e.to_string().contains("--negative"), "{e}");
        }
        let mut fine = opts.clone();
        fine.negative = Some("x".repeat(16 * 1024));
        assert!(check_defaults(&fine).is_ok());
    }

    #[test]
    fn a_request_problem_is_one_error_of_the_submission_object() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let opts = SubmitOptions {
            header: SubmitHeader::default(),
            seeds: SeedPlan::new(SeedMode::Increment, Some(9), &mut rng),
            negative: None,
            chunk_size: 10,
            chunk_bytes: 1 << 20,
            max_errors: 20,
            keepalive: KEEPALIVE,
        };
        let v = outcome_json(&request_problem("no prompts in a.txt; nothing was submitted"), &opts);
        assert!(v["job_id"].is_null());
        assert_eq!(v["accepted"], 0);
        assert_eq!(v["errors"][0]["code"], INVALID_REQUEST);
        assert_eq!(v["errors"][0]["message"], "no prompts in a.txt; nothing was submitted");
        assert_eq!(v["errors"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn a_prompt_record_syntax_error_names_the_prompt() {
        let i = PromptIssue {
            index: 2,
            line: 9,
            column: 14,
            code: PROMPT_SYNTAX.into(),
            message: "closing tag </m> does not match <n> opened at line 9, column 5".into(),
            source: "a.xml".into(),
            source_line: 9,
        };
        assert_eq!(
            format_error(&i),
            "a.xml: line 9, column 14: prompt #2: closing tag </m> does not match <n> opened at line 9, column 5 [prompt_syntax]"
        );
        let structure = PromptIssue { code: BATCH_SYNTAX.into(), message: "no <batch> root element found".into(), ..i };
        assert_eq!(format_error(&structure), "a.xml: line 9, column 14: no <batch> root element found");
    }
}
