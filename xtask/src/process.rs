//! Child processes owned by this process, free ports, readiness polling and temporary directories.
//!
//! Background children run in their own process group (a signal reaches a server and everything it
//! forked; Ctrl-C at the terminal reaches only us, so we stop them in order) and carry
//! `PR_SET_PDEATHSIG`, so they are killed even when this process dies without unwinding. Linux sends
//! that signal when the *thread* that forked the child ends, so every background child is forked by
//! one spawner thread that lives as long as the process: test threads come and go, servers stay.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use crate::signal;

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the child-spawner thread");
        requests
    })
}

/// Spawns `command` in its own process group, killed with SIGKILL if this process dies.
pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe; it runs after any credential change added earlier, which
    // would otherwise clear the death signal.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner()
        .send((command, reply))
        .map_err(|_| io::Error::other("the child-spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the child-spawner thread is gone"))?
}

/// A background child with its output appended to a log file. Dropping it stops it (its stop
/// signal, then SIGKILL after a grace period); during a panic the log's tail is printed first.
pub struct Process {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
    log: PathBuf,
    stop_signal: libc::c_int,
}

impl Process {
    /// Starts `command` (stdin closed, stdout and stderr appended to `log`).
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Process> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log {}", log.display()))?;
        writeln!(out, "==== {name}: {command:?}")?;
        let err = out.try_clone()?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = spawn_tied(command).with_context(|| format!("start {name}"))?;
        Ok(Process {
            name: name.to_owned(),
            child,
            exited: None,
            log: log.to_path_buf(),
            stop_signal: libc::SIGTERM,
        })
    }

    /// The signal [`Process::stop`] sends first (SIGTERM unless changed).
    pub fn with_stop_signal(mut self, signal: libc::c_int) -> Process {
        self.stop_signal = signal;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the child has ended, without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `signal` to the child's whole process group (nothing once it has been reaped, when the
    /// id may already belong to someone else).
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.is_running() {
            // SAFETY: plain kill(2) on the group we created for this child.
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), signal);
            }
        }
    }

    /// Waits up to `timeout` for the child to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the whole group and to every descendant that left it (PostgreSQL backends make
    /// themselves group leaders), then reaps the child.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let descendants = if self.is_running() {
            descendants_of(self.child.id())
        } else {
            Vec::new()
        };
        self.signal(libc::SIGKILL);
        for pid in descendants {
            // SAFETY: kill(2); these were our child's descendants a moment ago.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        self.wait_timeout(Duration::from_secs(10))
    }

    /// The stop signal, up to `grace` to end, then SIGKILL. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(self.stop_signal);
        match self.wait_timeout(grace) {
            Some(status) => Some(status),
            None => self.kill(),
        }
    }

    /// Polls until `port` on 127.0.0.1 accepts connections; fails early, with the log's tail, if the
    /// child exits first.
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let name = self.name.clone();
        wait_until(&format!("{name} to listen on 127.0.0.1:{port}"), timeout, || {
            if let Some(status) = self.try_status() {
                bail!(
                    "{name} exited ({}) before listening\n{}",
                    describe(status),
                    self.log_tail(40)
                );
            }
            Ok(port_is_open(port))
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log as text.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, headed with the process name and log path.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "---- {} (last {lines} lines of {}) ----\n{}",
            self.name,
            self.log.display(),
            tail_of_file(&self.log, lines)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
        self.stop(Duration::from_secs(5));
    }
}

/// Starts a server: given its directory and a port, returns the running process once it serves.
pub type Launch<'a> = dyn Fn(&Path, u16) -> Result<Process> + 'a;

/// A server process of ours on a fixed port, with its own directory (log `NAME.log` inside), that
/// can be stopped, killed and started again on the same port and directory from any thread.
pub struct LocalServer {
    // Field order matters: the process stops before its directory is removed.
    process: Mutex<Option<Process>>,
    name: &'static str,
    port: u16,
    /// How long a stop may take before SIGKILL.
    grace: Duration,
    dir: TempDir,
}

