//! Harness for the end-to-end tests: real PostgreSQL, Redis, coordinators, workers and the `farm`
//! CLI, each a separate process.
//!
//! - Servers: [`PgServer`] and [`RedisServer`] (from `xtask`). `start()` reuses `DATABASE_URL` /
//!   `REDIS_URL` when set (as `cargo xtask test` does) and otherwise starts a throwaway local server;
//!   `start_local()` always starts one, which outage tests need for `stop()` / `kill()` /
//!   `resume()` / `restart()`. [`shared_pg`] and [`shared_redis`] give one server per test binary;
//!   [`fresh_database`] a new database on it for each test.
//! - S3: [`s3_server`] starts a throwaway S3-compatible server ([`MotoServer`], installed on first
//!   use) with one bucket; [`CoordinatorOptions::s3_results`] points a coordinator's `--results` at
//!   it and [`s3_client`] reads the bucket back.
//! - Farm processes: [`Coordinator`], [`Worker`] and [`Cli`] run the workspace's binaries from the
//!   target dir the test binary itself lives in; they are built first (`cargo build --bins`) unless
//!   `FARM_BINS_BUILT` says that already happened.
//! - Every process is killed when its owner is dropped, and dies with the test binary even if that is
//!   killed. Output goes to log files in a temp dir; when a test panics the tails are printed (the
//!   test's captured output shows them) and the directory is kept.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use xtask::paths;
use xtask::torch::TorchEnv;

pub use xtask::moto::MotoServer;
pub use xtask::postgres::PgServer;
pub use xtask::process::{free_port, port_is_open, wait_for_port, wait_until, Process, TempDir};
pub use xtask::redis::RedisServer;

/// How long a coordinator may take to listen after it starts.
pub const COORDINATOR_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Worker arguments for the tiny model on CPU (what the demo and most tests use).
pub const TINY_CPU_WORKER: &[&str] = &[
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--precision",
    "fp32",
    "--max-batch",
    "4",
];

/// A job header asking for 64×64, one-step renders with `model`: what the throughput benchmarks
/// submit, so that the control plane, not rendering, is measured.
pub fn tiny_job_header(name: &str, model: &str) -> farm_proto::pb::SubmitHeader {
    farm_proto::pb::SubmitHeader {
        name: name.into(),
        defaults: Some(farm_proto::pb::RenderParams {
            width: 64,
            height: 64,
            steps: 1,
            model: model.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// Path of the workspace binary `name` (`farm-coordinator`, `farm-worker`, `farm`), built first if
/// needed. Panics if the build fails.
pub fn binary(name: &str) -> PathBuf {
    ensure_built();
    let path = paths::bin(name);
    assert!(
        path.exists(),
        "{} does not exist after building the workspace binaries",
        path.display()
    );
    path
}

/// Builds the farm's binaries once per test process, so tests never run stale ones. Skipped when
/// `FARM_BINS_BUILT` is set (`cargo xtask test` builds them before running the tests) or when
/// `FARM_BIN_DIR` points at binaries built elsewhere.
pub fn ensure_built() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if std::env::var_os("FARM_BINS_BUILT").is_some() || std::env::var_os("FARM_BIN_DIR").is_some() {
            return Ok(());
        }
        eprintln!("farm-tests: cargo build --bins -p farm-coordinator -p farm-worker -p farm");
        let mut build = Command::new(paths::cargo());
        build
            .args([
                "build",
                "--bins",
                "-p",
                "farm-coordinator",
                "-p",
                "farm-worker",
                "-p",
                "farm",
            ])
            .current_dir(paths::repo_root());
        if let Ok(Some(torch)) = TorchEnv::locate() {
            torch.apply(&mut build);
        }
        match build.stdin(Stdio::null()).output() {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "building the farm binaries failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(err) => Err(format!("could not run cargo to build the farm binaries: {err}")),
        }
    });
    if let Err(message) = built {
        panic!("{message}");
    }
}

/// The torch venv, looked up once per test process.
fn torch() -> Option<&'static TorchEnv> {
    static TORCH: OnceLock<Option<TorchEnv>> = OnceLock::new();
    TORCH.get_or_init(|| TorchEnv::locate().ok().flatten()).as_ref()
}

