//! `cargo xtask demo [--stay]`: a throwaway farm on loopback renders `examples/prompts.xml` with the
//! tiny model on CPU and downloads the PNGs into `./out/demo` (emptied first; nothing else under
//! `./out` is touched).
//!
//! PostgreSQL and Redis in temporary directories, one coordinator, one CPU worker, then the CLI:
//! `farm submit --wait --json` (progress on stderr, the job as JSON on stdout) and `farm results`.
//! Every process is stopped at the end, on error and on Ctrl-C; on error the logs' tails are printed.
//! `--stay` keeps the farm up after the render until Ctrl-C; `--no-build` uses the binaries as they are.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use xtask::postgres::PgServer;
use xtask::process::{self, Process, TempDir};
use xtask::redis::RedisServer;
use xtask::signal;
use xtask::torch::TorchEnv;
use xtask::{farm, paths};

const TENANT: &str = "demo";

pub fn run(args: &[String]) -> Result<ExitCode> {
    let stay = args.iter().any(|arg| arg == "--stay");
    let build = !args.iter().any(|arg| arg == "--no-build");
    if let Some(unknown) = args
        .iter()
        .find(|arg| !["--stay", "--no-build"].contains(&arg.as_str()))
    {
        bail!("unknown demo option {unknown:?} (--stay, --no-build)");
    }
    let prompts = paths::repo_root().join("examples/prompts.xml");
    if !prompts.exists() {
        bail!("{} is missing", prompts.display());
    }
    let torch = if build {
        super::build()?
    } else {
        super::setup::run()?
    };

    let mut demo = Demo::start()?;
    let result = demo.render(&torch, stay);
    if let Err(err) = &result {
        if !signal::interrupted() {
            // The logs outlive the demo, for the user to read.
            demo.dir.keep();
            eprintln!("xtask demo: {err:#}\nlogs are in {}", demo.dir.path().display());
            demo.print_logs();
        }
    }
    result.map(|()| ExitCode::SUCCESS)
}

/// Everything the demo started. Fields drop in order: clients of a server stop before it.
struct Demo {
    worker: Option<Process>,
    coordinator: Option<Process>,
    redis: RedisServer,
    pg: PgServer,
    dir: TempDir,
}

impl Demo {
    fn start() -> Result<Demo> {
        let dir = TempDir::new("farm-demo")?;
        println!("xtask demo: starting PostgreSQL and Redis");
        let pg = PgServer::start_local()?;
        let redis = RedisServer::start_local()?;
        Ok(Demo {
            worker: None,
            coordinator: None,
            redis,
            pg,
            dir,
        })
    }

