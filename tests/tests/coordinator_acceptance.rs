//! Acceptance tests of the coordinator, run as real processes against real PostgreSQL and Redis:
//! bad input, lost and silent workers, two replicas with a cross-replica watcher, fair share,
//! coordinator and PostgreSQL restarts, and a Redis outage.
//!
//! Workers are `farm-worker --renderer synthetic` processes (no model), except where a test needs to
//! hold a lease by hand: then it speaks `WorkerService` directly through the gRPC client.
//!
//! Every test checks its outcome in the job store itself (task rows, attempts) and in the results
//! directory, not only through the API.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use farm_proto::pb::job_service_client::JobServiceClient;
use farm_proto::pb::worker_service_client::WorkerServiceClient;
use farm_proto::pb::{
    coordinator_message, job_event, submit_job_request, upload_result_request, worker_message, Assign,
    CancelJobRequest, CoordinatorMessage, Credits, DownloadResultRequest, GetJobRequest, GetTaskRequest, Heartbeat, Hello, Job as JobStatus,
    JobEvent, JobState, ListJobsRequest, ListResultsRequest, ListWorkersRequest, Precision, PromptChunk, PromptSpec, RenderParams,
    RetryJobRequest, StepProgress, SubmitEnd, SubmitHeader, SubmitJobRequest, SubmitJobResponse, TaskFailed, TaskReleased, TaskState, UploadHeader,
    UploadResultRequest, UploadResultResponse, WatchJobRequest, WorkerCapabilities, WorkerMessage,
};
use farm_tests::{
    fresh_database, shared_redis, Coordinator, CoordinatorOptions, PgServer, RedisServer, Worker,
};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Model name the synthetic workers announce and the test jobs ask for.
const MODEL: &str = "tiny";

/// The log line a worker prints once the coordinator welcomed it.
const WORKER_CONNECTED: &str = "connected to the coordinator";

/// A coordinator on `database_url` with the usual test flags plus `extra`.
fn coordinator_with(options: CoordinatorOptions, extra: &[&str]) -> Coordinator {
    let options = options
        .args(["--idle-poll-ms", "100"])
        .args(extra.iter().copied());
    Coordinator::spawn(options).expect("start the coordinator")
}

fn coordinator(database_url: &str, extra: &[&str]) -> Coordinator {
    coordinator_with(CoordinatorOptions::new(database_url), extra)
}

/// A synthetic worker process (`step_ms` per denoising step) named `name`.
fn synthetic_worker(url: &str, token: &str, name: &str, step_ms: u64, max_batch: u32) -> Worker {
    synthetic_worker_with(url, token, name, step_ms, max_batch, &[])
}

/// [`synthetic_worker`] with extra arguments.
fn synthetic_worker_with(url: &str, token: &str, name: &str, step_ms: u64, max_batch: u32, extra: &[&str]) -> Worker {
    let step_ms = step_ms.to_string();
    let max_batch = max_batch.to_string();
    let mut args = vec![
        "--renderer",
        "synthetic",
        "--synthetic-step-ms",
        &step_ms,
        "--model",
        MODEL,
        "--no-warmup",
        "--max-batch",
        &max_batch,
        "--name",
        name,
        "--max-backoff-ms",
        "200",
    ];
    args.extend_from_slice(extra);
    Worker::spawn(url, token, &args).expect("start a worker")
}

fn wait_connected(workers: &[&Worker]) {
    for worker in workers {
        worker
            .wait_for_log(WORKER_CONNECTED, Duration::from_secs(60))
            .expect("the worker connects");
    }
}

async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the coordinator")
}

/// `msg` with `authorization: Bearer <token>`.
fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut request = Request::new(msg);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// `msg` with the given raw authorization value, or none at all.
fn with_auth<T>(auth: Option<&str>, msg: T) -> Request<T> {
    let mut request = Request::new(msg);
    if let Some(value) = auth {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

fn jobs(ch: &Channel) -> JobServiceClient<Channel> {
    JobServiceClient::new(ch.clone()).max_decoding_message_size(64 << 20)
}

fn header(name: &str, steps: u32) -> SubmitHeader {
    SubmitHeader {
        name: name.to_owned(),
        defaults: Some(RenderParams {
            width: 64,
            height: 64,
            steps,
            model: MODEL.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn prompt(i: usize) -> PromptSpec {
    PromptSpec {
        text: format!("1girl, solo, portrait number {i}"),
        seed: Some(i as u64),
        ..Default::default()
    }
}

fn prompts(n: usize) -> Vec<PromptSpec> {
    (0..n).map(prompt).collect()
}

/// The SubmitJob stream: `header` (if any), the prompts in chunks of 1,000, then the end marker.
fn submit_messages(header: Option<SubmitHeader>, prompts: Vec<PromptSpec>) -> Vec<SubmitJobRequest> {
    let n = prompts.len() as u64;
    let mut messages = submit_messages_without_end(header, prompts);
    messages.push(SubmitJobRequest {
        msg: Some(submit_job_request::Msg::End(SubmitEnd { prompt_count: n })),
    });
    messages
}

/// [`submit_messages`] without the end marker (a client that went away).
fn submit_messages_without_end(header: Option<SubmitHeader>, prompts: Vec<PromptSpec>) -> Vec<SubmitJobRequest> {
    let mut messages = Vec::new();
    if let Some(header) = header {
        messages.push(SubmitJobRequest {
            msg: Some(submit_job_request::Msg::Header(header)),
        });
    }
    for chunk in prompts.chunks(1000) {
        messages.push(SubmitJobRequest {
            msg: Some(submit_job_request::Msg::Chunk(PromptChunk {
                prompts: chunk.to_vec(),
            })),
        });
    }
    messages
}

async fn submit(
    ch: &Channel,
    token: &str,
    header: SubmitHeader,
    prompts: Vec<PromptSpec>,
) -> Result<SubmitJobResponse, Status> {
    let stream = tokio_stream::iter(submit_messages(Some(header), prompts));
    jobs(ch)
        .submit_job(authed(token, stream))
        .await
        .map(|r| r.into_inner())
}

/// Submits and expects a new job; returns its id.
async fn submit_ok(ch: &Channel, token: &str, header: SubmitHeader, prompts: Vec<PromptSpec>) -> Uuid {
    let n = prompts.len() as u64;
    let response = submit(ch, token, header, prompts).await.expect("SubmitJob");
    assert!(response.errors.is_empty(), "unexpected errors: {:?}", response.errors);
    assert_eq!(response.accepted, n);
    assert!(!response.duplicate);
    Uuid::parse_str(&response.job_id).expect("a job id")
}

/// A fresh database with a coordinator on it, a pool on the database and a channel to the coordinator.
struct Farm {
    db: String,
    coord: Coordinator,
    pool: PgPool,
    ch: Channel,
}

impl Farm {
    async fn start(prefix: &str, coordinator_args: &[&str]) -> Farm {
        let db = fresh_database(prefix);
        let coord = coordinator(&db, coordinator_args);
        let pool = pool(&db).await;
        let ch = channel(&coord.url()).await;
        Farm { db, coord, pool, ch }
    }
}

async fn pool(database_url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(3))
        .connect(database_url)
        .await
        .expect("connect to PostgreSQL")
}

async fn count(pool: &PgPool, sql: &str, job: Uuid) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Rows in jobs, tasks and task_attempts.
async fn row_counts(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "select (select count(*) from jobs), (select count(*) from tasks), (select count(*) from task_attempts)",
    )
    .fetch_one(pool)
    .await
    .expect("count rows")
}

/// Tasks of a job by state, for failure messages.
async fn states(pool: &PgPool, job: Uuid) -> Vec<(i16, i64)> {
    sqlx::query_as("select state, count(*) from tasks where job_id = $1 group by state order by state")
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

/// Whether the job has finished (`finished_at` is set).
async fn job_finished(pool: &PgPool, job: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select finished_at is not null from jobs where id = $1").bind(job).fetch_one(pool).await
}

/// Polls the job store until the job is finished. Tolerates the database being away meanwhile.
async fn wait_job_finished(pool: &PgPool, job: Uuid, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(job_finished(pool, job).await, Ok(true)) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "job {job} did not finish within {timeout:?}; tasks by state: {:?}",
                states(pool, job).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 20 ms until it is true; returns how long it took, panics after `timeout`.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PNG results stored for a job (and temporary files left behind).
fn stored_blobs(results: &Path, job: Uuid) -> (usize, usize) {
    let dir = results.join(job.to_string());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (0, 0);
    };
    let names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let pngs = names.iter().filter(|n| n.ends_with(".png")).count();
    let temps = names.iter().filter(|n| n.starts_with(".tmp-")).count();
    (pngs, temps)
}

/// Every task of the job succeeded exactly once: state, one succeeded attempt per task, one blob per
/// task whose bytes match the size and SHA-256 recorded in its row.
async fn assert_each_task_succeeded_once(pool: &PgPool, job: Uuid, total: i64, results: &Path) {
    let succeeded = count(pool, "select count(*) from tasks where job_id = $1 and state = 3", job).await;
    assert_eq!(succeeded, total, "succeeded tasks; by state: {:?}", states(pool, job).await);
    let not_once = count(
        pool,
        "select count(*) from tasks t where t.job_id = $1 and
             (select count(*) from task_attempts a where a.task_id = t.id and a.outcome = 'succeeded') <> 1",
        job,
    )
    .await;
    assert_eq!(not_once, 0, "tasks without exactly one succeeded attempt");
    let (pngs, _) = stored_blobs(results, job);
    assert_eq!(pngs as i64, total, "stored PNGs");
    let rows: Vec<(i64, String, i64, String)> = sqlx::query_as(
        "select idx, result_sha256, result_size, result_key from tasks where job_id = $1 order by idx",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap();
    for (idx, sha, size, key) in rows {
        assert!(key.starts_with(&format!("{job}/{idx}.")), "result key {key} of task {idx}");
        let bytes = std::fs::read(results.join(&key)).expect("the result blob");
        assert_eq!(bytes.len() as i64, size, "size of result {idx}");
        assert_eq!(hex::encode(Sha256::digest(&bytes)), sha, "sha256 of result {idx}");
    }
    let state: i16 = sqlx::query_scalar("select state from jobs where id = $1")
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(i32::from(state), JobState::Succeeded as i32, "job state");
}

/// A worker session spoken by hand over `WorkerService.Connect`.
struct Session {
    out: mpsc::Sender<WorkerMessage>,
    inbound: tonic::Streaming<CoordinatorMessage>,
    worker_id: String,
}

impl Session {
    async fn open(ch: &Channel, auth: Option<&str>, name: &str, max_batch: u32) -> Result<Session, Status> {
        Session::open_with_pixels(ch, auth, name, max_batch, 1024 * 1024).await
    }

    async fn open_with_pixels(
        ch: &Channel,
        auth: Option<&str>,
        name: &str,
        max_batch: u32,
        max_pixels: u64,
    ) -> Result<Session, Status> {
        let caps = WorkerCapabilities {
            device: "cpu".into(),
            model_name: MODEL.into(),
            model_hash: "none".into(),
            max_batch,
            max_pixels,
            ..Default::default()
        };
        Session::open_with_caps(ch, auth, name, caps).await
    }

    async fn open_with_caps(
        ch: &Channel,
        auth: Option<&str>,
        name: &str,
        caps: WorkerCapabilities,
    ) -> Result<Session, Status> {
        let (out, rx) = mpsc::channel(1024);
        let hello = Hello { name: name.to_owned(), capabilities: Some(caps), held_leases: vec![] };
        out.send(WorkerMessage {
            msg: Some(worker_message::Msg::Hello(hello)),
        })
        .await
        .unwrap();
        let mut client = WorkerServiceClient::new(ch.clone());
        let mut inbound = client
            .connect(with_auth(auth, ReceiverStream::new(rx)))
            .await?
            .into_inner();
        let welcome = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no welcome"))??;
        let Some(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(welcome)),
        }) = welcome
        else {
            panic!("the first message is not a welcome: {welcome:?}");
        };
        Ok(Session {
            out,
            inbound,
            worker_id: welcome.worker_id,
        })
    }

    async fn credits(&self, add: u32) {
        self.out
            .send(WorkerMessage {
                msg: Some(worker_message::Msg::Credits(Credits { add, withdraw: false })),
            })
            .await
            .expect("the session is open");
    }

    /// A heartbeat listing `leases`.
    async fn heartbeat(&self, leases: Vec<farm_proto::pb::Lease>) {
        self.heartbeat_reporting(leases, 0).await
    }

    /// A heartbeat that also reports the device memory free now (0: not measured).
    async fn heartbeat_reporting(&self, leases: Vec<farm_proto::pb::Lease>, vram_free_bytes: u64) {
        self.out
            .send(WorkerMessage {
                msg: Some(worker_message::Msg::Heartbeat(Heartbeat { leases, vram_free_bytes })),
            })
            .await
            .expect("the session is open");
    }

    /// Reports the task of `lease` failed, of `kind` ("render", "out_of_memory", ...).
    async fn failed(&self, lease: &farm_proto::pb::Lease, kind: &str, retryable: bool) {
        self.out
            .send(WorkerMessage {
                msg: Some(worker_message::Msg::Failed(TaskFailed {
                    lease: Some(lease.clone()),
                    error: format!("{kind} failure reported by the test"),
                    retryable,
                    kind: kind.into(),
                })),
            })
            .await
            .expect("the session is open");
    }

    /// The assignment that arrives within `wait`, if any (other messages are skipped).
    async fn assign_within(&mut self, wait: Duration) -> Option<Assign> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.inbound.message()).await.ok()?;
            if let Some(coordinator_message::Msg::Assign(assign)) = msg.expect("the stream is healthy")?.msg {
                return Some(assign);
            }
        }
    }

    /// The next assignment (other messages are skipped).
    async fn next_assign(&mut self, timeout: Duration) -> Assign {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.inbound.message())
                .await
                .expect("an assignment in time")
                .expect("the stream is healthy")
                .expect("the stream is open");
            if let Some(coordinator_message::Msg::Assign(assign)) = msg.msg {
                return assign;
            }
        }
    }
}

