//! `cargo xtask setup`: installs what is missing and says what it found. Quick when all is there:
//! only file checks, plus one `import torch` the first time a venv is seen.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use xtask::torch::{self, TorchEnv, TORCH_VERSION};
use xtask::{moto, paths, postgres, redis};

use super::run_checked;

/// Ensures PostgreSQL, Redis, the torch venv and the moto venv exist; returns the torch environment.
pub fn run() -> Result<TorchEnv> {
    let mut apt = Apt::default();

    let mut missing = Vec::new();
    if postgres::find_bin_dir().is_none() {
        missing.push("postgresql");
    }
    if redis::find_server_binary().is_none() {
        missing.push("redis-server");
    }
    // torch-sys and the worker's libtorch shims compile C++ (minimal images have gcc but no g++).
    let cxx_missing = paths::which("c++").is_none() && paths::which("g++").is_none();
    if cxx_missing {
        missing.push("g++");
    }
    if !missing.is_empty() {
        apt.install(&missing)?;
    }
    let pg_bin = postgres::find_bin_dir()
        .context("PostgreSQL server binaries still missing after apt-get install postgresql")?;
    let redis_server = redis::find_server_binary()
        .context("redis-server still missing after apt-get install redis-server")?;
    if cxx_missing && paths::which("c++").is_none() && paths::which("g++").is_none() {
        bail!("no C++ compiler (c++ or g++) after apt-get install g++; torch-sys and the worker need one");
    }
    let (torch, torch_installed) = ensure_torch_venv(&mut apt)?;
    // Not fatal: without these only `cargo xtask deploy-check` fails (and says why).
    if let Err(err) = ensure_deploy_tools(&torch.venv) {
        eprintln!("setup: warning: {err:#}");
    }
    // Not fatal either: only the tests against an S3-compatible server need it (and they try again).
    let moto = moto::ensure_installed();

    let status = |installed: bool| if installed { "installed" } else { "present" };
    println!(
        "setup: postgresql {} ({})",
        pg_bin.display(),
        status(missing.contains(&"postgresql"))
    );
    println!(
        "setup: redis      {} ({})",
        redis_server.display(),
        status(missing.contains(&"redis-server"))
    );
    println!(
        "setup: torch      {} in {} ({})",
        torch.version,
        torch.venv.display(),
        status(torch_installed)
    );
    match moto {
        Ok((venv, installed)) => println!(
            "setup: moto       {} in {} ({})",
            moto::MOTO_VERSION,
            venv.display(),
            status(installed)
        ),
        Err(err) => eprintln!("setup: warning: moto (S3-compatible test server): {err:#}"),
    }
    Ok(torch)
}

