//! `cargo xtask fuzz [SECONDS]`: the prompt parser's fuzz target in `proto/fuzz`, for SECONDS
//! (default 60), through cargo-fuzz on a nightly toolchain, as `proto/fuzz/README.md` runs it.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use xtask::paths;

use super::run_checked;

pub fn run(args: &[String]) -> Result<ExitCode> {
    let seconds: u64 = match args.first() {
        Some(text) => text
            .parse()
            .with_context(|| format!("SECONDS must be a whole number, got {text:?}"))?,
        None => 60,
    };
    let proto = paths::repo_root().join("proto");
    if !proto.join("fuzz/Cargo.toml").exists() {
        bail!("no fuzz crate at {}/fuzz", proto.display());
    }
    let fuzz = |args: &[&str]| {
        // Through rustup, not the (stable) cargo that runs xtask.
        let mut command = Command::new("rustup");
        command
            .args(["run", "nightly", "cargo", "fuzz"])
            .args(args)
            .current_dir(&proto);
        command.env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO");
        command
    };
    let listed = fuzz(&["list"]).output();
    let targets = match listed {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).into_owned(),
        _ => {
            eprintln!(
                "xtask fuzz: needs rustup, a nightly toolchain and cargo-fuzz:\n  rustup toolchain install nightly\n  cargo install cargo-fuzz"
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let targets: Vec<&str> = targets
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let Some(target) = targets
        .iter()
        .find(|name| name.contains("prompt"))
        .or(targets.first())
    else {
        bail!("proto/fuzz has no fuzz targets");
    };
    // The target's corpus grows in fuzz/corpus/TARGET; fuzz/seeds (committed inputs) and
    // fuzz/TARGET.dict are used when present.
    let corpus = format!("fuzz/corpus/{target}");
    std::fs::create_dir_all(proto.join(&corpus))?;
    let mut run: Vec<String> = vec!["run".into(), target.to_string(), corpus];
    if proto.join("fuzz/seeds").is_dir() {
        run.push("fuzz/seeds".into());
    }
    run.extend([
        "--".into(),
        format!("-max_total_time={seconds}"),
        "-max_len=4096".into(),
    ]);
    if proto.join(format!("fuzz/{target}.dict")).exists() {
        run.push(format!("-dict=fuzz/{target}.dict"));
    }
    println!("xtask fuzz: cargo +nightly fuzz {}", run.join(" "));
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    run_checked(fuzz(&run))?;
    Ok(ExitCode::SUCCESS)
}