/// `UploadResult` of `data` under the lease (`task_id`, `lease_token`).
async fn upload(
    ch: &Channel,
    auth: Option<&str>,
    task_id: &str,
    lease_token: u64,
    data: &[u8],
) -> Result<UploadResultResponse, Status> {
    let header = UploadHeader {
        lease: Some(farm_proto::pb::Lease {
            task_id: task_id.to_owned(),
            lease_token,
        }),
        content_type: "image/png".into(),
        size_bytes: data.len() as u64,
        sha256: hex::encode(Sha256::digest(data)),
        metadata_json: "{}".into(),
    };
    let messages = vec![
        UploadResultRequest {
            msg: Some(upload_result_request::Msg::Header(header)),
        },
        UploadResultRequest {
            msg: Some(upload_result_request::Msg::Data(data.to_vec())),
        },
    ];
    WorkerServiceClient::new(ch.clone())
        .upload_result(with_auth(auth, tokio_stream::iter(messages)))
        .await
        .map(|r| r.into_inner())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, contains: &str, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                status.message().contains(contains),
                "{what}: message {:?} should contain {contains:?}",
                status.message()
            );
            let lower = status.message().to_lowercase();
            for sql_word in ["select ", "insert ", "update ", "sqlstate", "violates"] {
                assert!(!lower.contains(sql_word), "{what}: SQL leaks into the status: {status:?}");
            }
        }
    }
}

/// Worker session ids connected through the replica listening on `port`.
async fn workers_of_replica(pool: &PgPool, port: u16) -> HashSet<String> {
    let rows: Vec<(String,)> = sqlx::query_as("select id::text from workers where coordinator like $1")
        .bind(format!("%:{port}"))
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|r| r.0).collect()
}

/// Reads a WatchJob stream to its end (or `timeout`).
async fn collect_events(ch: Channel, token: String, job: Uuid, timeout: Duration) -> Vec<JobEvent> {
    let mut stream = jobs(&ch)
        .watch_job(authed(
            &token,
            WatchJobRequest {
                job_id: job.to_string(),
                after_sequence: 0,
            },
        ))
        .await
        .expect("WatchJob")
        .into_inner();
    let mut events = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(ev))) => events.push(ev),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => panic!("the watch broke: {status:?}"),
            Err(_) => panic!("the watch did not end within {timeout:?} ({} events)", events.len()),
        }
    }
    events
}

fn final_state(events: &[JobEvent]) -> Option<i32> {
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(job_event::Event::Job(j)) => Some(j.state),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input

/// One submission that must be refused prompt by prompt: nothing stored, the reply names the prompt.
struct PromptCase {
    name: &'static str,
    prompts: Vec<PromptSpec>,
    index: u64,
    code: &'static str,
    /// Expected 1-based line (0: not located in the text).
    line: u32,
    message: &'static str,
}

/// A submission past the coordinator's prompt limit is refused with the limit named, at the first
/// prompt past it: the coordinator answers without waiting for the rest of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_over_the_prompt_limit_is_refused_without_reading_the_rest() {
    let Farm { db, coord, pool, ch } = Farm::start("acc_prompt_limit", &["--max-prompts-per-job", "5"]).await;
    let alice = coord.token("alice", "client").unwrap();
    let before = row_counts(&pool).await;
    // Eight prompts, then a stream that never ends (no end marker): the answer must not wait for it.
    let sent = submit_messages_without_end(Some(header("too big", 2)), prompts(8));
    let endless = tokio_stream::StreamExt::chain(tokio_stream::iter(sent), tokio_stream::pending());
    let r = tokio::time::timeout(Duration::from_secs(20), jobs(&ch).submit_job(authed(&alice, endless)))
        .await
        .expect("answered without the rest of the stream")
        .unwrap()
        .into_inner();
    assert!(r.job_id.is_empty() && r.accepted == 0, "{r:?}");
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!((r.errors[0].index, r.errors[0].code.as_str()), (5, "too_many_prompts"));
    assert!(r.errors[0].message.contains("at most 5 prompts"), "{}", r.errors[0].message);
    assert_eq!(row_counts(&pool).await, before, "nothing stored");
    // Within the limit the same coordinator stores the job.
    assert_eq!(submit(&ch, &alice, header("fits", 2), prompts(5)).await.unwrap().accepted, 5);
    // The limit cannot be raised past the protocol's ceiling.
    let refused = std::process::Command::new(farm_tests::binary("farm-coordinator"))
        .args(["serve", "--max-prompts-per-job", "1000001", "--database-url", &db])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("1000000"));
}

/// A submission that stops sending is refused after the coordinator's limit between messages,
/// with the limit named and nothing stored; while it waits it holds one of the coordinator's turns
/// to store submissions, so with one turn the next submission is stored only after it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_submission_is_refused_after_the_idle_limit_and_gives_up_its_turn() {
    let args = ["--submit-idle-timeout-s", "2", "--submit-quiet-limit-s", "5", "--max-concurrent-submissions", "1"];
    let Farm { coord, pool, ch, .. } = Farm::start("acc_stalled_submit", &args).await;
    let alice = coord.token("alice", "client").unwrap();
    let before = row_counts(&pool).await;
    // A header and some prompts, then silence (no end marker, the stream stays open).
    let sent = submit_messages_without_end(Some(header("stalled", 2)), prompts(3));
    let stalled = tokio_stream::StreamExt::chain(tokio_stream::iter(sent), tokio_stream::pending());
    let (ch2, alice2) = (ch.clone(), alice.clone());
    let started = Instant::now();
    let first = tokio::spawn(async move { jobs(&ch2).submit_job(authed(&alice2, stalled)).await });
    // The stalled submission holds the only turn by the time the next one is sent: the next one
    // is stored only after the stalled one is refused, 2 s after its last message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = submit(&ch, &alice, header("next", 2), prompts(2)).await.expect("the next submission is stored");
    let waited = started.elapsed();
    assert_eq!(next.accepted, 2);
    assert!(waited >= Duration::from_millis(1900), "the next submission was stored {waited:?} after the stalled one started, while it held the only turn");
    let refused = tokio::time::timeout(Duration::from_secs(20), first).await.expect("answered").unwrap();
    let status = refused.expect_err("a stalled submission is refused");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("--submit-idle-timeout-s") && status.message().contains("2 s"), "{}", status.message());
    let after = row_counts(&pool).await;
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 2), "only the next job and its two tasks are stored");
    // A complete submission (end marker sent) whose client keeps its side open is stored.
    let open = tokio_stream::StreamExt::chain(
        tokio_stream::iter(submit_messages(Some(header("kept open", 2)), prompts(2))),
        tokio_stream::pending(),
    );
    let r = tokio::time::timeout(Duration::from_secs(20), jobs(&ch).submit_job(authed(&alice, open)))
        .await
        .expect("answered")
        .expect("a complete submission is stored")
        .into_inner();
    assert_eq!(r.accepted, 2, "{r:?}");
    // A slow submission that sends empty chunks (the client's keep-alive while its input is
    // quiet) for longer than the limit is stored.
    let mut messages = submit_messages(Some(header("slow input", 2)), prompts(2));
    let keepalive = SubmitJobRequest { msg: Some(submit_job_request::Msg::Chunk(PromptChunk { prompts: vec![] })) };
    messages.splice(1..1, std::iter::repeat_n(keepalive, 6));
    let slow = futures::stream::unfold(messages.into_iter(), |mut rest| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rest.next().map(|m| (m, rest))
    });
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), jobs(&ch).submit_job(authed(&alice, slow)))
        .await
        .expect("answered")
        .expect("a slow submission that keeps sending is stored")
        .into_inner();
    assert_eq!(r.accepted, 2, "{r:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "it lasted longer than the limit");
    // Keep-alives alone, for longer than the quiet limit (5 s), are refused: nothing is stored.
    let before = row_counts(&pool).await;
    let quiet = futures::stream::unfold(0u32, |n| async move {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let msg = if n == 0 {
            SubmitJobRequest { msg: Some(submit_job_request::Msg::Header(header("only keep-alives", 2))) }
        } else {
            SubmitJobRequest { msg: Some(submit_job_request::Msg::Chunk(PromptChunk { prompts: vec![] })) }
        };
        (n < 40).then_some((msg, n + 1))
    });
    let refused = tokio::time::timeout(Duration::from_secs(30), jobs(&ch).submit_job(authed(&alice, quiet)))
        .await
        .expect("answered")
        .expect_err("a submission of keep-alives alone is refused");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("--submit-quiet-limit-s"), "{}", refused.message());
    assert_eq!(row_counts(&pool).await, before, "nothing stored");
}

