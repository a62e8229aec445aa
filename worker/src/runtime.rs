//! The worker runtime: one OS thread owns the renderer (and so the model on its device); an async
//! controller on tokio holds the session with the coordinator. Bounded channels join them.
//!
//! * Credits: the controller asks for at most `2 x max_batch` tasks beyond what it holds, so one batch
//!   renders while the next waits.
//! * Batching: queued tasks of one shape (equal `RenderParams`) go to the GPU thread together, up to the
//!   current batch limit (halved after an out-of-memory failure). A task that failed before
//!   (`attempt > 1`), and each task of a batch that just failed, renders alone.
//! * Progress after every step; cancels are honoured between steps, the rest of the batch goes on.
//! * PNG encoding and uploads run off the GPU thread, overlapping the next batch. Uploads start only
//!   while a session is up; a render finished while the coordinator is away is uploaded after
//!   reconnecting if its lease is still current (an upload refused while the session changed is
//!   kept for that). A failing upload is retried with doubling waits; after `upload_attempts`
//!   failures while connected the task is handed back without charge (the coordinator or its
//!   storage is at fault; it is claimed again after 30 s) and its result dropped. An upload refused
//!   as invalid or corrupted fails the task at once (`kind "upload"`, charged). Results waiting for
//!   upload beyond one batch count against the credits, so a coordinator that cannot store results
//!   stops the worker taking more work.
//! * Drain (SIGTERM/SIGINT or a coordinator `Drain`): queued tasks are released, the running batch
//!   finishes and uploads, then the worker says goodbye and exits; after `drain_timeout` it exits
//!   with what is left (the coordinator requeues those tasks without charge when the stream ends).
//! * Reconnects back off (doubling up to `max_backoff`); the wait resets only after a session has
//!   lasted [`STABLE_SESSION`].
//! * Stall watchdog: the GPU thread stamps the time when a batch starts and after every step. A
//!   batch with no stamp for `stall_timeout` (a wedged GPU, a hung kernel) is reported failed
//!   (`kind "stalled"`, charged and retryable, so a prompt that always hangs ends after its
//!   attempts; its batchmates are charged too, and render alone when claimed again), the worker
//!   drains what it can and [`run`] returns [`RenderStalled`]: a stuck thread cannot be stopped
//!   from inside the process, so the process exits and its supervisor restarts it.
//! * Exit: after its goodbye the worker closes its side of the session and waits (up to 5 s) for
//!   the coordinator to end its side, which it does after handling every message sent before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farm_proto::error_chain;
use farm_proto::pb::worker_service_client::WorkerServiceClient;
use farm_proto::pb::{
    coordinator_message, upload_result_request, worker_message, CoordinatorMessage, Credits, Goodbye, Heartbeat,
    Hello, Lease, StepProgress, TaskAssignment, TaskFailed, TaskReleased, TaskRendered, UploadHeader,
    UploadResultRequest, WorkerCapabilities, WorkerMessage,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::pngmeta::{encode_png, ResultMetadata};
use crate::render::{precision_name, sampler_name, Image, RenderError, RenderItem, Renderer, RendererInfo};

/// How long an idle GPU waits for more same-shape tasks before starting a batch that is not full.
const BATCH_GATHER: Duration = Duration::from_millis(30);
/// A session that lasted this long resets the reconnect backoff.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Wait before the second upload attempt; doubles per failure up to [`UPLOAD_RETRY_MAX`].
const UPLOAD_RETRY_FIRST: Duration = Duration::from_secs(1);
const UPLOAD_RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest time one upload call may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a task handed back after failed uploads waits before it is claimed again.
const UPLOAD_HANDBACK_DELAY: Duration = Duration::from_secs(30);
/// Longest wait at exit for the coordinator to end the session (see `Controller::close_session`).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub coordinator: String,
    pub token: String,
    pub name: String,
    pub max_batch: u32,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Upload attempts per result before the task is handed back.
    pub upload_attempts: u32,
    /// Longest drain: after it the worker exits with what is left.
    pub drain_timeout: Duration,
    /// Numerical self-check outcome to report in the hello: (passed, unix ms).
    pub verified: Option<(bool, i64)>,
    /// The attention kernel order the renderer runs with (reported in the hello).
    pub attention_backend: String,
    /// PEM of the CA that signed the coordinator's TLS certificate (`--ca-cert`); an `https://`
    /// coordinator then trusts only it, else the system's roots.
    pub ca_cert_pem: Option<String>,
    /// Longest time a batch may go without starting or finishing a step (see the module docs);
    /// `None`: no watchdog.
    pub stall_timeout: Option<Duration>,
}

/// [`run`]'s error when a render stalled: the GPU thread is stuck, so the process must end.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a render made no progress for {seconds} s (a wedged GPU or a hung kernel); its tasks were reported failed")]
pub struct RenderStalled {
    pub seconds: u64,
}

/// [`run`]'s error when the coordinator refuses this worker (its token is unknown, revoked or not a
/// worker token): restarting cannot help, so the process exits with [`Refused::EXIT_STATUS`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("the coordinator refuses this worker: {0}")]
pub struct Refused(pub String);

impl Refused {
    /// The exit status for a refused worker (supervisors are told not to restart it).
    pub const EXIT_STATUS: i32 = 4;
}

/// When the GPU thread last showed progress, in milliseconds since `origin`.
#[derive(Clone)]
struct Liveness {
    origin: Instant,
    stamp_ms: Arc<AtomicU64>,
}

impl Liveness {
    fn new() -> Self {
        Liveness { origin: Instant::now(), stamp_ms: Arc::new(AtomicU64::new(0)) }
    }
    fn stamp(&self) {
        self.stamp_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Time since the last stamp.
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.stamp_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

/// A worker token as given (flag, environment, a secret file's contents): surrounding whitespace,
/// such as the line break a secret file ends with, is dropped; an empty token, or one with a
/// character that cannot travel in a gRPC header, is refused at start instead of at every
/// reconnect.
pub fn parse_token(given: &str) -> Result<String, String> {
    let token = given.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("the token contains {c:?}, which cannot be sent in a request header"));
    }
    Ok(token.to_string())
}

