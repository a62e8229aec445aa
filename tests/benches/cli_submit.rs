//! `farm submit` benchmark against a real local coordinator, printed as two rates, the CLI's peak memory
//! and one ratio:
//!
//! 1. **cli**: the `farm` binary submits a JSON Lines file of `BENCH_PROMPTS` XML prompts (default
//!    100,000): `farm --json submit FILE --width 64 --height 64 --steps 1 --model tiny --seed 1`. Timed
//!    from spawn to exit (process start, reading, local validation, chunking, streaming, and the
//!    coordinator's commit), with the process's peak resident set size (`VmHWM`, sampled from
//!    `/proc/PID/status` while it runs) and CPU time (from `wait4`). The reply must accept every
//!    prompt and the job must hold that many tasks. Alongside: the coordinator's CPU time and how busy
//!    the whole machine was (PostgreSQL and anything else running included), since on a small machine
//!    the CLI, the coordinator and PostgreSQL share the cores.
//! 2. **prebuilt**: the same prompts, with the seeds, sources and lines the CLI sends, as SubmitJob
//!    messages built before timing starts and streamed by this process over a fresh connection to the
//!    same coordinator: what the coordinator and PostgreSQL ingest at most. The ratio cli/prebuilt is
//!    what the CLI costs.
//!
//! A small submission of each kind warms the coordinator up first. `BENCH_ROUNDS` (default 1) repeats
//! both measurements in turn; the summary takes the fastest run of each and the largest peak RSS.
//!
//! Run: `cargo bench -p farm-tests --bench cli_submit --profile dev` (the binaries the harness starts are
//! built in the same profile; `FARM_BIN_DIR` points it at others, e.g. release builds). PostgreSQL is
//! `DATABASE_URL` or a throwaway local server; the coordinator runs alone with in-process events.

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_proto::batch::{BatchFormat, BatchReader};
use farm_proto::pb::job_service_client::JobServiceClient;
use farm_proto::pb::{
    submit_job_request, PromptChunk, PromptSpec, SubmitEnd, SubmitJobRequest,
};
use farm_tests::{tiny_job_header, Cli, Coordinator, CoordinatorOptions, PgServer};
use prost::Message;
use tonic::transport::Endpoint;
use tonic::Request;
use uuid::Uuid;