/// SIGTERM with a worker session and a watch open (streams that never end by themselves): the
/// coordinator exits cleanly after its grace period instead of waiting for its supervisor's SIGKILL,
/// and the worker's lease survives for another replica to take back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_coordinator_after_its_grace_with_streams_open() {
    let Farm { mut coord, pool, ch, .. } = Farm::start("acc_sigterm", &["--shutdown-grace-s", "2"]).await;
    let client = coord.token("tess", "client").unwrap();
    let worker = bearer(&coord.token("tess", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("held", 2), prompts(1)).await;
    let mut session = Session::open(&ch, Some(&worker), "holder", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    let _watch = jobs(&ch)
        .watch_job(authed(&client, WatchJobRequest { job_id: job.to_string(), after_sequence: 0 }))
        .await
        .expect("a watch");
    let started = Instant::now();
    let status = coord.stop(Duration::from_secs(25)).expect("it ended");
    let took = started.elapsed();
    assert!(status.success(), "the coordinator ended by itself, cleanly: {status:?} after {took:?}");
    assert!(took < Duration::from_secs(15), "stopped {took:?} after SIGTERM (grace 2 s)");
    // The lease was not given up: the task is still running under it, for the worker to keep.
    let lease = a.tasks[0].lease.as_ref().unwrap();
    let (state, token): (i16, i64) = sqlx::query_as("select state, lease_token from tasks where id = $1")
        .bind(Uuid::parse_str(&lease.task_id).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((state, token as u64), (2, lease.lease_token));
    drop(session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_documented_status_and_stores_nothing() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_bad_input", &[]).await;
    let alice = coord.token("alice", "client").unwrap();
    let bob = coord.token("bob", "client").unwrap();
    let alice_worker = coord.token("alice", "worker").unwrap();

    // --- Invalid prompts: SubmitJobResponse.errors, no job id, nothing stored.
    let with = |i: usize, f: &dyn Fn(&mut PromptSpec)| {
        let mut p = prompts(3);
        f(&mut p[i]);
        p[i].source = "batch.xml".into();
        p[i].source_line = 40 + i as u32;
        p
    };
    let mut late_bad = prompts(2500);
    late_bad[2100].text = "<character_1><n>rin</n>".into();
    let cases = vec![
        PromptCase {
            name: "malformed XML",
            prompts: with(1, &|p| p.text = "<character_1>\n  <n>miku</x>\n</character_1>".into()),
            index: 1,
            code: "xml_syntax",
            line: 2,
            message: "",
        },
        PromptCase {
            name: "DOCTYPE",
            prompts: with(0, &|p| {
                p.text = "<!DOCTYPE p [<!ENTITY e \"boom\">]>\n<character_1><n>&e;</n></character_1>".into()
            }),
            index: 0,
            code: "doctype",
            line: 1,
            message: "",
        },
        PromptCase {
            name: "oversize prompt",
            prompts: with(2, &|p| p.text = "a".repeat(16 * 1024 + 1)),
            index: 2,
            code: "too_large",
            line: 0,
            message: "16384",
        },
        PromptCase {
            name: "0 steps",
            prompts: with(1, &|p| p.steps = Some(0)),
            index: 1,
            code: "limit",
            line: 0,
            message: "between 1 and 200",
        },
        PromptCase {
            name: "201 steps",
            prompts: with(1, &|p| p.steps = Some(201)),
            index: 1,
            code: "limit",
            line: 0,
            message: "between 1 and 200",
        },
        PromptCase {
            name: "width 1000",
            prompts: with(0, &|p| p.width = Some(1000)),
            index: 0,
            code: "limit",
            line: 0,
            message: "multiples of 16",
        },
        PromptCase {
            name: "bad prompt in a later chunk",
            prompts: late_bad,
            index: 2100,
            code: "xml_syntax",
            line: 1,
            message: "",
        },
        PromptCase {
            name: "NUL byte",
            prompts: with(1, &|p| p.text = "1girl,\nblue\u{0}hair".into()),
            index: 1,
            code: "control_character",
            line: 2,
            message: "U+0000",
        },
        PromptCase {
            name: "NUL byte in a negative prompt",
            prompts: with(2, &|p| p.negative_prompt = "lowres\u{0}".into()),
            index: 2,
            code: "control_character",
            line: 1,
            message: "negative prompt",
        },
        PromptCase {
            name: "no prompts",
            prompts: vec![],
            index: 0,
            code: "empty",
            line: 0,
            message: "",
        },
    ];
    for case in cases {
        let before = row_counts(&pool).await;
        let with_source = case.prompts.get(case.index as usize).map(|p| (p.source.clone(), p.source_line));
        let response = submit(&ch, &alice, header(case.name, 2), case.prompts)
            .await
            .unwrap_or_else(|s| panic!("{}: invalid prompts are reported in the reply, got {s:?}", case.name));
        assert!(response.job_id.is_empty(), "{}: job id {}", case.name, response.job_id);
        assert_eq!(response.accepted, 0, "{}", case.name);
        assert!(!response.duplicate, "{}", case.name);
        assert_eq!(response.errors.len(), 1, "{}: {:?}", case.name, response.errors);
        let e = &response.errors[0];
        assert_eq!((e.index, e.code.as_str()), (case.index, case.code), "{}: {e:?}", case.name);
        assert_eq!(e.line, case.line, "{}: {e:?}", case.name);
        if case.line > 0 {
            assert!(e.column > 0, "{}: located errors have a column: {e:?}", case.name);
        }
        assert!(!e.message.is_empty() && e.message.contains(case.message), "{}: {e:?}", case.name);
        if let Some((source, line)) = with_source {
            assert_eq!((e.source.clone(), e.source_line), (source, line), "{}: source echoed", case.name);
        }
        assert_eq!(row_counts(&pool).await, before, "{}: nothing stored", case.name);
    }

    // --- Header-level limits and protocol errors: INVALID_ARGUMENT, nothing stored.
    let before = row_counts(&pool).await;
    let mut steps_201 = header("steps 201", 2);
    steps_201.defaults.as_mut().unwrap().steps = 201;
    let mut width_1000 = header("width 1000", 2);
    width_1000.defaults.as_mut().unwrap().width = 1000;
    let mut attempts_101 = header("attempts", 2);
    attempts_101.max_attempts = 101;
    let nul_name = header("nightly\u{0}", 2);
    for (what, h, message) in [
        ("header with 201 steps", steps_201, "200"),
        ("header with width 1000", width_1000, "multiples of 16"),
        ("header with 101 attempts", attempts_101, "max_attempts"),
        ("header with a NUL byte in the name", nul_name, "name: control character U+0000"),
    ] {
        assert_status(submit(&ch, &alice, h, prompts(3)).await, Code::InvalidArgument, message, what);
    }
    let no_header = tokio_stream::iter(submit_messages(None, prompts(2)));
    assert_status(
        jobs(&ch).submit_job(authed(&alice, no_header)).await,
        Code::InvalidArgument,
        "header",
        "chunk before the header",
    );
    // A stream that ends without its end marker (the client went away) or whose marker disagrees with
    // what arrived stores nothing, even when every prompt is valid.
    let cut = tokio_stream::iter(submit_messages_without_end(Some(header("cut off", 2)), prompts(1500)));
    assert_status(
        jobs(&ch).submit_job(authed(&alice, cut)).await,
        Code::Aborted,
        "nothing was stored",
        "a submission without its end marker",
    );
    let mut short = submit_messages(Some(header("short", 2)), prompts(1500));
    if let Some(SubmitJobRequest { msg: Some(submit_job_request::Msg::End(end)) }) = short.last_mut() {
        end.prompt_count = 1501;
    }
    assert_status(
        jobs(&ch).submit_job(authed(&alice, tokio_stream::iter(short))).await,
        Code::InvalidArgument,
        "1501",
        "an end marker that disagrees with the prompts sent",
    );
    assert_eq!(row_counts(&pool).await, before, "header errors store nothing");

    // A value the database itself refuses (class 22, data exception) is the caller's error, not an
    // outage to retry.
    assert_status(
        jobs(&ch)
            .list_jobs(authed(&alice, ListJobsRequest { name_contains: "a\u{0}".into(), ..Default::default() }))
            .await,
        Code::InvalidArgument,
        "cannot hold a value",
        "ListJobs with a NUL byte in the name filter",
    );

    // --- validate_only stores nothing even when everything is valid.
    let mut validate = header("validate", 2);
    validate.validate_only = true;
    let r = submit(&ch, &alice, validate, prompts(5)).await.unwrap();
    assert!(r.job_id.is_empty() && r.errors.is_empty() && r.accepted == 5, "{r:?}");
    assert_eq!(row_counts(&pool).await, before, "validate_only stores nothing");

    // --- Authentication: UNAUTHENTICATED without a token or with an unknown one, on both services.
    let unknown = bearer(&format!("farm_{}", "0".repeat(64)));
    for (what, auth, message) in [
        ("no token", None, "missing bearer token"),
        ("unknown token", Some(unknown.as_str()), "unknown or revoked token"),
        ("not a bearer token", Some("Basic YWxpY2U6c2VjcmV0"), "Bearer"),
    ] {
        let stream = tokio_stream::iter(submit_messages(Some(header("auth", 2)), prompts(2)));
        assert_status(
            jobs(&ch).submit_job(with_auth(auth, stream)).await,
            Code::Unauthenticated,
            message,
            &format!("SubmitJob, {what}"),
        );
        assert_status(
            jobs(&ch).list_jobs(with_auth(auth, ListJobsRequest::default())).await,
            Code::Unauthenticated,
            message,
            &format!("ListJobs, {what}"),
        );
        assert_status(
            Session::open(&ch, auth, "intruder", 1).await.map(|s| s.worker_id),
            Code::Unauthenticated,
            message,
            &format!("Connect, {what}"),
        );
        assert_status(
            upload(&ch, auth, &Uuid::new_v4().to_string(), 1, b"png").await,
            Code::Unauthenticated,
            message,
            &format!("UploadResult, {what}"),
        );
        // Every other job API call authenticates too (each on its own).
        let job_id = Uuid::new_v4().to_string();
        let c = &mut jobs(&ch);
        let calls: Vec<(&str, Result<(), Status>)> = vec![
            ("GetJob", c.get_job(with_auth(auth, GetJobRequest { job_id: job_id.clone() })).await.map(|_| ())),
            ("GetTask", c.get_task(with_auth(auth, GetTaskRequest { job_id: job_id.clone(), index: 0 })).await.map(|_| ())),
            (
                "WatchJob",
                c.watch_job(with_auth(auth, WatchJobRequest { job_id: job_id.clone(), after_sequence: 0 })).await.map(|_| ()),
            ),
            ("CancelJob", c.cancel_job(with_auth(auth, CancelJobRequest { job_id: job_id.clone() })).await.map(|_| ())),
            (
                "RetryJob",
                c.retry_job(with_auth(auth, RetryJobRequest { job_id: job_id.clone(), include_cancelled: false })).await.map(|_| ()),
            ),
            (
                "ListResults",
                c.list_results(with_auth(auth, ListResultsRequest { job_id: job_id.clone(), ..Default::default() })).await.map(|_| ()),
            ),
            (
                "DownloadResult",
                c.download_result(with_auth(auth, DownloadResultRequest { job_id: job_id.clone(), index: 0 })).await.map(|_| ()),
            ),
            ("ListWorkers", c.list_workers(with_auth(auth, ListWorkersRequest::default())).await.map(|_| ())),
        ];
        for (call, result) in calls {
            assert_status(result, Code::Unauthenticated, message, &format!("{call}, {what}"));
        }
    }
    // Roles: a worker token cannot use the job API and a client token cannot act as a worker.
    assert_status(
        jobs(&ch).list_jobs(authed(&alice_worker, ListJobsRequest::default())).await,
        Code::PermissionDenied,
        "worker tokens",
        "ListJobs with a worker token",
    );
    assert_status(
        Session::open(&ch, Some(&bearer(&alice)), "client-as-worker", 1).await.map(|s| s.worker_id),
        Code::PermissionDenied,
        "client tokens",
        "Connect with a client token",
    );
    assert_eq!(row_counts(&pool).await, before, "refused callers store nothing");

    // --- A revoked token is refused; `token list` shows tokens by id, never the token itself.
    let doomed = coord.token("alice", "client").unwrap();
    let id = &hex::encode(Sha256::digest(doomed.as_bytes()))[..12];
    let listed = coord.admin(&["token", "list", "--tenant", "alice", "--json"]).expect_success();
    assert!(!listed.stdout.contains(&doomed), "token list printed a token");
    let entry = |out: &str| -> serde_json::Value {
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("token {id} not listed: {out}"))
    };
    assert!(entry(&listed.stdout)["revoked_at"].is_null());
    assert_eq!(coord.admin(&["token", "revoke", &id[..6]]).code, 1, "fewer than 8 digits are refused");
    coord.admin(&["token", "revoke", id]).expect_success();
    assert_status(
        jobs(&ch).list_jobs(authed(&doomed, ListJobsRequest::default())).await,
        Code::Unauthenticated,
        "unknown or revoked token",
        "a revoked token",
    );
    let listed = coord.admin(&["token", "list", "--json"]).expect_success();
    assert!(entry(&listed.stdout)["revoked_at"].is_string(), "revocation time listed");

    // --- Another tenant's job is NOT_FOUND everywhere, like a job that does not exist.
    let job = submit_ok(&ch, &alice, header("alice's job", 2), prompts(3)).await;
    let id = job.to_string();
    // A watch resuming past the largest sequence number is refused (it would stop the job's counter).
    assert_status(
        jobs(&ch)
            .watch_job(authed(&alice, WatchJobRequest { job_id: id.clone(), after_sequence: u64::MAX }))
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        "after_sequence",
        "a resume point past the largest sequence number",
    );
    let missing = Uuid::new_v4().to_string();
    for job_id in [&id, &missing] {
        let what = |call: &str| format!("{call} of {} by bob", if job_id == &id { "alice's job" } else { "a missing job" });
        let c = &mut jobs(&ch);
        assert_status(
            c.get_job(authed(&bob, GetJobRequest { job_id: job_id.clone() })).await,
            Code::NotFound,
            "not found",
            &what("GetJob"),
        );
        assert_status(
            c.get_task(authed(&bob, GetTaskRequest { job_id: job_id.clone(), index: 0 })).await,
            Code::NotFound,
            "not found",
            &what("GetTask"),
        );
        assert_status(
            c.watch_job(authed(&bob, WatchJobRequest { job_id: job_id.clone(), after_sequence: 0 }))
                .await
                .map(|_| ()),
            Code::NotFound,
            "not found",
            &what("WatchJob"),
        );
        assert_status(
            c.cancel_job(authed(&bob, CancelJobRequest { job_id: job_id.clone() })).await,
            Code::NotFound,
            "not found",
            &what("CancelJob"),
        );
        assert_status(
            c.retry_job(authed(&bob, RetryJobRequest { job_id: job_id.clone(), include_cancelled: true }))
                .await,
            Code::NotFound,
            "not found",
            &what("RetryJob"),
        );
        assert_status(
            c.list_results(authed(&bob, ListResultsRequest { job_id: job_id.clone(), ..Default::default() }))
                .await,
            Code::NotFound,
            "not found",
            &what("ListResults"),
        );
        assert_status(
            c.download_result(authed(&bob, DownloadResultRequest { job_id: job_id.clone(), index: 0 }))
                .await
                .map(|_| ()),
            Code::NotFound,
            "",
            &what("DownloadResult"),
        );
    }
    let bobs = jobs(&ch).list_jobs(authed(&bob, ListJobsRequest::default())).await.unwrap().into_inner();
    assert!(bobs.jobs.iter().all(|j| j.job_id != id), "bob lists alice's job");
    let alices = jobs(&ch).get_job(authed(&alice, GetJobRequest { job_id: id.clone() })).await.unwrap().into_inner();
    assert_ne!(alices.state, JobState::Cancelled as i32, "bob's cancel must not reach alice's job");

    // --- Stale leases: UploadResult with a token that is not the task's current one is
    // FAILED_PRECONDITION and commits nothing, before and after the real commit.
    let mut session = Session::open(&ch, Some(&bearer(&alice_worker)), "hand-worker", 1).await.unwrap();
    session.credits(1).await;
    let assign = session.next_assign(Duration::from_secs(10)).await;
    assert_eq!(assign.tasks.len(), 1);
    let lease = assign.tasks[0].lease.clone().unwrap();
    let index = assign.tasks[0].index;
    // ListWorkers shows the farm's workers to every tenant, but a worker's current task only to the
    // tenant whose job it is.
    for (who, token, shown) in [("alice", &alice, 1), ("bob", &bob, 0)] {
        let listed = jobs(&ch).list_workers(authed(token, ListWorkersRequest::default())).await.unwrap().into_inner();
        let w = listed.workers.iter().find(|w| w.name == "hand-worker").expect("the hand worker is listed");
        assert_eq!(w.current_tasks.len(), shown, "current tasks of alice's lease as seen by {who}: {w:?}");
        if shown > 0 {
            assert_eq!(w.current_tasks[0].task_id, lease.task_id);
        }
    }
    // A heartbeat's free-memory figure replaces the hello's in the listing; one without a figure
    // (0) keeps it.
    /// (free VRAM, last heartbeat) of the hand worker as listed.
    async fn free_vram(ch: &Channel, token: &str) -> (u64, i64) {
        let listed = jobs(ch).list_workers(authed(token, ListWorkersRequest::default())).await.unwrap().into_inner();
        let w = listed.workers.into_iter().find(|w| w.name == "hand-worker").expect("the hand worker is listed");
        (w.capabilities.unwrap_or_default().vram_free_bytes, w.last_heartbeat_ms)
    }
    session.heartbeat_reporting(vec![lease.clone()], 7 << 30).await;
    wait_for("the heartbeat's free VRAM in ListWorkers", Duration::from_secs(10), || async {
        free_vram(&ch, &alice).await.0 == 7 << 30
    })
    .await;
    let (_, seen) = free_vram(&ch, &alice).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    session.heartbeat(vec![lease.clone()]).await;
    wait_for("the next heartbeat to be recorded", Duration::from_secs(10), || async {
        free_vram(&ch, &alice).await.1 > seen
    })
    .await;
    assert_eq!(free_vram(&ch, &alice).await.0, 7 << 30, "a heartbeat without a figure keeps the last one");
    // A worker the sweep marked disconnected (its heartbeats did not reach the database in time)
    // is connected again at its next heartbeat.
    sqlx::query("update workers set disconnected_at = now() where name = 'hand-worker'").execute(&pool).await.unwrap();
    session.heartbeat(vec![lease.clone()]).await;
    wait_for("the worker to be listed as connected again", Duration::from_secs(10), || async {
        let listed =
            jobs(&ch).list_workers(authed(&alice, ListWorkersRequest::default())).await.unwrap().into_inner();
        listed.workers.iter().any(|w| w.name == "hand-worker" && w.connected)
    })
    .await;
    // The listing is capped at 10,000 sessions: with more disconnected sessions than that, whose
    // names sort first, the connected worker is still listed.
    sqlx::query(
        "insert into workers (id, tenant_id, name, capabilities, model, max_pixels, max_batch, coordinator, disconnected_at)
         select gen_random_uuid(), 'alice', 'a-gone-' || lpad(i::text, 5, '0'), '{}'::jsonb, 'tiny', 0, 1, 'gone', now()
         from generate_series(1, 10000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let listed = jobs(&ch)
        .list_workers(authed(&alice, ListWorkersRequest { include_disconnected: true }))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.workers.iter().any(|w| w.name == "hand-worker" && w.connected), "the connected worker is listed");
    assert!(listed.workers.iter().any(|w| w.name.starts_with("a-gone-")), "disconnected sessions are listed too");
    let names: Vec<&str> = listed.workers.iter().map(|w| w.name.as_str()).collect();
    assert!(names.windows(2).all(|p| p[0] <= p[1]), "listed by name");
    sqlx::query("delete from workers where coordinator = 'gone'").execute(&pool).await.unwrap();
    let worker_auth = bearer(&alice_worker);
    let wa = Some(worker_auth.as_str());
    let blob_path = coord.results_dir().join(format!("{id}/{index}.{}.png", lease.lease_token));
    // Another session that learned the task id and token (they travel in PNG metadata) cannot
    // report progress on the lease, fail it or hand it back: only the session holding it can.
    let bob_worker = bearer(&coord.token("bob", "worker").unwrap());
    let intruder = Session::open(&ch, Some(&bob_worker), "intruder", 1).await.unwrap();
    for msg in [
        worker_message::Msg::Progress(StepProgress { lease: Some(lease.clone()), step: 7, total_steps: 9 }),
        worker_message::Msg::Failed(TaskFailed {
            lease: Some(lease.clone()),
            error: "forged".into(),
            retryable: false,
            kind: "render".into(),
        }),
        worker_message::Msg::Released(TaskReleased { lease: Some(lease.clone()), reason: "forged".into(), retry_after_ms: 0 }),
    ] {
        intruder.out.send(WorkerMessage { msg: Some(msg) }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let row: (i16, i32, i32, Option<String>) = sqlx::query_as(
        "select state, failures, current_step, lease_owner::text from tasks where id = $1",
    )
    .bind(Uuid::parse_str(&lease.task_id).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, (2, 0, 0, Some(session.worker_id.clone())), "another session changed the lease");
    drop(intruder);
    assert_status(
        upload(&ch, wa, &lease.task_id, lease.lease_token + 1000, b"forged").await,
        Code::FailedPrecondition,
        "lease is not current",
        "upload with a token that was never issued for the task",
    );
    assert_status(
        upload(&ch, wa, &Uuid::new_v4().to_string(), lease.lease_token, b"forged").await,
        Code::FailedPrecondition,
        "lease is not current",
        "upload for another task id",
    );
    assert!(!blob_path.exists(), "a refused upload stored a blob");
    assert_eq!(stored_blobs(coord.results_dir(), job), (0, 0), "a refused upload left a file behind");
    assert_eq!(
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 3", job).await,
        0,
        "a refused upload committed"
    );
    assert_status(
        upload(&ch, Some(&bearer(&alice)), &lease.task_id, lease.lease_token, b"client").await,
        Code::PermissionDenied,
        "client tokens",
        "upload with a client token",
    );
    let good = b"\x89PNG\r\n\x1a\nthe real result".to_vec();
    let committed = upload(&ch, wa, &lease.task_id, lease.lease_token, &good).await.expect("a current lease uploads");
    assert_eq!(committed.result.unwrap().sha256, hex::encode(Sha256::digest(&good)));
    let row_before: (i16, String, i64) =
        sqlx::query_as("select state, result_sha256, result_size from tasks where id = $1")
            .bind(Uuid::parse_str(&lease.task_id).unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_status(
        upload(&ch, wa, &lease.task_id, lease.lease_token, b"a second commit").await,
        Code::FailedPrecondition,
        "lease is not current",
        "a second upload under an already committed lease",
    );
    let row_after: (i16, String, i64) =
        sqlx::query_as("select state, result_sha256, result_size from tasks where id = $1")
            .bind(Uuid::parse_str(&lease.task_id).unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(row_before, row_after, "the committed row changed");
    assert_eq!(std::fs::read(&blob_path).unwrap(), good, "the committed blob changed");
    assert_eq!(stored_blobs(coord.results_dir(), job), (1, 0), "one blob, no temporary leftovers");
    assert_eq!(
        count(&pool, "select count(*) from task_attempts a join tasks t on t.id = a.task_id where t.job_id = $1 and a.outcome = 'succeeded'", job).await,
        1
    );
    drop(session);

    // --- Idempotency: the same tenant and key return the first job and insert nothing.
    let mut keyed = header("nightly", 2);
    keyed.idempotency_key = "nightly-2024-06-01".into();
    let first = submit(&ch, &alice, keyed.clone(), prompts(5)).await.unwrap();
    assert!(!first.duplicate && first.accepted == 5 && !first.job_id.is_empty(), "{first:?}");
    let before = row_counts(&pool).await;
    let again = submit(&ch, &alice, keyed.clone(), prompts(7)).await.unwrap();
    assert_eq!(again.job_id, first.job_id, "a repeated key returns the first job");
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.accepted, 5, "the first job's size");
    assert_eq!(row_counts(&pool).await, before, "a repeated key inserts nothing");
    // A validate-only call under the stored job's key still checks its prompts (and stores nothing).
    let mut check = keyed.clone();
    check.validate_only = true;
    let bad = PromptSpec { text: "<character_1><n>miku</x></character_1>".into(), ..prompt(0) };
    let checked = submit(&ch, &alice, check, vec![prompt(1), bad]).await.unwrap();
    assert!(!checked.duplicate && checked.job_id.is_empty(), "{checked:?}");
    assert_eq!(checked.errors.iter().map(|e| e.index).collect::<Vec<_>>(), [1], "{checked:?}");
    assert_eq!(row_counts(&pool).await, before, "validate_only stores nothing");
    // Keys are per tenant: bob's identical key is a new job.
    let bobs = submit(&ch, &bob, keyed, prompts(2)).await.unwrap();
    assert!(!bobs.duplicate && bobs.job_id != first.job_id, "{bobs:?}");
}

// ---------------------------------------------------------------------------------------------
// Lost and silent workers

/// A worker whose token is revoked loses its open session at its next heartbeat once the token
/// cache has expired (here 200 ms), its lease goes back to the queue, and it cannot connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_worker_token_ends_its_open_session() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_revoked_session", &["--auth-cache-ms", "200"]).await;
    let client = coord.token("kim", "client").unwrap();
    let raw = coord.token("kim", "worker").unwrap();
    let worker = bearer(&raw);
    let job = submit_ok(&ch, &client, header("revoked", 2), prompts(1)).await;
    let mut session = Session::open(&ch, Some(&worker), "revoked-worker", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    let lease = a.tasks[0].lease.clone().unwrap();
    session.heartbeat(vec![lease.clone()]).await;
    coord.admin(&["token", "revoke", &raw]).expect_success();
    tokio::time::sleep(Duration::from_millis(300)).await;
    session.heartbeat(vec![lease]).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = session.inbound.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the session of a revoked token stayed open");
    wait_for("the task to be queued again", Duration::from_secs(10), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 1", job).await == 1
    })
    .await;
    assert_status(
        Session::open(&ch, Some(&worker), "revoked-worker", 1).await.map(|s| s.worker_id),
        Code::Unauthenticated,
        "unknown or revoked token",
        "Connect with a revoked token",
    );
}

/// A lease lost while its upload is in flight (the header passed the lease check, then the worker's
/// session dropped, the task was requeued and another worker claimed it): the commit is refused with
/// FAILED_PRECONDITION and the blob published under that lease's key is removed again; the task is
/// done by the other worker. (Had nobody claimed it, the upload would have committed: see
/// `a_lease_its_worker_stops_listing_expires_while_the_session_keeps_the_others`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_during_its_upload_commits_nothing_and_leaves_no_blob() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_lost_mid_upload", &[]).await;
    let client = coord.token("carol", "client").unwrap();
    let worker = bearer(&coord.token("carol", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("lost mid-upload", 2), prompts(1)).await;

    let mut session = Session::open(&ch, Some(&worker), "mid-upload", 1).await.unwrap();
    session.credits(1).await;
    let assign = session.next_assign(Duration::from_secs(10)).await;
    let lease = assign.tasks[0].lease.clone().unwrap();
    let data = b"\x89PNG\r\n\x1a\nbytes of a lost lease".to_vec();
    let (tx, rx) = mpsc::channel(4);
    tx.send(UploadResultRequest {
        msg: Some(upload_result_request::Msg::Header(UploadHeader {
            lease: Some(lease.clone()),
            content_type: "image/png".into(),
            size_bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
            metadata_json: "{}".into(),
        })),
    })
    .await
    .unwrap();
    let mut uploads = WorkerServiceClient::new(ch.clone());
    let worker_auth = worker.clone();
    let upload = tokio::spawn(async move {
        uploads
            .upload_result(with_auth(Some(&worker_auth), ReceiverStream::new(rx)))
            .await
    });
    // Let the header pass the lease check, then lose the lease: the session drops and is requeued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(session);
    wait_for("the task to be queued again", Duration::from_secs(10), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 1", job).await == 1
    })
    .await;
    let mut other = Session::open(&ch, Some(&worker), "next", 1).await.unwrap();
    other.credits(1).await;
    let next = other.next_assign(Duration::from_secs(10)).await.tasks[0].lease.clone().unwrap();
    assert_ne!(next.lease_token, lease.lease_token);
    tx.send(UploadResultRequest { msg: Some(upload_result_request::Msg::Data(data)) }).await.unwrap();
    drop(tx);
    assert_status(
        upload.await.unwrap(),
        Code::FailedPrecondition,
        "lease is not current",
        "an upload whose lease was lost while it was sent",
    );
    assert_eq!(stored_blobs(coord.results_dir(), job), (0, 0), "the refused upload's blob was removed");
    assert_eq!(count(&pool, "select count(*) from tasks where job_id = $1 and state = 3", job).await, 0);

    // The other worker's result commits under the new lease.
    let good = b"\x89PNG\r\n\x1a\nthe result".to_vec();
    upload_ok(&ch, &worker, &next, &good).await;
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    assert_each_task_succeeded_once(&pool, job, 1, coord.results_dir()).await;
}

/// Heartbeats renew only the leases they list: a task the worker stops listing (one it lost track
/// of) expires after the TTL and is requeued while the session stays up and keeps its other lease.
/// Until another worker claims it (the worker was only late), its result still commits, uploaded
/// before the next heartbeat or after one that lists it again and so takes it back; once another
/// worker claimed it, the old lease is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_its_worker_stops_listing_expires_while_the_session_keeps_the_others() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_heartbeat_lists", &["--lease-ttl-ms", "1500", "--heartbeat-ms", "500"]).await;
    let client = coord.token("dave", "client").unwrap();
    let worker = bearer(&coord.token("dave", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("heartbeat lists", 2), prompts(4)).await;

    let mut session = Session::open(&ch, Some(&worker), "lister", 4).await.unwrap();
    session.credits(4).await;
    let mut leases = Vec::new();
    while leases.len() < 4 {
        let assign = session.next_assign(Duration::from_secs(10)).await;
        leases.extend(assign.tasks.into_iter().map(|t| t.lease.expect("an assignment carries its lease")));
    }
    let kept = leases[0].clone();
    let dropped = [leases[1].clone(), leases[2].clone(), leases[3].clone()];
    let assigned = Instant::now();
    let expired = || async {
        for d in &dropped {
            if attempt_outcome(&pool, d.lease_token as i64).await != "expired" {
                return false;
            }
        }
        true
    };
    while !expired().await {
        assert!(assigned.elapsed() < Duration::from_secs(10), "the unlisted leases did not expire");
        session.heartbeat(vec![kept.clone()]).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = assigned.elapsed();
    assert!(after >= Duration::from_millis(1400), "the unlisted leases expired {after:?} after their assignment (TTL 1.5 s)");
    // The listed lease was renewed all along and is still the session's.
    assert_eq!(attempt_outcome(&pool, kept.lease_token as i64).await, "running");
    let held = leases_of(&pool, "lister").await;
    assert_eq!(held.iter().map(|h| h.2).collect::<Vec<_>>(), vec![kept.lease_token as i64]);

    // Another worker claims one of the requeued tasks, under a new token.
    let mut other = Session::open(&ch, Some(&worker), "other", 1).await.unwrap();
    other.credits(1).await;
    let taken = other.next_assign(Duration::from_secs(10)).await.tasks[0].lease.clone().unwrap();
    let claimed = dropped.iter().find(|d| d.task_id == taken.task_id).expect("a requeued task is assigned again");
    assert_ne!(taken.lease_token, claimed.lease_token);
    let mut unclaimed = dropped.iter().filter(|d| d.task_id != taken.task_id);
    let (early, free) = (unclaimed.next().unwrap(), unclaimed.next().unwrap());

    // An upload under a requeued lease nobody claimed commits, before any heartbeat lists it.
    upload_ok(&ch, &worker, early, b"\x89PNG\r\n\x1a\nearly").await;
    assert_eq!(attempt_outcome(&pool, early.lease_token as i64).await, "succeeded");
    // A worker of another tenant that names the requeued lease does not get it (task ids and tokens
    // are not secrets).
    let stranger = bearer(&coord.token("eve", "worker").unwrap());
    let eve = Session::open(&ch, Some(&stranger), "stranger", 1).await.unwrap();
    eve.heartbeat(vec![free.clone()]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(leases_of(&pool, "stranger").await.is_empty(), "another tenant's worker took the lease");
    // Listing the rest again: the task nobody claimed comes back to the session; the claimed one
    // does not.
    session.heartbeat(dropped.iter().cloned().chain([kept.clone()]).collect()).await;
    wait_for("the unclaimed lease to be taken back", Duration::from_secs(10), || async {
        leases_of(&pool, "lister").await.len() == 2
    })
    .await;
    let mut held: Vec<i64> = leases_of(&pool, "lister").await.iter().map(|h| h.2).collect();
    held.sort();
    let mut want = vec![kept.lease_token as i64, free.lease_token as i64];
    want.sort();
    assert_eq!(held, want);
    assert_eq!(attempt_outcome(&pool, free.lease_token as i64).await, "running");
    // The listed leases that are no longer the session's (another worker's claim, a committed
    // result) come back revoked, for the worker to stop rendering them.
    let revoked = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), session.inbound.message())
            .await
            .expect("a revocation in time")
            .expect("the stream is healthy")
            .expect("the stream is open");
        if let Some(coordinator_message::Msg::Revoked(r)) = msg.msg {
            break r.leases;
        }
    };
    let mut named: Vec<(String, u64)> = revoked.into_iter().map(|l| (l.task_id, l.lease_token)).collect();
    named.sort();
    let mut want = vec![(claimed.task_id.clone(), claimed.lease_token), (early.task_id.clone(), early.lease_token)];
    want.sort();
    assert_eq!(named, want, "revoked: the claimed and the committed lease, not the kept or taken-back ones");
    assert_status(
        upload(&ch, Some(&worker), &claimed.task_id, claimed.lease_token, b"stale").await,
        Code::FailedPrecondition,
        "lease is not current",
        "upload under the lease another worker's claim replaced",
    );
    upload_ok(&ch, &worker, &kept, b"\x89PNG\r\n\x1a\nkept").await;
    upload_ok(&ch, &worker, free, b"\x89PNG\r\n\x1a\ntaken back").await;
    upload_ok(&ch, &worker, &taken, b"\x89PNG\r\n\x1a\nclaimed").await;
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    assert_each_task_succeeded_once(&pool, job, 4, coord.results_dir()).await;
}

/// The same result uploaded twice at once under one lease (a worker retrying while its first upload
/// is still in flight): the task is committed once, and whatever each upload is answered, the
/// committed blob stays in place with the committed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_uploaded_twice_at_once_commits_once_and_keeps_its_blob() {
    const TASKS: usize = 12;
    let Farm { coord, pool, ch, .. } = Farm::start("acc_double_upload", &[]).await;
    let client = coord.token("dave", "client").unwrap();
    let worker = bearer(&coord.token("dave", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("double upload", 2), prompts(TASKS)).await;
    let mut session = Session::open(&ch, Some(&worker), "twice", 4).await.unwrap();
    session.credits(TASKS as u32).await;
    let mut leases = Vec::new();
    while leases.len() < TASKS {
        for task in session.next_assign(Duration::from_secs(10)).await.tasks {
            leases.push(task.lease.unwrap());
        }
    }
    for (i, lease) in leases.iter().enumerate() {
        let data = [b"\x89PNG\r\n\x1a\n".as_slice(), format!("result {i}").as_bytes()].concat();
        let (a, b) = tokio::join!(
            upload(&ch, Some(&worker), &lease.task_id, lease.lease_token, &data),
            upload(&ch, Some(&worker), &lease.task_id, lease.lease_token, &data),
        );
        for outcome in [a, b] {
            if let Err(status) = outcome {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            }
        }
    }
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    assert_each_task_succeeded_once(&pool, job, TASKS as i64, coord.results_dir()).await;
    assert_eq!(stored_blobs(coord.results_dir(), job), (TASKS, 0), "one blob per task, no leftovers");
}

/// A worker whose pixel limit no task of a job fits is never given that job, and gets the jobs it
/// fits (a larger worker takes the big one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_get_only_tasks_within_their_pixel_limit() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_pixels", &[]).await;
    let client = coord.token("erin", "client").unwrap();
    let worker = bearer(&coord.token("erin", "worker").unwrap());
    let mut big_header = header("big images", 2);
    if let Some(d) = big_header.defaults.as_mut() {
        (d.width, d.height) = (512, 512);
    }
    let big = submit_ok(&ch, &client, big_header, prompts(3)).await;
    let small = submit_ok(&ch, &client, header("small images", 2), prompts(2)).await;

    let mut little = Session::open_with_pixels(&ch, Some(&worker), "little", 4, 256 * 256).await.unwrap();
    little.credits(8).await;
    let got = little.next_assign(Duration::from_secs(10)).await;
    assert_eq!(got.tasks.len(), 2);
    assert!(got.tasks.iter().all(|t| t.job_id == small.to_string()), "the little worker gets the small job only");
    // Nothing more comes to it while the big job waits.
    let more = little.assign_within(Duration::from_millis(1500)).await;
    assert!(more.is_none(), "a task of the big job went to a worker it does not fit: {more:?}");
    assert_eq!(count(&pool, "select count(*) from tasks where job_id = $1 and state = 1", big).await, 3);

    let mut large = Session::open(&ch, Some(&worker), "large", 4).await.unwrap();
    large.credits(4).await;
    let got = large.next_assign(Duration::from_secs(10)).await;
    assert_eq!(got.tasks.len(), 3);
    assert!(got.tasks.iter().all(|t| t.job_id == big.to_string()));

    // A worker that withdraws its unused credit (as a draining one does) gets no more tasks until
    // it grants new ones.
    large
        .out
        .send(WorkerMessage { msg: Some(worker_message::Msg::Credits(Credits { add: 0, withdraw: true })) })
        .await
        .unwrap();
    let mut later_header = header("big images, later", 2);
    if let Some(d) = later_header.defaults.as_mut() {
        (d.width, d.height) = (512, 512);
    }
    let later = submit_ok(&ch, &client, later_header, prompts(2)).await;
    let more = large.assign_within(Duration::from_millis(1500)).await;
    assert!(more.is_none(), "a task went to a worker that withdrew its credits: {more:?}");
    large.credits(1).await;
    let got = large.next_assign(Duration::from_secs(10)).await;
    assert_eq!(got.tasks.len(), 1, "one new credit, one task");
    assert_eq!(got.tasks[0].job_id, later.to_string());
}

/// A job that asks for a precision goes only to workers rendering in it; one that asks for none goes
/// to any worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_ask_for_a_precision_go_only_to_workers_rendering_in_it() {
    let Farm { coord, ch, .. } = Farm::start("acc_precision", &[]).await;
    let client = coord.token("ivy", "client").unwrap();
    let worker = bearer(&coord.token("ivy", "worker").unwrap());
    let mut fp16_header = header("fp16 images", 2);
    fp16_header.defaults.as_mut().unwrap().precision = Precision::Fp16 as i32;
    let fp16 = submit_ok(&ch, &client, fp16_header, prompts(2)).await;
    let any = submit_ok(&ch, &client, header("any precision", 2), prompts(1)).await;
    let caps = |precision: Precision| WorkerCapabilities {
        model_name: MODEL.into(),
        max_batch: 4,
        max_pixels: 1024 * 1024,
        precision: precision as i32,
        ..Default::default()
    };
    let mut bf16_card = Session::open_with_caps(&ch, Some(&worker), "bf16-card", caps(Precision::Bf16)).await.unwrap();
    bf16_card.credits(8).await;
    let got = bf16_card.next_assign(Duration::from_secs(10)).await;
    assert_eq!(got.tasks.iter().map(|t| t.job_id.clone()).collect::<Vec<_>>(), [any.to_string()]);
    let more = bf16_card.assign_within(Duration::from_millis(1500)).await;
    assert!(more.is_none(), "an fp16 job went to a bf16 worker: {more:?}");
    let mut fp16_card = Session::open_with_caps(&ch, Some(&worker), "fp16-card", caps(Precision::Fp16)).await.unwrap();
    fp16_card.credits(8).await;
    let got = fp16_card.next_assign(Duration::from_secs(10)).await;
    assert_eq!(got.tasks.len(), 2);
    assert!(got.tasks.iter().all(|t| t.job_id == fp16.to_string()));
    // Status shows the precision each job asked for: none (any worker's) is not reported as bf16.
    let client = client.as_str();
    let precision_of = |id: Uuid| {
        let ch = ch.clone();
        async move {
            let job = jobs(&ch).get_job(authed(client, GetJobRequest { job_id: id.to_string() })).await.unwrap().into_inner();
            job.defaults.unwrap().precision
        }
    };
    assert_eq!(precision_of(fp16).await, Precision::Fp16 as i32);
    assert_eq!(precision_of(any).await, Precision::Unspecified as i32);
}

/// A running job's images/s counts the time its results took to render: the results of the last
/// minute over the minute, or over the time since the job started when that is shorter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_rate_counts_the_time_since_it_started() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_rate", &[]).await;
    let client = coord.token("rae", "client").unwrap();
    let worker = bearer(&coord.token("rae", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("rated", 2), prompts(4)).await;
    let get = || {
        let (ch, client) = (ch.clone(), client.clone());
        async move { jobs(&ch).get_job(authed(&client, GetJobRequest { job_id: job.to_string() })).await.unwrap().into_inner() }
    };
    let before = get().await;
    assert_eq!(before.started_at_ms, 0, "no worker has taken a task yet");
    let mut session = Session::open(&ch, Some(&worker), "rater", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    upload_ok(&ch, &worker, a.tasks[0].lease.as_ref().unwrap(), b"\x89PNG\r\n\x1a\nrated").await;
    let after = get().await;
    assert!(after.started_at_ms >= after.created_at_ms, "started at the first claim: {after:?}");
    // The worker's rate likewise counts from its session's start: connected 20 s ago, one image.
    sqlx::query("update workers set connected_at = now() - interval '20 seconds' where name = 'rater'")
        .execute(&pool)
        .await
        .unwrap();
    let listed = jobs(&ch).list_workers(authed(&client, ListWorkersRequest::default())).await.unwrap().into_inner();
    let rater = listed.workers.iter().find(|w| w.name == "rater").expect("the worker is listed");
    assert!((rater.images_per_second - 1.0 / 20.0).abs() < 0.003, "worker images/s {}", rater.images_per_second);
    // The job started 30 s ago and has one result: 1/30 images/s and 3 images to go, not 1 image/s
    // (its one result is a second old at most).
    sqlx::query("update jobs set started_at = now() - interval '30 seconds' where id = $1").bind(job).execute(&pool).await.unwrap();
    let j = get().await;
    assert_eq!(j.counts.map(|c| (c.succeeded, c.queued)), Some((1, 3)));
    assert!((j.images_per_second - 1.0 / 30.0).abs() < 0.002, "images/s {}", j.images_per_second);
    assert!((j.eta_seconds - 90.0).abs() < 6.0, "ETA {}", j.eta_seconds);
    // Started long ago: the window is the last minute.
    sqlx::query("update jobs set started_at = now() - interval '10 minutes' where id = $1").bind(job).execute(&pool).await.unwrap();
    let j = get().await;
    assert!((j.images_per_second - 1.0 / 60.0).abs() < 0.001, "images/s {}", j.images_per_second);
    // A retry starts the measurement again: the result from before it no longer counts.
    session.credits(1).await;
    let b = session.next_assign(Duration::from_secs(10)).await;
    session.failed(b.tasks[0].lease.as_ref().unwrap(), "render", false).await;
    wait_for("the task to fail", Duration::from_secs(10), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 4", job).await == 1
    })
    .await;
    jobs(&ch)
        .retry_job(authed(&client, RetryJobRequest { job_id: job.to_string(), include_cancelled: false }))
        .await
        .unwrap();
    let j = get().await;
    assert_eq!(j.started_at_ms, 0, "a retry clears the start");
    assert!((j.images_per_second - 1.0 / 60.0).abs() < 0.001, "without a start, the last minute: {}", j.images_per_second);
    session.credits(1).await;
    session.next_assign(Duration::from_secs(10)).await;
    let j = get().await;
    assert!(j.started_at_ms > after.started_at_ms, "the first claim after the retry starts it again");
    assert_eq!((j.images_per_second, j.eta_seconds), (0.0, -1.0), "the result from before the retry does not count");
}

/// A worker that failed two tasks of a job gets no more of that job while another connected worker
/// could take it; once it is the only worker left it gets the job again, so every task still ends
/// (here one succeeded, one failed after max_attempts) instead of waiting for a worker that is not
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_worker_is_excluded_only_while_another_can_take_the_job() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_exclusion", &[]).await;
    let client = coord.token("frank", "client").unwrap();
    let worker = bearer(&coord.token("frank", "worker").unwrap());
    let mut h = header("flaky", 2);
    h.max_attempts = 3;
    let job = submit_ok(&ch, &client, h, prompts(2)).await;

    let mut flaky = Session::open(&ch, Some(&worker), "flaky", 1).await.unwrap();
    let mut steady = Session::open(&ch, Some(&worker), "steady", 1).await.unwrap();
    for _ in 0..2 {
        flaky.credits(1).await;
        let a = flaky.next_assign(Duration::from_secs(10)).await;
        flaky.failed(a.tasks[0].lease.as_ref().unwrap(), "render", true).await;
    }
    // Excluded while `steady` is connected: nothing comes, past the 1 s backoff of both tasks.
    flaky.credits(1).await;
    let got = flaky.assign_within(Duration::from_millis(2500)).await;
    assert!(got.is_none(), "an excluded worker got the job while another could take it: {got:?}");
    steady.credits(1).await;
    let a = steady.next_assign(Duration::from_secs(10)).await;
    upload_ok(&ch, &worker, a.tasks[0].lease.as_ref().unwrap(), b"\x89PNG\r\n\x1a\nsteady").await;
    drop(steady);
    // The only worker left gets the remaining task again; its third failure fails the task.
    let mut charged = 0;
    while let Some(a) = flaky.assign_within(Duration::from_secs(10)).await {
        flaky.failed(a.tasks[0].lease.as_ref().unwrap(), "render", true).await;
        charged += 1;
        if charged < 2 {
            flaky.credits(1).await;
        } else {
            break;
        }
    }
    assert_eq!(charged, 2, "the last worker did not get the task back; tasks by state: {:?}", states(&pool, job).await);
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    assert_eq!(states(&pool, job).await, vec![(3, 1), (4, 1)], "one succeeded, one failed");
    let failures: i32 = sqlx::query_scalar("select failures from tasks where job_id = $1 and state = 4")
        .bind(job)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failures, 3, "the failed task used its three attempts");
}

