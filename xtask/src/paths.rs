//! Where things are in the workspace and its build output.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The workspace root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo that runs us (cargo sets `CARGO` for `cargo run` and test binaries), else `cargo`.
pub fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// The directory holding the workspace's binaries for the current profile.
///
/// `FARM_BIN_DIR` wins. Otherwise it is derived from the running executable: a test binary lives in
/// `<target>/<profile>/deps/`, `xtask` itself in `<target>/<profile>/`. This follows
/// `CARGO_TARGET_DIR` and the profile without asking cargo.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = env::var_os("FARM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let dir = if dir.file_name().is_some_and(|name| name == "deps") {
            dir.parent().map(Path::to_path_buf).unwrap_or(dir)
        } else {
            dir
        };
        if dir.join(".fingerprint").is_dir() {
            return dir;
        }
    }
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug")
}

/// Path of the workspace binary `name` (it may not be built yet).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The golden tensors the worker's parity tests read (exported to tests as `FARM_GOLDENS_DIR`).
pub fn goldens_dir() -> PathBuf {
    repo_root().join("worker/tests/fixtures/goldens")
}

/// Looks `program` up on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// A regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The per-user cache directory for the farm: `$XDG_CACHE_HOME/newbie-farm` or `~/.cache/newbie-farm`.
pub fn cache_dir() -> PathBuf {
    let base = env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("newbie-farm")
}
