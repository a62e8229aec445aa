//! `farm watch`: follow a job live until it reaches a final state.
//!
//! The event stream is resumed from the last sequence seen after any disconnect, with exponential
//! backoff (0.25 s doubling to 10 s; the command gives up after 10 minutes without a connection).
//! Counts, rate and ETA come from GetJob, refreshed every few seconds and soon after task events;
//! busy workers and their step progress come from the events.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use farm_proto::pb::{
    job_event, GetJobRequest, Job, JobEvent, ListWorkersRequest, TaskState, WatchJobRequest,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::connect::Client;
use crate::errors::{tls_failure, CliError, CliResult};
use crate::output::{self, job_is_done, job_is_final, job_state_name, task_state_name, JobOver, CANCEL_SETTLE};
use crate::ui::Ui;

/// How long the stream is still read after GetJob showed the job final, for the events in flight.
pub const FINAL_GRACE: Duration = Duration::from_secs(2);
/// A stream that stayed up this long resets the backoff even if it carried no event.
pub const STABLE_STREAM: Duration = Duration::from_secs(10);
/// First reconnect delay.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Give up after this long without managing to reach the coordinator.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// Whether a failed call is worth repeating.
pub fn is_transient(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// Exponential backoff with a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    failing_since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_START,
            failing_since: None,
        }
    }
}

impl Backoff {
    /// The delay before the next try; doubles each time up to [`BACKOFF_MAX`].
    pub fn next_delay(&mut self) -> Duration {
        self.failing_since.get_or_insert_with(Instant::now);
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
    pub fn reset(&mut self) {
        self.next = BACKOFF_START;
        self.failing_since = None;
    }
    pub fn exhausted(&self) -> bool {
        self.failing_since.is_some_and(|t| t.elapsed() > GIVE_UP_AFTER)
    }
}

/// What the display knows about one busy worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub index: u64,
    pub step: u32,
    pub total_steps: u32,
}

/// Live state built from the events: which worker renders which task.
#[derive(Debug, Default)]
pub struct LiveState {
    pub last_sequence: u64,
    pub busy: BTreeMap<String, Busy>,
    /// A task event arrived since the last GetJob refresh.
    pub dirty: bool,
    /// Final state announced by a job event.
    pub final_state: Option<i32>,
}

impl LiveState {
    /// Applies one event; returns false for a replayed event (sequence not above the last one).
    pub fn apply(&mut self, ev: &JobEvent) -> bool {
        if ev.sequence <= self.last_sequence && self.last_sequence != 0 {
            return false;
        }
        self.last_sequence = ev.sequence;
        match &ev.event {
            Some(job_event::Event::Task(t)) => {
                self.dirty = true;
                if t.state == TaskState::Running as i32 && !t.worker_id.is_empty() {
                    self.busy.retain(|_, b| b.index != t.index);
                    self.busy.insert(
                        t.worker_id.clone(),
                        Busy {
                            index: t.index,
                            step: 0,
                            total_steps: 0,
                        },
                    );
                } else {
                    self.busy.retain(|_, b| b.index != t.index);
                }
            }
            Some(job_event::Event::Progress(p)) if !p.worker_id.is_empty() => {
                let busy = Busy {
                    index: p.index,
                    step: p.step,
                    total_steps: p.total_steps,
                };
                self.busy.insert(p.worker_id.clone(), busy);
            }
            Some(job_event::Event::Progress(_)) => {}
            Some(job_event::Event::Job(j)) => {
                self.dirty = true;
                if job_is_final(j.state) {
                    self.final_state = Some(j.state);
                    self.busy.clear();
                }
            }
            None => {}
        }
        true
    }
}

/// The event as one JSON line (`farm watch --json`).
pub fn event_json(ev: &JobEvent) -> serde_json::Value {
    let base =
        |kind: &str| json!({"type": kind, "job_id": ev.job_id, "sequence": ev.sequence, "at_ms": ev.at_ms});
    match &ev.event {
        Some(job_event::Event::Task(t)) => {
            let mut v = base("task");
            v["index"] = json!(t.index);
            v["state"] = json!(task_state_name(t.state));
            v["worker_id"] = json!(t.worker_id);
            v["error"] = json!(t.error);
            v
        }
        Some(job_event::Event::Progress(p)) => {
            let mut v = base("progress");
            v["index"] = json!(p.index);
            v["step"] = json!(p.step);
            v["total_steps"] = json!(p.total_steps);
            v["worker_id"] = json!(p.worker_id);
            v
        }
        Some(job_event::Event::Job(j)) => {
            let mut v = base("job");
            v["state"] = json!(job_state_name(j.state));
            // A state change published without counts has `null`, not zeros.
            v["counts"] = j.counts.as_ref().map_or(serde_json::Value::Null, |c| output::counts_json(Some(c)));
            v
        }
        None => base("unknown"),
    }
}

