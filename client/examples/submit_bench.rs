//! Submission throughput: writes N JSON Lines prompts (default 100,000) to a temporary file and streams
//! them through the same code path as `farm submit` (reader thread, local validation, chunking, gRPC
//! client streaming) into an in-process JobService that only counts what it receives. Prints prompts/s
//! and the peak resident set size of the process (VmHWM).
//!
//! `cargo run --release -p farm --example submit_bench [-- PROMPTS [CHUNK_SIZE]]`

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use farm::cli::SeedMode;
use farm::connect::{AuthInterceptor, Conn};
use farm::submit::{self, Input, SeedPlan, SubmitOptions};
use farm_proto::pb::job_service_server::{JobService, JobServiceServer};
use farm_proto::pb::*;
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Accepts submissions and counts prompts; everything else is unimplemented.
#[derive(Default, Clone)]
struct Sink {
    prompts: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl JobService for Sink {
    async fn submit_job(
        &self,
        req: Request<Streaming<SubmitJobRequest>>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let mut s = req.into_inner();
        let mut n = 0u64;
        while let Some(m) = s.message().await? {
            if let Some(submit_job_request::Msg::Chunk(c)) = m.msg {
                n += c.prompts.len() as u64;
                let b: usize = c.prompts.iter().map(|p| p.text.len()).sum();
                self.bytes.fetch_add(b as u64, Ordering::Relaxed);
            }
        }
        self.prompts.fetch_add(n, Ordering::Relaxed);
        Ok(Response::new(SubmitJobResponse {
            job_id: "bench".into(),
            accepted: n,
            ..Default::default()
        }))
    }
    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn get_task(&self, _: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        Err(Status::unimplemented("sink"))
    }
    type WatchJobStream = BoxStream<JobEvent>;
    async fn watch_job(&self, _: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn retry_job(&self, _: Request<RetryJobRequest>) -> Result<Response<RetryJobResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn list_results(
        &self,
        _: Request<ListResultsRequest>,
    ) -> Result<Response<ListResultsResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    type DownloadResultStream = BoxStream<DownloadResultChunk>;
    async fn download_result(
        &self,
        _: Request<DownloadResultRequest>,
    ) -> Result<Response<Self::DownloadResultStream>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
}

/// Peak resident set size in KiB, from /proc/self/status.
fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn write_prompts(path: &std::path::Path, n: usize) -> std::io::Result<u64> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let hair = ["blue hair", "silver hair", "black hair", "pink hair"];
    for i in 0..n {
        let text = format!(
            "<character_1><n>girl_{i}</n><gender>1girl</gender><appearance>{}, long hair, red eyes</appearance>\
             <clothing>school uniform</clothing><expression>smile</expression></character_1>\
             <general_tags><count>1girl</count><style>anime style</style><background>classroom, window</background>\
             <quality>masterpiece, best quality</quality></general_tags>",
            hair[i % hair.len()]
        );
        let rec = if i % 10 == 0 {
            serde_json::json!({"prompt": text, "seed": i, "steps": 20})
        } else {
            serde_json::json!({"prompt": text})
        };
        writeln!(w, "{rec}")?;
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let chunk: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);

    let dir = std::env::temp_dir().join(format!("farm-submit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.jsonl");
    let t = Instant::now();
    let size = write_prompts(&file, n).unwrap();
    println!(
        "generated {n} prompts ({:.1} MiB) in {:.2}s",
        size as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let hwm_before = vm_hwm_kib().unwrap_or(0);

    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                JobServiceServer::new(sink.clone())
                    .max_decoding_message_size(farm::connect::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let conn = Conn::new(channel, AuthInterceptor::new(Some("bench")).unwrap());

    let opts = SubmitOptions {
        header: SubmitHeader {
            name: "bench".into(),
            defaults: Some(RenderParams::default()),
            ..Default::default()
        },
        seeds: SeedPlan {
            mode: SeedMode::Increment,
            base: 1,
        },
        negative: None,
        chunk_size: chunk,
        chunk_bytes: submit::CHUNK_BYTES,
        keepalive: submit::KEEPALIVE,
        max_errors: 20,
    };
    let t = Instant::now();
    let out = submit::submit_stream(
        conn.service(),
        vec![Input::File(file.clone())],
        opts,
        indicatif::ProgressBar::hidden(),
    )
    .await
    .expect("submission failed");
    let secs = t.elapsed().as_secs_f64();
    let resp = out.response.expect("no reply");
    assert!(out.local_errors.is_empty(), "{:?}", out.local_errors.first());
    assert_eq!(resp.accepted as usize, n);
    assert_eq!(sink.prompts.load(Ordering::Relaxed) as usize, n);
    let hwm = vm_hwm_kib().unwrap_or(0);
    println!(
        "streamed {n} prompts in {} messages: {:.2}s, {:.0} prompts/s, {:.1} MiB/s",
        out.chunks,
        secs,
        n as f64 / secs,
        size as f64 / 1048576.0 / secs
    );
    println!(
        "peak RSS (VmHWM): {:.1} MiB (before streaming: {:.1} MiB); input file {:.1} MiB",
        hwm as f64 / 1024.0,
        hwm_before as f64 / 1024.0,
        size as f64 / 1048576.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
