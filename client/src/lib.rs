//! The `farm` command-line client of the NewBie render farm.
//!
//! `main.rs` only calls [`main`]; everything else lives here so that tests can drive the commands.
//!
//! * [`cli`]: command-line syntax.
//! * [`config`]: endpoint/token/CA settings and their precedence.
//! * [`connect`]: the gRPC channel with the bearer-token interceptor.
//! * [`submit`]: streaming submission of prompt files.
//! * [`watch`]: live job progress with resumable event streams.
//! * [`results`]: parallel, resumable result downloads.
//! * [`output`]: JSON shapes and human tables.
//! * [`pngmeta`]: metadata of result PNGs.
//! * [`errors`]: errors and exit codes.

pub mod cli;
pub mod config;
pub mod connect;
pub mod errors;
pub mod output;
pub mod pngmeta;
pub mod results;
pub mod submit;
pub mod ui;
pub mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use farm_proto::pb::{
    CancelJobRequest, GetJobRequest, GetTaskRequest, JobState, ListJobsRequest, ListWorkersRequest,
    RetryJobRequest,
};
use serde_json::json;

use crate::cli::{Cli, Command, StateArg};
use crate::config::FlagConfig;
use crate::connect::Conn;
use crate::errors::{exit, CliError, CliResult, ErrorKind};
use crate::ui::Ui;

/// Parses the process arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    // Die quietly on a closed pipe (`farm jobs | head`) instead of panicking in println!.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // Help and version exit 0, usage errors 2.
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FARM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(unix)]
    builder.on_thread_start(block_sigpipe_in_this_thread);
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE as u8);
        }
    };
    let code = runtime.block_on(run(cli));
    ExitCode::from(code as u8)
}

/// Blocks SIGPIPE in the calling thread. The runtime's threads drive the connections, and a vectored
/// write to a socket the peer has closed (for example a TLS port answering a plaintext client with an
/// alert and a close) raises SIGPIPE, which the default disposition set in [`main`] would turn into a
/// silent death; blocked, the write fails with EPIPE and becomes an error with a message. Output to
/// stdout happens on the main thread, which keeps the default.
#[cfg(unix)]
fn block_sigpipe_in_this_thread() {
    // SAFETY: plain libc calls on a local signal set; only the calling thread's mask changes.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Runs a parsed command line; prints errors and returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    match execute(cli).await {
        Ok(()) => exit::OK,
        Err(e) => {
            if !e.reported {
                eprintln!("error: {e}");
            }
            e.exit_code()
        }
    }
}

/// Runs a parsed command line.
pub async fn execute(cli: Cli) -> CliResult<()> {
    let ui = Ui::new(cli.global.json, cli.global.quiet);
    // Commands that need no connection.
    match &cli.command {
        Command::Completions(a) => {
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "farm", &mut std::io::stdout());
            return Ok(());
        }
        Command::ShowPng(a) => return pngmeta::run(&a.file, ui.json),
        _ => {}
    }
    let flags = FlagConfig {
        endpoint: cli.global.endpoint.clone(),
        token: cli.global.token.clone(),
        ca_cert: cli.global.ca_cert.clone(),
        config: cli.global.config.clone(),
    };
    let settings = config::load(&flags)?;
    let conn = connect::connect(&settings)?;
    let Err(mut e) = dispatch(&conn, cli.command, ui).await else {
        return Ok(());
    };
    // A plaintext call cut off by the server: find out whether it is a TLS port.
    if settings.endpoint.starts_with("http://")
        && errors::looks_like_cut_connection(&e.message)
        && connect::speaks_tls(&settings.endpoint).await
    {
        e.message = format!(
            "{} [endpoint {}]; that port speaks TLS: use an https:// endpoint (with --ca-cert FILE when \
             its CA is private)",
            e.message, settings.endpoint
        );
    } else if e.message.contains("coordinator is unavailable") || e.message.contains("TLS handshake failed") {
        e.message.push_str(&format!(" [endpoint {}]", settings.endpoint));
    }
    Err(e)
}

