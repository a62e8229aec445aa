//! The CLI against an in-process fake JobService: streaming submission, aborts, server-side errors,
//! exit codes, auth metadata, watch resumption and resumable result downloads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farm::cli::{Command, JobArg, SeedMode};
use farm::connect::{AuthInterceptor, Conn};
use farm::errors::exit;
use farm::results::{ResultsOptions, TMP_PREFIX};
use farm::submit::{self, Input, SeedPlan, SubmitOptions};
use farm::ui::Ui;
use farm_proto::pb::job_service_server::{JobService, JobServiceServer};
use farm_proto::pb::*;
use futures::Stream;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const TOKEN: &str = "test-token";

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    headers: Vec<SubmitHeader>,
    /// Prompt counts of each chunk of the submission in progress (or the last one).
    chunks: Vec<usize>,
    /// Prompts of completed submissions.
    completed: Vec<Vec<PromptSpec>>,
    /// Submissions whose stream broke before it ended.
    aborted: usize,
    downloads: Vec<u64>,
    watch_calls: Vec<u64>,
    get_job_calls: usize,
    /// `since_ms` of each ListResults call.
    list_since: Vec<i64>,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
    /// index -> bytes; the advertised sha256 may be overridden to simulate corruption.
    results: Arc<BTreeMap<u64, Vec<u8>>>,
    bad_sha: Arc<Vec<u64>>,
    /// Indexes whose download is refused with PERMISSION_DENIED.
    denied: Arc<Vec<u64>>,
    /// Indexes corrupted in transit on their first `flaky_times` downloads only.
    flaky: Arc<Vec<u64>>,
    flaky_times: usize,
    watch_mode: WatchMode,
}

/// How the fake's WatchJob and GetJob behave.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum WatchMode {
    /// Two events, a disconnect, then the rest and the final state; GetJob final after the resume.
    #[default]
    Resume,
    /// Every stream ends at once without an event while GetJob keeps answering "running".
    EndsAtOnce,
    /// The stream stays open and silent; GetJob answers "running" before its n-th call and
    /// "succeeded" from that call on.
    SilentFinalFromCall(usize),
}