/// `farm-coordinator`, `farm-worker` or `farm` with the environment of [`xtask::farm::command`] and
/// no user CLI config file.
fn farm_command(name: &str) -> Command {
    let mut command = xtask::farm::command(&binary(name), torch());
    command.env(
        "XDG_CONFIG_HOME",
        std::env::temp_dir().join("farm-tests-no-config"),
    );
    command
}

// ---------------------------------------------------------------------------------------------
// Shared servers

static SHARED_PG: OnceLock<PgServer> = OnceLock::new();
static SHARED_REDIS: OnceLock<RedisServer> = OnceLock::new();

/// One PostgreSQL for the whole test binary: `DATABASE_URL`, or a local server started on first use
/// and stopped when the binary exits. Do not stop it; use [`PgServer::start_local`] for outages.
pub fn shared_pg() -> &'static PgServer {
    SHARED_PG.get_or_init(|| {
        let server = PgServer::start().expect("start PostgreSQL for the tests");
        stop_shared_servers_at_exit();
        server
    })
}

/// One Redis for the whole test binary: `REDIS_URL`, or a local server started on first use.
pub fn shared_redis() -> &'static RedisServer {
    SHARED_REDIS.get_or_init(|| {
        let server = RedisServer::start().expect("start Redis for the tests");
        stop_shared_servers_at_exit();
        server
    })
}

/// A fresh S3-compatible server (moto, in memory) on a free port with an empty bucket `bucket`.
/// Stopped when dropped.
pub fn s3_server(bucket: &str) -> MotoServer {
    let server = MotoServer::start().expect("start moto (it is pip-installed on first use)");
    server.create_bucket(bucket).expect("create the bucket");
    server
}

/// An object_store client for `bucket` on `server`, with the same settings a coordinator gets.
pub fn s3_client(server: &MotoServer, bucket: &str) -> object_store::aws::AmazonS3 {
    let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(bucket);
    for (name, value) in server.env() {
        let key = name.to_ascii_lowercase().parse().expect("an AmazonS3Builder setting");
        builder = builder.with_config(key, value);
    }
    builder.build().expect("an S3 client for moto")
}

/// A new, empty database on [`shared_pg`] whose name starts with `prefix`; returns its URL.
pub fn fresh_database(prefix: &str) -> String {
    shared_pg()
        .create_database(prefix)
        .expect("create a test database")
}

/// Statics are never dropped: stop the shared servers (and remove their directories) from atexit.
fn stop_shared_servers_at_exit() {
    extern "C" fn stop_shared_servers() {
        if let Some(server) = SHARED_PG.get() {
            server.shutdown();
        }
        if let Some(server) = SHARED_REDIS.get() {
            server.shutdown();
        }
    }
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe {
            libc::atexit(stop_shared_servers);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Farm processes

/// One farm process (coordinator or worker) that can be killed and started again with the same
/// command line; its log and scratch files live in its own temp dir.
struct Service {
    // Field order matters: the process stops before its directory is removed.
    process: Option<Process>,
    /// `coordinator` or `worker`.
    name: String,
    /// The binary, e.g. `farm-coordinator`.
    binary: &'static str,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// The port it serves on, waited for after every start.
    port: Option<u16>,
    dir: TempDir,
}

impl Service {
    fn new(
        name: &str,
        binary: &'static str,
        env: Vec<(OsString, OsString)>,
        port: Option<u16>,
    ) -> Result<Service> {
        let dir = TempDir::new(&format!("farm-test-{name}"))?;
        Ok(Service {
            process: None,
            name: name.to_owned(),
            binary,
            args: Vec::new(),
            env,
            port,
            dir,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.name))
    }

    fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let mut command = farm_command(self.binary);
        command.args(&self.args);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let process = self
            .process
            .insert(Process::spawn(&self.name, command, &self.log_path())?);
        if let Some(port) = self.port {
            process.wait_for_port(port, COORDINATOR_START_TIMEOUT)?;
        }
        Ok(())
    }

    fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        self.process.as_mut().and_then(Process::kill)
    }

    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.process.as_mut().and_then(|process| process.stop(grace))
    }

    fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if thread::panicking() {
            // The process prints its log's tail when dropped; keep the whole directory to read.
            self.dir.keep();
            eprintln!("farm-tests: kept {} for {}", self.dir.path().display(), self.name);
        }
    }
}

