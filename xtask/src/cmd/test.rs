//! `cargo xtask test`: the whole test run, as CI does it (`.ci/run`).
//!
//! Builds every binary first (the end-to-end tests run them as processes), starts PostgreSQL and
//! Redis unless `DATABASE_URL` / `REDIS_URL` name existing ones, runs the workspace's tests with
//! those URLs, then every executable in `.ci/checks/` (in name order, same environment) and the
//! deploy check (`cargo xtask deploy-check`). The exit code is the tests' exit code, or 1 if only a
//! check failed.

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Result;
use xtask::paths;
use xtask::postgres::PgServer;
use xtask::process;
use xtask::redis::RedisServer;
use xtask::signal;

use super::{build_bins, cargo, run_foreground, setup};

pub fn run(extra_args: &[String]) -> Result<ExitCode> {
    let torch = setup::run()?;
    build_bins(&torch)?;

    let pg = PgServer::start()?;
    let redis = RedisServer::start()?;
    let origin = |local: bool| {
        if local {
            "started for this run"
        } else {
            "from the environment"
        }
    };
    println!("xtask: DATABASE_URL={} ({})", pg.url(), origin(pg.is_local()));
    println!("xtask: REDIS_URL={} ({})", redis.url(), origin(redis.is_local()));
    let test_env: Vec<(&str, OsString)> = vec![
        ("DATABASE_URL", pg.url().into()),
        ("REDIS_URL", redis.url().into()),
        ("FARM_GOLDENS_DIR", paths::goldens_dir().into()),
        // The binaries were just built: the harness need not run cargo build itself.
        ("FARM_BINS_BUILT", "1".into()),
    ];

    let mut tests = if std::env::var("FARM_TEST_RUNNER").as_deref() == Ok("nextest") {
        cargo(&torch, &["nextest", "run", "--workspace", "--no-fail-fast"])
    } else {
        cargo(&torch, &["test", "--workspace", "--no-fail-fast"])
    };
    tests.args(extra_args).envs(test_env.iter().cloned());
    println!("xtask: {:?}", tests.get_args().collect::<Vec<_>>());
    let status = run_foreground(tests)?;
    signal::check()?;
    if !pg.is_running() || !redis.is_running() {
        eprintln!(
            "xtask: a shared server died during the tests\n{}\n{}",
            pg.log_tail(40),
            redis.log_tail(40)
        );
    }

    let mut failed_checks = Vec::new();
    for check in checks()? {
        println!("xtask: check {}", check.display());
        let mut command = Command::new(&check);
        command
            .current_dir(paths::repo_root())
            .envs(test_env.iter().cloned());
        torch.apply(&mut command);
        let check_status = run_foreground(command)?;
        signal::check()?;
        if !check_status.success() {
            eprintln!(
                "xtask: check {} failed ({})",
                check.display(),
                process::describe(check_status)
            );
            failed_checks.push(check);
        }
    }

    println!("xtask: check deploy/validate.py");
    match super::deploy_check::check() {
        Ok(true) => {}
        Ok(false) => failed_checks.push(PathBuf::from("deploy/validate.py")),
        Err(err) => {
            eprintln!("xtask: deploy check: {err:#}");
            failed_checks.push(PathBuf::from("deploy/validate.py"));
        }
    }
    signal::check()?;

    if !status.success() {
        eprintln!("xtask: tests failed ({})", process::describe(status));
        let code = status.code().unwrap_or(1).clamp(1, 255);
        return Ok(ExitCode::from(code as u8));
    }
    if !failed_checks.is_empty() {
        eprintln!("xtask: {} check(s) failed", failed_checks.len());
        return Ok(ExitCode::FAILURE);
    }
    println!("xtask: tests and checks passed");
    Ok(ExitCode::SUCCESS)
}

/// The executables in `.ci/checks/`, in name order.
fn checks() -> Result<Vec<PathBuf>> {
    let dir = paths::repo_root().join(".ci/checks");
    let mut found: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| paths::is_executable(path))
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort();
    Ok(found)
}
