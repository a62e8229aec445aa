//! A throwaway PostgreSQL server (or an external one named by a URL).
//!
//! A local server lives in a fresh temporary directory: `initdb` with trust authentication, a random
//! port on 127.0.0.1, its unix socket inside the temp dir, durability switched off (fsync,
//! synchronous_commit, full_page_writes) because nothing in it outlives the run. PostgreSQL refuses
//! to run as root, so under root the server runs as the `postgres` user (`nobody` if there is none).

use std::env;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::{self, LocalServer, Process, TempDir};

/// The superuser every local server is initialised with.
pub const SUPERUSER: &str = "postgres";

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding `initdb`, `postgres`, `pg_ctl`, `pg_isready` and `psql`: `FARM_PG_BIN`, else
/// the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else wherever `initdb` is on PATH.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("FARM_PG_BIN").map(PathBuf::from) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()?;
            let bin = entry.path().join("bin");
            (paths::is_executable(&bin.join("initdb")) && paths::is_executable(&bin.join("postgres")))
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    paths::which("initdb").and_then(|initdb| initdb.parent().map(Path::to_path_buf))
}

/// A PostgreSQL server: started here (stoppable, restartable) or external (`DATABASE_URL`).
pub struct PgServer {
    backend: Backend,
}

enum Backend {
    External { url: String },
    Local(Box<Local>),
}

struct Local {
    server: LocalServer,
    setup: Setup,
}

/// What starting the server again needs.
struct Setup {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<(libc::uid_t, libc::gid_t)>,
}

impl PgServer {
    /// The server named by `DATABASE_URL` if that is set, else a fresh local one.
    pub fn start() -> Result<PgServer> {
        match env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Ok(PgServer::external(&url)),
            _ => PgServer::start_local(),
        }
    }

    /// An external server; it cannot be stopped or restarted from here.
    pub fn external(url: &str) -> PgServer {
        PgServer {
            backend: Backend::External { url: url.to_owned() },
        }
    }

    /// Always a fresh local server, whatever `DATABASE_URL` says (for outage tests).
    pub fn start_local() -> Result<PgServer> {
        let bin_dir = find_bin_dir().context(
            "no PostgreSQL server binaries (initdb) found under /usr/lib/postgresql/*/bin or on PATH; \
             run `cargo xtask setup` or `apt-get install postgresql`, or set FARM_PG_BIN",
        )?;
        let dir = TempDir::new("farm-pg")?;
        // The server's own files sit one level down, owned by the account it runs as; the top level
        // (our logs) stays ours but must be traversable for that account.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let run_as = server_account()?;
        let server_root = dir.path().join("server");
        let data_dir = server_root.join("data");
        let socket_dir = server_root.join("socket");
        fs::create_dir(&server_root)?;
        fs::create_dir(&socket_dir)?;
        if let Some((uid, gid)) = run_as {
            chown(&server_root, uid, gid)?;
            chown(&socket_dir, uid, gid)?;
        }

        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("--pgdata")
            .arg(&data_dir)
            .args([
                "--username",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .current_dir(dir.path());
        drop_privileges(&mut initdb, run_as);
        process::run_captured(initdb).context("initdb")?;

        let setup = Setup {
            bin_dir,
            data_dir,
            socket_dir,
            run_as,
        };
        // SIGINT is PostgreSQL's "fast shutdown": sessions are disconnected, a checkpoint is written.
        let server = LocalServer::start("postgres", dir, Duration::from_secs(30), &|dir, port| {
            setup.launch(dir, port)
        })?;
        Ok(PgServer {
            backend: Backend::Local(Box::new(Local { server, setup })),
        })
    }

    /// The maintenance URL (database `postgres`).
    pub fn url(&self) -> String {
        match &self.backend {
            Backend::External { url } => url.clone(),
            Backend::Local(local) => format!(
                "postgres://{SUPERUSER}@127.0.0.1:{}/postgres",
                local.server.port()
            ),
        }
    }

    /// The URL of database `name` on this server (same credentials and options as [`PgServer::url`]).
    pub fn url_for(&self, name: &str) -> String {
        with_database(&self.url(), name)
    }

    /// The TCP port of a local server.
    pub fn port(&self) -> Option<u16> {
        match &self.backend {
            Backend::External { .. } => None,
            Backend::Local(local) => Some(local.server.port()),
        }
    }

    /// Whether this server was started here (and so can be stopped and restarted).
    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    /// Creates a database whose name starts with `prefix` and is unique (so tests never collide,
    /// even on a long-lived external server) and returns its URL.
    pub fn create_database(&self, prefix: &str) -> Result<String> {
        let mut stem: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        if !stem.starts_with(|c: char| c.is_ascii_lowercase()) {
            stem.insert_str(0, "db_");
        }
        self.create_named_database(&format!("{stem}_{}", process::unique_suffix()))
    }

    /// Creates database `name` exactly (an error if it exists) and returns its URL.
    pub fn create_named_database(&self, name: &str) -> Result<String> {
        let valid = name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            bail!(
                "database name {name:?} must be lowercase letters, digits and underscores, at most 63 bytes"
            );
        }
        self.psql(&format!("create database \"{name}\""))
            .with_context(|| format!("create database {name}"))?;
        Ok(self.url_for(name))
    }

    /// Runs one SQL command on the maintenance database with `psql` and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = match &self.backend {
            Backend::Local(local) => local.setup.bin_dir.join("psql"),
            Backend::External { .. } => find_bin_dir()
                .map(|dir| dir.join("psql"))
                .filter(|psql| psql.exists())
                .unwrap_or_else(|| PathBuf::from("psql")),
        };
        let mut command = Command::new(psql);
        command
            .args([
                "--no-psqlrc",
                "--quiet",
                "--no-align",
                "--tuples-only",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg("--dbname")
            .arg(self.url())
            .arg("--command")
            .arg(sql);
        let output = process::run_captured(command)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Fast shutdown (SIGINT: sessions are disconnected, a checkpoint is written). Data and port stay.
    pub fn stop(&self) -> Result<()> {
        self.local("stop")?.server.stop();
        Ok(())
    }

    /// Crash: SIGKILL to the postmaster and every backend. The next start runs crash recovery.
    pub fn kill(&self) -> Result<()> {
        self.local("kill")?.server.kill();
        Ok(())
    }

    /// Starts the server again after [`PgServer::stop`] or [`PgServer::kill`], on the same port and
    /// data directory; returns once it accepts connections. Does nothing if it is running.
    pub fn resume(&self) -> Result<()> {
        let local = self.local("start")?;
        local.server.resume(&|dir, port| local.setup.launch(dir, port))
    }

    /// [`PgServer::stop`] then [`PgServer::resume`].
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.resume()
    }

    /// Whether a local server's process is running (external servers: always true).
    pub fn is_running(&self) -> bool {
        match &self.backend {
            Backend::External { .. } => true,
            Backend::Local(local) => local.server.is_running(),
        }
    }

    /// The server log of a local server.
    pub fn log_path(&self) -> Option<PathBuf> {
        match &self.backend {
            Backend::External { .. } => None,
            Backend::Local(local) => Some(local.server.log_path()),
        }
    }

    /// The last `lines` lines of the server log (empty for an external server).
    pub fn log_tail(&self, lines: usize) -> String {
        match &self.backend {
            Backend::External { .. } => String::new(),
            Backend::Local(local) => local.server.log_tail(lines),
        }
    }

    /// Stops a local server and removes its directory now (for owners that are never dropped,
    /// such as a process-wide shared server).
    pub fn shutdown(&self) {
        if let Backend::Local(local) = &self.backend {
            local.server.shutdown();
        }
    }

    fn local(&self, action: &str) -> Result<&Local> {
        match &self.backend {
            Backend::Local(local) => Ok(local),
            Backend::External { url } => {
                bail!("cannot {action} PostgreSQL at {url}: it was not started here (DATABASE_URL); use PgServer::start_local")
            }
        }
    }
}