const MODEL: &str = "tiny";
/// The seed base given to the CLI (`--seed`), so both submissions carry the same seeds.
const SEED_BASE: u64 = 1;
/// The CLI's default `--chunk-size` and its byte cut (`farm::submit::CHUNK_BYTES`), used for the
/// pre-built messages too.
const CHUNK_PROMPTS: usize = 2000;
const CHUNK_BYTES: usize = 1024 * 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Writes `n` JSON Lines records of XML prompts, varied per index; one in ten sets its own seed and one
/// in twenty its own negative prompt. Returns the file size.
fn write_prompts(path: &Path, n: u64) -> anyhow::Result<u64> {
    const HAIR: [&str; 5] = [
        "long silver hair",
        "short black hair",
        "twin tails, pink hair",
        "blonde ponytail",
        "messy brown hair",
    ];
    const EYES: [&str; 4] = ["red eyes", "blue eyes", "green eyes", "heterochromia"];
    const CLOTHES: [&str; 3] = [
        "school uniform, red ribbon",
        "white dress, straw hat",
        "black hoodie, jeans",
    ];
    const PLACES: [&str; 4] = [
        "classroom, window, afternoon",
        "city street at night, neon",
        "beach, sunset",
        "forest, morning mist",
    ];
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..n {
        let k = i as usize;
        let text = format!(
            "<character_1><n>character_{i}</n><gender>1girl</gender><appearance>{}, {}</appearance>\
             <clothing>{}</clothing><expression>smile</expression></character_1>\
             <general_tags><count>1girl</count><style>anime style</style><background>{}</background>\
             <quality>masterpiece, best quality</quality></general_tags>",
            HAIR[k % HAIR.len()],
            EYES[k % EYES.len()],
            CLOTHES[k % CLOTHES.len()],
            PLACES[k % PLACES.len()],
        );
        let mut record = serde_json::json!({ "prompt": text });
        if i % 10 == 0 {
            record["seed"] = (1_000_000 + i).into();
        }
        if i % 20 == 5 {
            record["negative"] = "lowres, bad anatomy, watermark".into();
        }
        writeln!(out, "{record}")?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// The SubmitJob stream the CLI sends for `path`: the same prompt specs (seed `SEED_BASE + index` unless
/// the prompt has one, source, line) cut into chunks the same way. Built before timing starts.
fn prebuilt(path: &Path, name: &str) -> anyhow::Result<(Vec<SubmitJobRequest>, u64)> {
    let source = path.display().to_string();
    let reader =
        BatchReader::new(BufReader::new(std::fs::File::open(path)?), BatchFormat::Jsonl).without_validation();
    let mut messages = vec![SubmitJobRequest {
        msg: Some(submit_job_request::Msg::Header(tiny_job_header(name, MODEL))),
    }];
    let mut chunk = Vec::with_capacity(CHUNK_PROMPTS);
    let mut chunk_len = 0;
    let mut count = 0u64;
    let flush = |chunk: &mut Vec<PromptSpec>, messages: &mut Vec<SubmitJobRequest>| {
        messages.push(SubmitJobRequest {
            msg: Some(submit_job_request::Msg::Chunk(PromptChunk {
                prompts: std::mem::take(chunk),
            })),
        });
    };
    for item in reader {
        let bp = item?;
        let spec = PromptSpec {
            seed: Some(bp.seed.unwrap_or(SEED_BASE + count)),
            width: bp.width,
            height: bp.height,
            steps: bp.steps,
            cfg_scale: bp.cfg_scale,
            negative_prompt: bp.negative_prompt.unwrap_or_default(),
            source: source.clone(),
            source_line: bp.line,
            text: bp.text,
        };
        let len = spec.encoded_len() + 4;
        if !chunk.is_empty() && (chunk.len() >= CHUNK_PROMPTS || chunk_len + len > CHUNK_BYTES) {
            flush(&mut chunk, &mut messages);
            chunk_len = 0;
        }
        chunk_len += len;
        chunk.push(spec);
        count += 1;
    }
    if !chunk.is_empty() {
        flush(&mut chunk, &mut messages);
    }
    messages.push(SubmitJobRequest {
        msg: Some(submit_job_request::Msg::End(SubmitEnd { prompt_count: count })),
    });
    Ok((messages, count))
}

/// Streams pre-built messages as one SubmitJob over a new connection; returns (job id, elapsed).
async fn submit_prebuilt(
    url: &str,
    token: &str,
    messages: Vec<SubmitJobRequest>,
    expected: u64,
) -> anyhow::Result<(Uuid, Duration)> {
    let started = Instant::now();
    let channel = Endpoint::from_shared(url.to_owned())?.connect().await?;
    let mut request = Request::new(tokio_stream::iter(messages));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let response = JobServiceClient::new(channel)
        .submit_job(request)
        .await?
        .into_inner();
    let elapsed = started.elapsed();
    anyhow::ensure!(
        response.errors.is_empty() && response.accepted == expected,
        "pre-built submission refused: accepted {} of {expected}, errors {:?}",
        response.accepted,
        response.errors.first()
    );
    Ok((Uuid::parse_str(&response.job_id)?, elapsed))
}

/// One `farm` run: wall time from spawn to exit, and the process's own resource usage.
struct CliRun {
    job: Uuid,
    elapsed: Duration,
    /// Peak resident set size in bytes.
    max_rss: u64,
    cpu: Duration,
}

/// The largest `VmHWM` of `pid` (bytes) seen until `stop`, sampled every 5 ms. `ru_maxrss` is no use
/// here: exec records the high-water mark of the memory the child had before it (a copy of, or shared
/// with, this process) as the child's own, so a benchmark process that holds the pre-built messages
/// would show up as the CLI's peak. `VmHWM` belongs to the exec'd program's address space alone and
/// only grows; growth after the last sample (while the process exits) is missed.
fn sample_peak_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak_kib = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak_kib * 1024
    })
}