/// Runs a command over a connection.
pub async fn dispatch(conn: &Conn, command: Command, ui: Ui) -> CliResult<()> {
    let client = &mut conn.jobs();
    match command {
        Command::Submit(args) => {
            let job_id = submit::run(conn.service(), &args, ui).await?;
            if let (true, Some(id)) = (args.wait, job_id) {
                let job = watch::watch(client, &id, ui, false).await?;
                return finish_watch(&job, ui, true);
            }
            Ok(())
        }
        Command::Status(a) => {
            let job = client
                .get_job(GetJobRequest {
                    job_id: a.job.clone(),
                })
                .await
                .map_err(|s| CliError::from_status(&s, &format!("job {}", a.job)))?
                .into_inner();
            if ui.json {
                println!("{}", output::job_json(&job));
            } else {
                print!("{}", output::job_human(&job));
            }
            Ok(())
        }
        Command::Jobs(a) => {
            let states: Vec<i32> = a.state.iter().map(|s| state_filter(*s) as i32).collect();
            let mut jobs = Vec::new();
            let mut token = String::new();
            loop {
                let want = if a.limit == 0 {
                    1000
                } else {
                    (a.limit as usize - jobs.len()).min(1000) as u32
                };
                let resp = client
                    .list_jobs(ListJobsRequest {
                        states: states.clone(),
                        name_contains: a.name.clone().unwrap_or_default(),
                        page_size: want,
                        page_token: token.clone(),
                    })
                    .await
                    .map_err(|s| CliError::from_status(&s, "jobs"))?
                    .into_inner();
                jobs.extend(resp.jobs);
                if a.limit != 0 && jobs.len() >= a.limit as usize {
                    jobs.truncate(a.limit as usize);
                    break;
                }
                if resp.next_page_token.is_empty() {
                    break;
                }
                token = resp.next_page_token;
            }
            if ui.json {
                println!(
                    "{}",
                    json!({ "jobs": jobs.iter().map(output::job_json).collect::<Vec<_>>() })
                );
            } else if jobs.is_empty() {
                if !ui.quiet {
                    eprintln!("no jobs");
                }
            } else {
                print!("{}", output::jobs_table(&jobs));
            }
            Ok(())
        }
        Command::Task(a) => {
            let task = client
                .get_task(GetTaskRequest {
                    job_id: a.job.clone(),
                    index: a.index,
                })
                .await
                .map_err(|s| CliError::from_status(&s, &format!("task {} of job {}", a.index, a.job)))?
                .into_inner();
            if ui.json {
                println!("{}", output::task_json(&task));
            } else {
                print!("{}", output::task_human(&task));
            }
            Ok(())
        }
        Command::Watch(a) => {
            let job = watch::watch(client, &a.job, ui, ui.json).await?;
            finish_watch(&job, ui, false)
        }
        Command::Cancel(a) => {
            let r = client
                .cancel_job(CancelJobRequest {
                    job_id: a.job.clone(),
                })
                .await
                .map_err(|s| CliError::from_status(&s, &format!("cancel {}", a.job)))?
                .into_inner();
            if ui.json {
                println!(
                    "{}",
                    json!({"job_id": a.job, "cancelled_queued": r.cancelled_queued, "cancelling_running": r.cancelling_running})
                );
            } else if !ui.quiet {
                println!(
                    "job {}: {} queued task(s) cancelled, {} running task(s) stopping",
                    a.job, r.cancelled_queued, r.cancelling_running
                );
            }
            Ok(())
        }
        Command::Retry(a) => {
            let r = client
                .retry_job(RetryJobRequest {
                    job_id: a.job.clone(),
                    include_cancelled: a.include_cancelled,
                })
                .await
                .map_err(|s| CliError::from_status(&s, &format!("retry {}", a.job)))?
                .into_inner();
            if ui.json {
                println!("{}", json!({"job_id": a.job, "requeued": r.requeued}));
            } else if !ui.quiet {
                println!("job {}: {} task(s) queued again", a.job, r.requeued);
            }
            Ok(())
        }
        Command::Results(a) => {
            let opts = results::ResultsOptions {
                dir: a.output.clone(),
                parallel: a.parallel as usize,
                since: a.since,
                from_index: a.from_index,
                follow: a.follow,
                poll_interval: std::time::Duration::from_secs(5),
                force: a.force,
            };
            let summary = results::download(client, &a.job, &opts, ui).await?;
            results::report(&a.job, &a.output, &summary, ui)
        }
        Command::Workers(a) => {
            let r = client
                .list_workers(ListWorkersRequest {
                    include_disconnected: a.all,
                })
                .await
                .map_err(|s| CliError::from_status(&s, "workers"))?
                .into_inner();
            if ui.json {
                println!(
                    "{}",
                    json!({ "workers": r.workers.iter().map(output::worker_json).collect::<Vec<_>>() })
                );
            } else if r.workers.is_empty() {
                if !ui.quiet {
                    eprintln!("no workers");
                }
            } else {
                print!("{}", output::workers_table(&r.workers));
            }
            Ok(())
        }
        Command::ShowPng(a) => pngmeta::run(&a.file, ui.json),
        Command::Completions(_) => Err(CliError::usage("completions need no connection")),
    }
}

/// Prints how a watched job ended; a job that did not succeed exits 1.
fn finish_watch(job: &farm_proto::pb::Job, ui: Ui, after_submit: bool) -> CliResult<()> {
    if ui.json {
        if after_submit {
            println!("{}", json!({"type": "final", "job": output::job_json(job)}));
        }
    } else if after_submit {
        // stdout holds the job id alone (`id=$(farm submit --wait ...)`).
        if !ui.quiet {
            eprintln!("{}", watch::final_line(job));
        }
    } else if !ui.quiet {
        println!("{}", watch::final_line(job));
    }
    if job.state == JobState::Succeeded as i32 {
        Ok(())
    } else {
        Err(CliError::reported(
            ErrorKind::Failure,
            format!("job {} ended {}", job.job_id, output::job_state_name(job.state)),
        ))
    }
}

fn state_filter(s: StateArg) -> JobState {
    match s {
        StateArg::Queued => JobState::Queued,
        StateArg::Running => JobState::Running,
        StateArg::Succeeded => JobState::Succeeded,
        StateArg::Failed => JobState::Failed,
        StateArg::Cancelled => JobState::Cancelled,
    }
}
