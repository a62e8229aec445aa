//! `cargo xtask deploy-check`: the offline checks of `deploy/` (`deploy/validate.py`), run with the
//! torch venv's python, which `cargo xtask setup` gives PyYAML and kubernetes-validate.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use xtask::paths;
use xtask::torch;

use super::{run_foreground, setup};

pub fn run() -> Result<ExitCode> {
    Ok(if check()? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `deploy/validate.py`; true when everything passed. Installs its python packages first if
/// the venv lacks them (as `cargo xtask setup` would).
pub fn check() -> Result<bool> {
    let venv = torch::venv_dir();
    let python = torch::python(&venv);
    anyhow::ensure!(
        python.exists(),
        "no venv at {}: run `cargo xtask setup` first",
        venv.display()
    );
    setup::ensure_deploy_tools(&venv)?;
    let root = paths::repo_root();
    let mut command = Command::new(&python);
    command
        .arg(root.join("deploy/validate.py"))
        .current_dir(&root);
    let status =
        run_foreground(command).with_context(|| format!("running {}", python.display()))?;
    Ok(status.success())
}
