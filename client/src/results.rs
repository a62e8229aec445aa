//! `farm results`: download a job's images into a directory.
//!
//! * Files are named `{index:06}.png`.
//! * A file already present whose size and SHA-256 match the result is skipped, so a re-run finishes an
//!   interrupted download and fetches only what is missing.
//! * Each download is written to a hidden temporary file (`.farm-tmp-…`), checked against the
//!   SHA-256 the coordinator reports, then renamed into place: a complete file or none. Temporary files
//!   left by an interrupted run are removed at the start of the next one.
//! * `--since` keeps `DIR/.farm-results.json` = `{"job_id": "...", "since_ms": N}`: the newest
//!   `created_at_ms` among the results of the last complete run into DIR. The next `--since` run asks
//!   ListResults only for results committed after `since_ms - 60 s` (the overlap covers commit order
//!   and clock skew; re-listed files are skipped by their SHA-256). The file is only advanced by a run
//!   without failures.
//! * `--follow` repeats the pass every few seconds until a pass that started after the job was over;
//!   results settled earlier in the run are not counted again, and a failure that a later pass
//!   recovers is not reported.
//! * A directory belongs to one job: `DIR/.farm-job` names it, and a run for another job is refused
//!   (unless `--force`), so one job's `000017.png` never replaces another's. One run at a time holds
//!   `DIR/.farm-lock`; a second run into the same directory is refused while the first runs.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use farm_proto::pb::{DownloadResultRequest, GetJobRequest, Job, ListResultsRequest, ResultInfo};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::connect::Client;
use crate::errors::{CliError, CliResult, ErrorKind};
use crate::output::{self, JobOver};
use crate::ui::Ui;
use crate::watch::is_transient;

/// Name of the state file `--since` keeps in the output directory.
pub const STATE_FILE: &str = ".farm-results.json";
/// Prefix of temporary download files.
pub const TMP_PREFIX: &str = ".farm-tmp-";
/// Name of the file naming the job a directory holds the results of.
pub const JOB_FILE: &str = ".farm-job";
/// Name of the lock file a run holds for its directory.
pub const LOCK_FILE: &str = ".farm-lock";
/// Overlap re-listed by `--since`.
pub const SINCE_OVERLAP_MS: i64 = 60_000;
const PAGE_SIZE: u32 = 1000;
/// Tries of one download within a pass (transient failures: stream errors, size or SHA-256 mismatch).
pub const ATTEMPTS: u32 = 3;

/// The file a result is stored in.
pub fn file_name(index: u64) -> String {
    format!("{index:06}.png")
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinceState {
    pub job_id: String,
    pub since_ms: i64,
    /// The `--from-index` of the run that wrote it: results below it were not listed then.
    #[serde(default)]
    pub from_index: u64,
}

/// The `--since` state of `job_id` in `dir`, if it covers every index from `from_index` (a state
/// written by a run that listed only from a higher index says nothing of the results below it).
pub fn read_state(dir: &Path, job_id: &str, from_index: u64) -> Option<SinceState> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    let s: SinceState = serde_json::from_str(&text).ok()?;
    (s.job_id == job_id && s.from_index <= from_index).then_some(s)
}

