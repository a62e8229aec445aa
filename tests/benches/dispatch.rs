//! Control-plane benchmark of the coordinator, printed as three figures and one ratio:
//!
//! 1. **submit**: SubmitJob prompts/s for one streamed job of `BENCH_PROMPTS` prompts (default 100,000).
//! 2. **dispatch**: end-to-end tasks/s with `BENCH_WORKERS` in-process worker sessions (default 64)
//!    that render in 0 ms: hello, credits, and for every assignment an UploadResult of a tiny blob and
//!    the credits back. Each task is claimed under a lease, sent, uploaded, stored and committed.
//! 3. **raw**: the floor PostgreSQL itself sets on the same database with the same number of
//!    connections: claim up to `BENCH_BATCH` queued tasks with `SELECT ... FOR UPDATE SKIP LOCKED`,
//!    then mark each one done with its own UPDATE (as an upload commits one task).
//! 4. **status**: GetJob of the same job once it has finished, with the task counts stored when it
//!    closed against the same call counting its tasks (as for a running job), alternating, median of
//!    `BENCH_STATUS_ROUNDS` (default 20) each.
//! 5. **listing**: ListJobs of a page of 50 three quarters down a tenant's `BENCH_LIST_JOBS` finished
//!    jobs (default 100,000), against the same page read with the earlier cursor form, which compared
//!    a computed value per row instead of `(created_at, id)` and so could not start in the index;
//!    alternating, median of `BENCH_STATUS_ROUNDS` each.
//!
//! Run: `cargo bench -p farm-tests --bench dispatch --profile dev` (the binaries the harness starts are
//! built in the same profile; `FARM_BIN_DIR` points it at others, e.g. release builds). PostgreSQL is
//! `DATABASE_URL` or a throwaway local server; the coordinator runs alone with in-process events.
//! Each timed phase stops after `BENCH_SECONDS` (default 20) or `BENCH_TASKS` tasks (default 30,000).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_proto::pb::job_service_client::JobServiceClient;
use farm_proto::pb::worker_service_client::WorkerServiceClient;
use farm_proto::pb::{
    coordinator_message, submit_job_request, upload_result_request, worker_message, Credits, Hello, Lease,
    PromptChunk, PromptSpec, SubmitEnd, SubmitJobRequest, UploadHeader,
    UploadResultRequest, WorkerCapabilities, WorkerMessage,
};
use farm_tests::{tiny_job_header, Coordinator, CoordinatorOptions, PgServer};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;
use uuid::Uuid;

const MODEL: &str = "tiny";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut request = Request::new(msg);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?.connect().await?)
}

/// The SubmitJob stream, built before timing starts.
fn submission(n: u64) -> Vec<SubmitJobRequest> {
    let header = tiny_job_header("dispatch benchmark", MODEL);
    let mut messages = vec![SubmitJobRequest {
        msg: Some(submit_job_request::Msg::Header(header)),
    }];
    let mut chunk = Vec::with_capacity(1000);
    for i in 0..n {
        chunk.push(PromptSpec {
            text: format!(
                "<character_1><n>character {i}</n><appearance>long hair, blue eyes</appearance></character_1>\
                 <general_tags><style>anime</style><background>city at night</background></general_tags>"
            ),
            seed: Some(i),
            ..Default::default()
        });
        if chunk.len() == 1000 || i + 1 == n {
            messages.push(SubmitJobRequest {
                msg: Some(submit_job_request::Msg::Chunk(PromptChunk {
                    prompts: std::mem::take(&mut chunk),
                })),
            });
        }
    }
    messages.push(SubmitJobRequest {
        msg: Some(submit_job_request::Msg::End(SubmitEnd { prompt_count: n })),
    });
    messages
}

