//! Worker acceptance: the real tiny model on CPU, a real coordinator and PostgreSQL, the `farm` CLI.
//!
//! * a batch of 20 prompts renders; every PNG decodes at the requested size and its metadata gives back
//!   the prompt, seed and steps;
//! * the same seeds and parameters give byte-identical image data (IDAT) in a second job;
//! * a cancel during a 20-step render stops that task within a step while the rest of its batch goes on;
//! * the coordinator killed and restarted mid-job: the worker reconnects and the job completes;
//! * SIGTERM during a batch: the batch finishes and uploads, queued tasks go back, another worker
//!   finishes them, and the drained worker exits 0; a drain longer than `--drain-timeout-s` ends
//!   with the worker exiting and its task going back without charge;
//! * a result the coordinator cannot store: after `--upload-attempts` the worker hands the task back
//!   without charge instead of holding its lease for ever, and the job completes once storage is back.

use std::path::Path;
use std::time::{Duration, Instant};

use farm_proto::pb::job_service_client::JobServiceClient;
use farm_proto::pb::{job_event, CancelJobRequest, GetJobRequest, GetTaskRequest, WatchJobRequest};
use farm_tests::{fresh_database, Coordinator, CoordinatorOptions, Worker, TINY_CPU_WORKER};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

type Client = JobServiceClient<Channel>;

async fn client(url: &str) -> Client {
    let channel = Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    JobServiceClient::new(channel)
}

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    r.metadata_mut().insert("authorization", v);
    r
}