fn check_auth<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == format!("Bearer {TOKEN}") => Ok(()),
        _ => Err(Status::unauthenticated("missing or wrong token")),
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn job(state: JobState, succeeded: u64) -> Job {
    Job {
        job_id: "job-1".into(),
        state: state as i32,
        counts: Some(TaskCounts {
            succeeded,
            total: 3,
            queued: 3 - succeeded,
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct AbortGuard {
    seen: Arc<Mutex<Seen>>,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if self.armed {
            self.seen.lock().unwrap().aborted += 1;
        }
    }
}

#[tonic::async_trait]
impl JobService for Fake {
    async fn submit_job(
        &self,
        req: Request<Streaming<SubmitJobRequest>>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        check_auth(&req)?;
        let mut stream = req.into_inner();
        let mut prompts = Vec::new();
        // Counts the submission as aborted unless it completes: the handler is either handed a stream
        // error or dropped when the client resets the stream.
        let mut guard = AbortGuard {
            seen: self.seen.clone(),
            armed: true,
        };
        self.seen.lock().unwrap().chunks.clear();
        // Like the coordinator: a stream without the end marker stores nothing.
        let mut ended = false;
        loop {
            match stream.message().await {
                Ok(Some(m)) => match m.msg {
                    Some(submit_job_request::Msg::Header(h)) => {
                        assert!(prompts.is_empty(), "header must come first");
                        self.seen.lock().unwrap().headers.push(h);
                    }
                    Some(submit_job_request::Msg::Chunk(c)) => {
                        self.seen.lock().unwrap().chunks.push(c.prompts.len());
                        prompts.extend(c.prompts);
                    }
                    Some(submit_job_request::Msg::End(e)) => {
                        assert_eq!(e.prompt_count, prompts.len() as u64, "end marker counts the prompts");
                        ended = true;
                    }
                    None => return Err(Status::invalid_argument("empty message")),
                },
                Ok(None) if ended => break,
                Ok(None) => return Err(Status::aborted("no end marker")),
                Err(_) => {
                    // The client went away mid-stream: store nothing.
                    return Err(Status::cancelled("stream broken"));
                }
            }
        }
        guard.armed = false;
        let errors: Vec<PromptIssue> = prompts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.text.contains("SERVER_REJECTS"))
            .map(|(i, p)| PromptIssue {
                index: i as u64,
                line: 1,
                column: 1,
                code: "bad_size".into(),
                message: "server says no".into(),
                source: p.source.clone(),
                source_line: p.source_line,
            })
            .collect();
        if !errors.is_empty() {
            return Ok(Response::new(SubmitJobResponse {
                errors,
                ..Default::default()
            }));
        }
        let n = prompts.len() as u64;
        self.seen.lock().unwrap().completed.push(prompts);
        Ok(Response::new(SubmitJobResponse {
            job_id: "job-1".into(),
            accepted: n,
            ..Default::default()
        }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        check_auth(&req)?;
        if req.get_ref().job_id != "job-1" {
            return Err(Status::not_found("no such job"));
        }
        let final_now = {
            let mut s = self.seen.lock().unwrap();
            s.get_job_calls += 1;
            match self.watch_mode {
                // Final once the watcher resumed after the simulated disconnect.
                WatchMode::Resume => s.watch_calls.len() >= 2,
                WatchMode::EndsAtOnce => false,
                WatchMode::SilentFinalFromCall(n) => s.get_job_calls >= n,
            }
        };
        Ok(Response::new(if final_now {
            job(JobState::Succeeded, 3)
        } else {
            job(JobState::Running, 1)
        }))
    }

    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_task(&self, _: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchJobStream = BoxStream<JobEvent>;

    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        check_auth(&req)?;
        let after = req.get_ref().after_sequence;
        let first = {
            let mut s = self.seen.lock().unwrap();
            s.watch_calls.push(after);
            s.watch_calls.len() == 1
        };
        match self.watch_mode {
            WatchMode::Resume => {}
            WatchMode::EndsAtOnce => return Ok(Response::new(Box::pin(futures::stream::empty()))),
            WatchMode::SilentFinalFromCall(_) => return Ok(Response::new(Box::pin(futures::stream::pending()))),
        }
        let ev = |seq: u64, e: job_event::Event| {
            Ok(JobEvent {
                job_id: "job-1".into(),
                sequence: seq,
                at_ms: 0,
                event: Some(e),
            })
        };
        let task = |i: u64, st: TaskState| {
            job_event::Event::Task(TaskStateChanged {
                index: i,
                state: st as i32,
                worker_id: "w1".into(),
                error: String::new(),
            })
        };
        let items: Vec<Result<JobEvent, Status>> = if first {
            vec![
                ev(1, task(0, TaskState::Running)),
                ev(2, task(0, TaskState::Succeeded)),
                Err(Status::unavailable("coordinator restarting")),
            ]
        } else {
            vec![
                ev(3, task(1, TaskState::Succeeded)),
                ev(4, task(2, TaskState::Succeeded)),
                ev(
                    5,
                    job_event::Event::Job(JobStateChanged {
                        state: JobState::Succeeded as i32,
                        counts: None,
                    }),
                ),
            ]
        };
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn retry_job(&self, _: Request<RetryJobRequest>) -> Result<Response<RetryJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_results(
        &self,
        req: Request<ListResultsRequest>,
    ) -> Result<Response<ListResultsResponse>, Status> {
        check_auth(&req)?;
        self.seen.lock().unwrap().list_since.push(req.get_ref().since_ms);
        // Two results per page, to exercise pagination.
        let start: u64 = req.get_ref().page_token.parse().unwrap_or(0);
        let all: Vec<_> = self
            .results
            .iter()
            .filter(|(i, _)| **i >= req.get_ref().from_index)
            .collect();
        let page: Vec<ResultInfo> = all
            .iter()
            .skip(start as usize)
            .take(2)
            .map(|(i, b)| ResultInfo {
                job_id: "job-1".into(),
                index: **i,
                size_bytes: b.len() as u64,
                sha256: sha(b),
                content_type: "image/png".into(),
                created_at_ms: 1_000_000 + **i as i64,
                worker_id: "w1".into(),
            })
            .collect();
        let next = if (start as usize + 2) < all.len() {
            (start + 2).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(ListResultsResponse {
            results: page,
            next_page_token: next,
        }))
    }

    type DownloadResultStream = BoxStream<DownloadResultChunk>;

    async fn download_result(
        &self,
        req: Request<DownloadResultRequest>,
    ) -> Result<Response<Self::DownloadResultStream>, Status> {
        check_auth(&req)?;
        let index = req.get_ref().index;
        let earlier = {
            let mut seen = self.seen.lock().unwrap();
            seen.downloads.push(index);
            seen.downloads.iter().filter(|&&i| i == index).count() - 1
        };
        if self.denied.contains(&index) {
            return Err(Status::permission_denied("token revoked"));
        }
        let bytes = self
            .results
            .get(&index)
            .cloned()
            .ok_or_else(|| Status::not_found("no result"))?;
        let mut sent = bytes.clone();
        if self.bad_sha.contains(&index) || (self.flaky.contains(&index) && earlier < self.flaky_times) {
            sent[0] ^= 0xff; // corrupted in transit
        }
        let info = ResultInfo {
            index,
            size_bytes: bytes.len() as u64,
            sha256: sha(&bytes),
            ..Default::default()
        };
        let mut chunks = Vec::new();
        for (n, part) in sent.chunks(3).enumerate() {
            chunks.push(Ok(DownloadResultChunk {
                info: (n == 0).then(|| info.clone()),
                data: part.to_vec(),
            }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse::default()))
    }
}

async fn serve(fake: Fake) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn client(addr: SocketAddr, token: &str) -> Conn {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Conn::new(channel, AuthInterceptor::new(Some(token)).unwrap())
}

/// A client with the right token, connected to a fresh server of `fake`.
async fn connected(fake: &Fake) -> Conn {
    client(serve(fake.clone()).await, TOKEN).await
}

fn jsonl_line(text: &str) -> String {
    serde_json::json!({ "prompt": text }).to_string()
}

fn write_jsonl(path: &Path, n: usize, bad_at: Option<usize>) {
    let mut s = String::new();
    for i in 0..n {
        let text = if Some(i) == bad_at {
            "<character_1><n>unclosed".to_string()
        } else {
            format!("<general_tags><count>1girl</count></general_tags> prompt {i}")
        };
        s.push_str(&jsonl_line(&text));
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

fn options(chunk_size: usize) -> SubmitOptions {
    SubmitOptions {
        header: SubmitHeader {
            name: "t".into(),
            defaults: Some(RenderParams::default()),
            ..Default::default()
        },
        seeds: SeedPlan {
            mode: SeedMode::Increment,
            base: 1000,
        },
        negative: Some("lowres".into()),
        chunk_size,
        chunk_bytes: submit::CHUNK_BYTES,
        max_errors: 20,
        keepalive: submit::KEEPALIVE,
    }
}

#[tokio::test]
async fn submit_streams_header_then_chunks() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.txt");
    write_jsonl(&a, 2300, None);
    std::fs::write(&b, "plain tags one\nplain tags two\n").unwrap();
    let inputs = vec![Input::File(a.clone()), Input::File(b.clone())];
    let out = submit::submit_stream(
        c.service(),
        inputs,
        options(1000),
        indicatif::ProgressBar::hidden(),
    )
    .await
    .unwrap();
    assert!(out.local_errors.is_empty(), "{:?}", out.local_errors);
    let resp = out.response.clone().unwrap();
    assert_eq!(resp.job_id, "job-1");
    assert_eq!(resp.accepted, 2302);
    assert_eq!(out.prompts, 2302);

    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.headers.len(), 1);
    assert_eq!(seen.headers[0].name, "t");
    assert_eq!(
        seen.chunks,
        vec![1000, 1000, 302],
        "prompts are cut into chunks of --chunk-size"
    );
    let prompts = &seen.completed[0];
    assert_eq!(prompts[0].seed, Some(1000));
    assert_eq!(prompts[2301].seed, Some(3301), "increment continues across files");
    assert_eq!(prompts[0].negative_prompt, "lowres");
    assert_eq!(prompts[0].source, a.display().to_string());
    assert_eq!(prompts[0].source_line, 1);
    assert_eq!(prompts[2300].source, b.display().to_string());
    assert_eq!(prompts[2301].source_line, 2);
    assert_eq!(prompts[2301].text, "plain tags two");
    assert!(prompts[5].text.ends_with("prompt 5"));
}

#[tokio::test]
async fn invalid_prompt_mid_file_aborts_and_nothing_is_stored() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    write_jsonl(&a, 5000, Some(3000));
    let opts = options(100);
    let out = submit::submit_stream(
        c.service(),
        vec![Input::File(a.clone())],
        opts.clone(),
        indicatif::ProgressBar::hidden(),
    )
    .await
    .unwrap();
    assert!(out.response.is_none(), "the call was dropped, not completed");
    assert_eq!(out.local_errors.len(), 1);
    let e = &out.local_errors[0];
    assert_eq!(e.index, 3000);
    assert_eq!(e.source, a.display().to_string());
    assert_eq!(e.source_line, 3001);
    assert_eq!(e.code, "xml_syntax");
    assert!(e.line >= 1 && e.column >= 1);
    let line = submit::format_error(e);
    assert!(
        line.starts_with(&format!(
            "{}:3001: prompt #3000, line {}, column {}",
            a.display(),
            e.line,
            e.column
        )),
        "{line}"
    );

    let err = submit::report(&out, &opts, Ui::silent()).unwrap_err();
    assert_eq!(err.exit_code(), exit::INVALID_INPUT);

    // The server saw the stream start (header and some chunks) and then break; nothing completed.
    let mut broke = false;
    for _ in 0..100 {
        if fake.seen.lock().unwrap().aborted == 1 {
            broke = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = fake.seen.lock().unwrap();
    assert!(
        broke,
        "the server's request stream must end in an error, not a clean end"
    );
    assert!(seen.completed.is_empty(), "no submission may complete");
    assert_eq!(seen.headers.len(), 1);
    let sent: usize = seen.chunks.iter().sum();
    assert!(sent <= 3000, "nothing after the invalid prompt was sent ({sent})");
}

#[tokio::test]
async fn server_side_errors_exit_3() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    std::fs::write(&a, "fine\nSERVER_REJECTS this\nfine again\n").unwrap();
    let opts = options(10);
    let out = submit::submit_stream(
        c.service(),
        vec![Input::File(a.clone())],
        opts.clone(),
        indicatif::ProgressBar::hidden(),
    )
    .await
    .unwrap();
    let errors = out.errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].index, 1);
    assert_eq!(
        submit::format_error(errors[0]),
        format!(
            "{}:2: prompt #1, line 1, column 1: server says no [bad_size]",
            a.display()
        )
    );
    assert_eq!(
        submit::report(&out, &opts, Ui::silent()).unwrap_err().exit_code(),
        3
    );
    assert!(fake.seen.lock().unwrap().completed.is_empty());
}

#[tokio::test]
async fn exit_codes_for_auth_and_not_found() {
    let addr = serve(Fake::default()).await;
    let good = client(addr, TOKEN).await;
    let e = farm::dispatch(
        &good,
        Command::Status(JobArg { job: "nope".into() }),
        Ui::silent(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), exit::NOT_FOUND);
    let bad = client(addr, "wrong").await;
    let e = farm::dispatch(
        &bad,
        Command::Status(JobArg { job: "job-1".into() }),
        Ui::silent(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), exit::AUTH);
    farm::dispatch(
        &good,
        Command::Status(JobArg { job: "job-1".into() }),
        Ui::silent(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn watch_resumes_after_disconnect_from_last_sequence() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let job = tokio::time::timeout(
        Duration::from_secs(20),
        farm::watch::watch(&mut c.jobs(), "job-1", Ui::silent(), false),
    )
    .await
    .expect("watch finished")
    .unwrap();
    assert_eq!(job.state, JobState::Succeeded as i32);
    assert_eq!(
        fake.seen.lock().unwrap().watch_calls,
        vec![0, 2],
        "resumed after the last event seen"
    );
}

#[tokio::test]
async fn watch_backs_off_when_streams_keep_ending_while_get_job_answers() {
    let fake = Fake { watch_mode: WatchMode::EndsAtOnce, ..Default::default() };
    let c = connected(&fake).await;
    let mut jobs = c.jobs();
    let watching = farm::watch::watch(&mut jobs, "job-1", Ui::silent(), false);
    assert!(tokio::time::timeout(Duration::from_millis(2200), watching).await.is_err(), "the job never ends");
    // Backoff 0.25 s, 0.5 s, 1 s: streams at about 0, 0.25, 0.75 and 1.75 s. Without backoff one
    // every 0.25 s (about nine).
    let calls = fake.seen.lock().unwrap().watch_calls.len();
    assert!((2..=5).contains(&calls), "{calls} WatchJob calls in 2.2 s");
}

#[tokio::test]
async fn watch_ends_when_get_job_shows_the_final_state_on_a_silent_stream() {
    let fake = Fake { watch_mode: WatchMode::SilentFinalFromCall(2), ..Default::default() };
    let c = connected(&fake).await;
    // The closing event was lost: the stream stays open, but the periodic GetJob (every 3 s
    // without events) sees the final state.
    let job = tokio::time::timeout(Duration::from_secs(15), farm::watch::watch(&mut c.jobs(), "job-1", Ui::silent(), false))
        .await
        .expect("watch ended on the refreshed final state")
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded as i32);
}

fn fake_with_results() -> (Fake, BTreeMap<u64, Vec<u8>>) {
    let mut results = BTreeMap::new();
    for i in 0..5u64 {
        results.insert(i, format!("png bytes of result {i}").into_bytes());
    }
    let fake = Fake {
        results: Arc::new(results.clone()),
        ..Default::default()
    };
    (fake, results)
}

fn results_options(dir: &Path) -> ResultsOptions {
    ResultsOptions {
        dir: dir.to_path_buf(),
        parallel: 3,
        since: false,
        from_index: 0,
        follow: false,
        poll_interval: Duration::from_millis(10),
        force: false,
    }
}

#[tokio::test]
async fn results_skip_files_with_matching_sha256() {
    let (fake, results) = fake_with_results();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    // 0: already complete; 1: wrong content (same length); 2: truncated; 3, 4: missing.
    std::fs::write(dir.path().join("000000.png"), &results[&0]).unwrap();
    let mut wrong = results[&1].clone();
    wrong[0] ^= 1;
    std::fs::write(dir.path().join("000001.png"), &wrong).unwrap();
    std::fs::write(dir.path().join("000002.png"), &results[&2][..4]).unwrap();
    std::fs::write(
        dir.path().join(format!("{TMP_PREFIX}000003-1-1")),
        b"half-written",
    )
    .unwrap();

    let s = farm::results::download(&mut c.jobs(), "job-1", &results_options(dir.path()), Ui::silent())
        .await
        .unwrap();
    assert_eq!((s.listed, s.downloaded, s.skipped, s.failed), (5, 4, 1, 0));
    let mut downloads = fake.seen.lock().unwrap().downloads.clone();
    downloads.sort();
    assert_eq!(
        downloads,
        vec![1, 2, 3, 4],
        "the file with the right sha256 is not fetched again"
    );
    for (i, b) in &results {
        assert_eq!(&std::fs::read(dir.path().join(format!("{i:06}.png"))).unwrap(), b);
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(TMP_PREFIX))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A second run downloads nothing.
    let s = farm::results::download(&mut c.jobs(), "job-1", &results_options(dir.path()), Ui::silent())
        .await
        .unwrap();
    assert_eq!((s.downloaded, s.skipped), (0, 5));
    assert_eq!(fake.seen.lock().unwrap().downloads.len(), 4);
}

#[tokio::test]
async fn corrupted_download_leaves_no_file() {
    let (mut fake, results) = fake_with_results();
    fake.bad_sha = Arc::new(vec![2]);
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = results_options(dir.path());
    opts.since = true;
    let s = farm::results::download(&mut c.jobs(), "job-1", &opts, Ui::silent())
        .await
        .unwrap();
    assert_eq!((s.downloaded, s.failed), (4, 1));
    assert!(
        !dir.path().join("000002.png").exists(),
        "a file that failed its check is not kept"
    );
    assert_eq!(std::fs::read(dir.path().join("000003.png")).unwrap(), results[&3]);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(TMP_PREFIX)), "{names:?}");
    assert!(
        !names.contains(&farm::results::STATE_FILE.to_string()),
        "--since state only advances after a clean run"
    );
    assert_eq!(
        farm::results::report("job-1", dir.path(), &s, Ui::silent())
            .unwrap_err()
            .exit_code(),
        1
    );
}

/// `--follow` lists recent results again on every poll: a result settled earlier in the run is not
/// counted again, and a download that failed in one pass and succeeded in a later one is no longer
/// a failure.
#[tokio::test]
async fn follow_counts_each_result_once_and_forgets_a_recovered_failure() {
    let (mut fake, results) = fake_with_results();
    // GetJob calls: the existence check, a pass while running, a pass after the end.
    fake.watch_mode = WatchMode::SilentFinalFromCall(3);
    fake.flaky = Arc::new(vec![2]);
    fake.flaky_times = farm::results::ATTEMPTS as usize; // every try of the first pass
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = results_options(dir.path());
    opts.follow = true;
    let s = farm::results::download(&mut c.jobs(), "job-1", &opts, Ui::silent()).await.unwrap();
    assert_eq!((s.listed, s.downloaded, s.skipped, s.failed), (5, 5, 0, 0), "{s:?}");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    farm::results::report("job-1", dir.path(), &s, Ui::silent()).expect("every result is on disk and verified");
    assert_eq!(std::fs::read(dir.path().join("000002.png")).unwrap(), results[&2]);
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.list_since.len(), 6, "two passes of three pages");
    assert_eq!(seen.downloads.iter().filter(|&&i| i == 2).count(), farm::results::ATTEMPTS as usize + 1);
}

#[tokio::test]
async fn a_refused_download_exits_with_its_kind_and_the_usual_wording() {
    let (mut fake, _) = fake_with_results();
    fake.bad_sha = Arc::new(vec![2]);
    fake.denied = Arc::new(vec![1]);
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let s = farm::results::download(&mut c.jobs(), "job-1", &results_options(dir.path()), Ui::silent())
        .await
        .unwrap();
    assert_eq!((s.downloaded, s.failed), (3, 2));
    let denied = s.errors.iter().find(|e| e.starts_with("000001.png")).expect("an error for 000001.png");
    assert!(denied.contains("permission denied (token revoked)"), "{denied}");
    // A permission failure outranks the corrupted download: exit 4, not 1.
    let e = farm::results::report("job-1", dir.path(), &s, Ui::silent()).unwrap_err();
    assert_eq!(e.exit_code(), exit::AUTH);
}

#[tokio::test]
async fn a_job_that_does_not_exist_leaves_the_directory_unclaimed() {
    let (fake, _) = fake_with_results();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let opts = results_options(dir.path());
    let e = farm::results::download(&mut c.jobs(), "job-typo", &opts, Ui::silent()).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::NOT_FOUND);
    assert!(!dir.path().join(farm::results::JOB_FILE).exists(), "no .farm-job for a job that does not exist");
    // The real job can then use the directory.
    let s = farm::results::download(&mut c.jobs(), "job-1", &opts, Ui::silent()).await.unwrap();
    assert_eq!(s.downloaded, 5);
}

#[tokio::test]
async fn since_remembers_the_newest_result() {
    let (fake, _) = fake_with_results();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = results_options(dir.path());
    opts.since = true;
    farm::results::download(&mut c.jobs(), "job-1", &opts, Ui::silent())
        .await
        .unwrap();
    let state = farm::results::read_state(dir.path(), "job-1", 0).unwrap();
    assert_eq!(state.since_ms, 1_000_004);
    let s = farm::results::download(&mut c.jobs(), "job-1", &opts, Ui::silent())
        .await
        .unwrap();
    assert_eq!(s.downloaded, 0);
    let since = fake.seen.lock().unwrap().list_since.clone();
    assert_eq!(since.first(), Some(&0));
    assert_eq!(since.last(), Some(&(1_000_004 - farm::results::SINCE_OVERLAP_MS)));
}

#[tokio::test]
async fn submit_command_exit_codes() {
    use clap::Parser;
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    let bad = dir.path().join("bad.txt");
    std::fs::write(
        &good,
        "1girl, smile\n<general_tags><count>1girl</count></general_tags>\n",
    )
    .unwrap();
    std::fs::write(&bad, "fine\n<character_1>unclosed\nfine\n").unwrap();
    let parse = |f: &Path, extra: &[&str]| {
        let mut args = vec![
            "farm".to_string(),
            "submit".into(),
            f.display().to_string(),
            "--seed".into(),
            "5".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        farm::cli::Cli::try_parse_from(args).unwrap().command
    };
    farm::dispatch(
        &c,
        parse(&good, &["--width", "512", "--seed-mode", "fixed", "--cfg-trunc", "0"]),
        Ui::silent(),
    )
    .await
    .unwrap();
    {
        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen.completed.len(), 1);
        assert!(
            seen.completed[0].iter().all(|p| p.seed == Some(5)),
            "fixed seed for every prompt"
        );
        assert_eq!(seen.headers[0].defaults.as_ref().unwrap().width, 512);
        // An explicit 0 travels as a value (guidance on no step); an unset scale stays unset.
        assert_eq!(seen.headers[0].defaults.as_ref().unwrap().cfg_trunc, Some(0.0));
        assert_eq!(seen.headers[0].defaults.as_ref().unwrap().cfg_scale, None);
        assert_eq!(seen.headers[0].name, "good.txt");
    }
    let e = farm::dispatch(&c, parse(&bad, &[]), Ui::silent())
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::INVALID_INPUT);
    let e = farm::dispatch(&c, parse(&good, &["--width", "1000"]), Ui::silent())
        .await
        .unwrap_err();
    assert_eq!(
        e.exit_code(),
        exit::INVALID_INPUT,
        "invalid defaults are refused before connecting"
    );
    // Checking stops at --max-errors, and the message says the count is not the total.
    let two_bad = dir.path().join("two-bad.txt");
    std::fs::write(&two_bad, "<character_1>unclosed\n<character_2>unclosed\n").unwrap();
    let e = farm::dispatch(&c, parse(&two_bad, &["--max-errors", "1"]), Ui::silent()).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::INVALID_INPUT);
    assert!(e.message.contains("found 1 invalid prompt(s) (stopped after --max-errors 1)"), "{}", e.message);
    // An input without prompts is named, not reported as prompt #0.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = farm::dispatch(&c, parse(&empty, &[]), Ui::silent()).await.unwrap_err();
    assert_eq!(e.exit_code(), exit::INVALID_INPUT);
    assert!(e.message.contains("no prompts in") && e.message.contains("empty.txt"), "{}", e.message);
    let e = farm::dispatch(&c, parse(&dir.path().join("missing.txt"), &[]), Ui::silent())
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), exit::USAGE);
    assert_eq!(
        fake.seen.lock().unwrap().completed.len(),
        1,
        "nothing else was stored"
    );
}

