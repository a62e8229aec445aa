//! Generates the `farm.v1` gRPC code. protoc comes from the vendored binary crate, so a fresh machine
//! needs no system protobuf compiler.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = ["farm/v1/common.proto", "farm/v1/jobs.proto", "farm/v1/workers.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // The worker API has an rpc named `Connect`; the generated client's `connect` constructor would clash
    // with it, so clients are built from a `tonic::transport::Channel` with `new` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .file_descriptor_set_path(out.join("farm_descriptor.bin"))
        .compile_protos(&files, &["."])?;
    Ok(())
}