fn write_jsonl(path: &Path, prompts: &[(String, u64)]) {
    let mut s = String::new();
    for (p, seed) in prompts {
        s.push_str(&serde_json::json!({ "prompt": p, "seed": seed }).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

fn prompts(n: usize, seed0: u64) -> Vec<(String, u64)> {
    (0..n)
        .map(|i| {
            (
                format!(
                    "<character_1><n>girl_{i}</n><gender>1girl</gender><appearance>long_hair, eyes_{}</appearance></character_1><general_tags><style>anime</style></general_tags>",
                    i % 7
                ),
                seed0 + i as u64,
            )
        })
        .collect()
}

/// Concatenated IDAT payloads: the compressed pixel data without any metadata chunk.
fn idat(png: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 8;
    while i + 8 <= png.len() {
        let len = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
        let kind = &png[i + 4..i + 8];
        if kind == b"IDAT" {
            out.extend_from_slice(&png[i + 8..i + 8 + len]);
        }
        i += 12 + len;
    }
    out
}

/// (width, height, JSON metadata) of a result.
fn read_png(bytes: &[u8]) -> (u32, u32, serde_json::Value) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let meta = reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == "farm")
        .map(|c| serde_json::from_str(&c.get_text().unwrap()).unwrap())
        .expect("a farm metadata chunk");
    (info.width, info.height, meta)
}

fn submit(cli: &farm_tests::Cli, file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--json", "submit", file.to_str().unwrap(), "--model", "tiny"];
    args.extend_from_slice(extra);
    let out = cli.run(&args).expect_success();
    // With --wait, a second line reports the final state; the first is the submission.
    let first: serde_json::Value = serde_json::from_str(out.stdout.lines().next().expect("output")).unwrap();
    first["job_id"].as_str().expect("job_id").to_string()
}

/// Polls task 0 of `job` until it has rendered `step` steps.
async fn wait_task_step(c: &mut Client, token: &str, job: &str, step: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let t = c.get_task(authed(token, GetTaskRequest { job_id: job.into(), index: 0 })).await.unwrap().into_inner();
        if t.current_step >= step {
            return;
        }
        assert!(Instant::now() < deadline, "task 0 of job {job} made no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_job_done(c: &mut Client, token: &str, job: &str, timeout: Duration) -> farm_proto::pb::Job {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(j) = c.get_job(authed(token, GetJobRequest { job_id: job.into() })).await {
            let j = j.into_inner();
            if j.finished_at_ms != 0 {
                return j;
            }
        }
        assert!(Instant::now() < deadline, "job {job} did not finish within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_renders_with_metadata_and_is_deterministic() {
    let db = fresh_database("worker_batch");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let wtoken = coord.token("tenant-a", "worker").unwrap();
    let _worker = Worker::spawn(&coord.url(), &wtoken, TINY_CPU_WORKER).unwrap();
    let cli = coord.cli("tenant-a").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("batch.jsonl");
    let ps = prompts(20, 5000);
    write_jsonl(&file, &ps);
    let common = ["--width", "96", "--height", "64", "--steps", "3", "--wait"];
    let job = submit(&cli, &file, &common);

    let out1 = dir.path().join("out1");
    cli.run(&["results", &job, "-o", out1.to_str().unwrap()]).expect_success();
    for (i, (prompt, seed)) in ps.iter().enumerate() {
        let bytes = std::fs::read(out1.join(format!("{i:06}.png"))).unwrap();
        let (w, h, meta) = read_png(&bytes);
        assert_eq!((w, h), (96, 64), "image {i} has the requested size");
        assert_eq!(meta["prompt"].as_str(), Some(prompt.as_str()));
        assert_eq!(meta["seed"].as_u64(), Some(*seed));
        assert_eq!(meta["steps"].as_u64(), Some(3));
        assert_eq!(meta["index"].as_u64(), Some(i as u64));
        assert_eq!(meta["model"].as_str(), Some("tiny"));
    }
    // The worker's render metadata is kept with the succeeded attempt (without the prompt texts,
    // which the task holds) and shown by `farm task`.
    let task = cli.run(&["task", &job, "7", "--json"]).expect_success().json();
    let attempt = task["attempts"].as_array().unwrap().iter().find(|a| a["outcome"] == "succeeded").expect("a succeeded attempt");
    let m = &attempt["metadata"];
    assert_eq!((m["seed"].as_u64(), m["index"].as_u64(), m["steps"].as_u64()), (Some(ps[7].1), Some(7), Some(3)), "{m}");
    assert!(m["render_ms"].as_u64().is_some_and(|ms| ms > 0) && m["batch_size"].as_u64().is_some_and(|n| n >= 1), "{m}");
    assert!(m.get("prompt").is_none(), "{m}");

    // Same prompts, seeds and parameters in a second job: byte-identical image data.
    let job2 = submit(&cli, &file, &common);
    let out2 = dir.path().join("out2");
    cli.run(&["results", &job2, "-o", out2.to_str().unwrap()]).expect_success();
    let mut distinct = std::collections::HashSet::new();
    for i in 0..ps.len() {
        let a = std::fs::read(out1.join(format!("{i:06}.png"))).unwrap();
        let b = std::fs::read(out2.join(format!("{i:06}.png"))).unwrap();
        assert!(!idat(&a).is_empty());
        assert_eq!(idat(&a), idat(&b), "image {i}: same seed and parameters, different pixels");
        distinct.insert(idat(&a));
    }
    assert_eq!(distinct.len(), ps.len(), "different prompts or seeds give different images");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_task_within_a_step_and_the_batch_goes_on() {
    let db = fresh_database("worker_cancel");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let token = coord.token("tenant-c", "client").unwrap();
    let wtoken = coord.token("tenant-c", "worker").unwrap();
    let cli = coord.cli("tenant-c").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Job A (one prompt) and job B (three) share a shape. The coordinator hands tasks out job by
    // job, so they are submitted while the worker renders a long first job, W: when W is done, the
    // worker gathers the same-shape tasks queued meanwhile, A's and B's, into one batch.
    let (fw, fa, fb) = (dir.path().join("w.jsonl"), dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    write_jsonl(&fw, &prompts(1, 500));
    write_jsonl(&fa, &prompts(1, 1));
    write_jsonl(&fb, &prompts(3, 100));
    let job_w = submit(&cli, &fw, &["--width", "256", "--height", "256", "--steps", "200"]);
    let mut c = client(&coord.url()).await;
    let _worker = Worker::spawn(&coord.url(), &wtoken, TINY_CPU_WORKER).unwrap();
    wait_task_step(&mut c, &token, &job_w, 1, Duration::from_secs(300)).await;
    let common = ["--width", "256", "--height", "256", "--steps", "20"];
    let job_a = submit(&cli, &fa, &common);
    let job_b = submit(&cli, &fb, &common);
    let w = c.get_task(authed(&token, GetTaskRequest { job_id: job_w.clone(), index: 0 })).await.unwrap().into_inner();
    assert!(w.current_step < 200, "W was still rendering when A and B came: {w:?}");
    let mut events = c
        .watch_job(authed(&token, WatchJobRequest { job_id: job_a.clone(), after_sequence: 0 }))
        .await
        .unwrap()
        .into_inner();

    // Cancel once A has made two steps.
    let mut step_at_cancel = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(ev) = tokio::time::timeout_at(deadline.into(), events.message()).await.expect("progress in time").unwrap() {
        if let Some(job_event::Event::Progress(p)) = ev.event {
            assert_eq!(p.total_steps, 20);
            if p.step >= 2 {
                step_at_cancel = p.step;
                break;
            }
        }
    }
    assert!(step_at_cancel >= 2, "job A made progress");
    // B renders in A's batch: its task makes steps while A is still early in its 20 (one GPU
    // thread: a batch of its own would start only after A's).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tb = c.get_task(authed(&token, GetTaskRequest { job_id: job_b.clone(), index: 0 })).await.unwrap().into_inner();
        if tb.current_step >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "B made no step while A rendered: {tb:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c.cancel_job(authed(&token, CancelJobRequest { job_id: job_a.clone() })).await.unwrap().into_inner();
    assert_eq!(r.cancelling_running, 1);

    let a = wait_job_done(&mut c, &token, &job_a, Duration::from_secs(300)).await;
    let b = wait_job_done(&mut c, &token, &job_b, Duration::from_secs(600)).await;
    assert_eq!(a.state, farm_proto::pb::JobState::Cancelled as i32);
    assert_eq!(b.counts.unwrap().succeeded, 3, "the rest of the batch finished");
    let t = c.get_task(authed(&token, GetTaskRequest { job_id: job_a.clone(), index: 0 })).await.unwrap().into_inner();
    assert_eq!(t.state, farm_proto::pb::TaskState::Cancelled as i32);
    assert!(
        t.current_step <= step_at_cancel + 2 && t.current_step < 20,
        "stopped within a step of the cancel (cancelled after step {step_at_cancel}, last step {})",
        t.current_step
    );
    assert_eq!(t.attempts.last().map(|a| a.outcome.as_str()), Some("cancelled"));
    assert_eq!(t.failures, 0, "a cancel is not a render failure");
    // B's task went on after A's was cancelled: one attempt, no retry.
    let tb = c.get_task(authed(&token, GetTaskRequest { job_id: job_b.clone(), index: 0 })).await.unwrap().into_inner();
    assert_eq!(tb.attempts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_a_coordinator_restart() {
    let db = fresh_database("worker_restart");
    let mut coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let token = coord.token("tenant-r", "client").unwrap();
    let wtoken = coord.token("tenant-r", "worker").unwrap();
    let cli = coord.cli("tenant-r").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.jsonl");
    write_jsonl(&file, &prompts(8, 42));
    let job = submit(&cli, &file, &["--width", "128", "--height", "128", "--steps", "12"]);
    let worker_args: Vec<&str> = TINY_CPU_WORKER.iter().copied().chain(["--max-backoff-ms", "300"]).collect();
    let _worker = Worker::spawn(&coord.url(), &wtoken, &worker_args).unwrap();
    let mut c = client(&coord.url()).await;
    // Kill the coordinator once rendering is under way.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let j = c.get_job(authed(&token, GetJobRequest { job_id: job.clone() })).await.unwrap().into_inner();
        if j.progress > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    coord.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    coord.resume().unwrap();
    let mut c = client(&coord.url()).await;
    let j = wait_job_done(&mut c, &token, &job, Duration::from_secs(600)).await;
    assert_eq!(j.counts.unwrap().succeeded, 8, "every task completed after the restart");
    let rows: i64 = {
        let pool = sqlx::PgPool::connect(&db).await.unwrap();
        sqlx::query_scalar("select count(*) from tasks where state = 3 and result_sha256 is not null")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(rows, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_running_batch_and_hands_back_the_rest() {
    let db = fresh_database("worker_drain");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let token = coord.token("tenant-d", "client").unwrap();
    let wtoken = coord.token("tenant-d", "worker").unwrap();
    let cli = coord.cli("tenant-d").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.jsonl");
    write_jsonl(&file, &prompts(6, 7));
    let job = submit(&cli, &file, &["--width", "256", "--height", "256", "--steps", "16"]);
    let args_a = ["--model", "tiny", "--device", "cpu", "--precision", "fp32", "--max-batch", "2", "--name", "worker-a"];
    let mut worker_a = Worker::spawn(&coord.url(), &wtoken, &args_a).unwrap();
    let mut c = client(&coord.url()).await;
    wait_task_step(&mut c, &token, &job, 2, Duration::from_secs(300)).await;
    // SIGTERM: the running batch must finish and upload, the queued tasks go back.
    let pid = worker_a.pid().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = worker_a.wait_exit(Duration::from_secs(300)).expect("the worker exits after draining");
    assert!(status.success(), "drained worker exits 0: {status:?}");
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let by_a: i64 = sqlx::query_scalar(
        "select count(*) from task_attempts where worker_name = 'worker-a' and outcome = 'succeeded'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(by_a >= 1, "the running batch was finished and uploaded before exit");
    let released: i64 =
        sqlx::query_scalar("select count(*) from task_attempts where worker_name = 'worker-a' and outcome in ('released', 'lost')")
            .fetch_one(&pool)
            .await
            .unwrap();
    let running_after: i64 = sqlx::query_scalar("select count(*) from tasks where state = 2").fetch_one(&pool).await.unwrap();
    assert_eq!(running_after, 0, "nothing stays leased to the drained worker");
    assert!(by_a + released >= 2);
    // Its credits (twice --max-batch) had brought it more tasks than the running batch: those were
    // handed back, not rendered during the drain.
    assert!(released >= 1 && by_a <= 2, "drain: {by_a} rendered, {released} handed back");
    let args_b = ["--model", "tiny", "--device", "cpu", "--precision", "fp32", "--max-batch", "2", "--name", "worker-b"];
    let _worker_b = Worker::spawn(&coord.url(), &wtoken, &args_b).unwrap();
    let j = wait_job_done(&mut c, &token, &job, Duration::from_secs(600)).await;
    assert_eq!(j.counts.unwrap().succeeded, 6);
    let by_b: i64 = sqlx::query_scalar(
        "select count(*) from task_attempts where worker_name = 'worker-b' and outcome = 'succeeded'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(by_a + by_b, 6, "each task succeeded exactly once");
}

/// A synthetic-renderer worker (`step_ms` per step) with `extra` flags.
fn synthetic_worker(url: &str, token: &str, name: &str, step_ms: u64, extra: &[&str]) -> Worker {
    let step_ms = step_ms.to_string();
    let mut args = vec!["--renderer", "synthetic", "--synthetic-step-ms", &step_ms, "--model", "tiny", "--no-warmup", "--name", name];
    args.extend_from_slice(extra);
    Worker::spawn(url, token, &args).expect("start a worker")
}

/// A worker whose token the coordinator refuses exits with status 4 (which the systemd unit does
/// not restart) instead of retrying for ever; a token read with a trailing line break (a secret
/// file) is trimmed and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_worker_exits_with_status_4_and_a_token_with_a_line_break_works() {
    let db = fresh_database("worker_refused");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let unknown = format!("farm_{}", "0".repeat(64));
    let mut refused = synthetic_worker(&coord.url(), &unknown, "refused", 1, &[]);
    let status = refused.wait_exit(Duration::from_secs(60)).expect("the refused worker exits");
    assert_eq!(status.code(), Some(4), "{status:?}");
    let wtoken = coord.token("tenant-k", "worker").unwrap();
    let trimmed = synthetic_worker(&coord.url(), &format!("{wtoken}\n"), "trimmed", 1, &[]);
    trimmed.wait_for_log("connected to the coordinator", Duration::from_secs(60)).expect("it connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_timeout_exits_and_hands_the_task_back() {
    let db = fresh_database("worker_drain_timeout");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let token = coord.token("tenant-t", "client").unwrap();
    let wtoken = coord.token("tenant-t", "worker").unwrap();
    let cli = coord.cli("tenant-t").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.jsonl");
    write_jsonl(&file, &prompts(1, 3));
    // 100 steps of 200 ms: the render outlasts the 1 s drain timeout by far.
    let job = submit(&cli, &file, &["--width", "64", "--height", "64", "--steps", "100"]);
    let mut worker = synthetic_worker(&coord.url(), &wtoken, "slow", 200, &["--drain-timeout-s", "1"]);
    let mut c = client(&coord.url()).await;
    wait_task_step(&mut c, &token, &job, 2, Duration::from_secs(60)).await;
    let pid = worker.pid().unwrap() as i32;
    let stopped = Instant::now();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = worker.wait_exit(Duration::from_secs(15)).expect("the worker exits at its drain timeout");
    assert!(status.success(), "{status:?}");
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(8), "exited {took:?} after SIGTERM with a 1 s drain timeout");
    // The coordinator requeues the task when it sees the stream end.
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (state, failures): (i16, i32) = sqlx::query_as("select state, failures from tasks")
            .fetch_one(&pool)
            .await
            .unwrap();
        if state == 1 {
            assert_eq!(failures, 0, "the unfinished task is queued again without charge");
            break;
        }
        assert!(Instant::now() < deadline, "the task was not queued again (state {state})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_the_coordinator_cannot_store_go_back_without_charge_and_finish_after_recovery() {
    let db = fresh_database("worker_upload_gives_up");
    let results = tempfile::tempdir().unwrap();
    let store = results.path().join("results");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100").results(&store)).unwrap();
    // Once the coordinator has opened its storage (its port opens before), the results directory
    // becomes a file: every store fails (the coordinator answers UNAVAILABLE).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !coord.log().contains("coordinator listening") {
        assert!(Instant::now() < deadline, "the coordinator did not finish starting");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&store);
    std::fs::write(&store, b"not a directory").unwrap();
    let token = coord.token("tenant-u", "client").unwrap();
    let wtoken = coord.token("tenant-u", "worker").unwrap();
    let cli = coord.cli("tenant-u").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.jsonl");
    write_jsonl(&file, &prompts(1, 5));
    let job = submit(&cli, &file, &["--width", "64", "--height", "64", "--steps", "2", "--max-attempts", "1"]);
    let _worker = synthetic_worker(&coord.url(), &wtoken, "uploader", 0, &["--upload-attempts", "2"]);
    // After two failed uploads the worker hands the task back: no attempt charged, nothing held.
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let released: i64 = sqlx::query_scalar("select count(*) from task_attempts where outcome = 'released'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if released >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never gave the task back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failures: i32 = sqlx::query_scalar("select failures from tasks").fetch_one(&pool).await.unwrap();
    assert_eq!(failures, 0, "an upload the coordinator could not store charged the task");
    // Storage back: the job completes (with max_attempts 1, so no attempt was spent on the outage).
    std::fs::remove_file(&store).unwrap();
    // create_dir_all: a store the coordinator attempts meanwhile may create it first.
    std::fs::create_dir_all(&store).unwrap();
    let mut c = client(&coord.url()).await;
    let j = wait_job_done(&mut c, &token, &job, Duration::from_secs(120)).await;
    assert_eq!(j.state, farm_proto::pb::JobState::Succeeded as i32, "{j:?}");
}