/// Submits a job of `n` prompts (2 steps, 2 attempts per task) for `tenant`, prompt `marked`
/// carrying the synthetic renderer's `marker`; returns the job and a worker token of the tenant.
async fn submit_with_marker(
    coord: &Coordinator,
    ch: &Channel,
    tenant: &str,
    name: &str,
    n: usize,
    marked: usize,
    marker: &str,
) -> (Uuid, String) {
    let client = coord.token(tenant, "client").unwrap();
    let worker_token = coord.token(tenant, "worker").unwrap();
    let mut ps = prompts(n);
    ps[marked].text.push_str(&format!(", {marker}"));
    let mut h = header(name, 2);
    h.max_attempts = 2;
    (submit_ok(ch, &client, h, ps).await, worker_token)
}

/// One prompt whose render fails (the synthetic renderer's NaN marker; on the model, a latent that
/// turns NaN) does not fail the prompts batched with it: a worker renders a failed batch again one
/// task at a time, so only the failing task is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_prompt_does_not_fail_its_batchmates() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_failing_prompt", &[]).await;
    let (job, worker_token) = submit_with_marker(&coord, &ch, "erin", "one failing prompt", 4, 2, "[synthetic:nan]").await;
    let _worker = synthetic_worker(&coord.url(), &worker_token, "batcher", 5, 4);
    wait_job_finished(&pool, job, Duration::from_secs(60)).await;
    let rows: Vec<(i64, i16, i32)> =
        sqlx::query_as("select idx, state, failures from tasks where job_id = $1 order by idx")
            .bind(job)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![(0, 3, 0), (1, 3, 0), (2, 4, 2), (3, 3, 0)], "(index, state, failures charged)");
}