/// How to start a coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub database_url: String,
    /// `--redis-url`; without it the coordinator fans out in-process.
    pub redis_url: Option<String>,
    /// `--results`: a directory in the coordinator's temp dir if unset, or an `s3://` URL (see
    /// [`CoordinatorOptions::s3_results`]).
    pub results_dir: Option<PathBuf>,
    /// The port to listen on (a free one if unset). Replicas each need their own.
    pub port: Option<u16>,
    /// Run `farm-coordinator migrate` before serving (default true).
    pub migrate: bool,
    /// Extra arguments after `serve ...`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl CoordinatorOptions {
    pub fn new(database_url: &str) -> CoordinatorOptions {
        CoordinatorOptions {
            database_url: database_url.to_owned(),
            redis_url: None,
            results_dir: None,
            port: None,
            migrate: true,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn redis(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_owned());
        self
    }

    pub fn results(mut self, dir: impl Into<PathBuf>) -> Self {
        self.results_dir = Some(dir.into());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `--results URL` (`s3://BUCKET/PREFIX`) on `server`, with the `AWS_*` environment that points
    /// the coordinator at it.
    pub fn s3_results(mut self, server: &MotoServer, url: &str) -> Self {
        self.results_dir = Some(PathBuf::from(url));
        self.env.extend(server.env().into_iter().map(|(name, value)| (name.to_owned(), value)));
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn skip_migrate(mut self) -> Self {
        self.migrate = false;
        self
    }

    /// `--tls-cert CERT --tls-key KEY`: the gRPC port speaks TLS only; reach it at
    /// [`Coordinator::https_url`] (the certificate must name 127.0.0.1).
    pub fn tls(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        let (cert, key) = (cert.as_ref().display().to_string(), key.as_ref().display().to_string());
        self.args(["--tls-cert".to_owned(), cert, "--tls-key".to_owned(), key])
    }
}

/// `farm-coordinator serve --listen 127.0.0.1:PORT --database-url .. [--redis-url ..] --results ..`.
pub struct Coordinator {
    service: Service,
    port: u16,
    database_url: String,
    results_dir: PathBuf,
}

impl Coordinator {
    /// Migrates the database (unless told not to), starts the coordinator and waits until it listens.
    pub fn spawn(options: CoordinatorOptions) -> Result<Coordinator> {
        if options.migrate {
            migrate(&options.database_url)?;
        }
        let port = options.port.unwrap_or_else(free_port);
        let env = options.env.iter().map(|(k, v)| (k.into(), v.into())).collect();
        let mut service = Service::new("coordinator", "farm-coordinator", env, Some(port))?;
        let results_dir = options
            .results_dir
            .clone()
            .unwrap_or_else(|| service.dir.path().join("results"));
        let args = &mut service.args;
        args.extend([
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
        ]);
        args.extend(["--database-url".into(), options.database_url.clone().into()]);
        if let Some(redis_url) = &options.redis_url {
            args.extend(["--redis-url".into(), redis_url.into()]);
        }
        args.extend(["--results".into(), results_dir.clone().into()]);
        args.extend(options.args.iter().map(OsString::from));
        service.start()?;
        Ok(Coordinator {
            service,
            port,
            database_url: options.database_url,
            results_dir,
        })
    }

    /// `http://127.0.0.1:PORT`, for clients and workers.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:PORT`, for a coordinator started with [`CoordinatorOptions::tls`].
    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Where this coordinator writes result blobs (`{results}/{job_id}/{index}.{lease_token}.png`): a directory, or
    /// the `s3://` URL it was given.
    pub fn results_dir(&self) -> &Path {
        &self.results_dir
    }

    /// A new token for `tenant` with `role` (`client` or `worker`), in this coordinator's database.
    pub fn token(&self, tenant: &str, role: &str) -> Result<String> {
        create_token(&self.database_url, tenant, role)
    }

    /// Runs `farm-coordinator ARGS... --database-url URL` (the administration subcommands, such as
    /// `token list`) against this coordinator's database.
    #[track_caller]
    pub fn admin(&self, args: &[&str]) -> CliOutput {
        let mut command = farm_command("farm-coordinator");
        command.args(args).arg("--database-url").arg(&self.database_url);
        let out = command.output().unwrap_or_else(|e| panic!("run farm-coordinator {args:?}: {e}"));
        CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A [`Cli`] for this coordinator with a new client token of `tenant`.
    pub fn cli(&self, tenant: &str) -> Result<Cli> {
        Ok(Cli::new(&self.url(), &self.token(tenant, "client")?))
    }

    /// SIGKILL (a crash): no graceful shutdown, streams drop mid-flight.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.service.kill()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.service.stop(grace)
    }

    /// Starts it again (same port, database and arguments) and waits until it listens. Does nothing
    /// while it runs.
    pub fn resume(&mut self) -> Result<()> {
        self.service.start()
    }

    /// [`Coordinator::kill`] then [`Coordinator::resume`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.resume()
    }

    pub fn is_running(&mut self) -> bool {
        self.service.is_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.process.as_ref().map(Process::pid)
    }

    /// Everything it logged, across restarts.
    pub fn log(&self) -> String {
        self.service.log()
    }

    pub fn log_path(&self) -> PathBuf {
        self.service.log_path()
    }
}

/// `farm-coordinator migrate --database-url URL`.
pub fn migrate(database_url: &str) -> Result<()> {
    xtask::farm::migrate(&binary("farm-coordinator"), database_url, torch())
}

/// `farm-coordinator token create --database-url URL --tenant T --role R`: the token it prints.
pub fn create_token(database_url: &str, tenant: &str, role: &str) -> Result<String> {
    xtask::farm::create_token(&binary("farm-coordinator"), database_url, tenant, role, torch())
}

/// `farm-worker --coordinator URL --token T ARGS...`.
pub struct Worker {
    service: Service,
}

impl Worker {
    /// Starts a worker (see [`TINY_CPU_WORKER`] for the usual `args`). It has no port to wait for;
    /// tests observe it through the coordinator.
    pub fn spawn(coordinator_url: &str, token: &str, args: &[&str]) -> Result<Worker> {
        Worker::spawn_with_env(coordinator_url, token, args, &[])
    }

    /// [`Worker::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        coordinator_url: &str,
        token: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Worker> {
        let env = env.iter().map(|(k, v)| (k.into(), v.into())).collect();
        let mut service = Service::new("worker", "farm-worker", env, None)?;
        service
            .args
            .extend(["--coordinator", coordinator_url, "--token", token].map(OsString::from));
        service.args.extend(args.iter().map(OsString::from));
        service.start()?;
        Ok(Worker { service })
    }

    /// SIGKILL (a crash mid-render).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.service.kill()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.service.stop(grace)
    }

    /// Starts it again with the same arguments. Does nothing while it runs.
    pub fn resume(&mut self) -> Result<()> {
        self.service.start()
    }

    /// [`Worker::kill`] then [`Worker::resume`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.resume()
    }

    pub fn is_running(&mut self) -> bool {
        self.service.is_running()
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.service
            .process
            .as_mut()
            .and_then(|process| process.wait_timeout(timeout))
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.process.as_ref().map(Process::pid)
    }

    pub fn log(&self) -> String {
        self.service.log()
    }

    pub fn log_path(&self) -> PathBuf {
        self.service.log_path()
    }

    /// Polls the log until it contains `needle` (e.g. a line saying it registered).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("the worker to log {needle:?}"), timeout, || {
            Ok(self.log().contains(needle))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// CLI