/// The coordinator endpoint: plaintext for `http://`, TLS for `https://` (trusting `ca_cert_pem` when
/// given, else the system's roots or, when the system has none, the bundled webpki roots). A CA with
/// an `http://` URL is refused so that a token never goes out in clear when TLS was asked for.
pub fn coordinator_endpoint(url: &str, ca_cert_pem: Option<&str>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("coordinator URL {url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let https = url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    let tls = ClientTlsConfig::new().timeout(Duration::from_secs(10));
    match (https, ca_cert_pem) {
        (false, None) => Ok(endpoint),
        (false, Some(_)) => Err(format!("--ca-cert is set but the coordinator URL {url} is not https://")),
        (true, Some(pem)) => {
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err("--ca-cert: not a PEM certificate (no -----BEGIN CERTIFICATE----- block)".into());
            }
            endpoint
                .tls_config(tls.ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| format!("TLS settings for {url}: {}", error_chain(&e)))
        }
        (true, None) => endpoint
            .clone()
            .tls_config(tls.clone().with_enabled_roots())
            .or_else(|_| endpoint.tls_config(tls.with_webpki_roots()))
            .map_err(|e| format!("TLS settings for {url}: {}", error_chain(&e))),
    }
}

/// A status's message and its sources (tonic keeps the cause of a connection failure, a TLS
/// handshake error among them, in the sources), with a hint when the coordinator's certificate was
/// not trusted.
fn status_text(s: &Status) -> String {
    let mut out = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    if out.contains("invalid peer certificate") {
        out.push_str(" (TLS: the coordinator's certificate is not trusted; --ca-cert names the CA that signed it)");
    }
    out
}

type Client = WorkerServiceClient<InterceptedService<Channel, AuthInterceptor>>;

