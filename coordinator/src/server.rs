//! Wiring: the gRPC server (job and worker services, health, reflection; TLS when configured), the
//! lease sweeper, the PostgreSQL notification listener and the metrics endpoint. `main` and the tests
//! call [`run`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use farm_proto::error_chain;
use farm_proto::pb::job_service_server::JobServiceServer;
use farm_proto::pb::worker_service_server::WorkerServiceServer;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::blobs::BlobStore;
use crate::events::Events;
use crate::grpc_jobs::JobApi;
use crate::grpc_workers::WorkerApi;
use crate::state::{Metrics, Shared};
use crate::store::{Store, StoreConfig};
use crate::submit::SubmitLimits;

/// Everything `serve` needs; `main` fills it from flags and the environment.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub database_url: String,
    pub redis_url: Option<String>,
    pub results: String,
    /// Memory budget of buffered results (local storage).
    pub results_memory_bytes: usize,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub idle_poll: Duration,
    pub db_pool_size: u32,
    pub metrics_listen: Option<SocketAddr>,
    /// How long a token lookup is trusted (revocations take effect within it).
    pub auth_cache: Duration,
    /// Most prompts one job may hold (at most [`farm_proto::limits::MAX_PROMPTS_PER_JOB`]).
    pub max_prompts_per_job: u64,
    /// Longest wait between two messages of a submission.
    pub submit_idle_timeout: Duration,
    /// Longest time a submission may send only empty chunks.
    pub submit_quiet_limit: Duration,
    /// Submissions stored at once by this replica.
    pub max_concurrent_submissions: u32,
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The coordinator's connection pool. Its sessions run with bitmap scans off: every query here is a
/// point lookup or an index walk that stops early (`order by idx limit n`), and with the row estimates
/// of a job copied in moments ago (stale statistics say "a few rows") the planner otherwise prefers a
/// bitmap scan plus sort over all of a job's queued tasks, which took seconds per claim on a
/// 100,000-task job.
pub async fn connect_db(url: &str, pool_size: u32) -> anyhow::Result<sqlx::PgPool> {
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .options([("enable_bitmapscan", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before every checkout (a round trip per query, a third of the database's work in
        // dispatch); a broken connection fails its query, which the callers retry or report.
        .test_before_acquire(false)
        .connect_with(options)
        .await?)
}

/// Builds the shared state: connects, migrates, opens storage and events.
pub async fn build(opts: &ServeOptions, replica: String) -> anyhow::Result<Arc<Shared>> {
    let pool = connect_db(&opts.database_url, opts.db_pool_size).await?;
    MIGRATOR.run(&pool).await?;
    let events = match &opts.redis_url {
        Some(url) => Events::redis(url).await?,
        None => Events::local(),
    };
    let blobs = BlobStore::open(&opts.results).await?.with_memory_budget(opts.results_memory_bytes);
    tracing::info!(results = %blobs.describe(), "result storage opened");
    let store = Store::new(pool.clone(), StoreConfig { lease_ttl: opts.lease_ttl, ..Default::default() });
    Ok(Arc::new(Shared {
        store,
        auth: Authenticator::new(pool, opts.auth_cache),
        events,
        blobs,
        limits: SubmitLimits {
            max_prompts: opts.max_prompts_per_job,
            idle_timeout: opts.submit_idle_timeout,
            quiet_limit: opts.submit_quiet_limit,
            ..SubmitLimits::default()
        },
        submit_slots: tokio::sync::Semaphore::new(opts.max_concurrent_submissions.max(1) as usize),
        max_concurrent_submissions: opts.max_concurrent_submissions.max(1),
        sessions: Mutex::new(HashMap::new()),
        new_work: Notify::new(),
        replica,
        heartbeat_interval: opts.heartbeat_interval,
        idle_poll: opts.idle_poll,
        metrics: Metrics::default(),
        finish_pending: Mutex::new(HashSet::new()),
        issued: Mutex::new(HashMap::new()),
    }))
}

/// TLS for the gRPC listener from two PEM files: the certificate chain (leaf first) and its private key
/// (PKCS#8, PKCS#1 or SEC1). Fails naming the file when one cannot be read, holds no PEM block of the
/// expected kind, or the pair does not make a usable server configuration (for example a key that does
/// not belong to the certificate).
pub fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<ServerTlsConfig> {
    let cert_pem = std::fs::read(cert).with_context(|| format!("--tls-cert {}: cannot read the certificate", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("--tls-key {}: cannot read the private key", key.display()))?;
    if !contains(&cert_pem, b"-----BEGIN CERTIFICATE-----") {
        anyhow::bail!("--tls-cert {}: not a PEM certificate (no -----BEGIN CERTIFICATE----- block)", cert.display());
    }
    if !contains(&key_pem, b"-----BEGIN") || !contains(&key_pem, b"PRIVATE KEY-----") {
        anyhow::bail!("--tls-key {}: not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)", key.display());
    }
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)).timeout(Duration::from_secs(10));
    // Building the acceptor parses both files and checks that the key matches the certificate.
    tonic::transport::Server::builder().tls_config(config.clone()).map_err(|e| {
        anyhow::anyhow!("--tls-cert {} / --tls-key {}: unusable TLS certificate or key: {}", cert.display(), key.display(), error_chain(&e))
    })?;
    Ok(config)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Serves until `shutdown` resolves; with `tls` (see [`load_tls`]) the gRPC port accepts TLS only.
/// At shutdown the health service says NOT_SERVING, new connections are refused, and calls in
/// flight get up to `grace` to end; the long-lived streams (worker sessions, watches), which never
/// end by themselves, are dropped after it.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobServiceServer<JobApi>>().await;
    health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(farm_proto::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let background = vec![
        tokio::spawn(sweep_loop(shared.clone())),
        tokio::spawn(listen_loop(shared.clone())),
    ];

    let jobs = JobServiceServer::new(JobApi { shared: shared.clone() })
        .max_decoding_message_size(64 << 20)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let workers = WorkerServiceServer::new(WorkerApi { shared: shared.clone() }).max_decoding_message_size(64 << 20);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| anyhow::anyhow!("TLS configuration: {}", error_chain(&e)))?;
    }
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let health = health_reporter.clone();
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<JobServiceServer<JobApi>>().await;
        health.set_not_serving::<WorkerServiceServer<WorkerApi>>().await;
        tracing::info!(grace_s = grace.as_secs_f64(), "stopping: calls in flight may end");
        let _ = stopping_tx.send(());
    };
    let serve = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(jobs)
        .add_service(workers)
        .serve_with_incoming_shutdown(no_delay(TcpListenerStream::new(listener)), shutdown);
    let result = tokio::select! {
        r = serve => r,
        _ = async {
            match stopping_rx.await {
                Ok(()) => tokio::time::sleep(grace).await,
                Err(_) => std::future::pending::<()>().await,
            }
        } => {
            tracing::info!("grace period over: dropping the open worker sessions and watches");
            Ok(())
        }
    };
    for b in background {
        b.abort();
    }
    result?;
    Ok(())
}