    fn render(&mut self, torch: &TorchEnv, stay: bool) -> Result<()> {
        let database_url = self.pg.create_named_database("farm")?;
        let coordinator_bin = paths::bin("farm-coordinator");
        farm::migrate(&coordinator_bin, &database_url, Some(torch))?;
        let client_token =
            farm::create_token(&coordinator_bin, &database_url, TENANT, "client", Some(torch))?;
        let worker_token =
            farm::create_token(&coordinator_bin, &database_url, TENANT, "worker", Some(torch))?;

        let port = process::free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut serve = farm::command(&coordinator_bin, Some(torch));
        serve
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database-url",
                &database_url,
            ])
            .args(["--redis-url", &self.redis.url()])
            .arg("--results")
            .arg(self.dir.path().join("results"));
        println!("xtask demo: coordinator on {endpoint}");
        let coordinator = self.coordinator.insert(Process::spawn(
            "coordinator",
            serve,
            &self.dir.path().join("coordinator.log"),
        )?);
        coordinator.wait_for_port(port, Duration::from_secs(60))?;

        let mut worker = farm::command(&paths::bin("farm-worker"), Some(torch));
        worker.args(["--coordinator", &endpoint, "--token", &worker_token]);
        worker.args([
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--max-batch",
            "4",
        ]);
        println!("xtask demo: CPU worker (tiny model)");
        self.worker = Some(Process::spawn(
            "worker",
            worker,
            &self.dir.path().join("worker.log"),
        )?);

        let no_config = self.dir.path().join("no-config");
        let cli = |args: &[&str]| {
            let mut command = farm::command(&paths::bin("farm"), Some(torch));
            command
                // The user's own client configuration (a TLS farm's CA, another endpoint) is not
                // the demo's: it reads from an empty configuration directory.
                .env("XDG_CONFIG_HOME", &no_config)
                .args(["--endpoint", &endpoint, "--token", &client_token])
                .args(args)
                .current_dir(paths::repo_root());
            command
        };
        println!("xtask demo: farm submit examples/prompts.xml --model tiny --width 256 --height 256 --steps 8 --wait");
        let submit = cli(&[
            "submit",
            "examples/prompts.xml",
            "--model",
            "tiny",
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            "8",
            "--wait",
            "--json",
        ]);
        let submitted = self.run_watched(submit, demo_timeout())?;
        let job_id = json_string_field(&submitted, "job_id")
            .with_context(|| format!("no \"job_id\" in the output of farm submit --json: {submitted:?}"))?;
        println!("xtask demo: job {job_id} finished");

        let out = paths::repo_root().join("out").join("demo");
        if out.exists() {
            fs::remove_dir_all(&out).with_context(|| format!("clear {}", out.display()))?;
        }
        self.run_watched(
            cli(&["results", &job_id, "-o", "./out/demo"]),
            Duration::from_secs(600),
        )?;
        let mut pngs = Vec::new();
        collect_pngs(&out, &mut pngs);
        pngs.sort();
        if pngs.is_empty() {
            bail!("farm results wrote no PNG into {}", out.display());
        }
        println!("xtask demo: {} PNG(s) in {}:", pngs.len(), out.display());
        for png in &pngs {
            println!(
                "  {}",
                png.strip_prefix(paths::repo_root()).unwrap_or(png).display()
            );
        }

        if stay {
            println!("\nThe farm stays up until Ctrl-C:");
            println!("  endpoint      {endpoint}");
            println!("  client token  {client_token}");
            println!("  database      {database_url}");
            println!("  redis         {}", self.redis.url());
            println!("  logs          {}", self.dir.path().display());
            while !signal::interrupted() {
                self.ensure_alive()?;
                thread::sleep(Duration::from_millis(200));
            }
            println!("\nstopping");
        }
        Ok(())
    }

    /// Runs a CLI command in the foreground (stderr to the terminal, stdout captured and echoed) while
    /// making sure the coordinator and the worker stay up; returns stdout.
    fn run_watched(&mut self, mut command: Command, timeout: Duration) -> Result<String> {
        let shown = format!("{command:?}");
        let mut child = command
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {shown}"))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let started = Instant::now();
        let outcome = loop {
            if let Some(status) = child.try_wait()? {
                break Ok(status);
            }
            if signal::interrupted() {
                break Err(anyhow::anyhow!("interrupted"));
            }
            if started.elapsed() > timeout {
                break Err(anyhow::anyhow!(
                    "{shown} did not finish within {timeout:?} (set FARM_DEMO_TIMEOUT in seconds)"
                ));
            }
            if let Err(err) = self.ensure_alive() {
                break Err(err);
            }
            thread::sleep(Duration::from_millis(100));
        };
        let status = match outcome {
            Ok(status) => status,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err);
            }
        };
        let stdout = reader.join().unwrap_or_default();
        print!("{stdout}");
        if !status.success() {
            bail!("{shown} failed ({})", process::describe(status));
        }
        Ok(stdout)
    }

    fn ensure_alive(&mut self) -> Result<()> {
        for process in [self.coordinator.as_mut(), self.worker.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Some(status) = process.try_status() {
                bail!("{} exited ({})", process.name(), process::describe(status));
            }
        }
        anyhow::ensure!(self.pg.is_running(), "PostgreSQL stopped");
        anyhow::ensure!(self.redis.is_running(), "Redis stopped");
        Ok(())
    }

    fn print_logs(&self) {
        eprintln!("{}\n{}", self.pg.log_tail(20), self.redis.log_tail(20));
        let started: Vec<&Process> = [self.coordinator.as_ref(), self.worker.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        super::print_log_tails(&started);
    }
}

fn demo_timeout() -> Duration {
    let seconds = std::env::var("FARM_DEMO_TIMEOUT")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1800);
    Duration::from_secs(seconds)
}

fn collect_pngs(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_pngs(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "png") {
            found.push(path);
        }
    }
}

/// The string value of `"field"` in a JSON text (the first occurrence; enough for one flat object,
/// without a JSON parser in xtask).
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\"");
    let after_key = &json[json.find(&key)? + key.len()..];
    let value = after_key
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn finds_the_job_id() {
        let json = r#"{"state": "succeeded", "job_id" : "0b8f-42", "tasks": {"job_id": "x"}}"#;
        assert_eq!(json_string_field(json, "job_id").as_deref(), Some("0b8f-42"));
        assert_eq!(json_string_field("{\"job_id\": 7}", "job_id"), None);
        assert_eq!(json_string_field("{}", "job_id"), None);
    }
}
