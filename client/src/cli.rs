//! Command-line syntax of `farm`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Command-line client of the NewBie render farm: submit prompt batches, follow jobs, download images.
///
/// Connection settings come from flags, then the environment (FARM_ENDPOINT, FARM_TOKEN, FARM_CA_CERT,
/// FARM_CONFIG), then the config file (~/.config/farm/config.json or config.toml), then defaults.
///
/// Exit codes: 0 success; 1 other failure; 2 usage error; 3 invalid input (prompt validation, an
/// unreadable PNG, a results directory holding another job); 4 authentication or permission; 5 not
/// found.
#[derive(Debug, Parser)]
#[command(name = "farm", version, propagate_version = true, max_term_width = 110)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Coordinator address: http://HOST:PORT (plaintext) or https://HOST:PORT (TLS)
    /// [env: FARM_ENDPOINT] [default: http://127.0.0.1:50051]
    #[arg(long, global = true, help_heading = "Global options", value_name = "URL")]
    pub endpoint: Option<String>,
    /// API token, sent as `authorization: Bearer <token>` on every call [env: FARM_TOKEN]
    #[arg(long, global = true, help_heading = "Global options", value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM file of the CA that signed the coordinator's TLS certificate; an https:// endpoint then
    /// trusts only this CA (without it: the system's roots) [env: FARM_CA_CERT]
    #[arg(long, global = true, help_heading = "Global options", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Config file to read instead of ~/.config/farm/config.json [env: FARM_CONFIG]
    #[arg(long, global = true, help_heading = "Global options", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of tables (field names are stable)
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// Print nothing but the essential result (the job id, errors); no progress bars
    #[arg(long, short, global = true, help_heading = "Global options")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit prompt files as one job and print its id
    ///
    /// FILES are XML batch files (.xml), JSON Lines (.jsonl: one {"prompt": ...} object per line), plain
    /// text (one prompt per line), directories of such files (read in name order, recursively), or `-`
    /// for standard input (format detected from its first bytes). Prompts are streamed, never held in
    /// memory all at once. Every prompt is validated locally while streaming and again by the server;
    /// when any prompt is invalid the errors are printed, nothing is stored, and the exit code is 3.
    Submit(SubmitArgs),
    /// Show one job: state, counts, progress, throughput and ETA
    Status(JobArg),
    /// List your jobs, newest first
    Jobs(JobsArgs),
    /// Show one task (one prompt of a job): prompt, parameters, seed, attempt history and errors
    Task(TaskArgs),
    /// Follow a job live until it ends (reconnects and resumes after disconnects)
    ///
    /// Exits 0 when the job succeeded and 1 when it ended failed or cancelled. With --json, prints one
    /// JSON object per event and a final {"type":"final","job":{...}} line.
    Watch(JobArg),
    /// Cancel a job: queued tasks at once, running ones within a denoising step
    Cancel(JobArg),
    /// Queue a job's failed tasks again with a fresh attempt budget
    Retry(RetryArgs),
    /// Download a job's images into a directory (parallel, resumable)
    ///
    /// Files are named {index:06}.png. A file already present with the right SHA-256 is skipped, so the
    /// command can be re-run to finish an interrupted download or to fetch new results of a running job.
    /// Each file is written under a temporary name and renamed once complete and verified.
    Results(ResultsArgs),
    /// List the workers of the farm
    Workers(WorkersArgs),
    /// Print the render metadata stored in a result PNG (the `parameters` text and the JSON record)
    ShowPng(ShowPngArgs),
    /// Print a shell completion script, e.g. `farm completions bash > /etc/bash_completion.d/farm`
    Completions(CompletionsArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum SeedMode {
    /// Every prompt gets --seed
    Fixed,
    /// Prompt i gets --seed + i (the default; the base is random when --seed is not given)
    #[default]
    Increment,
    /// Every prompt gets its own random seed
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    Euler,
    Midpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Bf16,
    Fp16,
    Fp32,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Batch files, directories, or `-` for standard input
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
    /// Job name shown in listings (default: the first file's name)
    #[arg(long)]
    pub name: Option<String>,
    /// Key that makes a re-submission return the first job instead of creating another
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Job priority; higher runs first
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Image width in pixels for prompts that do not set one (multiple of 16) [server default: 1024]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub width: Option<u32>,
    /// Image height in pixels for prompts that do not set one (multiple of 16) [server default: 1024]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub height: Option<u32>,
    /// Denoising steps, 1..=200 [server default: 28]
    #[arg(long, value_parser = clap::value_parser!(u32)
        .range(farm_proto::limits::MIN_STEPS as i64..=farm_proto::limits::MAX_STEPS as i64))]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale, 0..=30; 1 = the conditional prediction, 0 = the unconditional
    /// one [server default: 5]
    #[arg(long = "cfg", value_name = "SCALE")]
    pub cfg_scale: Option<f32>,
    /// Apply guidance only while the flow time is below this, 0..=1; 0 = never (no unconditional
    /// pass: about half the compute) [server default: 1 = every step]
    #[arg(long, value_name = "T")]
    pub cfg_trunc: Option<f32>,
    /// Cap the guided velocity's norm at RENORM times the conditional one; 0 = off [default: 0]
    #[arg(long, value_name = "RENORM")]
    pub renorm: Option<f32>,
    /// Time shift of the sampling schedule, in (0, 100] [server default: 6]
    #[arg(long, value_parser = positive_shift)]
    pub shift: Option<f32>,
    /// ODE sampler [server default: euler]
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Numerical precision: the job goes only to workers rendering in it [default: any worker's,
    /// bf16 on a default worker]
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Model preset or checkpoint name [server default: newbie-exp0.1]
    #[arg(long)]
    pub model: Option<String>,
    /// Seed: the base for --seed-mode increment, the seed of every prompt for fixed
    #[arg(long)]
    pub seed: Option<u64>,
    /// How prompts without their own seed get one
    #[arg(long, value_enum, default_value_t = SeedMode::Increment)]
    pub seed_mode: SeedMode,
    /// Render attempts per task before it fails, 1 to 100 [server default: 3]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=farm_proto::limits::MAX_ATTEMPTS as i64))]
    pub max_attempts: Option<u32>,
    /// Negative prompt for prompts that do not set their own
    #[arg(long, value_name = "TEXT")]
    pub negative: Option<String>,
    /// Validate everything (locally and on the server) without storing a job
    #[arg(long)]
    pub validate_only: bool,
    /// Prompts per streamed message (messages are also cut at about 1 MiB)
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub chunk_size: u32,
    /// Stop after this many local validation errors
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_errors: u32,
    /// After submitting, follow the job until it ends (exit 1 if it ends failed or cancelled); stdout
    /// still holds only the job id, progress and the outcome go to stderr
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Clone, Args)]
pub struct JobArg {
    /// Job id
    pub job: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// Only jobs in this state (repeatable)
    #[arg(long, value_enum)]
    pub state: Vec<StateArg>,
    /// Only jobs whose name contains this text
    #[arg(long, value_name = "TEXT")]
    pub name: Option<String>,
    /// Most jobs to list; 0 lists all
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Debug, Clone, Args)]
pub struct TaskArgs {
    /// Job id
    pub job: String,
    /// 0-based index of the prompt in the job
    pub index: u64,
}