#[derive(Clone)]
pub struct AuthInterceptor(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn lease_of(t: &TaskAssignment) -> Lease {
    t.lease.clone().unwrap_or_default()
}

fn task_id(t: &TaskAssignment) -> String {
    lease_of(t).task_id
}

fn shape_key(t: &TaskAssignment) -> String {
    format!("{:?}", t.params)
}

/// From the GPU thread to the controller.
enum GpuEvent {
    Progress { lease: Lease, step: u32, total: u32 },
    Finished { tasks: Vec<TaskAssignment>, images: Vec<Option<Image>>, render_ms: u64 },
    Failed { tasks: Vec<TaskAssignment>, error: RenderError },
}

/// An encoded result waiting to be uploaded.
struct PendingUpload {
    task: TaskAssignment,
    png: Arc<Vec<u8>>,
    sha256: String,
    /// The render metadata (the PNG's `farm` chunk) sent with the upload, kept with the attempt.
    metadata_json: Arc<str>,
    uploading: bool,
    /// Failed attempts so far.
    failures: u32,
    /// No attempt before this instant.
    next_try: Instant,
    /// [`Controller::session_epoch`] when the running attempt started.
    epoch: u64,
}

#[derive(Debug)]
enum UploadOutcome {
    Committed(String),
    /// The lease is gone: someone else owns the task now, drop the result.
    Stale(String),
    /// Try again later (coordinator or storage away).
    Retry(String),
    /// Retrying the same bytes cannot succeed (refused as invalid, corrupted, not allowed).
    Permanent(String),
}

/// The outcome of an upload call that ended with `s`.
fn upload_outcome(s: &Status) -> UploadOutcome {
    let text = format!("{}: {}", code_name(s.code()), s.message());
    match s.code() {
        Code::FailedPrecondition | Code::NotFound => UploadOutcome::Stale(s.message().to_string()),
        Code::InvalidArgument | Code::DataLoss | Code::PermissionDenied | Code::OutOfRange => UploadOutcome::Permanent(text),
        _ => UploadOutcome::Retry(text),
    }
}

/// The wait after `failures` failed attempts: 1 s doubling, at most 30 s.
fn upload_retry_wait(failures: u32) -> Duration {
    UPLOAD_RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(UPLOAD_RETRY_MAX)
}

/// Starts the GPU thread; returns the channel for batches and the one for its events.
fn spawn_gpu_thread(
    mut renderer: Box<dyn Renderer>,
    cancelled: Arc<Mutex<HashSet<String>>>,
    alive: Liveness,
) -> (std::sync::mpsc::SyncSender<Vec<TaskAssignment>>, mpsc::Receiver<GpuEvent>) {
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Vec<TaskAssignment>>(1);
    let (ev_tx, ev_rx) = mpsc::channel::<GpuEvent>(1024);
    std::thread::Builder::new()
        .name("gpu".into())
        .spawn(move || {
            while let Ok(tasks) = job_rx.recv() {
                alive.stamp();
                let params = tasks[0].params.clone().unwrap_or_default();
                let items: Vec<RenderItem> = tasks
                    .iter()
                    .map(|t| RenderItem { prompt: t.prompt.clone(), negative_prompt: t.negative_prompt.clone(), seed: t.seed })
                    .collect();
                let ids: Vec<String> = tasks.iter().map(task_id).collect();
                let started = Instant::now();
                let mut dropped: HashSet<usize> = HashSet::new();
                let result = {
                    let mut on_step = |step: usize, total: usize| -> Vec<usize> {
                        alive.stamp();
                        let c = cancelled.lock().unwrap();
                        let mut drop_now = Vec::new();
                        for (i, id) in ids.iter().enumerate() {
                            if dropped.contains(&i) {
                                continue;
                            }
                            if c.contains(id) {
                                drop_now.push(i);
                                continue;
                            }
                            // Progress is best effort: never block the GPU on the network.
                            let _ = ev_tx.try_send(GpuEvent::Progress {
                                lease: lease_of(&tasks[i]),
                                step: step as u32,
                                total: total as u32,
                            });
                        }
                        dropped.extend(drop_now.iter().copied());
                        drop_now
                    };
                    renderer.render(&items, &params, &mut on_step)
                };
                let render_ms = started.elapsed().as_millis() as u64;
                let ev = match result {
                    Ok(images) => GpuEvent::Finished { tasks, images, render_ms },
                    Err(error) => GpuEvent::Failed { tasks, error },
                };
                if ev_tx.blocking_send(ev).is_err() {
                    break;
                }
            }
        })
        .expect("spawn gpu thread");
    (job_tx, ev_rx)
}

struct Session {
    out: mpsc::Sender<WorkerMessage>,
    inbound: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
    heartbeat: Duration,
    granted_unfilled: u32,
}

struct Controller {
    opts: WorkerOptions,
    info: RendererInfo,
    /// Device memory free now (see [`spawn_vram_sampler`]); 0 when unknown.
    vram_free: Arc<AtomicU64>,
    /// Queued tasks of a failed batch, to be rendered one at a time (cleared with the queue).
    solo: HashSet<String>,
    client: Option<Client>,
    session: Option<Session>,
    /// Counts session starts and losses: an upload refused as stale while it changed may still be
    /// ours (the next hello keeps the lease).
    session_epoch: u64,
    /// When the current session started.
    connected_at: Option<Instant>,
    /// Reconnect wait and when the next attempt may start.
    backoff: Duration,
    next_connect: Instant,
    queue: VecDeque<TaskAssignment>,
    running: Vec<TaskAssignment>,
    uploads: HashMap<String, PendingUpload>,
    cancelled: Arc<Mutex<HashSet<String>>>,
    batch_limit: u32,
    /// When the GPU is idle and a batch is not full yet, assignments that arrive until this instant
    /// join it (the coordinator sends claims back to back).
    gather_until: Option<Instant>,
    draining: bool,
    /// Set when the running batch stalled: the drain then ends in [`RenderStalled`].
    stalled: Option<Duration>,
    /// Failure reports made while no session was open: their leases are still listed in the next
    /// hello, and the reports go out once the coordinator kept them, so the failure is charged.
    unreported: Vec<TaskFailed>,
    alive: Liveness,
    job_tx: std::sync::mpsc::SyncSender<Vec<TaskAssignment>>,
    /// (task id, lease token, outcome): an outcome of an older lease of the same task is ignored.
    upload_tx: mpsc::Sender<(String, u64, UploadOutcome)>,
    png_tx: mpsc::Sender<(String, u64, Result<Vec<u8>, String>)>,
}

impl Controller {
    fn capabilities(&self) -> WorkerCapabilities {
        WorkerCapabilities {
            device: self.info.device.clone(),
            device_name: self.info.device_name.clone(),
            vram_total_bytes: self.info.vram_total_bytes,
            vram_free_bytes: self.vram_free.load(Ordering::Relaxed),
            model_name: self.info.model_name.clone(),
            model_hash: self.info.model_hash.clone(),
            precision: self.info.precision as i32,
            max_batch: self.opts.max_batch,
            max_pixels: self.info.max_pixels,
            version: env!("CARGO_PKG_VERSION").to_string(),
            verified: self.opts.verified.map(|v| v.0).unwrap_or(false),
            verified_at_ms: self.opts.verified.map(|v| v.1).unwrap_or(0),
            attention_backend: self.opts.attention_backend.clone(),
        }
    }

    fn held_leases(&self) -> Vec<Lease> {
        self.queue
            .iter()
            .chain(self.running.iter())
            .chain(self.uploads.values().map(|u| &u.task))
            .map(lease_of)
            .chain(self.unreported.iter().filter_map(|f| f.lease.clone()))
            .collect()
    }

    /// Sends a message that may be lost (step progress): when the stream's buffer is full (the
    /// coordinator is behind) it is dropped instead of stalling the controller.
    fn send_lossy(&mut self, msg: worker_message::Msg) {
        if let Some(s) = &self.session {
            match s.out.try_send(WorkerMessage { msg: Some(msg) }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => tracing::debug!("coordinator stream full; progress dropped"),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::warn!("coordinator stream closed");
                    self.lost_session();
                }
            }
        }
    }

    async fn send(&mut self, msg: worker_message::Msg) {
        if let Some(s) = &self.session {
            if s.out.send(WorkerMessage { msg: Some(msg) }).await.is_err() {
                tracing::warn!("coordinator stream closed");
                self.lost_session();
            }
        }
    }

    /// The session ended: the next connect waits for the backoff, which grows unless the session
    /// had lasted [`STABLE_SESSION`].
    fn lost_session(&mut self) {
        if self.session.take().is_none() {
            return;
        }
        self.session_epoch += 1;
        if self.connected_at.take().is_some_and(|t| t.elapsed() >= STABLE_SESSION) {
            self.backoff = RECONNECT_FIRST;
        }
        self.schedule_reconnect();
    }

    /// The next connect waits for the backoff, which doubles up to `max_backoff`.
    fn schedule_reconnect(&mut self) {
        self.next_connect = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.opts.max_backoff);
    }

    /// Opens a session: channel, Connect stream, hello, welcome. Leases the coordinator did not keep are
    /// dropped here.
    async fn connect(&mut self) -> Result<(), String> {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                let endpoint = coordinator_endpoint(&self.opts.coordinator, self.opts.ca_cert_pem.as_deref())?;
                let channel = endpoint.connect_lazy();
                let value: MetadataValue<_> = format!("Bearer {}", self.opts.token)
                    .parse()
                    .map_err(|_| "the token contains characters not allowed in metadata".to_string())?;
                let c = WorkerServiceClient::with_interceptor(channel, AuthInterceptor(value))
                    .max_decoding_message_size(64 << 20);
                self.client = Some(c.clone());
                c
            }
        };
        let (out_tx, out_rx) = mpsc::channel::<WorkerMessage>(1024);
        let hello = Hello { name: self.opts.name.clone(), capabilities: Some(self.capabilities()), held_leases: self.held_leases() };
        out_tx
            .send(WorkerMessage { msg: Some(worker_message::Msg::Hello(hello)) })
            .await
            .map_err(|_| "internal channel closed".to_string())?;
        let mut c = client;
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            c.connect(tokio_stream::wrappers::ReceiverStream::new(out_rx)),
        )
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|s| format!("{}: {}", code_name(s.code()), status_text(&s)))?;
        let mut inbound = resp.into_inner();
        let welcome = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| "no welcome".to_string())?
            .map_err(|s| s.message().to_string())?;
        let Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Welcome(w)) }) = welcome else {
            return Err("the coordinator did not welcome us".into());
        };
        let kept: HashSet<String> = w.kept_leases.iter().map(|l| l.task_id.clone()).collect();
        let before = self.queue.len() + self.running.len() + self.uploads.len();
        self.queue.retain(|t| kept.contains(&task_id(t)));
        for t in &self.running {
            if !kept.contains(&task_id(t)) {
                self.cancelled.lock().unwrap().insert(task_id(t));
            }
        }
        self.uploads.retain(|id, _| kept.contains(id));
        // A failure whose lease the coordinator did not keep (it went to another worker) is moot.
        self.unreported.retain(|f| f.lease.as_ref().is_some_and(|l| kept.contains(&l.task_id)));
        tracing::info!(worker_id = %w.worker_id, coordinator = %w.coordinator, kept = kept.len(), held = before,
                       "connected to the coordinator");
        let (in_tx, in_rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if in_tx.send(Ok(m)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {
                        let _ = in_tx.send(Err(Status::unavailable("the coordinator closed the stream"))).await;
                        break;
                    }
                    Err(s) => {
                        let _ = in_tx.send(Err(s)).await;
                        break;
                    }
                }
            }
        });
        self.session = Some(Session {
            out: out_tx,
            inbound: in_rx,
            heartbeat: Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(100))),
            granted_unfilled: 0,
        });
        self.session_epoch += 1;
        self.connected_at = Some(Instant::now());
        for failed in std::mem::take(&mut self.unreported) {
            tracing::info!(task = %failed.lease.as_ref().map_or("", |l| l.task_id.as_str()), "reporting a failure from while disconnected");
            self.report_failure_msg(failed).await;
        }
        self.top_up().await;
        self.retry_uploads();
        Ok(())
    }

    /// Grants credits so that the coordinator may send up to two batches beyond what is held
    /// (results waiting for upload beyond one batch count as held).
    async fn top_up(&mut self) {
        if self.draining {
            return;
        }
        // One batch of results may be on its way up without holding back credits.
        let waiting = self.uploads.len().saturating_sub(self.batch_limit as usize);
        let held = (self.queue.len() + self.running.len() + waiting) as u32;
        let Some(s) = &self.session else { return };
        let target = 2 * self.batch_limit.max(1);
        let want = target.saturating_sub(held + s.granted_unfilled);
        if want > 0 {
            if let Some(s) = self.session.as_mut() {
                s.granted_unfilled += want;
            }
            self.send(worker_message::Msg::Credits(Credits { add: want, withdraw: false })).await;
        }
    }

    /// Hands the next batch (first queued task and others of its shape) to the GPU thread when idle.
    fn start_batch(&mut self) {
        self.gather_until = None;
        if self.queue.is_empty() {
            self.solo.clear();
        }
        if !self.running.is_empty() || self.queue.is_empty() {
            return;
        }
        if !self.solo.is_empty() {
            // Tasks that left the queue otherwise (cancelled, released) lose their mark.
            let queued: HashSet<String> = self.queue.iter().map(task_id).collect();
            self.solo.retain(|id| queued.contains(id));
        }
        let first = self.queue.pop_front().expect("non-empty");
        // The watchdog counts from here, not from the GPU thread's last stamp of an earlier batch.
        self.alive.stamp();
        if self.solo.remove(&task_id(&first)) {
            self.running = vec![first.clone()];
            if self.job_tx.send(vec![first]).is_err() {
                tracing::error!("the GPU thread is gone");
            }
            return;
        }
        let key = shape_key(&first);
        let mut batch = vec![first];
        let mut rest = VecDeque::new();
        while let Some(t) = self.queue.pop_front() {
            if batch.len() < self.batch_limit as usize && shape_key(&t) == key && !self.solo.contains(&task_id(&t)) {
                batch.push(t);
            } else {
                rest.push_back(t);
            }
        }
        self.queue = rest;
        self.running = batch.clone();
        if self.job_tx.send(batch).is_err() {
            tracing::error!("the GPU thread is gone");
        }
    }

    async fn on_coordinator(&mut self, msg: CoordinatorMessage) {
        match msg.msg {
            Some(coordinator_message::Msg::Assign(a)) => {
                if let Some(s) = self.session.as_mut() {
                    s.granted_unfilled = s.granted_unfilled.saturating_sub(a.tasks.len() as u32);
                }
                if self.draining {
                    for t in a.tasks {
                        let lease = Some(lease_of(&t));
                        self.send(worker_message::Msg::Released(TaskReleased { lease, reason: "draining".into(), retry_after_ms: 0 }))
                            .await;
                    }
                    return;
                }
                // A task that failed before renders alone: if its prompt broke (or hung) the batch
                // it was in, it cannot take batchmates down with it again.
                self.solo.extend(a.tasks.iter().filter(|t| t.attempt > 1).map(task_id));
                self.queue.extend(a.tasks);
                if self.running.is_empty() {
                    if self.queue.len() >= self.batch_limit as usize {
                        self.gather_until = None;
                        self.start_batch();
                    } else if self.gather_until.is_none() {
                        self.gather_until = Some(Instant::now() + BATCH_GATHER);
                    }
                }
            }
            Some(coordinator_message::Msg::Cancel(c)) => self.cancel(c.leases, true).await,
            Some(coordinator_message::Msg::Revoked(r)) => {
                tracing::warn!(leases = r.leases.len(), "leases revoked (their tasks went to another worker): their work is dropped");
                self.cancel(r.leases, false).await
            }
            Some(coordinator_message::Msg::Drain(d)) => {
                tracing::info!(reason = %d.reason, "the coordinator asks us to drain");
                self.begin_drain().await;
            }
            Some(coordinator_message::Msg::Welcome(_)) | None => {}
        }
    }

    /// Cancels (`report`: tells the coordinator) or forgets (revoked leases) the named leases, matched
    /// by task and token: queued ones at once, running ones between steps, finished ones waiting for
    /// their upload at once.
    async fn cancel(&mut self, leases: Vec<Lease>, report: bool) {
        let named: HashSet<(String, u64)> = leases.iter().map(|l| (l.task_id.clone(), l.lease_token)).collect();
        let is_named = |t: &TaskAssignment| {
            let l = lease_of(t);
            named.contains(&(l.task_id, l.lease_token))
        };
        let (gone, keep): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(is_named);
        self.queue = keep.into();
        for t in gone {
            if report {
                self.report_failure(&t, "cancelled before it started", false, "cancelled").await;
            }
        }
        {
            let mut c = self.cancelled.lock().unwrap();
            for t in &self.running {
                if is_named(t) {
                    c.insert(task_id(t));
                }
            }
        }
        let finished: Vec<String> = self.uploads.iter().filter(|(_, u)| is_named(&u.task)).map(|(id, _)| id.clone()).collect();
        for id in finished {
            if let Some(u) = self.uploads.remove(&id) {
                if report {
                    self.report_failure(&u.task, "cancelled before its upload", false, "cancelled").await;
                }
            }
        }
        self.top_up().await;
    }

    /// Reports a task that left the GPU thread as failed, dropping any cancel mark it had.
    async fn fail_task(&mut self, t: &TaskAssignment, error: &str, retryable: bool, kind: &str) {
        self.cancelled.lock().unwrap().remove(&task_id(t));
        self.report_failure(t, error, retryable, kind).await;
    }

    async fn report_failure(&mut self, t: &TaskAssignment, error: &str, retryable: bool, kind: &str) {
        let failed = TaskFailed { lease: Some(lease_of(t)), error: error.to_string(), retryable, kind: kind.to_string() };
        self.report_failure_msg(failed).await;
    }

    /// Sends a failure report, or keeps it for the next session when none is open.
    async fn report_failure_msg(&mut self, failed: TaskFailed) {
        if self.session.is_none() {
            self.unreported.push(failed);
            return;
        }
        self.send(worker_message::Msg::Failed(failed.clone())).await;
        if self.session.is_none() {
            // The stream broke under this report: it goes out again after the next hello.
            self.unreported.push(failed);
        }
    }

    async fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        // No more tasks: the credits not used yet are withdrawn first, so that the tasks handed
        // back below are not assigned here again.
        self.send(worker_message::Msg::Credits(Credits { add: 0, withdraw: true })).await;
        if let Some(s) = self.session.as_mut() {
            s.granted_unfilled = 0;
        }
        let queued: Vec<TaskAssignment> = self.queue.drain(..).collect();
        tracing::info!(released = queued.len(), running = self.running.len(), "draining");
        for t in queued {
            let reason = "worker draining".into();
            self.send(worker_message::Msg::Released(TaskReleased { lease: Some(lease_of(&t)), reason, retry_after_ms: 0 }))
                .await;
        }
    }

    /// Ends the session so that what was sent is known to be handled: the coordinator handles a
    /// session's messages in order and ends its side after the last one, so the worker closes its
    /// side and waits (at most [`CLOSE_WAIT`]) for the coordinator's to end.
    async fn close_session(&mut self) {
        let Some(Session { out, mut inbound, .. }) = self.session.take() else { return };
        drop(out);
        let ended = tokio::time::timeout(CLOSE_WAIT, async { while inbound.recv().await.is_some() {} }).await;
        if ended.is_err() {
            tracing::warn!(wait_ms = CLOSE_WAIT.as_millis() as u64, "the coordinator did not end the session in time");
        }
    }

    /// The watchdog: a running batch quiet for longer than `stall_timeout` is failed and the worker
    /// drains, to exit with [`RenderStalled`].
    async fn check_stall(&mut self) {
        let Some(limit) = self.opts.stall_timeout else { return };
        let quiet = self.alive.quiet_for();
        if self.running.is_empty() || self.stalled.is_some() || quiet < limit {
            return;
        }
        self.stalled = Some(quiet);
        tracing::error!(quiet_s = quiet.as_secs(), stall_timeout_s = limit.as_secs(), tasks = self.running.len(),
                        "render stalled: failing its tasks, draining and exiting");
        let error = format!(
            "render stalled on worker {}: no denoising step finished in {} s (stall timeout {} s); the worker exits to be restarted",
            self.opts.name,
            quiet.as_secs(),
            limit.as_secs()
        );
        for t in std::mem::take(&mut self.running) {
            self.fail_task(&t, &error, true, "stalled").await;
        }
        self.begin_drain().await;
    }

    async fn on_gpu(&mut self, ev: GpuEvent) {
        if self.stalled.is_some() && !matches!(ev, GpuEvent::Progress { .. }) {
            // A batch that ends after it was declared stalled: its tasks were already reported.
            return;
        }
        match ev {
            GpuEvent::Progress { lease, step, total } => {
                self.send_lossy(worker_message::Msg::Progress(StepProgress { lease: Some(lease), step, total_steps: total }));
            }
            GpuEvent::Finished { tasks, images, render_ms } => {
                self.running.clear();
                let batch_size = tasks.len() as u32;
                for (t, img) in tasks.into_iter().zip(images) {
                    let id = task_id(&t);
                    let was_cancelled = self.cancelled.lock().unwrap().remove(&id);
                    match img {
                        // A cancel that came after the last step (during the decode) still wins.
                        None | Some(_) if was_cancelled => {
                            self.report_failure(&t, "cancelled during rendering", false, "cancelled").await;
                        }
                        None => {}
                        Some(img) => {
                            self.send(worker_message::Msg::Rendered(TaskRendered { lease: Some(lease_of(&t)), render_ms })).await;
                            self.encode_and_upload(t, img, render_ms, batch_size);
                        }
                    }
                }
                self.start_batch();
                self.top_up().await;
            }
            GpuEvent::Failed { tasks, error } => {
                self.running.clear();
                tracing::warn!(error = %error, tasks = tasks.len(), "render failed");
                // Only a batch of several tasks says that smaller batches would fit: one task
                // out of memory (an oversized job, a spike from another process) leaves the limit.
                if matches!(error, RenderError::OutOfMemory(_)) && tasks.len() > 1 {
                    self.batch_limit = self.batch_limit.min(tasks.len() as u32 / 2).max(1);
                    tracing::warn!(batch_limit = self.batch_limit, "out of memory: smaller batches from now on");
                }
                // Any other failure of a batch may come from one of its prompts (a latent or text
                // encoding that turns NaN): its tasks are rendered again one at a time before any
                // is charged, so one bad prompt does not fail its batchmates.
                if tasks.len() > 1 && !matches!(error, RenderError::OutOfMemory(_)) {
                    if self.draining {
                        // No time to find the failing prompt: the tasks go back to the farm uncharged.
                        for t in &tasks {
                            self.cancelled.lock().unwrap().remove(&task_id(t));
                            let reason = format!("batch failed while draining: {error}");
                            let lease = Some(lease_of(t));
                            self.send(worker_message::Msg::Released(TaskReleased { lease, reason, retry_after_ms: 0 })).await;
                        }
                    } else {
                        tracing::warn!(tasks = tasks.len(), "batch failed; rendering its tasks one at a time");
                        for t in tasks.into_iter().rev() {
                            let id = task_id(&t);
                            if self.cancelled.lock().unwrap().remove(&id) {
                                self.report_failure(&t, "cancelled during rendering", false, "cancelled").await;
                            } else {
                                self.solo.insert(id);
                                self.queue.push_front(t);
                            }
                        }
                        self.start_batch();
                    }
                    self.top_up().await;
                    return;
                }
                // Out of memory with a single task: a smaller batch cannot help on this worker, so
                // the failure is charged like a render failure (another card may fit it).
                let kind = match &error {
                    RenderError::OutOfMemory(_) if tasks.len() == 1 => "render",
                    e => e.kind(),
                };
                for t in &tasks {
                    self.fail_task(t, &error.to_string(), error.retryable(), kind).await;
                }
                self.start_batch();
                self.top_up().await;
            }
        }
    }

    fn encode_and_upload(&mut self, t: TaskAssignment, img: Image, render_ms: u64, batch_size: u32) {
        let p = t.params.clone().unwrap_or_default();
        let meta = ResultMetadata {
            prompt: t.prompt.clone(),
            negative_prompt: t.negative_prompt.clone(),
            seed: t.seed,
            steps: p.steps,
            cfg_scale: farm_proto::limits::cfg_scale(&p),
            cfg_trunc: farm_proto::limits::cfg_trunc(&p),
            renorm_cfg: p.renorm_cfg,
            shift: p.shift,
            sampler: sampler_name(p.sampler).to_string(),
            width: img.width,
            height: img.height,
            precision: precision_name(self.info.precision).to_string(),
            model: self.info.model_name.clone(),
            model_hash: self.info.model_hash.clone(),
            worker: self.opts.name.clone(),
            job_id: t.job_id.clone(),
            index: t.index,
            task_id: task_id(&t),
            attempt: t.attempt,
            render_ms,
            batch_size,
        };
        let png_tx = self.png_tx.clone();
        let id = task_id(&t);
        let token = lease_of(&t).lease_token;
        let metadata_json: Arc<str> = upload_metadata(&meta).into();
        self.uploads.insert(
            id.clone(),
            PendingUpload {
                task: t,
                png: Arc::new(Vec::new()),
                sha256: String::new(),
                metadata_json,
                uploading: true,
                failures: 0,
                next_try: Instant::now(),
                epoch: self.session_epoch,
            },
        );
        tokio::spawn(async move {
            let encoded = tokio::task::spawn_blocking(move || encode_png(img.width, img.height, &img.rgb, &meta)).await;
            let png = match encoded {
                Ok(Ok(png)) => Ok(png),
                Ok(Err(e)) => Err(format!("PNG encoding failed: {e}")),
                Err(e) => Err(format!("PNG encoding panicked: {e}")),
            };
            let _ = png_tx.send((id, token, png)).await;
        });
    }

    /// Starts uploads of every encoded result that is not being uploaded and whose wait has passed,
    /// while a session is up.
    fn retry_uploads(&mut self) {
        let Some(client) = self.client.clone() else { return };
        if self.session.is_none() {
            return;
        }
        let now = Instant::now();
        for (id, u) in self.uploads.iter_mut() {
            if u.uploading || u.png.is_empty() || u.next_try > now {
                continue;
            }
            u.uploading = true;
            u.epoch = self.session_epoch;
            let (id, lease, png, sha, tx, c) =
                (id.clone(), lease_of(&u.task), u.png.clone(), u.sha256.clone(), self.upload_tx.clone(), client.clone());
            let metadata = u.metadata_json.clone();
            tokio::spawn(async move {
                let token = lease.lease_token;
                let outcome = upload(c, lease, png, sha, &metadata).await;
                let _ = tx.send((id, token, outcome)).await;
            });
        }
    }

    fn busy(&self) -> bool {
        !self.running.is_empty() || !self.queue.is_empty() || !self.uploads.is_empty() || !self.unreported.is_empty()
    }

    /// The pending upload of task `id` under lease `token`, if it is still waiting.
    fn pending(&mut self, id: &str, token: u64) -> Option<&mut PendingUpload> {
        self.uploads.get_mut(id).filter(|u| lease_of(&u.task).lease_token == token)
    }

    /// Handles the end of one upload attempt.
    async fn on_upload(&mut self, id: String, token: u64, outcome: UploadOutcome) {
        let (epoch, connected) = (self.session_epoch, self.session.is_some());
        let Some(u) = self.pending(&id, token) else {
            return; // cancelled meanwhile, or an older lease of the same task
        };
        // The session ended or changed during the attempt: a failure, or a refusal as stale (the
        // coordinator requeues the tasks of a lost stream), is not the upload's. It runs again,
        // uncounted, once the next hello has kept the lease.
        let interrupted = !connected || u.epoch != epoch;
        match outcome {
            UploadOutcome::Stale(m) | UploadOutcome::Retry(m) if interrupted => {
                u.uploading = false;
                u.next_try = Instant::now();
                tracing::info!(task = %id, reason = %m, "upload interrupted by the session's end; will retry");
                return;
            }
            UploadOutcome::Committed(sha) => {
                tracing::debug!(task = %id, %sha, "result committed");
                self.uploads.remove(&id);
            }
            UploadOutcome::Stale(m) => {
                tracing::warn!(task = %id, reason = %m, "result dropped: the lease is no longer ours");
                self.uploads.remove(&id);
            }
            UploadOutcome::Retry(m) => {
                let attempts = self.opts.upload_attempts.max(1);
                let Some(u) = self.pending(&id, token) else { return };
                u.uploading = false;
                u.failures += 1;
                let failures = u.failures;
                if failures < attempts {
                    let wait = upload_retry_wait(failures);
                    u.next_try = Instant::now() + wait;
                    tracing::warn!(task = %id, reason = %m, attempt = failures, retry_in_ms = wait.as_millis() as u64,
                                   "upload failed; will retry");
                    return;
                }
                if let Some(u) = self.uploads.remove(&id) {
                    let reason = format!("upload failed {failures} times, last: {m}");
                    tracing::error!(task = %id, %reason, "result dropped; the task goes back to the farm");
                    let lease = Some(lease_of(&u.task));
                    let retry_after_ms = UPLOAD_HANDBACK_DELAY.as_millis() as u32;
                    self.send(worker_message::Msg::Released(TaskReleased { lease, reason, retry_after_ms })).await;
                }
            }
            UploadOutcome::Permanent(m) => self.give_up_upload(&id, &format!("upload refused: {m}"), "upload").await,
        }
        self.top_up().await;
    }

    /// Drops a result that cannot be uploaded and reports its task failed (`kind`: "upload" or
    /// "render"; charged, retryable: another attempt renders it again).
    async fn give_up_upload(&mut self, id: &str, error: &str, kind: &str) {
        if let Some(u) = self.uploads.remove(id) {
            tracing::error!(task = %id, %error, "result dropped");
            self.report_failure(&u.task, error, true, kind).await;
        }
    }
}