/// A render that fails while the coordinator is away (killed, restarting) is charged once it is
/// back: the worker keeps the report and lists its lease in the next hello, the coordinator keeps
/// the lease, and the report goes out, instead of being lost and the lease expiring uncharged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_while_the_coordinator_is_away_is_charged_after_the_reconnect() {
    let Farm { mut coord, pool, ch, .. } = Farm::start("acc_failure_offline", &[]).await;
    let (job, worker_token) = submit_with_marker(&coord, &ch, "ivan", "fails offline", 1, 0, "[synthetic:nan]").await;
    // Two steps of 1.5 s: the render fails at its end, about 3 s after it starts.
    let _worker = synthetic_worker(&coord.url(), &worker_token, "offline", 1500, 1);
    wait_for("the render to start", Duration::from_secs(60), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 2", job).await == 1
    })
    .await;
    coord.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    coord.resume().expect("the coordinator restarts");
    // (outcome, error) of the job's first attempt.
    let first_attempt = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "select a.outcome, a.error from task_attempts a join tasks t on t.id = a.task_id where t.job_id = $1 and a.attempt = 1",
        )
        .bind(job)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    wait_for("the first attempt to end", Duration::from_secs(40), || async {
        first_attempt().await.is_some_and(|(outcome, _)| outcome != "running")
    })
    .await;
    let (outcome, error) = first_attempt().await.expect("the first attempt");
    assert_eq!(outcome, "failed", "the failure made while the coordinator was away is charged: {error:?}");
    assert!(error.is_some_and(|e| e.contains("NaN")));
}