/// A batch over the per-job limit stops at the first prompt past it, with the limit named, and
/// nothing is stored.
#[tokio::test]
async fn a_batch_over_the_prompt_limit_stops_at_the_limit() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.txt");
    let max = farm_proto::limits::MAX_PROMPTS_PER_JOB;
    std::fs::write(&big, "1girl\n".repeat(max as usize + 3)).unwrap();
    let opts = options(10_000);
    let out = submit::submit_stream(c.service(), vec![Input::File(big)], opts.clone(), indicatif::ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(out.local_errors.len(), 1);
    let e = &out.local_errors[0];
    assert_eq!((e.index, e.source_line, e.code.as_str()), (max, max as u32 + 1, "too_many_prompts"));
    assert!(e.message.contains(&format!("at most {max} prompts")), "{}", e.message);
    assert_eq!(out.prompts, max + 1, "reading stopped at the first prompt past the limit");
    let line = submit::format_error(e);
    assert!(line.contains(&format!("big.txt:{}: prompt #{max}: ", max + 1)) && !line.contains("column"), "{line}");
    assert_eq!(submit::report(&out, &opts, Ui::silent()).unwrap_err().exit_code(), exit::INVALID_INPUT);
    let seen = fake.seen.lock().unwrap();
    assert!(seen.completed.is_empty(), "nothing stored");
    let sent: usize = seen.chunks.iter().sum();
    assert!(sent as u64 <= max, "{sent} prompts sent");
}