/// First reconnect wait; doubles per failed attempt up to `max_backoff`.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

/// The render metadata sent with an upload: the PNG's `farm` chunk without the prompt texts, which
/// the task already holds (and which could exceed the coordinator's 16 KiB limit on metadata).
fn upload_metadata(meta: &ResultMetadata) -> String {
    let mut v = serde_json::to_value(meta).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("prompt");
        o.remove("negative_prompt");
    }
    v.to_string()
}

/// Streams one result to the coordinator in 1 MiB chunks.
async fn upload(mut client: Client, lease: Lease, png: Arc<Vec<u8>>, sha256: String, metadata: &str) -> UploadOutcome {
    let header = UploadResultRequest {
        msg: Some(upload_result_request::Msg::Header(UploadHeader {
            lease: Some(lease),
            content_type: "image/png".into(),
            size_bytes: png.len() as u64,
            sha256,
            metadata_json: metadata.to_string(),
        })),
    };
    let mut msgs = vec![header];
    for chunk in png.chunks(1 << 20) {
        msgs.push(UploadResultRequest { msg: Some(upload_result_request::Msg::Data(chunk.to_vec())) });
    }
    match tokio::time::timeout(UPLOAD_TIMEOUT, client.upload_result(tokio_stream::iter(msgs))).await {
        Ok(Ok(r)) => UploadOutcome::Committed(r.into_inner().result.map(|r| r.sha256).unwrap_or_default()),
        Ok(Err(s)) => upload_outcome(&s),
        Err(_) => UploadOutcome::Retry(format!("no answer within {} s", UPLOAD_TIMEOUT.as_secs())),
    }
}

