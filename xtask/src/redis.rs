//! A throwaway Redis server (or an external one named by a URL): a random port on 127.0.0.1, no
//! persistence (`--save '' --appendonly no`), so a restart comes back empty, like a real outage of a
//! cache-only Redis.

use std::env;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::{self, LocalServer, Process, TempDir};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `redis-server`: `FARM_REDIS_SERVER`, else PATH, else Debian's `/usr/bin` and `/usr/sbin`.
pub fn find_server_binary() -> Option<PathBuf> {
    if let Some(path) = env::var_os("FARM_REDIS_SERVER") {
        return Some(PathBuf::from(path));
    }
    paths::which("redis-server").or_else(|| {
        [
            "/usr/bin/redis-server",
            "/usr/sbin/redis-server",
            "/usr/local/bin/redis-server",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| paths::is_executable(path))
    })
}

/// A Redis server: started here (stoppable, restartable) or external (`REDIS_URL`).
pub struct RedisServer {
    backend: Backend,
}

enum Backend {
    External { url: String },
    Local(Local),
}

struct Local {
    server: LocalServer,
    binary: PathBuf,
}

impl RedisServer {
    /// The server named by `REDIS_URL` if that is set, else a fresh local one.
    pub fn start() -> Result<RedisServer> {
        match env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => Ok(RedisServer::external(&url)),
            _ => RedisServer::start_local(),
        }
    }

    /// An external server; it cannot be stopped or restarted from here.
    pub fn external(url: &str) -> RedisServer {
        RedisServer {
            backend: Backend::External { url: url.to_owned() },
        }
    }

    /// Always a fresh local server, whatever `REDIS_URL` says (for outage tests).
    pub fn start_local() -> Result<RedisServer> {
        let binary = find_server_binary()
            .context("redis-server not found; run `cargo xtask setup` or `apt-get install redis-server`, or set FARM_REDIS_SERVER")?;
        let server = LocalServer::start(
            "redis",
            TempDir::new("farm-redis")?,
            Duration::from_secs(10),
            &|dir, port| launch(&binary, dir, port),
        )?;
        Ok(RedisServer {
            backend: Backend::Local(Local { server, binary }),
        })
    }

    pub fn url(&self) -> String {
        match &self.backend {
            Backend::External { url } => url.clone(),
            Backend::Local(local) => format!("redis://127.0.0.1:{}", local.server.port()),
        }
    }

    pub fn port(&self) -> Option<u16> {
        match &self.backend {
            Backend::External { .. } => None,
            Backend::Local(local) => Some(local.server.port()),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    /// SIGTERM; nothing is saved. The port stays reserved for [`RedisServer::resume`].
    pub fn stop(&self) -> Result<()> {
        self.local("stop")?.server.stop();
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&self) -> Result<()> {
        self.local("kill")?.server.kill();
        Ok(())
    }

    /// Starts the server again on the same port (empty); returns once it answers PING. Does nothing
    /// if it is running.
    pub fn resume(&self) -> Result<()> {
        let local = self.local("start")?;
        local.server.resume(&|dir, port| launch(&local.binary, dir, port))
    }

    /// [`RedisServer::stop`] then [`RedisServer::resume`].
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.resume()
    }

    pub fn is_running(&self) -> bool {
        match &self.backend {
            Backend::External { .. } => true,
            Backend::Local(local) => local.server.is_running(),
        }
    }

    pub fn log_path(&self) -> Option<PathBuf> {
        match &self.backend {
            Backend::External { .. } => None,
            Backend::Local(local) => Some(local.server.log_path()),
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        match &self.backend {
            Backend::External { .. } => String::new(),
            Backend::Local(local) => local.server.log_tail(lines),
        }
    }

    /// Stops a local server and removes its directory now (for owners that are never dropped).
    pub fn shutdown(&self) {
        if let Backend::Local(local) = &self.backend {
            local.server.shutdown();
        }
    }

    fn local(&self, action: &str) -> Result<&Local> {
        match &self.backend {
            Backend::Local(local) => Ok(local),
            Backend::External { url } => {
                bail!("cannot {action} Redis at {url}: it was not started here (REDIS_URL); use RedisServer::start_local")
            }
        }
    }
}

/// Starts `redis-server` in `dir` on `port` and waits until it answers PING.
fn launch(binary: &Path, dir: &Path, port: u16) -> Result<Process> {
    let mut command = Command::new(binary);
    command
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .args(["--protected-mode", "no", "--logfile", ""])
        .arg("--port")
        .arg(port.to_string())
        .arg("--dir")
        .arg(dir)
        .current_dir(dir);
    let mut server = Process::spawn("redis", command, &LocalServer::log_path_in(dir, "redis"))?;
    process::wait_until(&format!("Redis on 127.0.0.1:{port}"), START_TIMEOUT, || {
        if let Some(status) = server.try_status() {
            bail!(
                "redis-server exited ({}) while starting\n{}",
                process::describe(status),
                server.log_tail(30)
            );
        }
        Ok(answers_ping(port))
    })?;
    Ok(server)
}

/// Whether a Redis server on 127.0.0.1:`port` answers `PING` with `+PONG`.
pub fn answers_ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 16];
        let n = stream.read(&mut reply)?;
        Ok(reply[..n].starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}