#[derive(Debug, Clone, Args)]
pub struct RetryArgs {
    /// Job id
    pub job: String,
    /// Also queue cancelled tasks again
    #[arg(long)]
    pub include_cancelled: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ResultsArgs {
    /// Job id
    pub job: String,
    /// Directory to write the images into (created if missing)
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Downloads in flight at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// Only ask for results committed since the last `--since` run into DIR (kept in
    /// DIR/.farm-results.json; a 60 s overlap is re-listed and already-present files are skipped)
    #[arg(long)]
    pub since: bool,
    /// Only results with an index at or above this
    #[arg(long, default_value_t = 0)]
    pub from_index: u64,
    /// Keep polling for new results until the job ends
    #[arg(long)]
    pub follow: bool,
    /// Write into a directory that holds another job's results (DIR/.farm-job names the job;
    /// files of the same index are replaced)
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    /// Also list workers that are no longer connected
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ShowPngArgs {
    /// PNG file written by the farm
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// Shell to generate the script for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `--shift`: a time shift in (0, 100] (0 is not "the default": it would divide the schedule by zero).
fn positive_shift(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v > 0.0 && v <= 100.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 100]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("farm").chain(args.iter().copied()))
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn zero_sizes_steps_and_shift_are_refused_not_taken_as_unset() {
        for (flag, value) in [
            ("--width", "0"),
            ("--height", "0"),
            ("--steps", "0"),
            ("--steps", "201"),
            ("--shift", "0"),
            ("--shift", "-1"),
            ("--shift", "nan"),
        ] {
            let arg = format!("{flag}={value}");
            let e = parse(&["submit", "a.txt", &arg]).expect_err(flag);
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag} {value}");
        }
        assert!(parse(&["submit", "a.txt", "--steps", "1", "--shift", "0.5", "--width", "16"]).is_ok());
    }