/// Runs the CLI to completion, sampling its peak RSS and reaping it with `wait4` for its CPU time.
fn submit_cli(cli: &Cli, file: &Path, expected: u64) -> anyhow::Result<CliRun> {
    let args = [
        "--json",
        "submit",
        &file.display().to_string(),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--model",
        MODEL,
        "--seed",
        &SEED_BASE.to_string(),
        "--name",
        "cli submit benchmark",
    ]
    .map(str::to_owned);
    let mut command = cli.command(&args);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak_rss(child.id(), stop_sampling.clone());
    let drain = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; `pid` is our own child, not yet reaped.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    let elapsed = started.elapsed();
    stop_sampling.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap_or(0);
    anyhow::ensure!(
        reaped == pid,
        "wait4 on farm failed: {}",
        std::io::Error::last_os_error()
    );
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    anyhow::ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "farm submit failed (wait status {status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let reply: serde_json::Value = serde_json::from_str(stdout.trim())?;
    anyhow::ensure!(
        reply["accepted"] == expected
            && reply["prompts"] == expected
            && reply["errors"].as_array().is_some_and(|e| e.is_empty()),
        "farm submit did not accept every prompt: {reply}"
    );
    let job = Uuid::parse_str(reply["job_id"].as_str().unwrap_or_default())?;
    let timeval =
        |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Ok(CliRun {
        job,
        elapsed,
        max_rss,
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
    })
}