/// A render that stops making progress (the synthetic renderer's hang marker; on a GPU, a wedged
/// device or a hung kernel) trips the worker's watchdog: the batch's tasks are charged with a
/// "stalled" error, the worker's queued tasks go back uncharged, and the worker exits with status 3
/// for its supervisor to restart it. Tasks that failed before render alone, so the batchmate of the
/// hanging prompt then renders, and a prompt that always hangs ends after its attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_render_is_charged_and_its_worker_exits() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_stall", &[]).await;
    let (job, worker_token) = submit_with_marker(&coord, &ch, "hana", "one hanging prompt", 3, 0, "[synthetic:hang]").await;
    let task_row = |idx: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i16, i32, Option<String>)>(
                "select state, failures, last_error from tasks where job_id = $1 and idx = $2",
            )
            .bind(job)
            .bind(idx)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let stall = ["--stall-timeout-s", "1"];
    let mut first = synthetic_worker_with(&coord.url(), &worker_token, "wedged", 5, 2, &stall);
    // Wait until the hanging task is running, so that the exit below is the watchdog's.
    let deadline = Instant::now() + Duration::from_secs(30);
    while task_row(0).await.0 != 2 {
        assert!(Instant::now() < deadline, "the hanging task was never leased; log:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = first.wait_exit(Duration::from_secs(30)).expect("the stalled worker exits by itself");
    assert_eq!(status.code(), Some(3), "exit status of a stalled worker; log:\n{}", first.log());
    // The worker waits for the coordinator to end the session, so its report is handled by now.
    let (state, failures, error) = task_row(0).await;
    assert_eq!((state, failures), (1, 1), "the stalled task is queued again with one attempt charged");
    assert!(error.as_deref().unwrap_or("").contains("stalled"), "last error: {error:?}");
    let (state, failures, _) = task_row(1).await;
    assert_eq!((state, failures), (1, 1), "the batchmate is charged too");
    let (state, failures, _) = task_row(2).await;
    assert_eq!((state, failures), (1, 0), "the worker's queued task goes back uncharged");
    // Restarted workers (as a supervisor would) finish the job: the hanging prompt fails after its
    // second attempt, the other one renders.
    let finished = || async { job_finished(&pool, job).await.unwrap() };
    for n in 0..4 {
        if finished().await {
            break;
        }
        let mut w = synthetic_worker_with(&coord.url(), &worker_token, &format!("restarted-{n}"), 5, 2, &stall);
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.is_running() && Instant::now() < deadline && !finished().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    let (state, failures, _) = task_row(0).await;
    assert_eq!((state, failures), (4, 2), "the always-hanging task failed after its two attempts");
    assert_eq!(task_row(1).await.0, 3, "the batchmate rendered alone");
    assert_eq!(task_row(2).await.0, 3, "the queued task rendered");
}

/// Running out of GPU memory is not charged the first six times (workers retry with smaller batches
/// and charge one at batch size 1 themselves); after that it is, so that no task loops for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_out_of_memory_is_charged_and_the_task_ends() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_oom", &[]).await;
    let client = coord.token("gina", "client").unwrap();
    let worker = bearer(&coord.token("gina", "worker").unwrap());
    let mut h = header("too big", 2);
    h.max_attempts = 2;
    let job = submit_ok(&ch, &client, h, prompts(1)).await;
    let mut small = Session::open(&ch, Some(&worker), "small-card", 1).await.unwrap();
    let mut reports = 0;
    loop {
        small.credits(1).await;
        let Some(a) = small.assign_within(Duration::from_secs(5)).await else { break };
        small.failed(a.tasks[0].lease.as_ref().unwrap(), "out_of_memory", true).await;
        reports += 1;
        assert!(reports <= 8, "out-of-memory failures are never charged: {reports} reports so far");
    }
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    let outcomes: Vec<String> = sqlx::query_scalar(
        "select a.outcome from task_attempts a join tasks t on t.id = a.task_id where t.job_id = $1 order by a.id",
    )
    .bind(job)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(outcomes, ["out_of_memory"; 6].iter().chain(&["failed"; 2]).copied().collect::<Vec<_>>());
    assert_eq!(states(&pool, job).await, vec![(4, 1)], "the task failed");
}

/// ListJobs pages through a tenant's jobs newest first without skipping or repeating one, and shows
/// each job as GetJob does (a finished job's stored counts, an unfinished job's counted ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_jobs_pages_newest_first_and_matches_get_job() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_list_jobs", &[]).await;
    let client = coord.token("lena", "client").unwrap();
    let other = coord.token("mo", "client").unwrap();
    let worker = bearer(&coord.token("lena", "worker").unwrap());
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(submit_ok(&ch, &client, header(&format!("job {i}"), 2), prompts(1 + i % 2)).await);
    }
    submit_ok(&ch, &other, header("someone else's", 2), prompts(1)).await;
    // Finish the oldest job.
    let mut session = Session::open(&ch, Some(&worker), "lister", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    assert_eq!(a.tasks[0].job_id, ids[0].to_string(), "the oldest job is claimed first");
    upload_ok(&ch, &worker, a.tasks[0].lease.as_ref().unwrap(), b"\x89PNG\r\n\x1a\nlisted").await;
    wait_job_finished(&pool, ids[0], Duration::from_secs(10)).await;
    drop(session);

    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = jobs(&ch)
            .list_jobs(authed(&client, ListJobsRequest { page_size: 3, page_token: token.clone(), ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.jobs.len() <= 3, "a page holds at most page_size jobs");
        listed.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "the listing does not end");
    }
    let listed_ids: Vec<String> = listed.iter().map(|j| j.job_id.clone()).collect();
    let newest_first: Vec<String> = ids.iter().rev().map(Uuid::to_string).collect();
    assert_eq!(listed_ids, newest_first, "every job of the tenant once, newest first");
    assert_eq!(pages, 3);
    for job in &listed {
        let got = jobs(&ch).get_job(authed(&client, GetJobRequest { job_id: job.job_id.clone() })).await.unwrap().into_inner();
        assert_eq!((job.state, job.counts, job.progress), (got.state, got.counts, got.progress), "job {}", job.job_id);
    }
    let oldest = listed.last().unwrap();
    assert_eq!(oldest.state, JobState::Succeeded as i32);
    assert_eq!(oldest.counts.map(|c| (c.succeeded, c.total)), Some((1, 1)));
    // A state filter pages the same way.
    let succeeded = jobs(&ch)
        .list_jobs(authed(&client, ListJobsRequest { states: vec![JobState::Succeeded as i32], page_size: 3, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(succeeded.jobs.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(), vec![ids[0].to_string()]);
    assert!(succeeded.next_page_token.is_empty());
}

/// Retrying a cancelled job restarts a task that a lost worker's session had put back in the queue
/// before the sweep cancelled it, with a fresh lease: the lost worker's late upload under its old
/// lease is refused, and the task renders again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_cancelled_job_restarts_a_task_requeued_from_a_lost_worker() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_retry_requeued", &[]).await;
    let client = coord.token("nia", "client").unwrap();
    let worker = bearer(&coord.token("nia", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("cancelled, then retried", 2), prompts(1)).await;
    let mut lost = Session::open(&ch, Some(&worker), "lost", 1).await.unwrap();
    lost.credits(1).await;
    let a = lost.next_assign(Duration::from_secs(10)).await;
    let old = a.tasks[0].lease.clone().unwrap();
    // Cancelled while it runs; then its worker's session ends, which puts the task back in the
    // queue until the sweep (every second) cancels it. The retry comes in that window.
    jobs(&ch).cancel_job(authed(&client, CancelJobRequest { job_id: job.to_string() })).await.unwrap();
    drop(lost);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state: i16 = sqlx::query_scalar("select state from tasks where job_id = $1").bind(job).fetch_one(&pool).await.unwrap();
        if state != 2 {
            // Queued again (1), or already cancelled by the sweep (5) if it ran in between: the
            // retry restarts the task either way; the first is the case this test is about.
            assert!(state == 1 || state == 5, "the lost worker's task is queued again: state {state}");
            break;
        }
        assert!(Instant::now() < deadline, "the lost session's task was not requeued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = jobs(&ch)
        .retry_job(authed(&client, RetryJobRequest { job_id: job.to_string(), include_cancelled: true }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.requeued, 1, "the requeued task counts as restarted");
    let refused = upload(&ch, Some(&worker), &old.task_id, old.lease_token, b"\x89PNG\r\n\x1a\nlate").await;
    assert_eq!(refused.map(|_| ()).map_err(|s| s.code()), Err(Code::FailedPrecondition), "the old lease's late upload");
    let mut fresh = Session::open(&ch, Some(&worker), "fresh", 1).await.unwrap();
    fresh.credits(1).await;
    let a = fresh.next_assign(Duration::from_secs(10)).await;
    let lease = a.tasks[0].lease.clone().unwrap();
    assert_ne!(lease.lease_token, old.lease_token, "a fresh lease");
    upload_ok(&ch, &worker, &lease, b"\x89PNG\r\n\x1a\nfresh").await;
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    assert_eq!(states(&pool, job).await, vec![(3, 1)], "the retried job succeeded");
}

/// A cancel that reaches a worker after the last denoising step, while it decodes the image, still
/// wins: the task ends cancelled and no result is stored (the worker does not upload it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_decode_wins() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_cancel_decode", &[]).await;
    let client = coord.token("otto", "client").unwrap();
    let worker_token = coord.token("otto", "worker").unwrap();
    let job = submit_ok(&ch, &client, header("cancelled while decoding", 2), prompts(1)).await;
    let _worker = synthetic_worker_with(&coord.url(), &worker_token, "decoder", 20, 1, &["--synthetic-decode-ms", "4000"]);
    // Both steps reported: the worker is decoding for the next 4 s.
    wait_for("the last step to be reported", Duration::from_secs(30), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 2 and current_step = 2", job).await == 1
    })
    .await;
    jobs(&ch).cancel_job(authed(&client, CancelJobRequest { job_id: job.to_string() })).await.unwrap();
    wait_job_finished(&pool, job, Duration::from_secs(30)).await;
    let (state, size): (i16, Option<i64>) = sqlx::query_as("select state, result_size from tasks where job_id = $1")
        .bind(job)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((state, size), (5, None), "(state, result size): cancelled, nothing stored");
}

/// A stored result that was cut short after its commit (a damaged disk, a file truncated by hand)
/// is not served as a complete download: the stream ends with DATA_LOSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_result_ends_its_download_with_data_loss() {
    let Farm { coord, ch, .. } = Farm::start("acc_damaged_result", &[]).await;
    let client = coord.token("jo", "client").unwrap();
    let worker = bearer(&coord.token("jo", "worker").unwrap());
    let job = submit_ok(&ch, &client, header("damaged", 2), prompts(1)).await;
    let mut session = Session::open(&ch, Some(&worker), "damager", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n".iter().copied().chain((0..4096u32).map(|i| (i % 251) as u8)).collect();
    upload_ok(&ch, &worker, a.tasks[0].lease.as_ref().unwrap(), &png).await;
    let download = || async {
        let mut stream = jobs(&ch)
            .download_result(authed(&client, DownloadResultRequest { job_id: job.to_string(), index: 0 }))
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            bytes.extend(chunk.data);
        }
        Ok::<_, Status>(bytes)
    };
    assert_eq!(download().await.expect("the intact result downloads"), png);
    // The one stored file of that size, cut in half.
    let mut files = vec![coord.results_dir().to_path_buf()];
    let mut stored = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if std::fs::metadata(&path).unwrap().len() == png.len() as u64 {
            stored.push(path);
        }
    }
    assert_eq!(stored.len(), 1, "stored files of the result's size: {stored:?}");
    std::fs::write(&stored[0], &png[..png.len() / 2]).unwrap();
    let status = match download().await {
        Ok(bytes) => panic!("a damaged result was served as a complete download of {} bytes", bytes.len()),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&format!("{} bytes", png.len() / 2)), "{}", status.message());
}