/// Input that is slow to come (a generator on a pipe) keeps the call alive with empty chunks while
/// it is quiet, and is submitted whole.
#[tokio::test]
async fn quiet_input_keeps_the_call_alive() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("slow.txt");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            writeln!(w, "1girl, first").unwrap();
            w.flush().unwrap();
            std::thread::sleep(Duration::from_millis(700));
            writeln!(w, "1girl, second").unwrap();
            w.flush().unwrap();
            std::thread::sleep(Duration::from_millis(700));
            writeln!(w, "1girl, third").unwrap();
        })
    };
    // Chunks of up to 100 prompts: a slow input still sends its prompts as they come.
    let mut opts = options(100);
    opts.keepalive = Duration::from_millis(100);
    let out = submit::submit_stream(c.service(), vec![Input::File(fifo)], opts, indicatif::ProgressBar::hidden())
        .await
        .unwrap();
    writer.join().unwrap();
    assert!(out.local_errors.is_empty(), "{:?}", out.local_errors);
    assert_eq!(out.response.map(|r| r.accepted), Some(3));
    let seen = fake.seen.lock().unwrap();
    let keepalives = seen.chunks.iter().filter(|&&n| n == 0).count();
    assert!(keepalives >= 3, "empty chunks while the input was quiet: {:?}", seen.chunks);
    assert_eq!(seen.chunks.iter().sum::<usize>(), 3);
    // The prompts went out as they came (a prompt a keep-alive interval after the last send goes
    // out at once), not all at the end in one chunk.
    let with_prompts = seen.chunks.iter().filter(|&&n| n > 0).count();
    assert!(with_prompts >= 2, "{:?}", seen.chunks);
}