pub fn write_state(dir: &Path, state: &SinceState) -> std::io::Result<()> {
    let tmp = dir.join(format!("{TMP_PREFIX}state-{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(tmp, dir.join(STATE_FILE))
}

/// Options of one download run.
#[derive(Debug, Clone)]
pub struct ResultsOptions {
    pub dir: PathBuf,
    pub parallel: usize,
    pub since: bool,
    pub from_index: u64,
    pub follow: bool,
    pub poll_interval: Duration,
    /// Write into a directory holding another job's results.
    pub force: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultsSummary {
    pub listed: u64,
    pub downloaded: u64,
    pub skipped: u64,
    pub failed: u64,
    pub bytes: u64,
    /// Newest `created_at_ms` seen (0 when none).
    pub newest_ms: i64,
    pub errors: Vec<String>,
    /// The kind of the failed downloads that decides the exit code: authentication before not
    /// found before any other failure.
    pub worst: Option<ErrorKind>,
}

impl ResultsSummary {
    fn record_failure(&mut self, kind: ErrorKind, message: String) {
        self.record_failure_kind(kind);
        self.failed += 1;
        self.errors.push(message);
    }

    fn record_failure_kind(&mut self, kind: ErrorKind) {
        let rank = |k: ErrorKind| match k {
            ErrorKind::Auth => 3,
            ErrorKind::NotFound => 2,
            _ => 1,
        };
        if self.worst.is_none_or(|w| rank(kind) > rank(w)) {
            self.worst = Some(kind);
        }
    }
}

/// SHA-256 of a file as lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Whether `path` already holds exactly this result.
pub fn already_present(path: &Path, info: &ResultInfo) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && (info.size_bytes == 0 || m.len() == info.size_bytes) => sha256_file(path)
            .map(|h| h.eq_ignore_ascii_case(&info.sha256))
            .unwrap_or(false),
        _ => false,
    }
}

/// A directory held by one run for one job (see the module documentation); released on drop.
#[derive(Debug)]
pub struct DirClaim {
    _lock: std::fs::File,
}

/// Creates `dir` if needed, takes its lock, checks (or records) which job it holds, and removes the
/// temporary files an interrupted run left behind. `force` lets a directory holding another job's
/// results be written into (it then holds `job_id`'s).
pub fn claim_dir(dir: &Path, job_id: &str, force: bool) -> CliResult<DirClaim> {
    let shown = dir.display();
    std::fs::create_dir_all(dir).map_err(|e| CliError::failure(format!("{shown}: {e}")))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| CliError::failure(format!("{shown}: {e}")))?;
    let locked = match lock.try_lock() {
        Ok(()) => true,
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(CliError::failure(format!(
                "another `farm results` is writing into {shown}; wait for it to end or choose another directory"
            )))
        }
        // Some network filesystems have no locks: go on without one.
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!("warning: {shown}: cannot lock ({e}); going on without a lock");
            false
        }
    };
    let marker = dir.join(JOB_FILE);
    // A directory written before job files existed: the `--since` state names its job, if any.
    let held = std::fs::read_to_string(&marker).or_else(|e| {
        std::fs::read_to_string(dir.join(STATE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<SinceState>(&t).ok())
            .map(|s| s.job_id)
            .ok_or(e)
    });
    match held {
        Ok(held) if held.trim() == job_id => {}
        Ok(held) if !force => {
            return Err(CliError::invalid(format!(
                "{shown} holds the results of job {}; download job {job_id} into another directory, or pass \
                 --force to write over them",
                held.trim()
            )))
        }
        _ => {
            let tmp = dir.join(format!("{TMP_PREFIX}job-{}", std::process::id()));
            std::fs::write(&tmp, format!("{job_id}\n"))
                .and_then(|()| std::fs::rename(&tmp, &marker))
                .map_err(|e| CliError::failure(format!("{}: {e}", marker.display())))?;
        }
    }
    // Without the lock another run may be writing its temporary files here.
    if locked {
        remove_stale_temp_files(dir);
    }
    Ok(DirClaim { _lock: lock })
}

/// Removes temporary files an interrupted run left behind (call with the directory's lock held).
pub fn remove_stale_temp_files(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Lists every result of the job from `from_index`, committed after `since_ms`.
pub async fn list_all(
    client: &mut Client,
    job_id: &str,
    from_index: u64,
    since_ms: i64,
) -> CliResult<Vec<ResultInfo>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let resp = client
            .list_results(ListResultsRequest {
                job_id: job_id.to_string(),
                from_index,
                since_ms,
                page_size: PAGE_SIZE,
                page_token: token.clone(),
            })
            .await
            .map_err(|s| CliError::from_status(&s, "results"))?
            .into_inner();
        out.extend(resp.results);
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    Ok(out)
}

enum Fetched {
    Skipped,
    Downloaded(u64),
}

/// What one run has settled, by result index: the results downloaded or found present (with their
/// SHA-256), and the downloads that failed and have not succeeded since. A `--follow` run lists
/// recent results again on every poll; those already settled are neither hashed nor counted again,
/// and a failure that a later pass recovers is no longer reported.
#[derive(Debug, Default)]
pub struct Ledger {
    done: HashMap<u64, String>,
    failed: BTreeMap<u64, (ErrorKind, String)>,
}

impl Ledger {
    fn settled(&self, r: &ResultInfo) -> bool {
        self.done.get(&r.index).is_some_and(|sha| sha.eq_ignore_ascii_case(&r.sha256))
    }

    fn record(&mut self, index: u64, sha256: String, outcome: Result<(), (ErrorKind, String)>) {
        match outcome {
            Ok(()) => {
                self.failed.remove(&index);
                self.done.insert(index, sha256);
            }
            Err(e) => {
                self.failed.insert(index, e);
            }
        }
    }