/// A watch ends at the job's last word only: not at a final state a retry has since superseded
/// (replayed from the job's history), and not at a cancel while a cancelled task is still running;
/// it ends with the state the job finally reaches, with its counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_only_at_the_final_state_the_job_keeps() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_watch_final", &[]).await;
    let client = coord.token("ivan", "client").unwrap();
    let worker = bearer(&coord.token("ivan", "worker").unwrap());
    let is_final_event = |e: &JobEvent| {
        matches!(&e.event, Some(job_event::Event::Job(j))
            if [JobState::Succeeded, JobState::Failed, JobState::Cancelled].iter().any(|s| *s as i32 == j.state))
    };
    let mut h = header("failed, then retried", 2);
    h.max_attempts = 1;
    let job = submit_ok(&ch, &client, h, prompts(1)).await;
    let mut session = Session::open(&ch, Some(&worker), "watched", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    session.failed(a.tasks[0].lease.as_ref().unwrap(), "render", false).await;
    wait_job_finished(&pool, job, Duration::from_secs(10)).await;
    jobs(&ch)
        .retry_job(authed(&client, RetryJobRequest { job_id: job.to_string(), include_cancelled: false }))
        .await
        .expect("RetryJob");
    let watch = tokio::spawn(collect_events(ch.clone(), client.clone(), job, Duration::from_secs(60)));
    // Past the watch's 2 s look at the job store.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!watch.is_finished(), "the watch ended at the final state the retry superseded: {:?}", watch.await);
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    upload_ok(&ch, &worker, a.tasks[0].lease.as_ref().unwrap(), b"\x89PNG\r\n\x1a\nretried").await;
    let events = watch.await.unwrap();
    assert_eq!(final_state(&events), Some(JobState::Succeeded as i32), "events: {events:?}");
    assert_eq!(events.iter().filter(|e| is_final_event(e)).count(), 1, "one final state, the last event: {events:?}");
    assert!(
        events.iter().any(|e| matches!(&e.event, Some(job_event::Event::Job(j)) if j.state == JobState::Running as i32)),
        "the retry is announced: {events:?}"
    );
    let counts = match &events.last().unwrap().event {
        Some(job_event::Event::Job(j)) => j.counts.expect("the final event has counts"),
        _ => unreachable!(),
    };
    assert_eq!((counts.succeeded, counts.failed, counts.total), (1, 0, 1), "final counts");

    // A cancel while its task runs: the watch waits for the task to stop.
    let job = submit_ok(&ch, &client, header("cancelled while running", 2), prompts(1)).await;
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    jobs(&ch).cancel_job(authed(&client, CancelJobRequest { job_id: job.to_string() })).await.expect("CancelJob");
    let watch = tokio::spawn(collect_events(ch.clone(), client.clone(), job, Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!watch.is_finished(), "the watch ended while a cancelled task still ran: {:?}", watch.await);
    session.failed(a.tasks[0].lease.as_ref().unwrap(), "cancelled", false).await;
    let events = watch.await.unwrap();
    assert_eq!(final_state(&events), Some(JobState::Cancelled as i32), "events: {events:?}");
    assert_eq!(events.iter().filter(|e| is_final_event(e)).count(), 1, "one final state, the last event: {events:?}");
    let counts = match &events.last().unwrap().event {
        Some(job_event::Event::Job(j)) => j.counts.expect("the final event has counts"),
        _ => unreachable!(),
    };
    assert_eq!((counts.cancelled, counts.total), (1, 1), "final counts");
}

/// `CancelJob` on a job that already succeeded is FAILED_PRECONDITION and keeps the outcome; on a
/// cancelled job it changes nothing. `RetryJob` of a cancelled job without its cancelled tasks is
/// FAILED_PRECONDITION (the sweep would cancel the failed tasks again at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_never_rewrite_a_finished_outcome() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_cancel_retry", &[]).await;
    let client = coord.token("hana", "client").unwrap();
    let worker = bearer(&coord.token("hana", "worker").unwrap());
    let done = submit_ok(&ch, &client, header("done", 2), prompts(1)).await;
    let mut session = Session::open(&ch, Some(&worker), "finisher", 1).await.unwrap();
    session.credits(1).await;
    let a = session.next_assign(Duration::from_secs(10)).await;
    upload_ok(&ch, &worker, a.tasks[0].lease.as_ref().unwrap(), b"\x89PNG\r\n\x1a\ndone").await;
    wait_job_finished(&pool, done, Duration::from_secs(10)).await;
    let c = &mut jobs(&ch);
    assert_status(
        c.cancel_job(authed(&client, CancelJobRequest { job_id: done.to_string() })).await,
        Code::FailedPrecondition,
        "already succeeded",
        "cancel of a succeeded job",
    );
    let state: i16 = sqlx::query_scalar("select state from jobs where id = $1").bind(done).fetch_one(&pool).await.unwrap();
    assert_eq!(i32::from(state), JobState::Succeeded as i32, "the succeeded job stays succeeded");

    // Every task settled, and the job's finish check has not run yet (it runs a moment after the
    // last commit, or at the next sweep): a cancel in that window is refused too, and the job
    // closes with its own outcome.
    let settled = submit_ok(&ch, &client, header("settled", 2), prompts(2)).await;
    sqlx::query("update tasks set state = 4, finished_at = now(), last_error = 'bad prompt' where job_id = $1")
        .bind(settled)
        .execute(&pool)
        .await
        .unwrap();
    assert_status(
        c.cancel_job(authed(&client, CancelJobRequest { job_id: settled.to_string() })).await,
        Code::FailedPrecondition,
        "failed",
        "cancel of a job whose tasks all settled",
    );
    wait_job_finished(&pool, settled, Duration::from_secs(10)).await;
    let state: i16 = sqlx::query_scalar("select state from jobs where id = $1").bind(settled).fetch_one(&pool).await.unwrap();
    assert_eq!(i32::from(state), JobState::Failed as i32, "the job closes as failed, not cancelled");

    let queued = submit_ok(&ch, &client, header("queued", 2), prompts(2)).await;
    let r = c.cancel_job(authed(&client, CancelJobRequest { job_id: queued.to_string() })).await.unwrap().into_inner();
    assert_eq!(r.cancelled_queued, 2);
    wait_job_finished(&pool, queued, Duration::from_secs(10)).await;
    let again = c.cancel_job(authed(&client, CancelJobRequest { job_id: queued.to_string() })).await.unwrap().into_inner();
    assert_eq!((again.cancelled_queued, again.cancelling_running), (0, 0), "a second cancel changes nothing");
    let counts = |job: JobStatus| {
        let c = job.counts.unwrap();
        (c.queued, c.running, c.succeeded, c.failed, c.cancelled, c.total)
    };
    let got = c.get_job(authed(&client, GetJobRequest { job_id: queued.to_string() })).await.unwrap().into_inner();
    assert_eq!(counts(got), (0, 0, 0, 0, 2, 2), "counts of the finished job");
    let stored: Option<String> = sqlx::query_scalar("select final_counts::text from jobs where id = $1")
        .bind(queued)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some(r#"{"5": 2}"#), "counts stored when the job closed");
    assert_status(
        c.retry_job(authed(&client, RetryJobRequest { job_id: queued.to_string(), include_cancelled: false })).await,
        Code::FailedPrecondition,
        "include-cancelled",
        "retry of a cancelled job without its cancelled tasks",
    );
    let r = c
        .retry_job(authed(&client, RetryJobRequest { job_id: queued.to_string(), include_cancelled: true }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.requeued, 2);
    let state: i16 = sqlx::query_scalar("select state from jobs where id = $1").bind(queued).fetch_one(&pool).await.unwrap();
    assert_eq!(i32::from(state), JobState::Running as i32, "the retried job runs again");
    let got = c.get_job(authed(&client, GetJobRequest { job_id: queued.to_string() })).await.unwrap().into_inner();
    assert_eq!(counts(got), (2, 0, 0, 0, 0, 2), "counts after the retry, not those stored when it finished");
    let got = c.get_job(authed(&client, GetJobRequest { job_id: done.to_string() })).await.unwrap().into_inner();
    assert_eq!((counts(got.clone()), got.progress), ((0, 0, 1, 0, 0, 1), 1.0), "counts of the succeeded job");
}

async fn upload_ok(ch: &Channel, auth: &str, lease: &farm_proto::pb::Lease, data: &[u8]) {
    upload(ch, Some(auth), &lease.task_id, lease.lease_token, data).await.expect("a current lease uploads");
}

/// Running leases of a worker (by its name): (task id, index, lease token).
async fn leases_of(pool: &PgPool, worker_name: &str) -> Vec<(Uuid, i64, i64)> {
    sqlx::query_as(
        "select t.id, t.idx, t.lease_token from tasks t join workers w on w.id = t.lease_owner
         where t.state = 2 and w.name = $1 order by t.idx",
    )
    .bind(worker_name)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Outcome of the attempt that carried `token` ('running' while open).
async fn attempt_outcome(pool: &PgPool, token: i64) -> String {
    sqlx::query_scalar("select outcome from task_attempts where lease_token = $1")
        .bind(token)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_tasks_are_requeued_at_once_and_finish_elsewhere() {
    // A long lease TTL: only the dropped stream can explain a fast requeue.
    let args = ["--lease-ttl-ms", "60000", "--heartbeat-ms", "500"];
    let Farm { coord, pool, ch, .. } = Farm::start("acc_killed_worker", &args).await;
    let client = coord.token("acme", "client").unwrap();
    let worker_token = coord.token("acme", "worker").unwrap();

    let mut victim = synthetic_worker(&coord.url(), &worker_token, "victim", 300, 2);
    wait_connected(&[&victim]);
    let job = submit_ok(&ch, &client, header("killed worker", 8), prompts(6)).await;

    // Kill the victim while it is between denoising steps of its batch.
    wait_for("the victim to be mid-render", Duration::from_secs(30), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 2 and current_step >= 1", job).await
            > 0
    })
    .await;
    let held = leases_of(&pool, "victim").await;
    assert!(!held.is_empty(), "the victim holds leases");
    victim.kill();
    let requeued_after = wait_for("the victim's leases to be requeued", Duration::from_secs(10), || async {
        for (task, _, token) in &held {
            let state: i16 = sqlx::query_scalar("select state from tasks where id = $1")
                .bind(task)
                .fetch_one(&pool)
                .await
                .unwrap();
            if state == 2 || attempt_outcome(&pool, *token).await != "lost" {
                return false;
            }
        }
        true
    })
    .await;
    eprintln!("requeued {requeued_after:?} after SIGKILL");
    assert!(
        requeued_after < Duration::from_secs(1),
        "requeued {requeued_after:?} after the kill; the stream drop must requeue within a second"
    );

    let rescuer = synthetic_worker(&coord.url(), &worker_token, "rescuer", 5, 4);
    wait_job_finished(&pool, job, Duration::from_secs(60)).await;
    drop(rescuer);
    assert_each_task_succeeded_once(&pool, job, 6, coord.results_dir()).await;

    // The task history shows the loss, not charged, and the success elsewhere.
    for (_, idx, token) in &held {
        let task = jobs(&ch)
            .get_task(authed(&client, GetTaskRequest { job_id: job.to_string(), index: *idx as u64 }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(task.state, TaskState::Succeeded as i32);
        assert_eq!(task.failures, 0, "losing a worker charges no attempt");
        let lost = task.attempts.iter().find(|a| a.lease_token == *token as u64).expect("the lost attempt");
        assert_eq!((lost.outcome.as_str(), lost.worker_name.as_str()), ("lost", "victim"));
        assert!(lost.ended_at_ms > 0);
        let last = task.attempts.last().unwrap();
        assert_eq!((last.outcome.as_str(), last.worker_name.as_str()), ("succeeded", "rescuer"));
        assert_eq!(last.attempt, 1, "the retry is still attempt 1");
        assert!(last.lease_token > lost.lease_token, "fencing tokens only grow");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_loses_its_leases_after_the_ttl_and_its_late_upload_is_refused() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_silent_worker", &["--lease-ttl-ms", "2000", "--heartbeat-ms", "500"]).await;
    let client = coord.token("acme", "client").unwrap();
    let worker_token = coord.token("acme", "worker").unwrap();

    let mut victim = synthetic_worker(&coord.url(), &worker_token, "silent", 400, 2);
    wait_connected(&[&victim]);
    let job = submit_ok(&ch, &client, header("silent worker", 6), prompts(4)).await;
    wait_for("the silent worker to be mid-render", Duration::from_secs(30), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 2 and current_step >= 1", job).await
            > 0
    })
    .await;

    // SIGSTOP: the TCP stream stays open, but no heartbeat, progress or upload comes any more.
    let pid = victim.pid().expect("the worker runs") as libc::pid_t;
    // SAFETY: plain signal to a child process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let held = leases_of(&pool, "silent").await;
    assert!(!held.is_empty(), "the stopped worker holds leases");
    wait_for("the silent worker's leases to expire", Duration::from_secs(10), || async {
        for (_, _, token) in &held {
            if attempt_outcome(&pool, *token).await != "expired" {
                return false;
            }
        }
        true
    })
    .await;
    let expired_after = stopped.elapsed();
    eprintln!("leases expired {expired_after:?} after SIGSTOP");
    // The last heartbeat came at most one interval (0.5 s) before the stop; the sweep runs every second.
    assert!(
        expired_after >= Duration::from_millis(1400) && expired_after < Duration::from_secs(5),
        "leases expired {expired_after:?} after the worker went silent (TTL 2 s)"
    );

    let rescuer = synthetic_worker(&coord.url(), &worker_token, "rescuer", 5, 4);
    wait_job_finished(&pool, job, Duration::from_secs(60)).await;
    drop(rescuer);
    assert_each_task_succeeded_once(&pool, job, 4, coord.results_dir()).await;
    let snapshot = || async {
        let rows: Vec<(i64, i16, String, String, i64, String)> = sqlx::query_as(
            "select idx, state, result_sha256, result_worker, (extract(epoch from result_at) * 1000000)::bigint,
                    result_key
             from tasks where job_id = $1 order by idx",
        )
        .bind(job)
        .fetch_all(&pool)
        .await
        .unwrap();
        let files: Vec<Vec<u8>> =
            rows.iter().map(|r| std::fs::read(coord.results_dir().join(&r.5)).unwrap()).collect();
        (rows, files)
    };
    let before = snapshot().await;
    assert!(before.0.iter().all(|r| r.3 == "rescuer"), "every result is the rescuer's: {:?}", before.0);

    // SIGCONT: the worker's next heartbeat lists its stale leases and gets them revoked, or it
    // uploads a stale render first and the coordinator refuses it; either way it drops that work.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (refused, revoked) = ("result dropped: the lease is no longer ours", "leases revoked");
    wait_for("the worker to drop its stale work", Duration::from_secs(30), || async {
        let log = victim.log();
        log.contains(refused) || log.contains(revoked)
    })
    .await;
    let log = victim.log();
    assert!(!log.contains(refused) || log.contains("lease is not current"), "a refusal names the stale lease");
    assert_eq!(snapshot().await, before, "a late upload changed a committed result");
    assert_each_task_succeeded_once(&pool, job, 4, coord.results_dir()).await;

    // The same refusal, spoken directly: the old lease token from task_attempts is not current.
    let worker_auth = bearer(&worker_token);
    for (task, _, token) in &held {
        assert_status(
            upload(&ch, Some(&worker_auth), &task.to_string(), *token as u64, b"late bytes").await,
            Code::FailedPrecondition,
            "lease is not current",
            "upload under an expired lease",
        );
        assert_eq!(attempt_outcome(&pool, *token).await, "expired");
    }
    assert_eq!(snapshot().await, before, "a stale upload changed a committed result");
    assert_eq!(stored_blobs(coord.results_dir(), job), (4, 0), "no temporary leftovers");
    victim.kill();
}

// ---------------------------------------------------------------------------------------------
// Replicas and scheduling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_store_and_watchers_see_progress_from_both() {
    let db = fresh_database("acc_replicas");
    let redis = shared_redis();
    let results = tempfile::tempdir().unwrap();
    let options = || CoordinatorOptions::new(&db).redis(&redis.url()).results(results.path());
    let one = coordinator_with(options(), &[]);
    let two = coordinator_with(options(), &[]);
    let pool = pool(&db).await;
    let client = one.token("acme", "client").unwrap();
    let worker_token = one.token("acme", "worker").unwrap();
    let workers = [
        synthetic_worker(&one.url(), &worker_token, "w1", 1, 8),
        synthetic_worker(&one.url(), &worker_token, "w2", 1, 8),
        synthetic_worker(&two.url(), &worker_token, "w3", 1, 8),
        synthetic_worker(&two.url(), &worker_token, "w4", 1, 8),
    ];
    wait_connected(&workers.iter().collect::<Vec<_>>());

    const TASKS: i64 = 2000;
    let ch_one = channel(&one.url()).await;
    let ch_two = channel(&two.url()).await;
    // Submitted through replica two, watched through replica one.
    let started = Instant::now();
    let job = submit_ok(&ch_two, &client, header("two replicas", 2), prompts(TASKS as usize)).await;
    let watcher = tokio::spawn(collect_events(ch_one.clone(), client.clone(), job, Duration::from_secs(180)));
    wait_job_finished(&pool, job, Duration::from_secs(180)).await;
    eprintln!("{TASKS} tasks over two replicas in {:?}", started.elapsed());
    let events = watcher.await.unwrap();
    drop(workers);

    assert_each_task_succeeded_once(&pool, job, TASKS, results.path()).await;
    // Both replicas dispatched and committed work. Each replica adds its workers' completion counts
    // to the table once a second.
    let mut per_replica: Vec<(String, i64)> = Vec::new();
    let counted = Instant::now();
    while counted.elapsed() < Duration::from_secs(10) {
        per_replica = sqlx::query_as(
            "select coordinator, sum(completed)::bigint from workers group by coordinator order by coordinator",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if per_replica.iter().map(|r| r.1).sum::<i64>() >= TASKS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(per_replica.len(), 2, "{per_replica:?}");
    assert!(per_replica.iter().all(|(_, n)| *n > 0), "each replica's workers completed tasks: {per_replica:?}");
    assert_eq!(per_replica.iter().map(|r| r.1).sum::<i64>(), TASKS);

    // The watcher on replica one saw progress from workers connected to replica two (and one).
    assert_eq!(final_state(&events), Some(JobState::Succeeded as i32), "the watch ends with the final state");
    let on_one = workers_of_replica(&pool, one.port()).await;
    let on_two = workers_of_replica(&pool, two.port()).await;
    let progress_from: HashMap<&str, usize> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Progress(p)) => Some(p.worker_id.as_str()),
            _ => None,
        })
        .fold(HashMap::new(), |mut m, w| {
            *m.entry(w).or_default() += 1;
            m
        });
    let from_two: usize = progress_from.iter().filter(|(w, _)| on_two.contains(**w)).map(|(_, n)| n).sum();
    let from_one: usize = progress_from.iter().filter(|(w, _)| on_one.contains(**w)).map(|(_, n)| n).sum();
    assert!(from_two > 0, "no progress from replica two's workers reached replica one's watcher");
    assert!(from_one > 0, "no progress from replica one's own workers");
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1] || (w[0] == w[1] && w[1] == *sequences.last().unwrap())),
        "sequence numbers increase"
    );
    let succeeded_events: HashSet<u64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Task(t)) if t.state == TaskState::Succeeded as i32 => Some(t.index),
            _ => None,
        })
        .collect();
    assert_eq!(succeeded_events.len() as i64, TASKS, "a succeeded event per task, from either replica");
}