/// In an XML batch, an unreadable prompt record names its prompt number (records after it keep
/// theirs), a syntax error that stops the reading says the rest of the file was not checked, the
/// next input is still checked, and an unreadable input is reported after the invalid prompts.
#[tokio::test]
async fn batch_syntax_errors_name_the_prompt_and_say_what_was_not_read() {
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.xml");
    std::fs::write(
        &a,
        "<batch>\n<prompt>1girl</prompt>\n<prompt size=\"2\">solo</prompt>\n<prompt><n>miku</m></prompt>\n<prompt>never read</prompt>\n</batch>\n",
    )
    .unwrap();
    let b = dir.path().join("b.txt");
    std::fs::write(&b, "1girl\n<character_1>unclosed\n").unwrap();
    let gone = dir.path().join("gone.txt");
    let opts = options(100);
    let inputs = vec![Input::File(a), Input::File(b), Input::File(gone)];
    let out = submit::submit_stream(c.service(), inputs, opts.clone(), indicatif::ProgressBar::hidden())
        .await
        .unwrap();
    let got: Vec<(u64, &str, u32)> = out.local_errors.iter().map(|e| (e.index, e.code.as_str(), e.source_line)).collect();
    assert_eq!(got, vec![(1, "prompt_syntax", 3), (2, "prompt_syntax", 4), (4, "xml_syntax", 2)]);
    let lines: Vec<String> = out.local_errors.iter().map(submit::format_error).collect();
    assert!(lines[1].contains("a.xml: line 4, column 16: prompt #2: closing tag </m> does not match <n>"), "{}", lines[1]);
    assert_eq!(out.unread.len(), 1);
    assert!(out.unread[0].ends_with("a.xml"), "{:?}", out.unread);
    assert!(out.failure.as_deref().is_some_and(|f| f.contains("gone.txt")), "{:?}", out.failure);
    let v = submit::outcome_json(&out, &opts);
    assert_eq!(v["unread"].as_array().map(Vec::len), Some(1));
    assert!(v["failure"].as_str().is_some_and(|f| f.contains("gone.txt")));
    // The unreadable input makes it a failure, after the prompt errors were reported.
    assert_eq!(submit::report(&out, &opts, Ui::silent()).unwrap_err().exit_code(), exit::FAILURE);
    assert!(fake.seen.lock().unwrap().completed.is_empty(), "nothing stored");
}