    /// The failures still standing, in index order, as a summary's `failed`, `errors` and `worst`.
    fn failures_into(&self, summary: &mut ResultsSummary) {
        summary.failed = 0;
        summary.errors.clear();
        summary.worst = None;
        for (kind, msg) in self.failed.values() {
            summary.record_failure(*kind, msg.clone());
        }
    }
}

/// Downloads one result into `dir` unless it is already there.
async fn fetch_one(
    mut client: Client,
    dir: PathBuf,
    info: ResultInfo,
) -> Result<Fetched, (ErrorKind, String)> {
    let target = dir.join(file_name(info.index));
    {
        let (t, i) = (target.clone(), info.clone());
        if tokio::task::spawn_blocking(move || already_present(&t, &i))
            .await
            .unwrap_or(false)
        {
            return Ok(Fetched::Skipped);
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match download_to(&mut client, &dir, &target, &info).await {
            Ok(n) => return Ok(Fetched::Downloaded(n)),
            Err((kind, msg, transient)) => {
                if !transient || attempt >= ATTEMPTS {
                    return Err((kind, format!("{}: {msg}", file_name(info.index))));
                }
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
            }
        }
    }
}

type DownloadError = (ErrorKind, String, bool);

/// A refused or broken DownloadResult call, worded and classified as every other call's error.
fn status_error(s: tonic::Status) -> DownloadError {
    let e = CliError::from_status(&s, "download");
    (e.kind, e.message, is_transient(s.code()))
}

async fn download_to(
    client: &mut Client,
    dir: &Path,
    target: &Path,
    listed: &ResultInfo,
) -> Result<u64, DownloadError> {
    let req = DownloadResultRequest {
        job_id: listed.job_id.clone(),
        index: listed.index,
    };
    let mut stream = client
        .download_result(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{:06}-{}-{}",
        listed.index,
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = async {
        let io = |e: std::io::Error| (ErrorKind::Failure, e.to_string(), false);
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut expected = listed.clone();
        let mut n: u64 = 0;
        let mut first = true;
        while let Some(chunk) = stream.message().await.map_err(status_error)? {
            if first {
                first = false;
                if let Some(info) = chunk.info {
                    expected = info;
                }
            }
            hasher.update(&chunk.data);
            // Result chunks are small; writing synchronously keeps the code simple and is cheap.
            file.write_all(&chunk.data).map_err(io)?;
            n += chunk.data.len() as u64;
        }
        let got = hex::encode(hasher.finalize());
        if expected.size_bytes != 0 && n != expected.size_bytes {
            return Err((
                ErrorKind::Failure,
                format!("received {n} bytes, expected {}", expected.size_bytes),
                true,
            ));
        }
        if !got.eq_ignore_ascii_case(&expected.sha256) {
            return Err((
                ErrorKind::Failure,
                format!("SHA-256 mismatch: received {got}, expected {}", expected.sha256),
                true,
            ));
        }
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, target).map_err(io)?;
        Ok(n)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Downloads one listing pass.
pub async fn download_pass(
    client: &Client,
    results: Vec<ResultInfo>,
    opts: &ResultsOptions,
    ui: Ui,
    ledger: &mut Ledger,
) -> ResultsSummary {
    let results: Vec<ResultInfo> = results.into_iter().filter(|r| !ledger.settled(r)).collect();
    let mut summary = ResultsSummary {
        listed: results.len() as u64,
        ..Default::default()
    };
    summary.newest_ms = results.iter().map(|r| r.created_at_ms).max().unwrap_or(0);
    let pb = ui.bar(
        results.len() as u64,
        "{spinner} downloading [{bar:30}] {pos}/{len} {msg} ({eta})",
    );
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = futures::stream::iter(results.into_iter().map(|info| {
        let (c, d) = (client.clone(), opts.dir.clone());
        let (index, sha256) = (info.index, info.sha256.clone());
        async move { (index, sha256, tokio::spawn(fetch_one(c, d, info)).await) }
    }))
    .buffer_unordered(opts.parallel.max(1));
    while let Some((index, sha256, r)) = tasks.next().await {
        let r = r.unwrap_or_else(|e| Err((ErrorKind::Failure, format!("{}: download task failed: {e}", file_name(index)))));
        match &r {
            Ok(Fetched::Skipped) => summary.skipped += 1,
            Ok(Fetched::Downloaded(n)) => {
                summary.downloaded += 1;
                summary.bytes += n;
                bytes.fetch_add(*n, Ordering::Relaxed);
            }
            Err((kind, msg)) => {
                pb.suspend(|| {
                    if !ui.json {
                        eprintln!("error: {msg}");
                    }
                });
                summary.record_failure(*kind, msg.clone());
            }
        }
        ledger.record(index, sha256, r.map(|_| ()));
        pb.inc(1);
        pb.set_message(format!(
            "{} new, {} present, {}",
            summary.downloaded,
            summary.skipped,
            output::format_bytes(bytes.load(Ordering::Relaxed))
        ));
    }
    pb.finish_and_clear();
    summary
}

/// Runs the whole command: one pass, or passes until the job ends with `--follow`.
pub async fn download(
    client: &mut Client,
    job_id: &str,
    opts: &ResultsOptions,
    ui: Ui,
) -> CliResult<ResultsSummary> {
    // The job must exist (and be the caller's) before the directory is claimed for it, so a
    // mistyped id leaves no `.farm-job` behind.
    client
        .get_job(GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(|s| CliError::from_status(&s, "results"))?;
    let _claim = claim_dir(&opts.dir, job_id, opts.force)?;
    let stored = if opts.since {
        read_state(&opts.dir, job_id, opts.from_index)
    } else {
        None
    };
    let mut since_ms = stored
        .as_ref()
        .map(|s| (s.since_ms - SINCE_OVERLAP_MS).max(0))
        .unwrap_or(0);
    let mut total = ResultsSummary::default();
    let mut ledger = Ledger::default();
    let mut over = JobOver::default();
    let mut last_job: Option<Job> = None;
    loop {
        // Whether the job was over before listing: then this pass sees every result (but for a
        // cancelled job's render that had not stopped after `CANCEL_SETTLE`, which may still commit).
        let final_before = if opts.follow {
            let job = client
                .get_job(GetJobRequest {
                    job_id: job_id.to_string(),
                })
                .await
                .map_err(|s| CliError::from_status(&s, "results"))?
                .into_inner();
            let over_now = over.check(&job);
            last_job = Some(job);
            over_now
        } else {
            true
        };
        let mut results = list_all(client, job_id, opts.from_index, since_ms).await?;
        for r in &mut results {
            if r.job_id.is_empty() {
                r.job_id = job_id.to_string();
            }
        }
        let pass = download_pass(client, results, opts, ui, &mut ledger).await;
        // Counts cover each result once per run (a retried failure counts where it ended).
        total.listed = (ledger.done.len() + ledger.failed.len()) as u64;
        total.downloaded += pass.downloaded;
        total.skipped += pass.skipped;
        total.bytes += pass.bytes;
        ledger.failures_into(&mut total);
        total.newest_ms = total.newest_ms.max(pass.newest_ms);
        // The listing window moves on only while no download is failing, so that a failed result
        // is listed (and fetched) again.
        if ledger.failed.is_empty() && (opts.since || opts.follow) && total.newest_ms > 0 {
            let newest = total
                .newest_ms
                .max(stored.as_ref().map(|s| s.since_ms).unwrap_or(0));
            if opts.since {
                write_state(
                    &opts.dir,
                    &SinceState {
                        job_id: job_id.to_string(),
                        since_ms: newest,
                        from_index: opts.from_index,
                    },
                )
                .map_err(|e| CliError::failure(format!("{}: {e}", opts.dir.join(STATE_FILE).display())))?;
            }
            since_ms = (newest - SINCE_OVERLAP_MS).max(0);
        }
        if !opts.follow || final_before {
            if let Some(job) = last_job.as_ref().filter(|j| !output::job_is_done(j)) {
                if ui.chatty() {
                    eprintln!(
                        "job {job_id} is cancelled; {} running task(s) did not stop within {} s, not waiting longer",
                        job.counts.map_or(0, |c| c.running),
                        output::CANCEL_SETTLE.as_secs()
                    );
                }
            }
            break;
        }
        if ui.chatty() && !ui.bars && pass.downloaded > 0 {
            eprintln!("downloaded {} new result(s); waiting for more", pass.downloaded);
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
    Ok(total)
}

/// Prints the summary; any failed download makes the exit code 1.
pub fn report(job_id: &str, dir: &Path, s: &ResultsSummary, ui: Ui) -> CliResult<()> {
    if ui.json {
        println!(
            "{}",
            serde_json::json!({
                "job_id": job_id, "dir": dir.display().to_string(), "listed": s.listed,
                "downloaded": s.downloaded, "skipped": s.skipped, "failed": s.failed, "bytes": s.bytes,
                "newest_ms": s.newest_ms, "errors": s.errors,
            })
        );
    } else if !ui.quiet {
        println!(
            "{} downloaded ({}), {} already present, {} failed -> {}",
            s.downloaded,
            output::format_bytes(s.bytes),
            s.skipped,
            s.failed,
            dir.display()
        );
    }
    if s.failed > 0 {
        return Err(CliError::reported(
            s.worst.unwrap_or(ErrorKind::Failure),
            format!("{} download(s) failed", s.failed),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_presence() {
        assert_eq!(file_name(7), "000007.png");
        assert_eq!(file_name(1_234_567), "1234567.png");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(file_name(1));
        std::fs::write(&p, b"hello").unwrap();
        let sha = hex::encode(Sha256::digest(b"hello"));
        let info = ResultInfo {
            index: 1,
            size_bytes: 5,
            sha256: sha.clone(),
            ..Default::default()
        };
        assert!(already_present(&p, &info));
        assert!(!already_present(
            &p,
            &ResultInfo {
                size_bytes: 6,
                ..info.clone()
            }
        ));
        assert!(!already_present(
            &p,
            &ResultInfo {
                sha256: "00".repeat(32),
                ..info.clone()
            }
        ));
        assert!(!already_present(&dir.path().join("nope.png"), &info));
    }

    #[test]
    fn state_file_round_trip_and_stale_temp_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_state(dir.path(), "j", 0), None);
        write_state(
            dir.path(),
            &SinceState {
                job_id: "j".into(),
                since_ms: 99,
                from_index: 10,
            },
        )
        .unwrap();
        assert_eq!(read_state(dir.path(), "j", 10).unwrap().since_ms, 99);
        assert_eq!(read_state(dir.path(), "j", 20).unwrap().since_ms, 99, "covers a narrower listing");
        assert_eq!(read_state(dir.path(), "j", 0), None, "says nothing of indexes below 10");
        // A state file from before `from_index` was recorded covers every index.
        std::fs::write(dir.path().join(STATE_FILE), r#"{"job_id":"j","since_ms":5}"#).unwrap();
        assert_eq!(read_state(dir.path(), "j", 0).unwrap().since_ms, 5);
        assert_eq!(
            read_state(dir.path(), "other", 0),
            None,
            "state of another job is ignored"
        );
        std::fs::write(dir.path().join(format!("{TMP_PREFIX}000001-1-2")), b"half").unwrap();
        std::fs::write(dir.path().join("000001.png"), b"whole").unwrap();
        remove_stale_temp_files(dir.path());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(TMP_PREFIX)), "{names:?}");
        assert!(names.contains(&"000001.png".to_string()));
    }

    #[test]
    fn a_directory_holds_one_job_and_one_run_at_a_time() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let claim = claim_dir(&dir, "job-a", false).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(JOB_FILE)).unwrap().trim(), "job-a");
        // A second run into the directory while the first holds it.
        let busy = claim_dir(&dir, "job-a", false).unwrap_err();
        assert!(busy.to_string().contains("another `farm results`"), "{busy}");
        drop(claim);
        // The same job again is fine; another job is refused (exit 3) without touching anything.
        std::fs::write(dir.join("000001.png"), b"a's image").unwrap();
        drop(claim_dir(&dir, "job-a", false).unwrap());
        let other = claim_dir(&dir, "job-b", false).unwrap_err();
        assert_eq!(other.exit_code(), 3, "{other}");
        assert!(other.to_string().contains("job-a") && other.to_string().contains("--force"), "{other}");
        assert_eq!(std::fs::read(dir.join("000001.png")).unwrap(), b"a's image");
        assert_eq!(std::fs::read_to_string(dir.join(JOB_FILE)).unwrap().trim(), "job-a");
        // --force hands the directory to the other job.
        drop(claim_dir(&dir, "job-b", true).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join(JOB_FILE)).unwrap().trim(), "job-b");
        // A directory from before job files: the --since state names its job.
        let older = root.path().join("older");
        std::fs::create_dir(&older).unwrap();
        write_state(&older, &SinceState { job_id: "job-c".into(), since_ms: 1, from_index: 0 }).unwrap();
        assert_eq!(claim_dir(&older, "job-d", false).unwrap_err().exit_code(), 3);
        drop(claim_dir(&older, "job-c", false).unwrap());
    }
}
