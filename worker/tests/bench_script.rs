//! `worker/bench/gpu_bench.sh` is run on a GPU machine rarely and with little time; this runs the
//! same script, every run of it, with the tiny preset on the CPU, so that a broken option or run
//! shows up here first. It also checks what the variants and prepared-conditioning runs report.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn gpu_bench_script_runs_end_to_end_on_the_cpu_with_the_tiny_preset() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let python = std::env::var("FARM_TORCH_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let run = Command::new("bash")
        .arg(root.join("worker/bench/gpu_bench.sh"))
        .arg(out.path())
        .current_dir(&root)
        .env("BIN", env!("CARGO_BIN_EXE_newbie-bench"))
        .env("PYTHON", &python)
        .env("PRESET", "tiny")
        .env("DEVICE", "cpu")
        .env("SIZE", "64")
        .env("CAP", "8")
        .env("MATMUL", "128")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "gpu_bench.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let runs = stdout.lines().filter(|l| l.starts_with("rc=")).count();
    assert_eq!(runs, 9, "every run of the script ran:\n{stdout}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("variants.json")).unwrap()).unwrap();
    let variants = v["variants"].as_array().unwrap();
    let names: Vec<&str> = variants.iter().map(|x| x["variant"].as_str().unwrap()).collect();
    assert_eq!(names, ["unfused", "fused", "fused+gqa", "fused+cudnn", "fused+gqa+cudnn", "fused+efficient", "fused+flash"]);
    let absmax = v["output_absmax"].as_f64().unwrap();
    assert!(absmax > 0.0);
    for x in variants {
        // bf16 through 6 blocks of the tiny model: every variant computes the same function.
        let diff = x["max_abs_diff_to_first"].as_f64().unwrap();
        assert!(diff <= 0.05 * absmax, "{} differs from the first by {diff} (absmax {absmax})", x["variant"]);
        assert!(x["ms_median"].as_f64().unwrap() > 0.0);
    }
    let b = &v["breakdown"];
    assert_eq!(b["attention_used"], "attention default", "the first variant's attention is counted");
    let components = b["components"].as_array().unwrap();
    assert_eq!(components.len(), 4 + 8, "four matmuls and eight attention settings");
    assert!(b["matmul_ms"].as_f64().unwrap() > 0.0 && b["attention_ms"].as_f64().unwrap() > 0.0);

    // Conditioning prepared once and prepared at every step give the same latents (same kernels, in
    // the same order, on the same inputs).
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("prepared.json")).unwrap()).unwrap();
    assert_eq!(p["final_latent_max_abs_diff"].as_f64(), Some(0.0), "{p}");
    assert!(p["s_per_step_prepared_once"].as_f64().unwrap() > 0.0 && p["ratio"].as_f64().unwrap() > 0.0, "{p}");
}