/// The `farm` CLI against one endpoint: `farm --endpoint URL [--token T] ARGS...`.
#[derive(Clone, Debug)]
pub struct Cli {
    endpoint: String,
    token: Option<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
}

/// What a CLI run produced.
#[derive(Clone, Debug)]
pub struct CliOutput {
    /// The exit code; 128 + N when killed by signal N.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Panics (showing both streams) unless the command succeeded; returns self for chaining.
    #[track_caller]
    pub fn expect_success(self) -> CliOutput {
        assert!(
            self.success(),
            "farm exited with {}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The first JSON value on stdout (for `--json` output; `submit --wait --json` prints the
    /// submission, then a line with the final state: see [`CliOutput::json_lines`]). Panics with the
    /// text if there is none.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        self.json_lines()
            .into_iter()
            .next()
            .unwrap_or_else(|| self.no_json("no JSON value"))
    }

    /// Every JSON value on stdout, in order. Panics with the text if stdout is not a JSON stream.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        serde_json::Deserializer::from_str(&self.stdout)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|err| self.no_json(&err.to_string()))
    }

    #[track_caller]
    fn no_json(&self, why: &str) -> ! {
        panic!(
            "farm printed no JSON ({why}):\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        )
    }

    /// `(code, stdout, stderr)`.
    pub fn into_parts(self) -> (i32, String, String) {
        (self.code, self.stdout, self.stderr)
    }
}

impl Cli {
    pub fn new(endpoint: &str, token: &str) -> Cli {
        Cli {
            endpoint: endpoint.to_owned(),
            token: Some(token.to_owned()),
            env: Vec::new(),
            timeout: Duration::from_secs(600),
        }
    }