impl LocalServer {
    /// Launches the server in `dir` on a free port. A port that was free when picked can be taken
    /// before the server binds it, so "Address already in use" makes it try another, five times.
    pub fn start(name: &'static str, dir: TempDir, grace: Duration, launch: &Launch) -> Result<LocalServer> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port();
            match launch(dir.path(), port) {
                Ok(process) => {
                    return Ok(LocalServer {
                        process: Mutex::new(Some(process)),
                        name,
                        port,
                        grace,
                        dir,
                    });
                }
                Err(err) if format!("{err:#}").contains("Address already in use") => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.expect("five attempts"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where a server named `name` started in `dir` logs.
    pub fn log_path_in(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.log"))
    }

    pub fn log_path(&self) -> PathBuf {
        LocalServer::log_path_in(self.dir.path(), self.name)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.log_path();
        format!(
            "---- {} (last {lines} lines of {}) ----\n{}",
            self.name,
            path.display(),
            tail_of_file(&path, lines)
        )
    }

    /// The process's stop signal, then SIGKILL after the grace period.
    pub fn stop(&self) {
        if let Some(mut process) = self.slot().take() {
            process.stop(self.grace);
        }
    }

    /// SIGKILL.
    pub fn kill(&self) {
        if let Some(mut process) = self.slot().take() {
            process.kill();
        }
    }

    /// Launches it again on the same port and directory unless it is running.
    pub fn resume(&self, launch: &Launch) -> Result<()> {
        let mut slot = self.slot();
        if slot.as_mut().is_some_and(Process::is_running) {
            return Ok(());
        }
        *slot = None;
        *slot = Some(launch(self.dir.path(), self.port)?);
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.slot().as_mut().is_some_and(Process::is_running)
    }

    /// Stops it and removes its directory now (for owners that are never dropped).
    pub fn shutdown(&self) {
        self.stop();
        self.dir.remove();
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Process>> {
        self.process.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The process ids below `root` in the process tree, from `/proc` (empty where there is none).
pub fn descendants_of(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may contain spaces and parentheses, so split after the last ')'.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// "exit code 3" or "signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last `lines` lines of a (possibly large) text file; empty if it cannot be read.
pub fn tail_of_file(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 256 * 1024;
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    if len > WINDOW && file.seek(SeekFrom::Start(len - WINDOW)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed out
/// before (two servers started side by side never get the same one).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral port on 127.0.0.1")
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poison| poison.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_is_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(250),
    )
    .is_ok()
}

/// Polls until 127.0.0.1:`port` accepts connections.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    wait_until(
        &format!("127.0.0.1:{port} to accept connections"),
        timeout,
        || Ok(port_is_open(port)),
    )
}

/// Calls `ready` every 50 ms until it returns true; errors from `ready`, a timeout and Ctrl-C end the wait.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        signal::check()?;
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {:?} waiting for {what}", timeout);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `PYTHON -m pip install REQUIREMENT` without prompts or pip's self-update check; the progress bar
/// only when `progress` is set (off in logs and CI).
pub fn pip_install(python: &Path, requirement: &str, progress: bool) -> Command {
    let mut pip = Command::new(python);
    pip.args(["-m", "pip", "install", "--no-input", "--disable-pip-version-check"]);
    if !progress {
        pip.args(["--progress-bar", "off"]);
    }
    pip.arg(requirement);
    pip
}

/// Runs a short foreground command to completion, capturing its output; a non-zero exit is an error
/// that carries the output.
pub fn run_captured(mut command: Command) -> Result<Output> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {shown}"))?;
    if !output.status.success() {
        return Err(anyhow!(
            "{shown} failed ({})\n{}{}",
            describe(output.status),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

/// A unique name part: process id, a per-process counter and some clock bits.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}_{count}_{:x}", std::process::id(), nanos & 0xff_ffff)
}

/// A directory under the system temp dir, removed (recursively) on drop unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let base = std::env::temp_dir();
        loop {
            let path = base.join(format!("{prefix}-{}", unique_suffix()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path, keep: false }),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err).with_context(|| format!("create {}", path.display())),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place when dropped (for a post-mortem).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Removes the directory now (what drop would do).
    pub fn remove(&self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// An exclusive `flock` on a file, released when dropped.
pub struct FileLock {
    file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("lock {}", path.display()));
        }
        Ok(FileLock { file })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocks the descriptor locked in `acquire`.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_reaches_descendants_that_left_the_group() {
        let dir = TempDir::new("xtask-process-test").unwrap();
        // The grandchild moves into a session of its own, as PostgreSQL backends do.
        let mut command = Command::new("sh");
        command.args(["-c", "setsid sleep 60 & wait"]);
        let mut process = Process::spawn("sh", command, &dir.path().join("sh.log")).unwrap();
        let mut grandchild = None;
        wait_until("the grandchild to start", Duration::from_secs(10), || {
            grandchild = descendants_of(process.pid()).into_iter().next();
            Ok(grandchild.is_some())
        })
        .unwrap();
        process.kill();
        let grandchild = grandchild.unwrap();
        wait_until("the grandchild to die", Duration::from_secs(10), || {
            let stat = fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init.
            Ok(stat.is_empty()
                || stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        })
        .unwrap();
    }
}
