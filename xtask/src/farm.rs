//! Running the farm's own binaries: a clean environment for them and the coordinator's admin
//! commands (`migrate`, `token create`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::process;
use crate::torch::TorchEnv;

/// `program` with the environment farm processes get: nothing inherited that configures them behind
/// their flags' backs (`DATABASE_URL`, `REDIS_URL`, every `FARM_*` but `FARM_TORCH_VENV`; a test run
/// exports the first two, and a coordinator started without `--redis-url` must not pick one up),
/// libtorch on LD_LIBRARY_PATH (the worker links it), backtraces, and `RUST_LOG=info` unless the
/// caller chose a level.
pub fn command(program: &Path, torch: Option<&TorchEnv>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let configures_farm = name.starts_with("FARM_") && name != "FARM_TORCH_VENV";
        if configures_farm || name == "DATABASE_URL" || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    if let Some(torch) = torch {
        torch.apply(&mut command);
    }
    command.env("RUST_BACKTRACE", "1");
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    command
}

/// `farm-coordinator migrate --database-url URL`.
pub fn migrate(coordinator: &Path, database_url: &str, torch: Option<&TorchEnv>) -> Result<()> {
    let mut migrate = command(coordinator, torch);
    migrate.args(["migrate", "--database-url", database_url]);
    process::run_captured(migrate).context("farm-coordinator migrate")?;
    Ok(())
}

/// `farm-coordinator token create --database-url URL --tenant T --role R`: the token it prints
/// (its last non-empty line of stdout).
pub fn create_token(
    coordinator: &Path,
    database_url: &str,
    tenant: &str,
    role: &str,
    torch: Option<&TorchEnv>,
) -> Result<String> {
    let mut create = command(coordinator, torch);
    create.args([
        "token",
        "create",
        "--database-url",
        database_url,
        "--tenant",
        tenant,
        "--role",
        role,
    ]);
    let output = process::run_captured(create).with_context(|| format!("create a {role} token"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let token = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or_default();
    anyhow::ensure!(
        !token.is_empty(),
        "`farm-coordinator token create` printed no token"
    );
    Ok(token.to_owned())
}
