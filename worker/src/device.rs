//! Device description for the worker's hello: name, total and free memory.

use tch::Device;

/// (name, total bytes, free bytes) of a device; memory is read from `nvidia-smi` for CUDA devices
/// (libtorch's C API exposes no memory query through tch), 0 when unknown.
pub fn describe(device: Device) -> (String, u64, u64) {
    match device {
        Device::Cuda(i) => {
            let out = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits", "-i", &i.to_string()])
                .output();
            if let Ok(o) = out {
                let s = String::from_utf8_lossy(&o.stdout);
                let parts: Vec<&str> = s.trim().split(", ").collect();
                if parts.len() == 3 {
                    let mib = |p: &str| p.trim().parse::<u64>().unwrap_or(0) * 1024 * 1024;
                    return (parts[0].to_string(), mib(parts[1]), mib(parts[2]));
                }
            }
            (format!("cuda:{i}"), 0, 0)
        }
        _ => ("cpu".to_string(), 0, 0),
    }
}

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("device {s:?}: expected cpu, cuda or cuda:N")),
    }
}

/// Loads libtorch's CUDA backend when it is installed.
///
/// The linker drops `libtorch_cuda.so` from binaries because no symbol of it is referenced directly,
/// and without it libtorch reports no CUDA device. Loading it by name (found through the library
/// path, like libtorch itself) registers the backend. Returns whether it was loaded; on machines
/// without it this is a no-op.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let name = std::ffi::CString::new("libtorch_cuda.so").expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is intentionally kept for the process life.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        !handle.is_null()
    })
}
