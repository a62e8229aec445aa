//! Compiles `csrc/sdpa_priority.cpp` and `csrc/cuda_memory.cpp` against the libtorch that `torch-sys` found (its build script
//! publishes the library folder as `DEP_TCH_LIBTORCH_LIB`; the headers sit next to it).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/sdpa_priority.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    for var in ["LIBTORCH_CXX11_ABI", "LIBTORCH", "LIBTORCH_INCLUDE", "LIBTORCH_USE_PYTORCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys publishes DEP_TCH_LIBTORCH_LIB (libtorch's lib folder)"),
    );
    // The headers: LIBTORCH_INCLUDE's include folder when set (as torch-sys reads it), else next to lib.
    let root = match std::env::var("LIBTORCH_INCLUDE") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => lib.parent().expect("libtorch's lib folder has a parent").to_path_buf(),
    };
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/sdpa_priority.cpp")
        .file("csrc/cuda_memory.cpp")
        .compile("farm_libtorch_shim");
}