#[tokio::test]
async fn directory_of_xml_and_jsonl_batches() {
    use clap::Parser;
    let fake = Fake::default();
    let c = connected(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.xml"),
        "<batch>\n  <prompt seed=\"42\" width=\"512\" height=\"512\">\n    <character_1><n>miku</n></character_1>\n  </prompt>\n  <prompt negative=\"blurry\">1girl, solo</prompt>\n</batch>\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.jsonl"),
        format!("{}\n", jsonl_line("landscape, sunset")),
    )
    .unwrap();
    std::fs::write(dir.path().join("ignored.md"), "not a batch").unwrap();
    let args = [
        "farm",
        "submit",
        dir.path().to_str().unwrap(),
        "--seed",
        "100",
        "--negative",
        "lowres",
    ];
    let cmd = farm::cli::Cli::try_parse_from(args).unwrap().command;
    farm::dispatch(&c, cmd, Ui::silent()).await.unwrap();
    let seen = fake.seen.lock().unwrap();
    let p = &seen.completed[0];
    assert_eq!(p.len(), 3);
    assert_eq!(p[0].text, "<character_1><n>miku</n></character_1>");
    assert_eq!(
        (p[0].seed, p[0].width, p[0].height),
        (Some(42), Some(512), Some(512))
    );
    assert_eq!(p[0].source_line, 3);
    assert_eq!(p[0].negative_prompt, "lowres");
    assert_eq!(
        (p[1].text.as_str(), p[1].seed, p[1].negative_prompt.as_str()),
        ("1girl, solo", Some(101), "blurry")
    );
    assert!(p[2].source.ends_with("b.jsonl"));
    assert_eq!(p[2].seed, Some(102));
}