/// The accepted connections with Nagle's algorithm off. A reply larger than one segment (a page of
/// ListJobs, a batch of events) otherwise waits for the client's delayed acknowledgement, about
/// 40 ms, before its last segment goes out; tonic sets this only on listeners it binds itself.
fn no_delay(
    incoming: TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(incoming, |conn| {
        if let Ok(c) = &conn {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        }
        conn
    })
}

/// How long the in-process event history of a closed job is kept for watches that replay it.
const EVENT_HISTORY_KEPT: Duration = Duration::from_secs(600);

/// Requeues expired leases every second (every replica runs it; the claim is `SKIP LOCKED`) and
/// writes the per-worker completion counters.
async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tick.tick().await;
        if let Err(e) = shared.store.flush_completed().await {
            tracing::debug!(error = %e, "worker counters not written; kept for the next tick");
        }
        match shared.store.sweep_expired().await {
            Ok(ts) if !ts.is_empty() => {
                Metrics::add(&shared.metrics.lease_expiries, ts.len() as u64);
                tracing::info!(expired = ts.len(), "requeued tasks whose lease expired");
                for t in &ts {
                    shared.task_event(t, None).await;
                }
                let _ = shared.store.notify_new_work().await;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "lease sweep failed"),
        }
        match shared.store.finish_idle_jobs().await {
            Ok(finished) => {
                for (job_id, state) in finished {
                    shared.announce_finished(job_id, state).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "closing finished jobs failed"),
        }
        // Leases this replica issued whose uploads went elsewhere or never came.
        let horizon = shared.store.cfg.lease_ttl * 4;
        shared.issued.lock().unwrap().retain(|_, l| l.issued_at.elapsed() < horizon);
        // In-process event histories of jobs that closed a while ago (a watch that starts later
        // closes with the state read from the job store).
        shared.events.prune(EVENT_HISTORY_KEPT);
    }
}