struct Display {
    ui: Ui,
    multi: MultiProgress,
    overall: ProgressBar,
    workers: HashMap<String, ProgressBar>,
    names: HashMap<String, String>,
    names_fetched: Option<Instant>,
    last_line: Option<Instant>,
}

impl Display {
    fn new(ui: Ui) -> Self {
        let multi = MultiProgress::with_draw_target(if ui.bars {
            ProgressDrawTarget::stderr_with_hz(8)
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{prefix} [{bar:32}] {pos}/{len} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        Display {
            ui,
            multi,
            overall,
            workers: HashMap::new(),
            names: HashMap::new(),
            names_fetched: None,
            last_line: None,
        }
    }

    fn show_job(&mut self, job: &Job) {
        let c = job.counts.unwrap_or_default();
        let done = c.succeeded + c.failed + c.cancelled;
        self.overall.set_length(c.total);
        self.overall.set_position(done);
        self.overall.set_prefix(job_state_name(job.state).to_string());
        let msg = format!(
            "{} ok, {} failed, {} running | {:.2} images/s, ETA {}",
            c.succeeded,
            c.failed,
            c.running,
            job.images_per_second,
            output::format_duration(job.eta_seconds)
        );
        self.overall.set_message(msg.clone());
        if !self.ui.bars
            && self.ui.chatty()
            && self
                .last_line
                .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            self.last_line = Some(Instant::now());
            eprintln!(
                "{} {}: {}/{} done; {}",
                output::format_time(now_ms()),
                job_state_name(job.state),
                done,
                c.total,
                msg
            );
        }
    }

    fn show_workers(&mut self, live: &LiveState) {
        if !self.ui.bars {
            return;
        }
        self.workers.retain(|id, bar| {
            let keep = live.busy.contains_key(id);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for (id, b) in &live.busy {
            let bar = self.workers.entry(id.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template("  {prefix:<20} {msg:<14} [{bar:20}] step {pos}/{len}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                bar
            });
            let name = self
                .names
                .get(id)
                .cloned()
                .unwrap_or_else(|| output::short_id(id).to_string());
            bar.set_prefix(name);
            bar.set_message(format!("task #{}", b.index));
            bar.set_length(b.total_steps as u64);
            bar.set_position(b.step as u64);
        }
    }

    fn note(&self, text: &str) {
        if self.ui.bars {
            self.overall.set_message(text.to_string());
        } else if self.ui.chatty() {
            eprintln!("{text}");
        }
    }

    fn finish(&mut self) {
        for (_, b) in self.workers.drain() {
            b.finish_and_clear();
        }
        self.overall.finish_and_clear();
    }

    async fn refresh_names(&mut self, client: &mut Client, live: &LiveState) {
        if !self.ui.bars || live.busy.keys().all(|id| self.names.contains_key(id)) {
            return;
        }
        if self
            .names_fetched
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.names_fetched = Some(Instant::now());
        if let Ok(resp) = client
            .list_workers(ListWorkersRequest {
                include_disconnected: true,
            })
            .await
        {
            for w in resp.into_inner().workers {
                if !w.name.is_empty() {
                    self.names.insert(w.worker_id, w.name);
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// GetJob, retried on transient failures.
async fn get_job(
    client: &mut Client,
    job_id: &str,
    backoff: &mut Backoff,
    display: &Display,
) -> CliResult<Job> {
    loop {
        match client
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
        {
            // A GetJob that works says nothing about the event stream: the backoff is reset only by
            // events and by streams that stay up (see `watch`), so a stream that keeps breaking
            // while GetJob answers still backs off and gives up.
            Ok(r) => return Ok(r.into_inner()),
            // A certificate that is not trusted stays so: fail at once instead of retrying.
            Err(s) if is_transient(s.code()) && tls_failure(&s).is_none() && !backoff.exhausted() => {
                let d = backoff.next_delay();
                display.note(&format!(
                    "coordinator unreachable ({}); retrying in {:.1}s",
                    s.code(),
                    d.as_secs_f64()
                ));
                tokio::time::sleep(d).await;
            }
            Err(s) => return Err(CliError::from_status(&s, "watch")),
        }
    }
}

/// Follows a job until it reaches a final state and returns its final record. With `events_json`,
/// prints every event as a JSON line on stdout.
pub async fn watch(client: &mut Client, job_id: &str, ui: Ui, events_json: bool) -> CliResult<Job> {
    let mut display = Display::new(ui);
    let mut live = LiveState::default();
    let mut backoff = Backoff::default();
    let mut job = get_job(client, job_id, &mut backoff, &display).await?;
    display.show_job(&job);
    let mut refresh = tokio::time::interval(Duration::from_millis(750));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = Instant::now();
    let mut over = JobOver::default();

    while !over.check(&job) {
        let stream = client
            .watch_job(WatchJobRequest {
                job_id: job_id.to_string(),
                after_sequence: live.last_sequence,
            })
            .await;
        let connected_at = Instant::now();
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if is_transient(s.code()) && tls_failure(&s).is_none() && !backoff.exhausted() => {
                let d = backoff.next_delay();
                display.note(&format!(
                    "watch stream unavailable ({}); reconnecting in {:.1}s",
                    s.code(),
                    d.as_secs_f64()
                ));
                tokio::time::sleep(d).await;
                continue;
            }
            Err(s) => {
                display.finish();
                return Err(CliError::from_status(&s, "watch"));
            }
        };
        let mut final_grace: Option<tokio::time::Instant> = None;
        let ended_with: Option<tonic::Status> = loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(ev)) => {
                        backoff.reset();
                        if live.apply(&ev) && events_json {
                            println!("{}", event_json(&ev));
                        }
                        display.show_workers(&live);
                    }
                    Ok(None) => break None,
                    Err(s) => break Some(s),
                },
                _ = tokio::time::sleep_until(final_grace.unwrap_or_else(tokio::time::Instant::now)), if final_grace.is_some() => {
                    break None;
                }
                _ = refresh.tick() => {
                    let due = if live.dirty { Duration::from_millis(750) } else { Duration::from_secs(3) };
                    if last_refresh.elapsed() >= due {
                        last_refresh = Instant::now();
                        live.dirty = false;
                        if let Ok(r) = client.get_job(GetJobRequest { job_id: job_id.to_string() }).await {
                            job = r.into_inner();
                            display.show_job(&job);
                            // Final already: the closing events normally follow within moments;
                            // if they were lost, stop waiting for the server after a short grace.
                            if over.check(&job) && final_grace.is_none() {
                                final_grace = Some(tokio::time::Instant::now() + FINAL_GRACE);
                            }
                        }
                        display.refresh_names(client, &live).await;
                        display.show_workers(&live);
                    }
                }
            }
        };
        if connected_at.elapsed() >= STABLE_STREAM {
            backoff.reset();
        }
        // The stream ended (normally after the final state) or broke: ask where the job stands.
        job = get_job(client, job_id, &mut backoff, &display).await?;
        display.show_job(&job);
        if over.check(&job) {
            break;
        }
        match ended_with {
            Some(s) if !is_transient(s.code()) => {
                display.finish();
                return Err(CliError::from_status(&s, "watch"));
            }
            Some(s) if backoff.exhausted() => {
                display.finish();
                return Err(CliError::from_status(&s, "watch"));
            }
            None if backoff.exhausted() => {
                display.finish();
                return Err(CliError::failure(format!(
                    "watch: the event stream of job {job_id} kept ending before the job did; gave up after {} minutes",
                    GIVE_UP_AFTER.as_secs() / 60
                )));
            }
            other => {
                let d = backoff.next_delay();
                let why = other
                    .map(|s| format!("{}", s.code()))
                    .unwrap_or_else(|| "stream ended".into());
                display.note(&format!(
                    "disconnected ({why}); resuming after event {} in {:.1}s",
                    live.last_sequence,
                    d.as_secs_f64()
                ));
                tokio::time::sleep(d).await;
            }
        }
    }
    if !job_is_done(&job) {
        let running = job.counts.map_or(0, |c| c.running);
        display.note(&format!(
            "job {job_id} is cancelled; {running} running task(s) did not stop within {} s, not waiting longer",
            CANCEL_SETTLE.as_secs()
        ));
    }
    display.finish();
    if events_json {
        println!("{}", json!({"type": "final", "job": output::job_json(&job)}));
    }
    Ok(job)
}

/// The one-line summary printed when a watched job ends.
pub fn final_line(job: &Job) -> String {
    let c = job.counts.unwrap_or_default();
    let took = if job.finished_at_ms > 0 && job.created_at_ms > 0 {
        format!(
            " in {}",
            output::format_duration((job.finished_at_ms - job.created_at_ms) as f64 / 1000.0)
        )
    } else {
        String::new()
    };
    format!(
        "job {} {}: {} succeeded, {} failed, {} cancelled of {}{}",
        job.job_id,
        job_state_name(job.state),
        c.succeeded,
        c.failed,
        c.cancelled,
        c.total,
        took
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::pb::{JobState, JobStateChanged, TaskProgress, TaskStateChanged};

    fn ev(seq: u64, e: job_event::Event) -> JobEvent {
        JobEvent {
            job_id: "j".into(),
            sequence: seq,
            at_ms: 1,
            event: Some(e),
        }
    }

    #[test]
    fn live_state_tracks_busy_workers_and_sequence() {
        let mut s = LiveState::default();
        assert!(s.apply(&ev(
            1,
            job_event::Event::Task(TaskStateChanged {
                index: 3,
                state: TaskState::Running as i32,
                worker_id: "w1".into(),
                error: String::new()
            })
        )));
        assert!(s.apply(&ev(
            2,
            job_event::Event::Progress(TaskProgress {
                index: 3,
                step: 5,
                total_steps: 28,
                worker_id: "w1".into()
            })
        )));
        assert_eq!(
            s.busy["w1"],
            Busy {
                index: 3,
                step: 5,
                total_steps: 28
            }
        );
        assert!(
            !s.apply(&ev(
                2,
                job_event::Event::Progress(TaskProgress {
                    index: 3,
                    step: 1,
                    total_steps: 28,
                    worker_id: "w1".into()
                })
            )),
            "replays are ignored"
        );
        assert_eq!(s.busy["w1"].step, 5);
        s.apply(&ev(
            3,
            job_event::Event::Task(TaskStateChanged {
                index: 3,
                state: TaskState::Succeeded as i32,
                worker_id: "w1".into(),
                error: String::new(),
            }),
        ));
        assert!(s.busy.is_empty());
        assert_eq!(s.last_sequence, 3);
        s.apply(&ev(
            4,
            job_event::Event::Job(JobStateChanged {
                state: JobState::Succeeded as i32,
                counts: None,
            }),
        ));
        assert_eq!(s.final_state, Some(JobState::Succeeded as i32));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::default();
        let ds: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(ds[0], BACKOFF_START);
        assert_eq!(ds[1], BACKOFF_START * 2);
        assert_eq!(*ds.last().unwrap(), BACKOFF_MAX);
        assert!(!b.exhausted());
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_START);
        assert!(is_transient(tonic::Code::Unavailable));
        assert!(!is_transient(tonic::Code::NotFound));
    }

    #[test]
    fn final_line_summarises() {
        let job = Job {
            job_id: "j".into(),
            state: JobState::Failed as i32,
            counts: Some(farm_proto::pb::TaskCounts {
                succeeded: 8,
                failed: 2,
                total: 10,
                ..Default::default()
            }),
            created_at_ms: 1_000,
            finished_at_ms: 66_000,
            ..Default::default()
        };
        assert_eq!(
            final_line(&job),
            "job j failed: 8 succeeded, 2 failed, 0 cancelled of 10 in 1m05s"
        );
    }

    #[test]
    fn events_as_json_lines() {
        let v = event_json(&ev(
            7,
            job_event::Event::Task(TaskStateChanged {
                index: 2,
                state: TaskState::Failed as i32,
                worker_id: "w".into(),
                error: "oom".into(),
            }),
        ));
        assert_eq!(v["type"], "task");
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["state"], "failed");
        assert_eq!(v["error"], "oom");
        let state = |counts| event_json(&ev(8, job_event::Event::Job(JobStateChanged { state: JobState::Cancelled as i32, counts })));
        assert!(state(None)["counts"].is_null(), "a state change without counts is not reported as zeros");
        let counts = farm_proto::pb::TaskCounts { cancelled: 4, total: 4, ..Default::default() };
        assert_eq!(state(Some(counts))["counts"]["cancelled"], 4);
    }
}