async fn task_count(pool: &sqlx::PgPool, job: Uuid) -> anyhow::Result<u64> {
    let (n,): (i64,) = sqlx::query_as("select count(*) from tasks where job_id = $1")
        .bind(job)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

fn rate(prompts: u64, elapsed: Duration) -> f64 {
    prompts as f64 / elapsed.as_secs_f64()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// User + system CPU time a process has used so far (`/proc/PID/stat`).
fn process_cpu(pid: Option<u32>) -> Duration {
    let Some(stat) = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()) else {
        return Duration::ZERO;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

/// Busy and total CPU time of the whole machine so far, in clock ticks over all cores (`/proc/stat`).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// What the machine and the coordinator spent during one measurement.
#[derive(Clone, Copy)]
struct Load {
    coordinator_cpu: Duration,
    /// Share of all cores' time that was busy (every process on the machine), 0..1.
    machine_busy: f64,
}

struct LoadMeter {
    coordinator: Option<u32>,
    cpu: Duration,
    ticks: (u64, u64),
}

impl LoadMeter {
    fn start(coordinator: Option<u32>) -> LoadMeter {
        LoadMeter {
            coordinator,
            cpu: process_cpu(coordinator),
            ticks: machine_ticks(),
        }
    }

    fn stop(self) -> Load {
        let (busy, total) = machine_ticks();
        let (busy, total) = (busy - self.ticks.0, total - self.ticks.1);
        Load {
            coordinator_cpu: process_cpu(self.coordinator).saturating_sub(self.cpu),
            machine_busy: if total == 0 {
                0.0
            } else {
                busy as f64 / total as f64
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let prompts = env_or("BENCH_PROMPTS", 100_000);
    let rounds = env_or("BENCH_ROUNDS", 1).max(1);

    let pg = PgServer::start()?;
    let db = pg.create_database("bench_cli_submit")?;
    let coord = Coordinator::spawn(CoordinatorOptions::new(&db))?;
    let token = coord.token("bench", "client")?;
    let cli = Cli::new(&coord.url(), &token);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db)
        .await?;

    let dir = tempfile::Builder::new()
        .prefix("farm-cli-submit-bench-")
        .tempdir()?;
    let file = dir.path().join("prompts.jsonl");
    let size = write_prompts(&file, prompts)?;
    println!(
        "input:    {prompts} prompts, {:.1} MiB of JSON Lines ({:.0} bytes/prompt)",
        mib(size),
        size as f64 / prompts as f64
    );

    // Warm-up: the coordinator's connections and statements, and the `farm` binary in the page cache.
    let warm_file = dir.path().join("warm-up.jsonl");
    write_prompts(&warm_file, 1000)?;
    let (warm, _) = prebuilt(&warm_file, "warm-up")?;
    submit_prebuilt(&coord.url(), &token, warm, 1000).await?;
    {
        let cli = cli.clone();
        let warm_file = warm_file.clone();
        tokio::task::spawn_blocking(move || submit_cli(&cli, &warm_file, 1000)).await??;
    }

    let mut best_cli: Option<(CliRun, Load)> = None;
    let mut best_prebuilt: Option<(Duration, Load)> = None;
    let mut peak_rss = 0u64;
    for round in 1..=rounds {
        let meter = LoadMeter::start(coord.pid());
        let run = {
            let (cli, file) = (cli.clone(), file.clone());
            tokio::task::spawn_blocking(move || submit_cli(&cli, &file, prompts)).await??
        };
        let cli_load = meter.stop();
        anyhow::ensure!(
            task_count(&pool, run.job).await? == prompts,
            "the CLI's job does not hold {prompts} tasks"
        );

        let (messages, count) = prebuilt(&file, "prebuilt submit benchmark")?;
        anyhow::ensure!(count == prompts);
        let meter = LoadMeter::start(coord.pid());
        let (job, elapsed) = submit_prebuilt(&coord.url(), &token, messages, prompts).await?;
        let prebuilt_load = meter.stop();
        anyhow::ensure!(
            task_count(&pool, job).await? == prompts,
            "the pre-built job does not hold {prompts} tasks"
        );

        if rounds > 1 {
            println!(
                "round {round}:  cli {:.0} prompts/s ({:.2} s, {:.1} MiB peak), prebuilt {:.0} prompts/s ({:.2} s)",
                rate(prompts, run.elapsed),
                run.elapsed.as_secs_f64(),
                mib(run.max_rss),
                rate(prompts, elapsed),
                elapsed.as_secs_f64()
            );
        }
        peak_rss = peak_rss.max(run.max_rss);
        if best_prebuilt.is_none_or(|(b, _)| elapsed < b) {
            best_prebuilt = Some((elapsed, prebuilt_load));
        }
        if best_cli.as_ref().is_none_or(|(b, _)| run.elapsed < b.elapsed) {
            best_cli = Some((run, cli_load));
        }
    }
    let ((run, cli_load), (prebuilt_elapsed, prebuilt_load)) =
        (best_cli.expect("one round"), best_prebuilt.expect("one round"));
    let (cli_rate, prebuilt_rate) = (rate(prompts, run.elapsed), rate(prompts, prebuilt_elapsed));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cli:      {prompts} prompts in {:.2} s = {cli_rate:.0} prompts/s (target >= 50000)",
        run.elapsed.as_secs_f64()
    );
    println!(
        "cli CPU:  farm {:.2} s, coordinator {:.2} s; machine {:.0} % busy ({cores} cores, every process)",
        run.cpu.as_secs_f64(),
        cli_load.coordinator_cpu.as_secs_f64(),
        100.0 * cli_load.machine_busy
    );
    println!(
        "cli RSS:  {:.1} MiB peak resident set of the farm process{}",
        mib(peak_rss),
        if rounds > 1 {
            " (the largest of the rounds)"
        } else {
            ""
        }
    );
    println!(
        "prebuilt: {prompts} prompts in {:.2} s = {prebuilt_rate:.0} prompts/s (the same prompts as pre-built SubmitJob messages)",
        prebuilt_elapsed.as_secs_f64()
    );
    println!(
        "prebuilt CPU: coordinator {:.2} s; machine {:.0} % busy",
        prebuilt_load.coordinator_cpu.as_secs_f64(),
        100.0 * prebuilt_load.machine_busy
    );
    println!(
        "ratio:    cli/prebuilt = {:.1} %",
        100.0 * cli_rate / prebuilt_rate
    );
    drop(coord);
    drop(pg);
    Ok(())
}
