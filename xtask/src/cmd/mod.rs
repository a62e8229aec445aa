//! The subcommands.

pub mod demo;
pub mod deploy_check;
pub mod fuzz;
pub mod setup;
pub mod test;

use std::process::{Command, ExitCode, ExitStatus};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use xtask::paths;
use xtask::postgres::PgServer;
use xtask::process::{self, Process};
use xtask::redis::RedisServer;
use xtask::signal;
use xtask::torch::TorchEnv;

/// `cargo <args>` at the workspace root with the torch environment.
pub fn cargo(torch: &TorchEnv, args: &[&str]) -> Command {
    let mut command = Command::new(paths::cargo());
    command.args(args).current_dir(paths::repo_root());
    torch.apply(&mut command);
    command
}

/// Runs a foreground command (inheriting the terminal) to its end. On Ctrl-C the terminal already
/// signalled it; on SIGTERM to us it is passed on, then SIGKILL after 15 s.
pub fn run_foreground(mut command: Command) -> Result<ExitStatus> {
    let shown = format!("{command:?}");
    let mut child = command.spawn().with_context(|| format!("start {shown}"))?;
    let mut forwarded_at = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if signal::interrupted() {
            let since = *forwarded_at.get_or_insert_with(|| {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                std::time::Instant::now()
            });
            if since.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a foreground command and fails unless it succeeds.
pub fn run_checked(command: Command) -> Result<()> {
    let shown = format!("{:?}", command.get_program());
    let status = run_foreground(command)?;
    signal::check()?;
    anyhow::ensure!(
        status.success(),
        "{} failed ({})",
        shown.trim_matches('"'),
        process::describe(status)
    );
    Ok(())
}

/// `cargo xtask env`.
pub fn env() -> Result<ExitCode> {
    let torch = TorchEnv::locate()?.context("no torch venv yet: run `cargo xtask setup` first")?;
    print!("{}", torch.shell_exports());
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask build`: set-up, then every binary of the workspace (dev profile).
pub fn build() -> Result<TorchEnv> {
    let torch = setup::run()?;
    build_bins(&torch)?;
    Ok(torch)
}

pub fn build_bins(torch: &TorchEnv) -> Result<()> {
    println!("xtask: cargo build --workspace --bins");
    run_checked(cargo(torch, &["build", "--workspace", "--bins"]))
}

/// `cargo xtask services`: PostgreSQL and Redis until Ctrl-C.
pub fn services() -> Result<ExitCode> {
    setup::run()?;
    let pg = PgServer::start_local()?;
    let redis = RedisServer::start_local()?;
    println!("PostgreSQL and Redis are running; Ctrl-C stops them.");
    println!("export DATABASE_URL={}", pg.url());
    println!("export REDIS_URL={}", redis.url());
    if let (Some(pg_log), Some(redis_log)) = (pg.log_path(), redis.log_path()) {
        println!("logs: {} {}", pg_log.display(), redis_log.display());
    }
    wait_for_interrupt(&[
        ("postgres", &|| pg.is_running()),
        ("redis", &|| redis.is_running()),
    ])?;
    println!("\nstopping");
    Ok(ExitCode::SUCCESS)
}

/// Sleeps until Ctrl-C; fails if one of the watched processes stops first.
pub fn wait_for_interrupt(watched: &[(&str, &dyn Fn() -> bool)]) -> Result<()> {
    while !signal::interrupted() {
        for (name, running) in watched {
            anyhow::ensure!(running(), "{name} stopped unexpectedly");
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Prints the tails of the logs of `processes` (after a failure).
pub fn print_log_tails(processes: &[&Process]) {
    for process in processes {
        eprintln!("{}", process.log_tail(40));
    }
}
