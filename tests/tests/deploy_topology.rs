//! The `deploy/compose.yaml` topology on loopback, as processes instead of containers: PostgreSQL,
//! Redis, an S3-compatible object store (moto), two coordinator replicas sharing all three (both with
//! `--results s3://farm-results/renders`, the connection in the `AWS_*` environment), and three CPU
//! workers with the tiny model spread over the replicas. Fifty prompts go in through the `farm` CLI;
//! every result must end up in the bucket, as a PNG whose size and SHA-256 are what the coordinators
//! recorded, nothing else may be left in the bucket, and `farm results` through the other replica
//! must download the same bytes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use farm_tests::{
    free_port, fresh_database, s3_client, s3_server, shared_redis, Cli, Coordinator, CoordinatorOptions, Worker,
    TINY_CPU_WORKER,
};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

const BUCKET: &str = "farm-results";
const PREFIX: &str = "renders";
const PROMPTS: usize = 50;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `farm_tasks_succeeded_total` from a coordinator's `/metrics` on 127.0.0.1:`port`.
fn committed_by(port: u16) -> u64 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
        .lines()
        .find_map(|line| line.strip_prefix("farm_tasks_succeeded_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no farm_tasks_succeeded_total in\n{reply}"))
}

#[test]
fn fifty_prompts_through_two_replicas_land_in_the_object_store() {
    let started = Instant::now();
    let moto = s3_server(BUCKET);
    let db = fresh_database("deploy_topology");
    let redis = shared_redis().url();
    let results = format!("s3://{BUCKET}/{PREFIX}");
    let metrics = [free_port(), free_port()];
    let options = |metrics: u16| {
        CoordinatorOptions::new(&db).redis(&redis).s3_results(&moto, &results).args([
            "--idle-poll-ms",
            "100",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ])
    };
    let coord_a = Coordinator::spawn(options(metrics[0])).unwrap();
    let coord_b = Coordinator::spawn(options(metrics[1]).skip_migrate()).unwrap();
    let worker_token = coord_a.token("compose", "worker").unwrap();
    // One libtorch thread each: three workers share two cores without oversubscribing them.
    let workers: Vec<Worker> = (0..3)
        .map(|i| {
            let coordinator = if i % 2 == 0 { coord_a.url() } else { coord_b.url() };
            let name = format!("worker-{i}");
            let args: Vec<&str> = TINY_CPU_WORKER.iter().copied().chain(["--no-warmup", "--name", &name]).collect();
            Worker::spawn_with_env(&coordinator, &worker_token, &args, &[("OMP_NUM_THREADS", "1")]).unwrap()
        })
        .collect();
    let cli_a = coord_a.cli("compose").unwrap().timeout(Duration::from_secs(600));
    // Every worker in the farm before the prompts go in, so that both replicas commit results.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let listed = cli_a.run(&["--json", "workers"]).expect_success().json();
        let connected = listed["workers"].as_array().unwrap().iter().filter(|w| w["connected"] == true).count();
        if connected == workers.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {connected} of {} workers connected: {listed}", workers.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("topology up after {:?}", started.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let lines: Vec<String> = (0..PROMPTS).map(|i| format!("1girl, solo, compose_{i}, smile")).collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let out = cli_a
        .run(&[
            "--json",
            "submit",
            prompts.to_str().unwrap(),
            "--model",
            "tiny",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--seed",
            "100",
            "--seed-mode",
            "increment",
            "--wait",
        ])
        .expect_success();
    let lines = out.json_lines();
    let job = lines[0]["job_id"].as_str().unwrap().to_string();
    assert_eq!(lines[0]["accepted"], PROMPTS, "{}", out.stdout);
    assert_eq!(lines.last().unwrap()["job"]["state"], "succeeded", "{}", out.stdout);
    assert_eq!(lines.last().unwrap()["job"]["counts"]["succeeded"], PROMPTS, "{}", out.stdout);
    eprintln!("{PROMPTS} rendered after {:?}", started.elapsed());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    // What the coordinators recorded: index -> (key, size, sha256, worker name).
    let recorded: BTreeMap<i64, (String, i64, String, String)> = runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&db).await.unwrap();
        let rows: Vec<(i64, String, i64, String, String)> = sqlx::query_as(
            "select idx, result_key, result_size, result_sha256, coalesce(result_worker, '')
               from tasks where job_id = $1::uuid and state = 3",
        )
        .bind(&job)
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.into_iter().map(|(i, k, n, s, w)| (i, (k, n, s, w))).collect()
    });
    assert_eq!(recorded.len(), PROMPTS, "every task succeeded with a recorded result");

    // The bucket holds exactly the fifty results under PREFIX/JOB/INDEX.TOKEN.png: no temporary objects,
    // nothing elsewhere. Each is a PNG whose size and SHA-256 match the coordinators' records.
    let store = s3_client(&moto, BUCKET);
    let stored: BTreeMap<String, Vec<u8>> = runtime.block_on(async {
        let listed: Vec<_> = store.list(None).collect().await;
        let mut out = BTreeMap::new();
        for meta in listed {
            let key = meta.unwrap().location.to_string();
            let bytes = store.get(&key.as_str().into()).await.unwrap().bytes().await.unwrap();
            out.insert(key, bytes.to_vec());
        }
        out
    });
    // Keys are JOB/INDEX.LEASE_TOKEN.png: exactly the keys the rows committed, nothing else.
    let mut expected_keys: Vec<String> = recorded.values().map(|(key, ..)| format!("{PREFIX}/{key}")).collect();
    expected_keys.sort();
    assert_eq!(stored.keys().cloned().collect::<Vec<_>>(), expected_keys, "the bucket holds exactly the results");
    for (idx, (key, size, sha, _)) in &recorded {
        let token = key
            .strip_prefix(&format!("{job}/{idx}."))
            .and_then(|rest| rest.strip_suffix(".png"))
            .unwrap_or_else(|| panic!("recorded key {key} of task {idx}"));
        assert!(token.parse::<u64>().is_ok(), "recorded key {key} of task {idx} ends with its lease token");
        let bytes = &stored[&format!("{PREFIX}/{key}")];
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "task {idx}: not a PNG");
        let decoded = png::Decoder::new(std::io::Cursor::new(bytes.as_slice())).read_info().unwrap();
        assert_eq!((decoded.info().width, decoded.info().height), (64, 64), "task {idx}");
        assert_eq!(bytes.len() as i64, *size, "task {idx}: size");
        assert_eq!(&sha256(bytes), sha, "task {idx}: sha256");
    }
    let by_worker = recorded.values().fold(BTreeMap::<&str, usize>::new(), |mut m, (_, _, _, w)| {
        *m.entry(w.as_str()).or_default() += 1;
        m
    });
    eprintln!("results by worker: {by_worker:?}");
    // `farm workers` through the other replica: every worker idle, and its images per second counts
    // exactly the results it committed (all within the minute) over the time since it connected.
    let cli_b = Cli::new(&coord_b.url(), &coord_b.token("compose", "client").unwrap());
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64;
    let before_ms = now_ms();
    let listed = cli_b.run(&["--json", "workers"]).expect_success().json();
    let after_ms = now_ms();
    for w in listed["workers"].as_array().unwrap() {
        let name = w["name"].as_str().unwrap();
        assert_eq!(w["current_tasks"].as_array().map(Vec::len), Some(0), "{name} holds no task after the job: {w}");
        // CPU workers with `--attention-backend auto` measure nothing and report libtorch's order.
        assert_eq!(w["attention_backend"], "default", "{name}: {w}");
        // The coordinator read its clock between `before_ms` and `after_ms` (same host, same clock).
        let count = by_worker.get(name).copied().unwrap_or(0) as f64;
        let connected = w["connected_at_ms"].as_f64().unwrap();
        let window = |at: f64| ((at - connected) / 1000.0).clamp(1.0, 60.0);
        let ips = w["images_per_second"].as_f64().unwrap();
        assert!(
            count / window(after_ms) - 1e-9 <= ips && ips <= count / window(before_ms) + 1e-9,
            "{name}: {count} images since it connected: {w}"
        );
    }
    // Both replicas wrote to the bucket: workers upload to the replica they are connected to.
    let committed: Vec<u64> = metrics.iter().map(|port| committed_by(*port)).collect();
    assert_eq!(committed.iter().sum::<u64>(), PROMPTS as u64, "results committed per replica: {committed:?}");
    assert!(committed.iter().all(|n| *n > 0), "each replica committed results: {committed:?}");

    // `farm results` through the other replica downloads the same bytes from the bucket.
    let out_dir = dir.path().join("out");
    let r = cli_b.run(&["--json", "results", &job, "-o", out_dir.to_str().unwrap()]).expect_success().json();
    assert_eq!(r["downloaded"], PROMPTS, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    for (idx, (_, _, sha, _)) in &recorded {
        let file = out_dir.join(format!("{idx:06}.png"));
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(&sha256(&bytes), sha, "downloaded {}", file.display());
    }
    eprintln!("verified after {:?}", started.elapsed());
    drop(workers);
}
