//! Device description for the worker's hello: name, total and free memory.

use tch::Device;

/// (name, total bytes, free bytes) of a device; memory is read from `nvidia-smi` for CUDA devices
/// (libtorch's C API exposes no memory query through tch), 0 when unknown.
pub fn describe(device: Device) -> (String, u64, u64) {
    match device {
        Device::Cuda(i) => match query_gpu(i, "name,memory.total,memory.free").as_deref() {
            Some([name, total, free]) => (name.clone(), mib(total), mib(free)),
            _ => (format!("cuda:{i}"), 0, 0),
        },
        _ => ("cpu".to_string(), 0, 0),
    }
}

/// Device memory free now, in bytes (all processes counted), or `None` on the CPU or when
/// `nvidia-smi` cannot tell. Sent with every heartbeat.
pub fn free_vram_bytes(device: Device) -> Option<u64> {
    memory_field(device, "memory.free").filter(|b| *b > 0)
}

/// Device memory in use now, in bytes (all processes, the CUDA contexts included), from
/// `nvidia-smi`; `None` on the CPU or when it cannot tell.
pub fn used_vram_bytes(device: Device) -> Option<u64> {
    memory_field(device, "memory.used")
}

/// One MiB-valued `nvidia-smi` memory field of `device`, in bytes.
fn memory_field(device: Device, field: &str) -> Option<u64> {
    let Device::Cuda(i) = device else { return None };
    match query_gpu(i, field).as_deref() {
        Some([value]) => Some(mib(value)),
        _ => None,
    }
}

/// Longest wait for one `nvidia-smi` query.
const SMI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One `nvidia-smi --query-gpu` row of GPU `index`, split into its fields.
///
/// `index` is the CUDA index this process sees; with `CUDA_VISIBLE_DEVICES` set it names the GPU by
/// that list's entry (an index or a UUID, both of which `nvidia-smi -i` takes), since `nvidia-smi`
/// ignores the variable.
fn query_gpu(index: usize, fields: &str) -> Option<Vec<String>> {
    let id = smi_id(index, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref());
    run_query("nvidia-smi", &id, fields, SMI_TIMEOUT)
}

/// Runs `program` as `nvidia-smi --query-gpu=FIELDS ... -i ID`, at most `timeout` long.
fn run_query(program: &str, id: &str, fields: &str, timeout: std::time::Duration) -> Option<Vec<String>> {
    let mut child = std::process::Command::new(program)
        .args([&format!("--query-gpu={fields}"), "--format=csv,noheader,nounits", "-i", id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    // A wedged GPU can hang nvidia-smi: give up after a few seconds rather than hold the caller
    // (and, at exit, the runtime's blocking pool) for ever.
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut stdout).ok()?;
    let row = stdout;
    let parts: Vec<String> = row.trim().split(", ").map(str::to_string).collect();
    (parts.len() == fields.split(',').count()).then_some(parts)
}

/// The `nvidia-smi -i` id of CUDA device `index` under `CUDA_VISIBLE_DEVICES` (`visible`).
fn smi_id(index: usize, visible: Option<&str>) -> String {
    visible
        .and_then(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()).nth(index))
        .map_or_else(|| index.to_string(), str::to_string)
}

fn mib(field: &str) -> u64 {
    field.trim().parse::<u64>().unwrap_or(0) * 1024 * 1024
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

extern "C" {
    fn farm_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
    fn farm_cuda_reset_peak(device: i32) -> i32;
}

/// libtorch's CUDA caching allocator figures for one device, in bytes: memory held by tensors
/// (`allocated`) and memory the allocator holds from the driver (`reserved`, allocated plus its
/// cache), each now and at its peak since the last [`reset_peak_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorMemory {
    pub allocated: u64,
    pub allocated_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
}

/// The allocator figures of `device`; `None` for the CPU, or when libtorch has no initialised CUDA
/// allocator (no CUDA backend loaded, nothing allocated yet).
pub fn allocator_memory(device: Device) -> Option<AllocatorMemory> {
    let Device::Cuda(index) = device else { return None };
    let mut out = [0i64; 4];
    // SAFETY: `out` has the four slots the function writes.
    let rc = unsafe { farm_cuda_memory_stats(index as i32, out.as_mut_ptr()) };
    (rc == 0).then(|| AllocatorMemory {
        allocated: out[0].max(0) as u64,
        allocated_peak: out[1].max(0) as u64,
        reserved: out[2].max(0) as u64,
        reserved_peak: out[3].max(0) as u64,
    })
}

/// Starts a new peak window for [`allocator_memory`]; false when there is no CUDA allocator.
pub fn reset_peak_memory(device: Device) -> bool {
    let Device::Cuda(index) = device else { return false };
    // SAFETY: plain call with a device index; failures are reported through the return code.
    unsafe { farm_cuda_reset_peak(index as i32) == 0 }
}

#[cfg(test)]
mod allocator_tests {
    use super::*;

    #[test]
    fn allocator_figures_are_absent_without_cuda_and_never_abort() {
        assert_eq!(allocator_memory(Device::Cpu), None);
        assert!(!reset_peak_memory(Device::Cpu));
        if !tch::Cuda::is_available() {
            // The shim itself runs and reports "no CUDA allocator" instead of throwing across FFI.
            assert_eq!(allocator_memory(Device::Cuda(0)), None);
            assert!(!reset_peak_memory(Device::Cuda(0)));
        } else {
            let before = allocator_memory(Device::Cuda(0));
            let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, Device::Cuda(0)));
            let after = allocator_memory(Device::Cuda(0)).expect("the CUDA allocator is initialised");
            assert!(after.allocated >= before.map_or(0, |b| b.allocated) + (4 << 20));
            assert!(after.allocated_peak >= after.allocated && after.reserved >= after.allocated);
            drop(t);
        }
    }
}

#[cfg(test)]
mod smi_tests {
    use super::*;

    #[test]
    fn cuda_indexes_map_through_the_visible_devices() {
        assert_eq!(smi_id(0, None), "0");
        assert_eq!(smi_id(1, Some("3,5")), "5");
        assert_eq!(smi_id(0, Some("GPU-8f1e, 2")), "GPU-8f1e");
        // An index past the list (or an empty list) is taken as it is.
        assert_eq!(smi_id(2, Some("3,5")), "2");
        assert_eq!(smi_id(0, Some("")), "0");
        assert_eq!(free_vram_bytes(Device::Cpu), None);
        assert_eq!(used_vram_bytes(Device::Cpu), None);
    }

    #[test]
    fn a_query_reads_one_row_and_gives_up_on_a_hung_tool() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p.display().to_string()
        };
        let answers = script("answers", "echo 'NVIDIA H200, 143771, 1024'");
        let fields = "name,memory.total,memory.free";
        let row = run_query(&answers, "0", fields, std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(row, ["NVIDIA H200", "143771", "1024"]);
        assert_eq!(mib(&row[2]), 1024 << 20);
        assert_eq!(run_query(&answers, "0", "memory.free", std::time::Duration::from_secs(10)), None, "wrong field count");
        let fails = script("fails", "echo 'No devices were found'; exit 6");
        assert_eq!(run_query(&fails, "0", "memory.free", std::time::Duration::from_secs(10)), None);
        let hangs = script("hangs", "sleep 30");
        let started = std::time::Instant::now();
        assert_eq!(run_query(&hangs, "0", "memory.free", std::time::Duration::from_millis(300)), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "gave up after {:?}", started.elapsed());
    }
}
