//! The `farm` CLI driven as a user would, against a real coordinator, PostgreSQL and a worker with the
//! tiny model: submit with --wait, status, results twice (the second downloads nothing), cancel,
//! retry, and every --json output parsed back; error paths with their exit codes.

use std::time::{Duration, Instant};

use farm_tests::{fresh_database, Cli, Coordinator, CoordinatorOptions, Worker, TINY_CPU_WORKER};

fn write(path: &std::path::Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn wait_state(cli: &Cli, job: &str, want: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = cli.run(&["--json", "status", job]).expect_success().json();
        if s["state"] == want {
            return s;
        }
        assert!(Instant::now() < deadline, "job {job} never reached {want}: {s}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn submit_wait_status_results_cancel_retry() {
    let db = fresh_database("cli_e2e");
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db).arg("--idle-poll-ms").arg("100")).unwrap();
    let wtoken = coord.token("cli-tenant", "worker").unwrap();
    let mut worker = Worker::spawn(&coord.url(), &wtoken, TINY_CPU_WORKER).unwrap();
    let cli = coord.cli("cli-tenant").unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Submit and wait: one JSON line for the submission, one for the final state.
    let file = dir.path().join("p.txt");
    write(&file, &(0..5).map(|i| format!("1girl, solo, smile, pose_{i}")).collect::<Vec<_>>());
    let out = cli
        .run(&["--json", "submit", file.to_str().unwrap(), "--model", "tiny", "--width", "64", "--height", "64",
               "--steps", "2", "--seed", "7", "--seed-mode", "increment", "--name", "cli-job", "--wait"])
        .expect_success();
    let lines = out.json_lines();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    let job = lines[0]["job_id"].as_str().unwrap().to_string();
    assert_eq!(lines[0]["accepted"], 5);
    assert_eq!(lines[1]["type"], "final");
    assert_eq!(lines[1]["job"]["state"], "succeeded");

    let status = cli.run(&["--json", "status", &job]).expect_success().json();
    assert_eq!(status["job_id"], job.as_str());
    assert_eq!(status["state"], "succeeded");
    for k in ["queued", "running", "succeeded", "failed", "cancelled", "total"] {
        assert!(status["counts"][k].is_u64(), "counts.{k} in {status}");
    }
    assert_eq!(status["counts"]["succeeded"], 5);
    assert_eq!(status["counts"]["total"], 5);
    let jobs = cli.run(&["--json", "jobs", "--name", "cli-job"]).expect_success().json();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1);
    let task = cli.run(&["--json", "task", &job, "3"]).expect_success().json();
    assert_eq!(task["seed"], 10, "increment seed mode: 7 + index");
    assert_eq!(task["state"], "succeeded");

    // Results twice: the second run finds everything present.
    let out_dir = dir.path().join("out");
    let r1 = cli.run(&["--json", "results", &job, "-o", out_dir.to_str().unwrap()]).expect_success().json();
    let r2 = cli.run(&["--json", "results", &job, "-o", out_dir.to_str().unwrap()]).expect_success().json();
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count(), 5);
    let downloaded = |v: &serde_json::Value| v["downloaded"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(downloaded(&r1), 5, "{r1}");
    assert_eq!(downloaded(&r2), 0, "second download fetches nothing: {r2}");
    let shown = cli.run(&["--json", "show-png", out_dir.join("000002.png").to_str().unwrap()]).expect_success().json();
    assert!(shown.to_string().contains("pose_2"), "{shown}");

    // A long job cancelled while it runs, then retried with its cancelled tasks.
    let long = dir.path().join("long.txt");
    write(&long, &(0..6).map(|i| format!("landscape, sky_{i}")).collect::<Vec<_>>());
    let sub = cli
        .run(&["--json", "submit", long.to_str().unwrap(), "--model", "tiny", "--width", "256", "--height", "256", "--steps", "30"])
        .expect_success()
        .json();
    let long_job = sub["job_id"].as_str().unwrap().to_string();
    wait_state(&cli, &long_job, "running", Duration::from_secs(120));
    let c = cli.run(&["--json", "cancel", &long_job]).expect_success().json();
    let (queued_at_cancel, running_at_cancel) = (c["cancelled_queued"].as_u64().unwrap(), c["cancelling_running"].as_u64().unwrap());
    assert!(running_at_cancel >= 1, "a task was rendering when the cancel came: {c}");
    wait_state(&cli, &long_job, "cancelled", Duration::from_secs(300));
    // The renders that were running stop (cancelled, not finished and uploaded).
    let deadline = Instant::now() + Duration::from_secs(300);
    let s = loop {
        let s = cli.run(&["--json", "status", &long_job]).expect_success().json();
        if s["counts"]["running"] == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "the cancelled renders never stopped: {s}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(s["counts"]["cancelled"].as_u64(), Some(queued_at_cancel + running_at_cancel), "{s}");
    let r = cli.run(&["--json", "retry", &long_job, "--include-cancelled"]).expect_success().json();
    assert!(r["requeued"].as_u64().unwrap() >= 1, "{r}");
    let s = wait_state(&cli, &long_job, "succeeded", Duration::from_secs(600));
    assert_eq!(s["counts"]["succeeded"], 6);

    // In text mode `submit --wait` keeps stdout to the job id; the outcome goes to stderr. A job
    // that asked for no precision reports none, and when a worker started it.
    let one = dir.path().join("one.txt");
    write(&one, &["1girl, wave".to_string()]);
    let out = cli
        .run(&["submit", one.to_str().unwrap(), "--model", "tiny", "--width", "64", "--height", "64", "--steps", "1", "--wait"])
        .expect_success();
    assert_eq!(out.stdout.lines().count(), 1, "stdout: {}", out.stdout);
    let one_job = out.stdout.trim();
    assert!(out.stderr.contains(&format!("job {one_job} succeeded")), "{}", out.stderr);
    let s = cli.run(&["--json", "status", one_job]).expect_success().json();
    assert_eq!(s["defaults"]["precision"], "default", "{s}");
    assert!(s["started_at_ms"].as_i64().unwrap() >= s["created_at_ms"].as_i64().unwrap(), "{s}");

    // A finished job keeps its outcome; one directory holds one job's results.
    let out = cli.run(&["cancel", &job]);
    assert_eq!(out.code, 1, "cancel of a succeeded job: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("already succeeded"), "{}", out.stderr);
    assert_eq!(cli.run(&["--json", "status", &job]).expect_success().json()["state"], "succeeded");
    let out = cli.run(&["results", &long_job, "-o", out_dir.to_str().unwrap()]);
    assert_eq!(out.code, 3, "another job's results into the same directory: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(&job) && out.stderr.contains("--force"), "{}", out.stderr);

    // Error paths: exit codes and messages.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"<character_1><n>x</n>\"}\n").unwrap();
    let out = cli.run(&["submit", bad.to_str().unwrap(), "--model", "tiny"]);
    assert_eq!(out.code, 3, "invalid input: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("line") && out.stderr.contains("column"), "{}", out.stderr);
    // With --json every invalid-input exit prints the submission object, a whole-request problem
    // as its one error.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# nothing here\n").unwrap();
    let out = cli.run(&["--json", "submit", empty.to_str().unwrap()]);
    assert_eq!(out.code, 3, "no prompts: {}{}", out.stdout, out.stderr);
    let v = out.json();
    assert!(v["job_id"].is_null(), "{v}");
    assert_eq!(v["errors"][0]["code"], "invalid_request", "{v}");
    assert!(v["errors"][0]["message"].as_str().is_some_and(|m| m.contains("no prompts")), "{v}");
    let out = cli.run(&["status", "00000000-0000-0000-0000-000000000000"]);
    assert_eq!(out.code, 5, "not found: {}", out.stderr);
    let out = Cli::new(&coord.url(), "farm_not_a_token").run(&["jobs"]);
    assert_eq!(out.code, 4, "auth: {}", out.stderr);
    let out = cli.run(&["submit"]);
    assert_eq!(out.code, 2, "usage: {}", out.stderr);
    worker.kill();
}