/// Cross-replica wake-ups and cancels through PostgreSQL LISTEN/NOTIFY.
async fn listen_loop(shared: Arc<Shared>) {
    loop {
        let mut listener = match PgListener::connect_with(&shared.store.pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "notification listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if listener.listen_all(["farm_tasks", "farm_cancel"]).await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(n) if n.channel() == "farm_tasks" => shared.new_work.notify_waiters(),
                Ok(n) => {
                    let parts: Vec<&str> = n.payload().split(' ').collect();
                    if let [w, t, tok] = parts[..] {
                        if let (Ok(w), Ok(t), Ok(tok)) = (Uuid::parse_str(w), Uuid::parse_str(t), tok.parse::<i64>()) {
                            shared.cancel_local(w, t, tok);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "notification listener lost its connection");
                    // Work may have arrived while we were deaf.
                    shared.new_work.notify_waiters();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

/// Prometheus text exposition of the replica's counters and the queue's state.
pub async fn render_metrics(shared: &Shared) -> String {
    use std::fmt::Write;
    let m = &shared.metrics;
    let mut s = String::new();
    let counter = |s: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(&mut s, "farm_tasks_dispatched_total", "Tasks sent to workers by this replica.", m.tasks_dispatched.load(Ordering::Relaxed));
    counter(&mut s, "farm_tasks_succeeded_total", "Results committed by this replica.", m.tasks_succeeded.load(Ordering::Relaxed));
    counter(&mut s, "farm_task_failure_reports_total", "Render failures reported by workers.", m.tasks_failed_reports.load(Ordering::Relaxed));
    counter(&mut s, "farm_requeues_total", "Tasks requeued after a worker was lost or released them.", m.requeues.load(Ordering::Relaxed));
    counter(&mut s, "farm_lease_expiries_total", "Leases that expired (silent workers).", m.lease_expiries.load(Ordering::Relaxed));
    counter(&mut s, "farm_stale_lease_refusals_total", "Reports and uploads refused for a stale fencing token.", m.stale_refusals.load(Ordering::Relaxed));
    counter(&mut s, "farm_jobs_submitted_total", "Jobs stored by this replica.", m.jobs_submitted.load(Ordering::Relaxed));
    counter(&mut s, "farm_prompts_submitted_total", "Prompts stored by this replica.", m.prompts_submitted.load(Ordering::Relaxed));
    counter(&mut s, "farm_dispatch_claims_total", "Claim queries that returned work.", m.dispatch_claims.load(Ordering::Relaxed));
    let _ = writeln!(
        s,
        "# HELP farm_dispatch_latency_seconds_sum Time spent in successful claims.\n# TYPE farm_dispatch_latency_seconds_sum counter\nfarm_dispatch_latency_seconds_sum {}",
        m.dispatch_latency_us_sum.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "# HELP farm_connected_workers Worker sessions on this replica.\n# TYPE farm_connected_workers gauge\nfarm_connected_workers {}",
        shared.sessions.lock().unwrap().len()
    );
    counter(&mut s, "farm_event_publish_failures_total", "Events that could not be published (Redis away).", shared.events.publish_failures.load(Ordering::Relaxed));
    let _ = writeln!(s, "# HELP farm_tasks Tasks by state (queued and running).\n# TYPE farm_tasks gauge");
    // Two counts, so that each reads its own partial index (tasks_queued, tasks_running_job).
    if let Ok((q, r)) = sqlx::query_as::<_, (i64, i64)>(
        "select (select count(*) from tasks where state = 1)::bigint,
                (select count(*) from tasks where state = 2)::bigint",
    )
    .fetch_one(&shared.store.pool)
    .await
    {
        let _ = writeln!(s, "farm_tasks{{state=\"queued\"}} {q}\nfarm_tasks{{state=\"running\"}} {r}");
    }
    s
}

/// Serves `/metrics` over plain HTTP/1.
pub async fn serve_metrics(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(render_metrics(&shared).await)))
                    } else {
                        hyper::Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut incoming = Box::pin(no_delay(TcpListenerStream::new(listener)));
        let accepted = tokio_stream::StreamExt::next(&mut incoming).await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY on the accepted connection");
    }
}