    /// No `--token` (for authentication tests).
    pub fn without_token(endpoint: &str) -> Cli {
        Cli {
            token: None,
            ..Cli::new(endpoint, "")
        }
    }

    /// An extra environment variable for every run.
    pub fn env(mut self, name: &str, value: &str) -> Cli {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// How long [`Cli::run`] waits before killing the command and panicking (default 600 s).
    pub fn timeout(mut self, timeout: Duration) -> Cli {
        self.timeout = timeout;
        self
    }

    /// The full command line, to run it any other way.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut command = farm_command("farm");
        command.arg("--endpoint").arg(&self.endpoint);
        if let Some(token) = &self.token {
            command.arg("--token").arg(token);
        }
        command.args(args);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs `farm ARGS...` to completion (blocking; see [`Cli::run_async`] inside async tests that
    /// do other things meanwhile).
    #[track_caller]
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> CliOutput {
        self.run_with_stdin(args, b"")
    }

    /// Runs `farm ARGS...` with `input` on stdin.
    #[track_caller]
    pub fn run_with_stdin<S: AsRef<OsStr>>(&self, args: &[S], input: &[u8]) -> CliOutput {
        let mut command = self.command(args);
        let shown = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("start {shown}: {err}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let read_all = |mut stream: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes);
                String::from_utf8_lossy(&bytes).into_owned()
            })
        };
        let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
        let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for farm") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let (stdout, stderr) = (
                    stdout.join().unwrap_or_default(),
                    stderr.join().unwrap_or_default(),
                );
                panic!(
                    "{shown} did not finish within {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
                    self.timeout
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let _ = writer.join();
        let code = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            _ => -1,
        };
        CliOutput {
            code,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }

    /// [`Cli::run`] on tokio's blocking pool, so the test's other futures keep running.
    pub async fn run_async<S: AsRef<OsStr>>(&self, args: &[S]) -> CliOutput {
        let cli = self.clone();
        let args: Vec<OsString> = args.iter().map(|arg| arg.as_ref().to_owned()).collect();
        tokio::task::spawn_blocking(move || cli.run(&args))
            .await
            .expect("the CLI run panicked")
    }

    /// Starts `farm ARGS...` in the background (e.g. a `watch` or a `submit --wait` to interrupt),
    /// output appended to `log`.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S], log: &Path) -> Result<Process> {
        Process::spawn("farm", self.command(args), log)
    }
}
