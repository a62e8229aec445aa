//! A throwaway S3-compatible server: `moto` (PyPI's AWS mock, `moto[server]`) on a random port of
//! 127.0.0.1, everything in memory, so each server starts empty. The coordinator's S3 result storage
//! is tested against it, and the deploy topology test stores its results there.
//!
//! moto lives in its own small venv, `$FARM_MOTO_VENV` or `<cache>/newbie-farm/moto-venv` (see
//! [`paths::cache_dir`]), installed on first use with `pip install moto[server]==MOTO_VERSION`. A
//! stamp file inside the venv records the installed version; a file lock keeps two test binaries
//! from installing at once.

use std::env;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::{self, FileLock, LocalServer, Process, TempDir};

/// The moto release the tests are written against.
pub const MOTO_VERSION: &str = "5.2.5";

/// Credentials and region handed to clients of a local server (moto accepts any).
pub const ACCESS_KEY_ID: &str = "farm-test";
pub const SECRET_ACCESS_KEY: &str = "farm-test-secret";
pub const REGION: &str = "us-east-1";

const STAMP: &str = ".farm-moto";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The venv: `FARM_MOTO_VENV`, else `<cache>/newbie-farm/moto-venv`.
pub fn venv_dir() -> PathBuf {
    env::var_os("FARM_MOTO_VENV")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::cache_dir().join("moto-venv"))
}

fn python(venv: &Path) -> PathBuf {
    venv.join("bin/python")
}

/// Whether the venv holds the pinned moto (by its stamp; nothing is run).
pub fn is_installed(venv: &Path) -> bool {
    python(venv).exists()
        && fs::read_to_string(venv.join(STAMP)).is_ok_and(|text| text.trim() == MOTO_VERSION)
}

/// Makes sure the venv holds `moto[server]==MOTO_VERSION`; returns the venv and whether anything
/// was installed. Creates the venv with `$FARM_PYTHON` (default `python3`) when it is missing.
pub fn ensure_installed() -> Result<(PathBuf, bool)> {
    let venv = venv_dir();
    if is_installed(&venv) {
        return Ok((venv, false));
    }
    let parent = venv.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let _lock = FileLock::acquire(&parent.join("moto-venv.lock"))?;
    // Someone else may have installed it while we waited for the lock.
    if is_installed(&venv) {
        return Ok((venv, false));
    }
    let _ = fs::remove_file(venv.join(STAMP));
    let pip_works = Command::new(python(&venv))
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !pip_works {
        if venv.exists() {
            fs::remove_dir_all(&venv)
                .with_context(|| format!("remove broken venv {}", venv.display()))?;
        }
        let base_python = env::var("FARM_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut create = Command::new(&base_python);
        create.args(["-m", "venv"]).arg(&venv);
        process::run_captured(create).with_context(|| {
            format!(
                "creating the moto venv {} (on Debian `apt-get install python3-venv`, which `cargo xtask setup` does)",
                venv.display()
            )
        })?;
    }
    eprintln!(
        "xtask: pip install moto[server]=={MOTO_VERSION} into {}",
        venv.display()
    );
    let pip = process::pip_install(&python(&venv), &format!("moto[server]=={MOTO_VERSION}"), false);
    process::run_captured(pip).context("installing moto")?;
    let probe = Command::new(python(&venv))
        .args(["-c", "import moto.server, moto; print(moto.__version__)"])
        .output()
        .context("run the moto venv's python")?;
    let version = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
    if !probe.status.success() || version != MOTO_VERSION {
        bail!(
            "moto in {} reports {version:?}, expected {MOTO_VERSION}\n{}",
            venv.display(),
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    fs::write(venv.join(STAMP), MOTO_VERSION)
        .with_context(|| format!("write the stamp in {}", venv.display()))?;
    Ok((venv, true))
}

/// A moto server of ours (installed first when missing). Stopped when dropped.
pub struct MotoServer {
    server: LocalServer,
    venv: PathBuf,
}

impl MotoServer {
    /// Installs moto if needed and starts a fresh, empty server on a free port.
    pub fn start() -> Result<MotoServer> {
        let (venv, _) = ensure_installed()?;
        let server = LocalServer::start(
            "moto",
            TempDir::new("farm-moto")?,
            Duration::from_secs(5),
            &|dir, port| launch(&venv, dir, port),
        )?;
        Ok(MotoServer { server, venv })
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// `http://127.0.0.1:PORT`: the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The environment an S3 client (the coordinator's `AmazonS3Builder::from_env`) needs to use this
    /// server: static credentials, region, endpoint, plain HTTP allowed.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }

    /// Creates a bucket (`PUT /NAME`); fails unless the server answers 200.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        let (status, body) = http(self.port(), "PUT", &format!("/{name}"))?;
        if status != 200 {
            bail!("creating bucket {name} on moto: HTTP {status}\n{body}");
        }
        Ok(())
    }

    /// `GET PATH` (unsigned; moto does not check signatures): the status code and the body, e.g.
    /// `/BUCKET?uploads` for the multipart uploads still open.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http(self.port(), "GET", path)
    }

    /// Starts it again on the same port (empty) unless it is running.
    pub fn resume(&self) -> Result<()> {
        self.server
            .resume(&|dir, port| launch(&self.venv, dir, port))
    }

    pub fn stop(&self) {
        self.server.stop();
    }

    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    pub fn log_path(&self) -> PathBuf {
        self.server.log_path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }

    /// Stops it and removes its directory now (for owners that are never dropped).
    pub fn shutdown(&self) {
        self.server.shutdown();
    }
}

/// Starts `python -m moto.server` on 127.0.0.1:`port` and waits until it answers HTTP.
fn launch(venv: &Path, dir: &Path, port: u16) -> Result<Process> {
    let mut command = Command::new(python(venv));
    command
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .current_dir(dir)
        .env("PYTHONUNBUFFERED", "1");
    let mut server = Process::spawn("moto", command, &LocalServer::log_path_in(dir, "moto"))?;
    process::wait_until(&format!("moto on 127.0.0.1:{port}"), START_TIMEOUT, || {
        if let Some(status) = server.try_status() {
            bail!(
                "moto exited ({}) while starting\n{}",
                process::describe(status),
                server.log_tail(30)
            );
        }
        Ok(http(port, "GET", "/").is_ok_and(|(status, _)| status == 200))
    })?;
    Ok(server)
}

/// One HTTP/1.1 request without a body; returns the status code and the body.
fn http(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP reply: {reply:?}"))?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