    #[test]
    fn submit_flags_parse() {
        let cli = parse(&[
            "submit",
            "a.jsonl",
            "dir",
            "-",
            "--width",
            "512",
            "--height",
            "768",
            "--steps",
            "20",
            "--cfg",
            "4.5",
            "--cfg-trunc",
            "0.9",
            "--renorm",
            "1",
            "--shift",
            "3",
            "--sampler",
            "midpoint",
            "--precision",
            "fp16",
            "--model",
            "tiny",
            "--seed",
            "7",
            "--seed-mode",
            "fixed",
            "--priority",
            "-2",
            "--name",
            "n",
            "--idempotency-key",
            "k",
            "--max-attempts",
            "5",
            "--negative",
            "blurry",
            "--wait",
            "--json",
            "--endpoint",
            "http://h:1",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(cli.global.endpoint.as_deref(), Some("http://h:1"));
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        assert!(cli.global.json);
        let Command::Submit(s) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(
            s.files,
            vec![PathBuf::from("a.jsonl"), PathBuf::from("dir"), PathBuf::from("-")]
        );
        assert_eq!((s.width, s.height, s.steps), (Some(512), Some(768), Some(20)));
        assert_eq!(s.cfg_scale, Some(4.5));
        assert_eq!(s.cfg_trunc, Some(0.9));
        assert_eq!(s.renorm, Some(1.0));
        assert_eq!(s.shift, Some(3.0));
        assert_eq!(s.sampler, Some(SamplerArg::Midpoint));
        assert_eq!(s.precision, Some(PrecisionArg::Fp16));
        assert_eq!(s.model.as_deref(), Some("tiny"));
        assert_eq!(s.seed, Some(7));
        assert_eq!(s.seed_mode, SeedMode::Fixed);
        assert_eq!(s.priority, -2);
        assert_eq!(s.max_attempts, Some(5));
        assert_eq!(s.negative.as_deref(), Some("blurry"));
        assert!(s.wait);
        assert_eq!(s.chunk_size, 2000);
    }

    #[test]
    fn submit_defaults() {
        let Command::Submit(s) = parse(&["submit", "x.txt"]).unwrap().command else {
            panic!()
        };
        assert_eq!(s.seed_mode, SeedMode::Increment);
        assert_eq!(s.seed, None);
        assert!(!s.wait && !s.validate_only);
        assert_eq!(s.priority, 0);
    }

    #[test]
    fn usage_errors_exit_2() {
        for bad in [
            vec!["submit"],
            vec!["submit", "x", "--seed-mode", "sometimes"],
            vec!["submit", "x", "--chunk-size", "0"],
            vec!["submit", "x", "--max-attempts", "0"],
            vec!["submit", "x", "--max-attempts", "101"],
            vec!["task", "job"],
            vec!["task", "job", "notanumber"],
            vec!["results", "job"],
            vec!["jobs", "--state", "weird"],
            vec!["frobnicate"],
        ] {
            let e = parse(&bad).err().unwrap_or_else(|| panic!("{bad:?} parsed"));
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn other_commands_parse() {
        let c = parse(&[
            "jobs", "--state", "running", "--state", "failed", "--name", "x", "--limit", "0",
        ])
        .unwrap();
        let Command::Jobs(j) = c.command else { panic!() };
        assert_eq!(j.state, vec![StateArg::Running, StateArg::Failed]);
        assert_eq!(j.limit, 0);
        let Command::Task(t) = parse(&["task", "j1", "12"]).unwrap().command else {
            panic!()
        };
        assert_eq!((t.job.as_str(), t.index), ("j1", 12));
        let Command::Results(r) = parse(&["results", "j1", "-o", "out", "--parallel", "8", "--since"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((r.parallel, r.since), (8, true));
        let Command::Retry(r) = parse(&["retry", "j1", "--include-cancelled"]).unwrap().command else {
            panic!()
        };
        assert!(r.include_cancelled);
        let Command::Workers(w) = parse(&["--json", "workers", "--all"]).unwrap().command else {
            panic!()
        };
        assert!(w.all);
        assert!(matches!(
            parse(&["completions", "zsh"]).unwrap().command,
            Command::Completions(_)
        ));
        assert!(matches!(
            parse(&["show-png", "a.png"]).unwrap().command,
            Command::ShowPng(_)
        ));
        assert!(matches!(
            parse(&["watch", "j"]).unwrap().command,
            Command::Watch(_)
        ));
        assert!(matches!(
            parse(&["cancel", "j"]).unwrap().command,
            Command::Cancel(_)
        ));
        assert!(matches!(
            parse(&["status", "j"]).unwrap().command,
            Command::Status(_)
        ));
    }
}