/// One worker session rendering in 0 ms until `stop`: every assigned task is uploaded at once (the
/// batch's uploads concurrently) and its credit granted back.
async fn session(
    url: String,
    token: String,
    name: String,
    batch: u32,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let ch = channel(&url).await?;
    let (out, rx) = mpsc::channel(256);
    let hello = Hello {
        name,
        capabilities: Some(WorkerCapabilities {
            device: "cpu".into(),
            model_name: MODEL.into(),
            model_hash: "bench".into(),
            max_batch: batch,
            max_pixels: 1024 * 1024,
            ..Default::default()
        }),
        held_leases: vec![],
    };
    out.send(WorkerMessage { msg: Some(worker_message::Msg::Hello(hello)) }).await?;
    let mut inbound = WorkerServiceClient::new(ch.clone())
        .connect(authed(&token, ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let credits = |add: u32| WorkerMessage { msg: Some(worker_message::Msg::Credits(Credits { add, withdraw: false })) };
    out.send(credits(batch * 2)).await?;
    let blob = b"\x89PNG\r\n\x1a\nbenchmark result".to_vec();
    let sha = hex::encode(Sha256::digest(&blob));
    while !stop.load(Ordering::Relaxed) {
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(200), inbound.message()).await else {
            continue;
        };
        let Some(msg) = msg? else { break };
        let Some(coordinator_message::Msg::Assign(assign)) = msg.msg else { continue };
        let uploads = assign.tasks.iter().map(|task| {
            let lease: Lease = task.lease.clone().expect("a lease");
            let messages = vec![
                UploadResultRequest {
                    msg: Some(upload_result_request::Msg::Header(UploadHeader {
                        lease: Some(lease),
                        content_type: "image/png".into(),
                        size_bytes: blob.len() as u64,
                        sha256: sha.clone(),
                        metadata_json: "{}".into(),
                    })),
                },
                UploadResultRequest { msg: Some(upload_result_request::Msg::Data(blob.clone())) },
            ];
            let mut client = WorkerServiceClient::new(ch.clone());
            let token = token.clone();
            async move { client.upload_result(authed(&token, tokio_stream::iter(messages))).await }
        });
        let n = futures::future::try_join_all(uploads).await?.len() as u32;
        done.fetch_add(u64::from(n), Ordering::Relaxed);
        out.send(credits(n)).await?;
    }
    Ok(())
}

/// Runs until `limit` tasks are done or `seconds` pass; returns (tasks, elapsed).
async fn measure(done: &AtomicU64, limit: u64, seconds: u64) -> (u64, Duration) {
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) && done.load(Ordering::Relaxed) - start_count < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (done.load(Ordering::Relaxed) - start_count, started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let prompts = env_or("BENCH_PROMPTS", 100_000);
    let workers = env_or("BENCH_WORKERS", 64) as usize;
    let batch = env_or("BENCH_BATCH", 4) as u32;
    let seconds = env_or("BENCH_SECONDS", 20);
    let task_limit = env_or("BENCH_TASKS", 30_000);

    let pg = PgServer::start()?;
    let db = pg.create_database("bench_dispatch")?;
    let pool_size = (workers + 16).to_string();
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).args([
        "--db-pool",
        &pool_size,
        "--idle-poll-ms",
        "100",
        "--lease-ttl-ms",
        "60000",
        "--heartbeat-ms",
        "10000",
    ]))?;
    let client_token = coord.token("bench", "client")?;
    let worker_token = coord.token("bench", "worker")?;

    // 1. Submission.
    let messages = submission(prompts);
    let ch = channel(&coord.url()).await?;
    let started = Instant::now();
    let response = JobServiceClient::new(ch.clone())
        .submit_job(authed(&client_token, tokio_stream::iter(messages)))
        .await?
        .into_inner();
    let submit_elapsed = started.elapsed();
    anyhow::ensure!(response.errors.is_empty() && response.accepted == prompts, "submission refused: {response:?}");
    let job = Uuid::parse_str(&response.job_id)?;
    let submit_rate = prompts as f64 / submit_elapsed.as_secs_f64();

    // 2. Dispatch through the coordinator.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sessions: Vec<_> = (0..workers)
        .map(|i| {
            tokio::spawn(session(
                coord.url(),
                worker_token.clone(),
                format!("bench-{i}"),
                batch,
                done.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Warm-up: every session connected and the first tasks through.
    let warm_up = Instant::now();
    while done.load(Ordering::Relaxed) < (workers as u64) * u64::from(batch) && warm_up.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (dispatched, dispatch_elapsed) = measure(&done, task_limit, seconds).await;
    stop.store(true, Ordering::Relaxed);
    for s in sessions {
        if let Err(e) = s.await? {
            eprintln!("a worker session failed: {e:#}");
        }
    }
    let dispatch_rate = dispatched as f64 / dispatch_elapsed.as_secs_f64();
    // Let the coordinator requeue what the closed sessions held before the raw loop runs.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. Raw claim loop on the same database and job, as many connections as sessions.
    // Like the coordinator's pool: no ping before each checkout.
    let pool = PgPoolOptions::new()
        .max_connections(workers as u32)
        .test_before_acquire(false)
        .connect(&db)
        .await?;
    let raw_done = Arc::new(AtomicU64::new(0));
    let raw_stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..workers)
        .map(|_| {
            let (pool, raw_done, raw_stop) = (pool.clone(), raw_done.clone(), raw_stop.clone());
            let owner = Uuid::new_v4();
            tokio::spawn(async move {
                while !raw_stop.load(Ordering::Relaxed) {
                    let claimed: Vec<(Uuid, i64)> = sqlx::query_as(
                        "with picked as (
                             select id from tasks where job_id = $1 and state = 1 order by idx limit $2
                             for update skip locked)
                         update tasks t set state = 2, lease_owner = $3, lease_token = nextval('lease_tokens'),
                                lease_expires_at = now() + interval '60 seconds'
                         from picked where t.id = picked.id
                         returning t.id, t.lease_token",
                    )
                    .bind(job)
                    .bind(i64::from(batch))
                    .bind(owner)
                    .fetch_all(&pool)
                    .await?;
                    if claimed.is_empty() {
                        break;
                    }
                    for (id, token) in claimed {
                        sqlx::query(
                            "update tasks set state = 3, finished_at = now(), lease_owner = null
                             where id = $1 and lease_token = $2 and state = 2",
                        )
                        .bind(id)
                        .bind(token)
                        .execute(&pool)
                        .await?;
                        raw_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let (raw, raw_elapsed) = measure(&raw_done, task_limit, seconds).await;
    raw_stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await??;
    }
    let raw_rate = raw as f64 / raw_elapsed.as_secs_f64();
    println!("submit:   {prompts} prompts in {:.2} s = {submit_rate:.0} prompts/s (target >= 100000)", submit_elapsed.as_secs_f64());
    println!(
        "dispatch: {dispatched} tasks in {:.2} s = {dispatch_rate:.0} tasks/s with {workers} sessions, batch {batch} (target >= 5000)",
        dispatch_elapsed.as_secs_f64()
    );
    println!(
        "raw:      {raw} tasks in {:.2} s = {raw_rate:.0} tasks/s (SKIP LOCKED claim of {batch} + one UPDATE per task, {workers} connections)",
        raw_elapsed.as_secs_f64()
    );
    println!("ratio:    dispatch/raw = {:.1} % (target >= 50 %)", 100.0 * dispatch_rate / raw_rate);

    // 4. Status of the finished job: stored counts against counting its tasks.
    sqlx::query("update tasks set state = 3, finished_at = now(), lease_owner = null where job_id = $1 and state in (1, 2)")
        .bind(job)
        .execute(&pool)
        .await?;
    let closing = Instant::now();
    loop {
        let stored: Option<bool> = sqlx::query_scalar("select final_counts is not null from jobs where id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await?;
        if stored == Some(true) {
            break;
        }
        anyhow::ensure!(closing.elapsed() < Duration::from_secs(30), "the lease sweep did not close the job");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored_counts: String = sqlx::query_scalar("select final_counts::text from jobs where id = $1")
        .bind(job)
        .fetch_one(&pool)
        .await?;
    let rounds = env_or("BENCH_STATUS_ROUNDS", 20);
    let mut jobs_client = JobServiceClient::new(ch.clone());
    let mut time_get_job = async || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let j = jobs_client
            .get_job(authed(&client_token, farm_proto::pb::GetJobRequest { job_id: job.to_string() }))
            .await?
            .into_inner();
        anyhow::ensure!(j.counts.map(|c| c.succeeded) == Some(prompts), "GetJob counts {j:?}");
        Ok(started.elapsed())
    };
    let (mut with_stored, mut counted) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        with_stored.push(time_get_job().await?);
        sqlx::query("update jobs set final_counts = null where id = $1").bind(job).execute(&pool).await?;
        counted.push(time_get_job().await?);
        sqlx::query("update jobs set final_counts = $2::jsonb where id = $1")
            .bind(job)
            .bind(&stored_counts)
            .execute(&pool)
            .await?;
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let (stored_ms, counted_ms) = (median(&mut with_stored), median(&mut counted));

    println!(
        "status:   GetJob of the finished {prompts}-task job: {stored_ms:.2} ms with stored counts, {counted_ms:.2} ms counting its tasks ({:.1}x), median of {rounds}",
        counted_ms / stored_ms
    );

    // 5. A deep page of a long job listing.
    let list_jobs = env_or("BENCH_LIST_JOBS", 100_000) as i64;
    sqlx::query(
        "insert into jobs (id, tenant_id, name, params, model, max_pixels, max_attempts, total, total_steps,
                           state, finished_at, final_counts, created_at)
         select gen_random_uuid(), 'bench', 'listed ' || g, '{}', $2, 0, 3, 1, 1, 3, now(), '{\"3\": 1}',
                now() - interval '1 day' - g * interval '1 second'
         from generate_series(1, $1) g",
    )
    .bind(list_jobs)
    .bind(MODEL)
    .execute(&pool)
    .await?;
    sqlx::query("analyze jobs").execute(&pool).await?;
    let (cursor_ts, cursor_id): (i64, Uuid) = sqlx::query_as(
        "select (extract(epoch from created_at) * 1000000)::bigint, id from jobs where tenant_id = 'bench'
         order by created_at desc, id desc offset $1 limit 1",
    )
    .bind(list_jobs * 3 / 4)
    .fetch_one(&pool)
    .await?;
    let page_token = format!("{cursor_ts}:{cursor_id}");
    let mut time_list = async || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let page = jobs_client
            .list_jobs(authed(
                &client_token,
                farm_proto::pb::ListJobsRequest { page_size: 50, page_token: page_token.clone(), ..Default::default() },
            ))
            .await?
            .into_inner();
        anyhow::ensure!(page.jobs.len() == 50, "ListJobs page of {}", page.jobs.len());
        Ok(started.elapsed())
    };
    let earlier_form = async || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "select id from jobs
             where tenant_id = 'bench' and ((extract(epoch from created_at) * 1000000)::bigint, id) < ($1, $2)
             order by created_at desc, id desc limit 51",
        )
        .bind(cursor_ts)
        .bind(cursor_id)
        .fetch_all(&pool)
        .await?;
        anyhow::ensure!(rows.len() == 51, "earlier form read {} rows", rows.len());
        Ok(started.elapsed())
    };
    let (mut listed, mut earlier) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        listed.push(time_list().await?);
        earlier.push(earlier_form().await?);
    }
    let (listed_ms, earlier_ms) = (median(&mut listed), median(&mut earlier));
    println!(
        "listing:  ListJobs page of 50 at depth {} of {list_jobs} jobs: {listed_ms:.2} ms (RPC); the earlier cursor form's query alone {earlier_ms:.2} ms ({:.1}x), median of {rounds}",
        list_jobs * 3 / 4,
        earlier_ms / listed_ms
    );
    drop(coord);
    drop(pg);
    Ok(())
}
