//! `farm-coordinator`: serve, migrate, and manage tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use farm_coordinator::{auth, server};

#[derive(Parser)]
#[command(name = "farm-coordinator", version, about = "Coordinator of the NewBie-image render farm")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the job and worker gRPC APIs (plus health and reflection).
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token (and its tenant if new); prints the token, which is not stored in clear.
    Create {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Tenant the token belongs to.
        #[arg(long)]
        tenant: String,
        /// client (job API), worker (worker API) or admin (both).
        #[arg(long, default_value = "client")]
        role: String,
        /// Free-form label kept with the token.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List tokens (id, tenant, role, label, created, revoked); the tokens themselves are not stored.
    List {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Only this tenant's tokens.
        #[arg(long)]
        tenant: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: every replica refuses it within its --auth-cache-ms (30 s by default), and a
    /// worker session open with it ends at its next heartbeat after that.
    Revoke {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// The token (farm_...) or its id from `token list` (at least 8 hex digits).
        token_or_id: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the gRPC listener.
    #[arg(long, env = "FARM_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Name of this replica in ListWorkers (`coordinator`) and in the workers' welcome [default: the
    /// listen address, or HOSTNAME:PORT when it listens on every interface]
    #[arg(long, env = "FARM_REPLICA_NAME", value_name = "NAME")]
    replica_name: Option<String>,
    /// PostgreSQL URL (the job store).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Redis URL for cross-replica events; without it events stay in this process.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Where results are stored: a local directory (or file:// URL), or s3://BUCKET[/PREFIX] for
    /// S3-compatible object storage.
    ///
    /// For s3:// the connection comes from the standard AWS environment: AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN for temporary credentials), AWS_REGION (default
    /// us-east-1), AWS_ENDPOINT or AWS_ENDPOINT_URL for S3-compatible servers other than AWS (MinIO,
    /// Ceph, ...), AWS_ALLOW_HTTP=true when that endpoint is plain http://, and
    /// AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true for bucket-in-hostname addressing (path style otherwise
    /// with a custom endpoint). The bucket must exist: it is listed once at start. Results up to 8 MiB
    /// are written with one PUT after their size and SHA-256 are checked; larger ones go through a
    /// multipart upload to PREFIX/.tmp/ and are copied into place.
    #[arg(long, env = "FARM_RESULTS", default_value = "./results")]
    results: String,
    /// Memory all results being uploaded may hold together (MiB), local directory storage: results
    /// up to 8 MiB are buffered and written in one go; once this is used up, further ones are
    /// written through a temporary file as they arrive.
    #[arg(long, env = "FARM_RESULTS_MEMORY_MIB", default_value_t = 256)]
    results_memory_mib: usize,
    /// Address of the Prometheus /metrics endpoint (off when not set).
    #[arg(long, env = "FARM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Lease time-to-live in milliseconds; heartbeats renew it.
    #[arg(long, env = "FARM_LEASE_TTL_MS", default_value_t = 15_000)]
    lease_ttl_ms: u64,
    /// On SIGTERM/SIGINT: how long, in seconds, calls in flight (uploads, submissions) may take to
    /// end before the coordinator exits; worker sessions and watches, which never end by
    /// themselves, are then dropped (workers reconnect to another replica and keep their leases).
    /// Keep it below the supervisor's stop timeout (30 s in the shipped units and manifests).
    #[arg(long, env = "FARM_SHUTDOWN_GRACE_S", default_value_t = 10)]
    shutdown_grace_s: u64,
    /// Heartbeat interval asked of workers, in milliseconds.
    #[arg(long, env = "FARM_HEARTBEAT_MS", default_value_t = 5_000)]
    heartbeat_ms: u64,
    /// How often an idle dispatch loop polls for work, in milliseconds (wake-ups make it rarely matter).
    #[arg(long, env = "FARM_IDLE_POLL_MS", default_value_t = 500)]
    idle_poll_ms: u64,
    /// Connections in the PostgreSQL pool.
    #[arg(long, env = "FARM_DB_POOL", default_value_t = 32)]
    db_pool: u32,
    /// How long a token lookup is cached, in milliseconds: a revoked token is refused within it, by
    /// new calls and by open worker sessions (checked on each heartbeat).
    #[arg(long, env = "FARM_AUTH_CACHE_MS", default_value_t = 30_000)]
    auth_cache_ms: u64,
    /// Most prompts one job may hold, 1 to 1,000,000 (the protocol's ceiling, which `farm submit`
    /// also checks before sending); a larger submission is refused with this limit named, and the
    /// coordinator stops reading it at the first prompt past the limit.
    #[arg(long, env = "FARM_MAX_PROMPTS_PER_JOB", default_value_t = farm_proto::limits::MAX_PROMPTS_PER_JOB,
          value_parser = clap::value_parser!(u64).range(1..=farm_proto::limits::MAX_PROMPTS_PER_JOB))]
    max_prompts_per_job: u64,
    /// Longest wait between two messages of a submission, in seconds; a stream quiet for longer
    /// before its end marker is refused (ABORTED, nothing stored), so a stalled client does not
    /// hold a database connection; after the end marker the submission is stored.
    #[arg(long, env = "FARM_SUBMIT_IDLE_TIMEOUT_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    submit_idle_timeout_s: u64,
    /// Longest time, in seconds, a submission may go without a prompt while it sends empty chunks
    /// (`farm submit` sends one every 15 s while its input, a slow pipe, is quiet); past it the
    /// submission is refused (ABORTED, nothing stored), so quiet submissions cannot hold the
    /// replica's turns and database connections for ever.
    #[arg(long, env = "FARM_SUBMIT_QUIET_LIMIT_S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    submit_quiet_limit_s: u64,
    /// Submissions stored at once by this replica (each holds a database connection while its
    /// prompts stream in); more wait up to 30 s for a turn, then are refused as UNAVAILABLE.
    #[arg(long, env = "FARM_MAX_CONCURRENT_SUBMISSIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_submissions: u32,
    /// PEM certificate chain (leaf first) for TLS on the gRPC listener; with --tls-key the listener
    /// speaks TLS only. The metrics endpoint stays plain HTTP.
    #[arg(long, env = "FARM_TLS_CERT", requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FARM_TLS_KEY", requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Migrate { database_url } => {
            let pool = server::connect_db(&database_url, 2).await?;
            server::MIGRATOR.run(&pool).await.context("migrating")?;
            eprintln!("migrations applied");
        }
        Cmd::Token { cmd: TokenCmd::Create { database_url, tenant, role, label } } => {
            let role = auth::Role::parse(&role).context("--role must be client, worker or admin")?;
            let pool = server::connect_db(&database_url, 2).await?;
            server::MIGRATOR.run(&pool).await.context("migrating")?;
            let token = auth::create_token(&pool, &tenant, role, &label).await?;
            println!("{token}");
        }
        // Listing and revoking read and write api_tokens only: they leave the schema as it is.
        Cmd::Token { cmd: TokenCmd::List { database_url, tenant, json } } => {
            let pool = server::connect_db(&database_url, 2).await?;
            let tokens = auth::list_tokens(&pool, tenant.as_deref()).await?;
            if json {
                for t in &tokens {
                    println!("{}", serde_json::to_string(t)?);
                }
            } else {
                println!("{:<12}  {:<16}  {:<6}  {:<20}  {:<20}  label", "id", "tenant", "role", "created", "revoked");
                let time = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
                for t in &tokens {
                    let revoked = t.revoked_at.as_ref().map(time).unwrap_or_else(|| "-".into());
                    println!("{:<12}  {:<16}  {:<6}  {:<20}  {:<20}  {}", t.id, t.tenant, t.role, time(&t.created_at), revoked, t.label);
                }
            }
        }
        Cmd::Token { cmd: TokenCmd::Revoke { database_url, token_or_id } } => {
            let pool = server::connect_db(&database_url, 2).await?;
            let t = auth::revoke_token(&pool, &token_or_id).await?;
            println!("revoked token {} of tenant {} (role {})", t.id, t.tenant, t.role);
        }
        Cmd::Serve(a) => {
            // Each submission being stored holds a connection; dispatch needs the others.
            let max_concurrent_submissions = if a.max_concurrent_submissions >= a.db_pool {
                let lowered = (a.db_pool / 2).max(1);
                tracing::warn!(
                    max_concurrent_submissions = a.max_concurrent_submissions,
                    db_pool = a.db_pool,
                    lowered,
                    "--max-concurrent-submissions must be below --db-pool; lowered to half the pool"
                );
                lowered
            } else {
                a.max_concurrent_submissions
            };
            if a.lease_ttl_ms < 2 * a.heartbeat_ms {
                anyhow::bail!("--lease-ttl-ms must be at least twice --heartbeat-ms");
            }
            // Checked before anything else starts, so a bad file fails the start at once.
            let tls = match (&a.tls_cert, &a.tls_key) {
                (Some(cert), Some(key)) => Some(server::load_tls(cert, key)?),
                _ => None,
            };
            let opts = server::ServeOptions {
                database_url: a.database_url,
                redis_url: a.redis_url,
                results: a.results,
                results_memory_bytes: a.results_memory_mib.saturating_mul(1 << 20),
                lease_ttl: Duration::from_millis(a.lease_ttl_ms),
                heartbeat_interval: Duration::from_millis(a.heartbeat_ms),
                idle_poll: Duration::from_millis(a.idle_poll_ms),
                db_pool_size: a.db_pool,
                auth_cache: Duration::from_millis(a.auth_cache_ms),
                metrics_listen: a.metrics_listen,
                max_prompts_per_job: a.max_prompts_per_job,
                submit_idle_timeout: Duration::from_secs(a.submit_idle_timeout_s),
                submit_quiet_limit: Duration::from_secs(a.submit_quiet_limit_s),
                max_concurrent_submissions,
            };
            let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
            let addr = listener.local_addr()?;
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
            let replica = replica_name(a.replica_name.as_deref(), addr, hostname.as_deref());
            let shared = server::build(&opts, replica).await?;
            if let Some(m) = opts.metrics_listen {
                let s = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = server::serve_metrics(m, s).await {
                        tracing::error!(error = %e, "metrics endpoint failed");
                    }
                });
            }
            tracing::info!(%addr, redis = opts.redis_url.is_some(), tls = tls.is_some(), "coordinator listening");
            server::run(listener, shared, tls, shutdown_signal(), Duration::from_secs(a.shutdown_grace_s)).await?;
            tracing::info!("coordinator stopped");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The replica's name: the one given, else the bound address, or `HOSTNAME:PORT` when the
/// listener is bound to every interface (so that replicas started from one configuration,
/// all on 0.0.0.0, tell themselves apart).
fn replica_name(given: Option<&str>, addr: SocketAddr, hostname: Option<&str>) -> String {
    if let Some(name) = given.map(str::trim).filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    match hostname.map(str::trim).filter(|h| !h.is_empty()) {
        Some(host) if addr.ip().is_unspecified() => format!("{host}:{}", addr.port()),
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::replica_name;

    #[test]
    fn replicas_on_every_interface_are_named_by_host() {
        let any = "0.0.0.0:50051".parse().unwrap();
        assert_eq!(replica_name(None, any, Some("coord-7f9c\n")), "coord-7f9c:50051");
        assert_eq!(replica_name(None, any, None), "0.0.0.0:50051");
        assert_eq!(replica_name(Some("east-1"), any, Some("coord-7f9c")), "east-1");
        let local = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(replica_name(None, local, Some("box")), "127.0.0.1:4000");
        assert_eq!(replica_name(Some(" "), local, Some("box")), "127.0.0.1:4000");
    }
}
