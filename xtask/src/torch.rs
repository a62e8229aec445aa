//! The libtorch environment: PyPI's torch wheel in a venv, which `tch` builds against
//! (`LIBTORCH_USE_PYTORCH=1`, the venv's python first on PATH) and which binaries load at run time
//! (torch's `lib/` on LD_LIBRARY_PATH).
//!
//! Asking python where torch lives takes seconds, so the answer is cached in a stamp file inside the
//! venv and trusted while torch's shared libraries are still where it says.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::paths;

/// The torch release `tch` 0.24 binds.
pub const TORCH_VERSION: &str = "2.11.0";

const STAMP: &str = ".farm-torch";

/// The venv: `FARM_TORCH_VENV`, else `<cache>/newbie-farm/torch-venv` (see [`paths::cache_dir`]).
pub fn venv_dir() -> PathBuf {
    env::var_os("FARM_TORCH_VENV")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::cache_dir().join("torch-venv"))
}

/// The venv's python.
pub fn python(venv: &Path) -> PathBuf {
    venv.join("bin/python")
}

/// A venv holding an importable torch.
#[derive(Clone, Debug)]
pub struct TorchEnv {
    pub venv: PathBuf,
    /// `torch.__version__`, e.g. `2.11.0+cu130`.
    pub version: String,
    /// The `torch` package directory; its `lib/` holds libtorch.
    pub torch_dir: PathBuf,
}

impl TorchEnv {
    /// The venv at [`venv_dir`], from its stamp or by asking its python; `None` if no venv exists.
    pub fn locate() -> Result<Option<TorchEnv>> {
        let venv = venv_dir();
        if let Some(found) = TorchEnv::cached(&venv) {
            return Ok(Some(found));
        }
        if !python(&venv).exists() {
            return Ok(None);
        }
        TorchEnv::probe(&venv).map(Some)
    }

    /// What the stamp says, if libtorch is still where it says and torch was not reinstalled since.
    pub fn cached(venv: &Path) -> Option<TorchEnv> {
        let stamp = venv.join(STAMP);
        let text = fs::read_to_string(&stamp).ok()?;
        let mut lines = text.lines();
        let version = lines.next()?.to_owned();
        let torch_dir = PathBuf::from(lines.next()?);
        let found = TorchEnv {
            venv: venv.to_path_buf(),
            version,
            torch_dir,
        };
        let modified = |path: &Path| fs::metadata(path).and_then(|meta| meta.modified()).ok();
        let installed = modified(&found.torch_dir.join("version.py"))?;
        let fresh = modified(&stamp)? >= installed && found.lib_dir().join("libtorch_cpu.so").exists();
        fresh.then_some(found)
    }

    /// Asks the venv's python for torch's version and location, and records the answer in the stamp.
    pub fn probe(venv: &Path) -> Result<TorchEnv> {
        let output = Command::new(python(venv))
            .args([
                "-c",
                "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("run {}", python(venv).display()))?;
        if !output.status.success() {
            bail!(
                "`import torch` fails in {}:\n{}",
                venv.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut lines = stdout.lines().map(str::trim);
        let (Some(version), Some(torch_dir)) = (lines.next(), lines.next()) else {
            bail!("unexpected answer from {}: {stdout:?}", python(venv).display());
        };
        let found = TorchEnv {
            venv: venv.to_path_buf(),
            version: version.to_owned(),
            torch_dir: PathBuf::from(torch_dir),
        };
        // Best effort: without the stamp we only ask again next time.
        let _ = fs::write(
            venv.join(STAMP),
            format!("{}\n{}\n", found.version, found.torch_dir.display()),
        );
        Ok(found)
    }

    /// Forgets the stamp (after changing the venv).
    pub fn forget(venv: &Path) {
        let _ = fs::remove_file(venv.join(STAMP));
    }

    /// Whether this is the torch release `tch` needs (local version suffixes such as `+cu130` allowed).
    pub fn is_expected_version(&self) -> bool {
        self.version == TORCH_VERSION || self.version.starts_with(&format!("{TORCH_VERSION}+"))
    }

    /// libtorch's shared libraries.
    pub fn lib_dir(&self) -> PathBuf {
        self.torch_dir.join("lib")
    }

    /// The variables builds and binaries need, computed against this process's own environment:
    /// `FARM_TORCH_VENV`, `LIBTORCH_USE_PYTORCH=1`, `PATH` with the venv's `bin` first and
    /// `LD_LIBRARY_PATH` with torch's `lib` first.
    pub fn vars(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("FARM_TORCH_VENV", self.venv.clone().into_os_string()),
            ("LIBTORCH_USE_PYTORCH", "1".into()),
            ("PATH", prepend_path("PATH", &self.venv.join("bin"))),
            (
                "LD_LIBRARY_PATH",
                prepend_path("LD_LIBRARY_PATH", &self.lib_dir()),
            ),
        ]
    }

    /// Sets [`TorchEnv::vars`] on `command`.
    pub fn apply(&self, command: &mut Command) {
        for (name, value) in self.vars() {
            command.env(name, value);
        }
    }

    /// The same variables as `export` lines for a POSIX shell.
    pub fn shell_exports(&self) -> String {
        self.vars()
            .into_iter()
            .map(|(name, value)| {
                format!(
                    "export {name}='{}'\n",
                    value.to_string_lossy().replace('\'', r"'\''")
                )
            })
            .collect()
    }
}

/// `$variable` with `dir` in front (moved there if it was further back, added if absent).
fn prepend_path(variable: &str, dir: &Path) -> OsString {
    let current = env::var_os(variable).unwrap_or_default();
    let rest = env::split_paths(&current).filter(|entry| entry != dir && !entry.as_os_str().is_empty());
    env::join_paths(std::iter::once(dir.to_path_buf()).chain(rest)).expect("PATH entries contain no ':'")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::TempDir;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_stamp_is_trusted_until_torch_changes() {
        let venv = TempDir::new("xtask-torch-test").unwrap();
        let torch_dir = venv.path().join("site-packages/torch");
        fs::create_dir_all(torch_dir.join("lib")).unwrap();
        fs::write(torch_dir.join("lib/libtorch_cpu.so"), b"").unwrap();
        let version_py = torch_dir.join("version.py");
        fs::write(&version_py, b"__version__ = '2.11.0'\n").unwrap();
        let set_mtime = |path: &Path, time: SystemTime| {
            fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(time)
                .unwrap();
        };
        let now = SystemTime::now();
        set_mtime(&version_py, now - Duration::from_secs(60));
        fs::write(
            venv.path().join(STAMP),
            format!("2.11.0+cpu\n{}\n", torch_dir.display()),
        )
        .unwrap();

        let found = TorchEnv::cached(venv.path()).expect("a fresh stamp is used");
        assert!(found.is_expected_version());
        assert_eq!(found.lib_dir(), torch_dir.join("lib"));

        set_mtime(&version_py, now + Duration::from_secs(60));
        assert!(
            TorchEnv::cached(venv.path()).is_none(),
            "a reinstalled torch is asked again"
        );
    }

    #[test]
    fn versions_with_a_local_suffix_match() {
        let with = |version: &str| TorchEnv {
            venv: "/v".into(),
            version: version.into(),
            torch_dir: "/t".into(),
        };
        assert!(with("2.11.0").is_expected_version());
        assert!(with("2.11.0+cu130").is_expected_version());
        assert!(!with("2.11.1").is_expected_version());
        assert!(!with("2.11.0rc1").is_expected_version());
    }
}
