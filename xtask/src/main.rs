//! `cargo xtask <command>`: set-up of a fresh machine, builds, the local demo farm and the test run.
//! See `xtask/README.md`.

mod cmd;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

  setup             install what is missing: PostgreSQL and Redis (apt), the torch venv (pip)
  env               print the build/run environment as shell exports (eval \"$(cargo xtask env)\")
  build             setup, then cargo build --workspace --bins
  demo [--stay] [--no-build]
                    build, start a throwaway farm on loopback, render examples/prompts.xml into ./out/demo
  test [ARGS...]    setup, start PostgreSQL and Redis, cargo test --workspace --no-fail-fast ARGS,
                    then the extra checks in .ci/checks/ and deploy-check
  deploy-check      offline checks of deploy/ (YAML, Kubernetes schemas, compose, Dockerfiles, systemd)
  fuzz [SECONDS]    run the prompt fuzz target in proto/fuzz (needs cargo-fuzz and a nightly toolchain)
  services          start PostgreSQL and Redis, print their URLs, run until Ctrl-C
";

fn main() -> ExitCode {
    xtask::signal::install();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "setup" => cmd::setup::run().map(|_| ExitCode::SUCCESS),
        "env" => cmd::env(),
        "build" => cmd::build().map(|_| ExitCode::SUCCESS),
        "demo" => cmd::demo::run(rest),
        "test" => cmd::test::run(rest),
        "deploy-check" => cmd::deploy_check::run(),
        "fuzz" => cmd::fuzz::run(rest),
        "services" => cmd::services(),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprint!("xtask: unknown command {other:?}\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask {command}: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