impl Setup {
    /// Starts `postgres` in `dir` on `port` and waits until it accepts connections.
    fn launch(&self, dir: &Path, port: u16) -> Result<Process> {
        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .current_dir(dir);
        for setting in [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
            "unix_socket_permissions=0777",
        ] {
            command.arg("-c").arg(setting);
        }
        drop_privileges(&mut command, self.run_as);
        let log = LocalServer::log_path_in(dir, "postgres");
        let mut server = Process::spawn("postgres", command, &log)?.with_stop_signal(libc::SIGINT);
        let ready = process::wait_until(&format!("PostgreSQL on 127.0.0.1:{port}"), START_TIMEOUT, || {
            if let Some(status) = server.try_status() {
                bail!(
                    "postgres exited ({}) while starting\n{}",
                    process::describe(status),
                    server.log_tail(30)
                );
            }
            // pg_isready: 0 accepting, 1 still starting or recovering, 2 no answer yet.
            let status = Command::new(self.bin_dir.join("pg_isready"))
                .args([
                    "--quiet",
                    "--host",
                    "127.0.0.1",
                    "--username",
                    SUPERUSER,
                    "--dbname",
                    "postgres",
                    "--timeout",
                    "2",
                ])
                .arg("--port")
                .arg(port.to_string())
                .stdin(std::process::Stdio::null())
                .status()
                .context("run pg_isready")?;
            Ok(status.success())
        });
        ready.map(|()| server)
    }
}

/// `url` with its database (path) replaced by `name`, query string kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Under root: the account the server runs as (`postgres`, else `nobody`). Otherwise none (run as we are).
fn server_account() -> Result<Option<(libc::uid_t, libc::gid_t)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(ids) = lookup_user(name) {
            return Ok(Some(ids));
        }
    }
    bail!("running as root and neither a `postgres` nor a `nobody` account exists; PostgreSQL refuses to run as root")
}

fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let name = CString::new(name).ok()?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r writes only into `entry` and `buffer`, both sized as passed.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        );
        (rc == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
    }
}

fn chown(path: &Path, uid: libc::uid_t, gid: libc::gid_t) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))
}

/// Makes `command` switch to `run_as` between fork and exec.
fn drop_privileges(command: &mut Command, run_as: Option<(libc::uid_t, libc::gid_t)>) {
    if let Some((uid, gid)) = run_as {
        // SAFETY: setgroups/setgid/setuid are async-signal-safe and touch only the child.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_urls_keep_credentials_and_options() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres", "x"),
            "postgres://u:p@h:5/x"
        );
        assert_eq!(
            with_database("postgres://h:5/postgres?sslmode=disable", "x"),
            "postgres://h:5/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:5", "x"), "postgres://h:5/x");
        assert_eq!(with_database("postgres://h:5?a=b", "x"), "postgres://h:5/x?a=b");
    }
}