/// Seconds since the epoch (as f64) of a job's finished_at.
async fn finished_at(pool: &PgPool, job: Uuid) -> f64 {
    sqlx::query_scalar("select extract(epoch from finished_at)::float8 from jobs where id = $1")
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_lets_a_small_job_finish_long_before_a_big_one() {
    let Farm { coord, pool, ch, .. } = Farm::start("acc_fair_share", &[]).await;
    let client = coord.token("acme", "client").unwrap();
    let worker_token = coord.token("acme", "worker").unwrap();
    let workers: Vec<Worker> = (0..4)
        .map(|i| synthetic_worker(&coord.url(), &worker_token, &format!("w{i}"), 0, 16))
        .collect();
    wait_connected(&workers.iter().collect::<Vec<_>>());

    let big = submit_ok(&ch, &client, header("big", 1), prompts(10_000)).await;
    // Let the big job take the workers first.
    wait_for("the big job to start", Duration::from_secs(30), || async {
        count(&pool, "select count(*) from tasks where job_id = $1 and state = 3", big).await >= 100
    })
    .await;
    let small = submit_ok(&ch, &client, header("small", 1), prompts(10)).await;
    let started = Instant::now();
    wait_job_finished(&pool, small, Duration::from_secs(60)).await;
    let small_took = started.elapsed();
    let small_done = finished_at(&pool, small).await;
    let big_left: i64 = sqlx::query_scalar(
        "select count(*) from tasks where job_id = $1 and (finished_at is null or extract(epoch from finished_at) > $2)",
    )
    .bind(big)
    .bind(small_done)
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!("the small job finished in {small_took:?} with {big_left} tasks of the big job left");
    assert!(big_left >= 5_000, "the small job waited behind the big one: only {big_left} of 10,000 were left");
    assert_each_task_succeeded_once(&pool, small, 10, coord.results_dir()).await;

    wait_job_finished(&pool, big, Duration::from_secs(240)).await;
    let big_done = finished_at(&pool, big).await;
    assert!(small_done < big_done, "the small job finished after the big one");
    assert_each_task_succeeded_once(&pool, big, 10_000, coord.results_dir()).await;
}

// ---------------------------------------------------------------------------------------------
// Outages

/// Polls the succeeded count of a job until it reaches `at_least` (the database may be away).
async fn wait_succeeded(pool: &PgPool, job: Uuid, at_least: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n: Result<i64, _> =
            sqlx::query_scalar("select count(*) from tasks where job_id = $1 and state = 3")
                .bind(job)
                .fetch_one(pool)
                .await;
        if n.as_ref().is_ok_and(|n| *n >= at_least) {
            return;
        }
        assert!(Instant::now() < deadline, "fewer than {at_least} tasks succeeded within {timeout:?}: {n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_postgres_restarts_mid_batch_lose_nothing() {
    let pg = PgServer::start_local().expect("a dedicated PostgreSQL");
    let db = pg.create_database("acc_restarts").unwrap();
    let mut coord = coordinator(&db, &["--lease-ttl-ms", "3000", "--heartbeat-ms", "500"]);
    let pool = pool(&db).await;
    let client = coord.token("acme", "client").unwrap();
    let worker_token = coord.token("acme", "worker").unwrap();
    let workers = [
        synthetic_worker(&coord.url(), &worker_token, "w1", 3, 4),
        synthetic_worker(&coord.url(), &worker_token, "w2", 3, 4),
    ];
    wait_connected(&workers.iter().collect::<Vec<_>>());
    const TASKS: i64 = 1200;
    let job = submit_ok(&channel(&coord.url()).await, &client, header("restarts", 2), prompts(TASKS as usize)).await;

    // The coordinator crashes (SIGKILL) mid-batch and comes back on the same port.
    wait_succeeded(&pool, job, TASKS / 5, Duration::from_secs(60)).await;
    coord.kill();
    let at_crash = count(&pool, "select count(*) from tasks where job_id = $1 and state = 3", job).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    coord.resume().expect("the coordinator restarts");
    wait_succeeded(&pool, job, at_crash + TASKS / 10, Duration::from_secs(60)).await;

    // PostgreSQL stops mid-batch, stays away for two seconds and comes back.
    let before_outage = count(&pool, "select count(*) from tasks where job_id = $1 and state = 3", job).await;
    pg.stop().expect("stop PostgreSQL");
    assert!(before_outage < TASKS, "the job was still running when PostgreSQL stopped ({before_outage} of {TASKS} done)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.resume().expect("start PostgreSQL again");

    wait_job_finished(&pool, job, Duration::from_secs(120)).await;
    drop(workers);
    assert_each_task_succeeded_once(&pool, job, TASKS, coord.results_dir()).await;
    // Status still answers through the restarted coordinator.
    let status = jobs(&channel(&coord.url()).await)
        .get_job(authed(&client, GetJobRequest { job_id: job.to_string() }))
        .await
        .expect("GetJob after the outages")
        .into_inner();
    assert_eq!(status.state, JobState::Succeeded as i32);
    assert_eq!(status.counts.unwrap().succeeded, TASKS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_dispatch_and_status_working_and_progress_recovers() {
    let redis = RedisServer::start_local().expect("a dedicated Redis");
    let db = fresh_database("acc_redis_outage");
    let coord = coordinator_with(CoordinatorOptions::new(&db).redis(&redis.url()), &[]);
    let pool = pool(&db).await;
    let client = coord.token("acme", "client").unwrap();
    let worker_token = coord.token("acme", "worker").unwrap();
    let ch = channel(&coord.url()).await;
    let workers = [
        synthetic_worker(&coord.url(), &worker_token, "w1", 2, 4),
        synthetic_worker(&coord.url(), &worker_token, "w2", 2, 4),
    ];
    wait_connected(&workers.iter().collect::<Vec<_>>());

    // With Redis up, a watcher sees progress.
    let before = submit_ok(&ch, &client, header("before the outage", 2), prompts(50)).await;
    let events = collect_events(ch.clone(), client.clone(), before, Duration::from_secs(60)).await;
    assert_eq!(final_state(&events), Some(JobState::Succeeded as i32));
    assert!(events.iter().any(|e| matches!(e.event, Some(job_event::Event::Progress(_)))));

    // Redis away: submissions, dispatch, uploads and status all keep working.
    redis.stop().expect("stop Redis");
    let started = Instant::now();
    let during = submit_ok(&ch, &client, header("during the outage", 2), prompts(300)).await;
    // Dispatch must not wait on Redis: 300 tiny tasks take about a second with Redis up.
    wait_job_finished(&pool, during, Duration::from_secs(20)).await;
    eprintln!("300 tasks with Redis away in {:?}", started.elapsed());
    assert_each_task_succeeded_once(&pool, during, 300, coord.results_dir()).await;
    let status = jobs(&ch)
        .get_job(authed(&client, GetJobRequest { job_id: during.to_string() }))
        .await
        .expect("GetJob with Redis away")
        .into_inner();
    assert_eq!((status.state, status.counts.unwrap().succeeded), (JobState::Succeeded as i32, 300));
    // A watch of a finished job still ends with its final state (read from the job store).
    let events = collect_events(ch.clone(), client.clone(), during, Duration::from_secs(15)).await;
    assert_eq!(final_state(&events), Some(JobState::Succeeded as i32));

    // Redis back: progress reaches watchers again.
    redis.resume().expect("start Redis again");
    // The coordinator finds Redis again on a later publish (it retries about once a second), and a
    // short job can finish before that on a busy machine: submit jobs until one's progress is seen.
    let recovered_by = Instant::now() + Duration::from_secs(60);
    loop {
        let after = submit_ok(&ch, &client, header("after the outage", 4), prompts(50)).await;
        let events = collect_events(ch.clone(), client.clone(), after, Duration::from_secs(60)).await;
        assert_eq!(final_state(&events), Some(JobState::Succeeded as i32));
        assert_each_task_succeeded_once(&pool, after, 50, coord.results_dir()).await;
        let progress = events.iter().filter(|e| matches!(e.event, Some(job_event::Event::Progress(_)))).count();
        if progress > 0 {
            break;
        }
        assert!(Instant::now() < recovered_by, "no progress events within 60 s of Redis returning");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(workers);
}