/// How often the free device memory is measured for heartbeats.
const VRAM_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The device memory free now (0: unknown, as on the CPU), refreshed every
/// [`VRAM_SAMPLE_EVERY`] off the runtime's threads (`nvidia-smi` takes tens of milliseconds).
fn spawn_vram_sampler(info: &RendererInfo) -> Arc<AtomicU64> {
    let free = Arc::new(AtomicU64::new(info.vram_free_bytes));
    if let Ok(device @ tch::Device::Cuda(_)) = crate::device::parse_device(&info.device) {
        let shared = free.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VRAM_SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let now = tokio::task::spawn_blocking(move || crate::device::free_vram_bytes(device)).await;
                if let Ok(Some(bytes)) = now {
                    shared.store(bytes, Ordering::Relaxed);
                }
                // The worker is gone when only this task holds the value.
                if Arc::strong_count(&shared) == 1 {
                    return;
                }
            }
        });
    }
    free
}

/// How [`run`] ended after a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Nothing was left running.
    Drained,
    /// The drain timed out with a batch still on the GPU thread: the process should end without
    /// running libtorch's exit-time teardown under that thread.
    GpuBusy,
}

/// Runs the worker until `shutdown` resolves (then drains) or the coordinator asks it to drain.
pub async fn run(
    opts: WorkerOptions,
    renderer: Box<dyn Renderer>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunEnd> {
    let info = renderer.info();
    let vram_free = spawn_vram_sampler(&info);
    let cancelled = Arc::new(Mutex::new(HashSet::new()));
    let alive = Liveness::new();
    let (job_tx, mut gpu_rx) = spawn_gpu_thread(renderer, cancelled.clone(), alive.clone());
    let (upload_tx, mut upload_rx) = mpsc::channel::<(String, u64, UploadOutcome)>(1024);
    let (png_tx, mut png_rx) = mpsc::channel::<(String, u64, Result<Vec<u8>, String>)>(1024);
    let mut ctl = Controller {
        batch_limit: opts.max_batch.max(1),
        gather_until: None,
        opts,
        info,
        vram_free: vram_free.clone(),
        solo: HashSet::new(),
        client: None,
        session: None,
        session_epoch: 0,
        connected_at: None,
        backoff: RECONNECT_FIRST,
        next_connect: Instant::now(),
        queue: VecDeque::new(),
        running: Vec::new(),
        uploads: HashMap::new(),
        cancelled,
        draining: false,
        stalled: None,
        unreported: Vec::new(),
        alive,
        job_tx,
        upload_tx,
        png_tx,
    };
    tokio::pin!(shutdown);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut retry_tick = tokio::time::interval(Duration::from_secs(1));
    let mut stall_tick = tokio::time::interval(Duration::from_millis(250));
    let mut shutdown_seen = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if ctl.draining {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + ctl.opts.drain_timeout);
            let late = Instant::now() >= deadline;
            if !ctl.busy() || late {
                if late {
                    // What is left goes back to the farm when the stream ends (no attempt charged).
                    tracing::warn!(running = ctl.running.len(), uploads = ctl.uploads.len(),
                                   timeout_s = ctl.opts.drain_timeout.as_secs(), "drain timeout; exiting with work left");
                }
                let reason = if ctl.stalled.is_some() { "render stalled" } else { "drained" };
                ctl.send(worker_message::Msg::Goodbye(Goodbye { reason: reason.into() })).await;
                ctl.close_session().await;
                tracing::info!(reason, "exiting");
                return match ctl.stalled {
                    Some(quiet) => Err(RenderStalled { seconds: quiet.as_secs() }.into()),
                    None if !ctl.running.is_empty() => Ok(RunEnd::GpuBusy),
                    None => Ok(RunEnd::Drained),
                };
            }
        }
        if ctl.session.is_none() && Instant::now() >= ctl.next_connect {
            match ctl.connect().await {
                Ok(()) => {
                    if let Some(s) = &ctl.session {
                        heartbeat = tokio::time::interval(s.heartbeat);
                    }
                }
                Err(e) if e.starts_with("Unauthenticated") || e.starts_with("PermissionDenied") => {
                    // Retrying cannot help: the token is unknown, revoked or not a worker token.
                    return Err(Refused(e).into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = ctl.backoff.as_millis() as u64, "cannot reach the coordinator");
                    ctl.schedule_reconnect();
                }
            }
        }
        let drain_wait = drain_deadline.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(Instant::now()));
        let reconnect_wait = ctl.next_connect.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
        tokio::select! {
            _ = &mut shutdown, if !shutdown_seen => {
                shutdown_seen = true;
                ctl.begin_drain().await;
            }
            msg = async { match ctl.session.as_mut() { Some(s) => s.inbound.recv().await, None => std::future::pending().await } } => {
                match msg {
                    Some(Ok(m)) => ctl.on_coordinator(m).await,
                    Some(Err(s)) => {
                        tracing::warn!(status = %s.message(), retry_in_ms = ctl.backoff.as_millis() as u64,
                                       "lost the coordinator stream; reconnecting");
                        ctl.lost_session();
                    }
                    None => ctl.lost_session(),
                }
            }
            ev = gpu_rx.recv() => {
                match ev {
                    Some(ev) => ctl.on_gpu(ev).await,
                    None => anyhow::bail!("the GPU thread stopped"),
                }
            }
            up = upload_rx.recv() => {
                let Some((id, token, outcome)) = up else { continue };
                ctl.on_upload(id, token, outcome).await;
            }
            p = png_rx.recv() => {
                match p {
                    Some((id, token, Ok(png))) => {
                        if let Some(u) = ctl.pending(&id, token) {
                            u.sha256 = hex::encode(Sha256::digest(&png));
                            u.png = Arc::new(png);
                            u.uploading = false;
                        }
                        ctl.retry_uploads();
                    }
                    Some((id, token, Err(e))) if ctl.pending(&id, token).is_some() => {
                        ctl.give_up_upload(&id, &e, "render").await;
                        ctl.top_up().await;
                    }
                    Some(_) | None => {}
                }
            }
            _ = heartbeat.tick() => {
                if ctl.session.is_some() {
                    let leases = ctl.held_leases();
                    let vram_free_bytes = vram_free.load(Ordering::Relaxed);
                    ctl.send(worker_message::Msg::Heartbeat(Heartbeat { leases, vram_free_bytes })).await;
                }
            }
            _ = retry_tick.tick() => ctl.retry_uploads(),
            _ = stall_tick.tick(), if ctl.opts.stall_timeout.is_some() && !ctl.running.is_empty() => {
                // A batch that has just finished is not a stall: its events are handled first.
                while let Ok(ev) = gpu_rx.try_recv() {
                    ctl.on_gpu(ev).await;
                }
                ctl.check_stall().await;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(ctl.gather_until.unwrap_or_else(Instant::now))),
                if ctl.gather_until.is_some() => ctl.start_batch(),
            _ = tokio::time::sleep(reconnect_wait), if ctl.session.is_none() => {}
            _ = tokio::time::sleep(drain_wait), if drain_deadline.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_checked_at_start() {
        assert_eq!(parse_token("abc.DEF-1\n").unwrap(), "abc.DEF-1");
        assert_eq!(parse_token(" \tabc\r\n").unwrap(), "abc");
        assert!(parse_token("\n").unwrap_err().contains("empty"));
        assert!(parse_token("ab\ncd").unwrap_err().contains("'\\n'"));
        assert!(parse_token("ab cd").is_err());
        assert!(parse_token("tök").is_err());
    }

    #[test]
    fn upload_failures_are_sorted_by_what_retrying_can_do() {
        let kind = |code: Code| match upload_outcome(&Status::new(code, "x")) {
            UploadOutcome::Stale(_) => "stale",
            UploadOutcome::Permanent(_) => "permanent",
            UploadOutcome::Retry(_) => "retry",
            UploadOutcome::Committed(_) => "committed",
        };
        assert_eq!(kind(Code::FailedPrecondition), "stale");
        assert_eq!(kind(Code::NotFound), "stale");
        assert_eq!(kind(Code::DataLoss), "permanent");
        assert_eq!(kind(Code::InvalidArgument), "permanent");
        assert_eq!(kind(Code::PermissionDenied), "permanent");
        assert_eq!(kind(Code::Unavailable), "retry");
        assert_eq!(kind(Code::Internal), "retry");
        assert_eq!(kind(Code::ResourceExhausted), "retry");
    }

    #[test]
    fn upload_waits_double_up_to_the_cap() {
        let waits: Vec<u64> = (1..=8).map(|f| upload_retry_wait(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(upload_retry_wait(1000), UPLOAD_RETRY_MAX);
    }
}