/// The torch venv: reused when `import torch` gives the expected version; created and/or filled with
/// `pip install torch==2.11.0` (with its CUDA runtime dependencies, which libtorch_cpu links) otherwise.
/// Returns the environment and whether anything was installed.
fn ensure_torch_venv(apt: &mut Apt) -> Result<(TorchEnv, bool)> {
    let venv = torch::venv_dir();
    if let Some(found) = TorchEnv::cached(&venv).filter(TorchEnv::is_expected_version) {
        return Ok((found, false));
    }
    // One installer at a time (`xtask demo` and `xtask test` started together, two checkouts
    // sharing the cache): the others wait, then find it installed.
    let parent = venv.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let _lock = xtask::process::FileLock::acquire(&parent.join("torch-venv.lock"))?;
    if let Some(found) = TorchEnv::cached(&venv).filter(TorchEnv::is_expected_version) {
        return Ok((found, false));
    }
    if torch::python(&venv).exists() {
        match TorchEnv::probe(&venv) {
            Ok(found) if found.is_expected_version() => return Ok((found, false)),
            Ok(found) => println!(
                "setup: {} has torch {}, want {TORCH_VERSION}",
                venv.display(),
                found.version
            ),
            Err(err) => println!("setup: {err:#}"),
        }
    }
    TorchEnv::forget(&venv);

    let python_works = Command::new(torch::python(&venv))
        .args(["-c", "import pip"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !python_works {
        create_venv(&venv, apt)?;
    }

    println!(
        "setup: pip install torch=={TORCH_VERSION} into {} (about 4.6 GB, a few minutes)",
        venv.display()
    );
    let pip = xtask::process::pip_install(
        &torch::python(&venv),
        &format!("torch=={TORCH_VERSION}"),
        std::env::var_os("CI").is_none(),
    );
    run_checked(pip)?;

    let found = TorchEnv::probe(&venv)?;
    if !found.is_expected_version() {
        bail!(
            "pip installed torch {} into {}, expected {TORCH_VERSION}",
            found.version,
            venv.display()
        );
    }
    Ok((found, true))
}

/// What `deploy/validate.py` imports: PyYAML and kubernetes-validate (which bundles the Kubernetes
/// schemas, so the check itself needs no network).
pub const DEPLOY_TOOLS: [&str; 2] = ["PyYAML==6.0.3", "kubernetes-validate==1.37.0"];
const DEPLOY_TOOLS_STAMP: &str = ".farm-deploy-tools";

/// Installs [`DEPLOY_TOOLS`] into the venv unless its stamp says they are there.
pub fn ensure_deploy_tools(venv: &Path) -> Result<()> {
    let stamp = venv.join(DEPLOY_TOOLS_STAMP);
    let wanted = DEPLOY_TOOLS.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|text| text == wanted) {
        return Ok(());
    }
    let imports = || {
        Command::new(torch::python(venv))
            .args(["-c", "import yaml, kubernetes_validate"])
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if !imports() {
        println!("setup: pip install {} into {}", DEPLOY_TOOLS.join(" "), venv.display());
        let mut pip = Command::new(torch::python(venv));
        pip.args(["-m", "pip", "install", "--no-input", "--disable-pip-version-check"]);
        if std::env::var_os("CI").is_some() {
            pip.args(["--progress-bar", "off"]);
        }
        pip.args(DEPLOY_TOOLS);
        run_checked(pip).context("installing the deploy check's python packages")?;
    }
    fs::write(&stamp, wanted).with_context(|| format!("write {}", stamp.display()))?;
    Ok(())
}

/// `python3 -m venv`, installing python3-venv with apt if that fails (Debian ships venv separately).
fn create_venv(venv: &Path, apt: &mut Apt) -> Result<()> {
    if venv.exists() {
        println!("setup: removing broken venv {}", venv.display());
        fs::remove_dir_all(venv).with_context(|| format!("remove {}", venv.display()))?;
    }
    if let Some(parent) = venv.parent() {
        fs::create_dir_all(parent)?;
    }
    let base_python = std::env::var("FARM_PYTHON").unwrap_or_else(|_| "python3".into());
    println!("setup: {base_python} -m venv {}", venv.display());
    let attempt = |venv: &Path| {
        Command::new(&base_python)
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .is_ok_and(|status| status.success())
    };
    if attempt(venv) {
        return Ok(());
    }
    let _ = fs::remove_dir_all(venv);
    apt.install(&["python3", "python3-venv"])?;
    if !attempt(venv) {
        bail!("`{base_python} -m venv {}` fails even with python3-venv installed (set FARM_PYTHON to another python ≥ 3.10)", venv.display());
    }
    Ok(())
}

/// apt-get, with `update` run once before the first install, through sudo when not root.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn command(&self, args: &[&str]) -> Result<Command> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut command = if root {
            Command::new("apt-get")
        } else if paths::which("sudo").is_some() {
            let mut sudo = Command::new("sudo");
            sudo.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
            sudo
        } else {
            bail!(
                "not root and no sudo: install {} yourself",
                args.last().unwrap_or(&"")
            );
        };
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        Ok(command)
    }

    fn install(&mut self, packages: &[&str]) -> Result<()> {
        if paths::which("apt-get").is_none() {
            bail!(
                "{} missing and this machine has no apt-get: install them with its package manager",
                packages.join(", ")
            );
        }
        if !self.updated {
            println!("setup: apt-get update");
            run_checked(self.command(&["update"])?)?;
            self.updated = true;
        }
        println!("setup: apt-get install {}", packages.join(" "));
        let mut args = vec!["install", "--yes", "--no-install-recommends"];
        args.extend_from_slice(packages);
        run_checked(self.command(&args)?)
    }
}
