//! Human tables and the stable JSON shapes printed with `--json`.
//!
//! JSON field names (stable; new fields may be added, none renamed or removed):
//!
//! * job: `job_id`, `name`, `state` (`queued|running|succeeded|failed|cancelled|unspecified`),
//!   `priority`, `counts` {`queued`, `running`, `succeeded`, `failed`, `cancelled`, `total`},
//!   `progress` (0..1), `images_per_second`, `eta_seconds` (null when unknown), `queue_position`,
//!   `defaults` (render params), `max_attempts`, `created_at_ms`, `finished_at_ms` (null while
//!   unfinished), `started_at_ms` (when a worker first took a task since submission or the last
//!   retry; null before), `idempotency_key`.
//! * render params: `width`, `height`, `steps`, `cfg_scale`, `cfg_trunc`, `renorm_cfg`, `shift`,
//!   `sampler` (`euler|midpoint|default`), `precision` (`bf16|fp16|fp32|default`), `model`.
//! * task: `task_id`, `job_id`, `index`, `state`, `prompt`, `negative_prompt`, `params`, `seed`,
//!   `failures`, `current_step`, `last_error`, `result` (result or null), `attempts` [{`attempt`,
//!   `worker_id`, `worker_name`, `started_at_ms`, `ended_at_ms` (null while running), `outcome`, `error`,
//!   `lease_token`, `metadata` (the worker's render metadata, or null)}].
//! * result: `job_id`, `index`, `size_bytes`, `sha256`, `content_type`, `created_at_ms`, `worker_id`.
//! * worker: `worker_id`, `name`, `connected`, `device`, `device_name`, `vram_total_bytes`,
//!   `vram_free_bytes`, `model_name`, `model_hash`, `precision`, `max_batch`, `max_pixels`, `version`,
//!   `verified`, `verified_at_ms` (0 when never verified), `attention_backend`, `connected_at_ms`, `last_heartbeat_ms`, `current_tasks` [{`job_id`,
//!   `index`, `task_id`}], `images_per_second`, `completed`, `failed`, `coordinator`.
//! * prompt issue: `index`, `source`, `source_line`, `line`, `column`, `code`, `message`.

use farm_proto::pb::{
    Attempt, Job, JobState, Precision, PromptIssue, RenderParams, ResultInfo, Sampler, Task, TaskCounts,
    TaskState, WorkerInfo,
};
use serde_json::{json, Value};

pub fn job_state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unspecified",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub fn task_state_name(state: i32) -> &'static str {
    match TaskState::try_from(state).unwrap_or(TaskState::Unspecified) {
        TaskState::Unspecified => "unspecified",
        TaskState::Queued => "queued",
        TaskState::Running => "running",
        TaskState::Succeeded => "succeeded",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
    }
}

pub fn sampler_name(s: i32) -> &'static str {
    match Sampler::try_from(s).unwrap_or(Sampler::Unspecified) {
        Sampler::Unspecified => "default",
        Sampler::Euler => "euler",
        Sampler::Midpoint => "midpoint",
    }
}

pub fn precision_name(p: i32) -> &'static str {
    match Precision::try_from(p).unwrap_or(Precision::Unspecified) {
        Precision::Unspecified => "default",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
        Precision::Fp32 => "fp32",
    }
}

/// Whether a job state is final.
pub use farm_proto::job_state_is_final as job_is_final;

/// Whether a job is over: its state is final and, for a cancelled job, its running tasks have
/// stopped too (a job reads CANCELLED from the cancel on, and a task that was finishing then may
/// still commit its result until the job closes).
pub fn job_is_done(job: &Job) -> bool {
    job_is_final(job.state) && (job.state != JobState::Cancelled as i32 || job.finished_at_ms > 0)
}

/// How long a client waits for the running tasks of a cancelled job to stop.
pub const CANCEL_SETTLE: std::time::Duration = std::time::Duration::from_secs(120);

/// Decides when a followed job is over: when [`job_is_done`], or once it has read CANCELLED with
/// tasks still stopping for [`CANCEL_SETTLE`] (a worker whose render hangs may never stop one).
#[derive(Debug, Default)]
pub struct JobOver {
    cancelling_since: Option<std::time::Instant>,
}

impl JobOver {
    pub fn check(&mut self, job: &Job) -> bool {
        self.check_at(job, std::time::Instant::now())
    }

    fn check_at(&mut self, job: &Job, now: std::time::Instant) -> bool {
        if job_is_done(job) {
            return true;
        }
        if !job_is_final(job.state) {
            self.cancelling_since = None;
            return false;
        }
        now.saturating_duration_since(*self.cancelling_since.get_or_insert(now)) >= CANCEL_SETTLE
    }
}

pub fn counts_json(c: Option<&TaskCounts>) -> Value {
    let c = c.cloned().unwrap_or_default();
    json!({
        "queued": c.queued, "running": c.running, "succeeded": c.succeeded,
        "failed": c.failed, "cancelled": c.cancelled, "total": c.total,
    })
}

pub fn params_json(p: Option<&RenderParams>) -> Value {
    let p = p.cloned().unwrap_or_default();
    json!({
        "width": p.width, "height": p.height, "steps": p.steps, "cfg_scale": p.cfg_scale,
        "cfg_trunc": p.cfg_trunc, "renorm_cfg": p.renorm_cfg, "shift": p.shift,
        "sampler": sampler_name(p.sampler), "precision": precision_name(p.precision), "model": p.model,
    })
}

/// A time in ms since 1970, or null where it is unset (0).
fn time_or_null(ms: i64) -> Value {
    if ms > 0 {
        json!(ms)
    } else {
        Value::Null
    }
}

pub fn job_json(j: &Job) -> Value {
    json!({
        "job_id": j.job_id,
        "name": j.name,
        "state": job_state_name(j.state),
        "priority": j.priority,
        "counts": counts_json(j.counts.as_ref()),
        "progress": j.progress,
        "images_per_second": j.images_per_second,
        "eta_seconds": if j.eta_seconds >= 0.0 { json!(j.eta_seconds) } else { Value::Null },
        "queue_position": j.queue_position,
        "defaults": params_json(j.defaults.as_ref()),
        "max_attempts": j.max_attempts,
        "created_at_ms": j.created_at_ms,
        "finished_at_ms": time_or_null(j.finished_at_ms),
        "started_at_ms": time_or_null(j.started_at_ms),
        "idempotency_key": j.idempotency_key,
    })
}

pub fn result_json(r: &ResultInfo) -> Value {
    json!({
        "job_id": r.job_id, "index": r.index, "size_bytes": r.size_bytes, "sha256": r.sha256,
        "content_type": r.content_type, "created_at_ms": r.created_at_ms, "worker_id": r.worker_id,
    })
}

pub fn attempt_json(a: &Attempt) -> Value {
    json!({
        "attempt": a.attempt, "worker_id": a.worker_id, "worker_name": a.worker_name,
        "started_at_ms": a.started_at_ms,
        "ended_at_ms": time_or_null(a.ended_at_ms),
        "outcome": a.outcome, "error": a.error, "lease_token": a.lease_token,
        // The worker's render metadata, as an object (null when the attempt has none).
        "metadata": serde_json::from_str::<Value>(&a.metadata_json).unwrap_or(Value::Null),
    })
}

pub fn task_json(t: &Task) -> Value {
    json!({
        "task_id": t.task_id, "job_id": t.job_id, "index": t.index, "state": task_state_name(t.state),
        "prompt": t.prompt, "negative_prompt": t.negative_prompt, "params": params_json(t.params.as_ref()),
        "seed": t.seed, "failures": t.failures, "current_step": t.current_step, "last_error": t.last_error,
        "result": t.result.as_ref().map(result_json).unwrap_or(Value::Null),
        "attempts": t.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    })
}

pub fn worker_json(w: &WorkerInfo) -> Value {
    let c = w.capabilities.clone().unwrap_or_default();
    json!({
        "worker_id": w.worker_id, "name": w.name, "connected": w.connected,
        "device": c.device, "device_name": c.device_name, "vram_total_bytes": c.vram_total_bytes,
        "vram_free_bytes": c.vram_free_bytes, "model_name": c.model_name, "model_hash": c.model_hash,
        "precision": precision_name(c.precision), "max_batch": c.max_batch, "max_pixels": c.max_pixels,
        "version": c.version, "verified": c.verified, "verified_at_ms": c.verified_at_ms,
        "attention_backend": c.attention_backend,
        "connected_at_ms": w.connected_at_ms, "last_heartbeat_ms": w.last_heartbeat_ms,
        "current_tasks": w.current_tasks.iter()
            .map(|t| json!({"job_id": t.job_id, "index": t.index, "task_id": t.task_id}))
            .collect::<Vec<_>>(),
        "images_per_second": w.images_per_second, "completed": w.completed, "failed": w.failed,
        "coordinator": w.coordinator,
    })
}

pub fn issue_json(i: &PromptIssue) -> Value {
    json!({
        "index": i.index, "source": i.source, "source_line": i.source_line, "line": i.line,
        "column": i.column, "code": i.code, "message": i.message,
    })
}

/// One line for a prompt problem: `FILE:FILE_LINE: prompt #INDEX, line L, column C: MESSAGE [CODE]`.
/// The file line is where the prompt starts in its file; line and column are inside the prompt text.
pub fn format_issue(i: &PromptIssue) -> String {
    let mut s = String::new();
    if !i.source.is_empty() {
        s.push_str(&i.source);
        if i.source_line > 0 {
            s.push_str(&format!(":{}", i.source_line));
        }
        s.push_str(": ");
    }
    s.push_str(&format!("prompt #{}", i.index));
    if i.line > 0 {
        s.push_str(&format!(", line {}, column {}", i.line, i.column));
    }
    s.push_str(": ");
    s.push_str(&i.message);
    if !i.code.is_empty() {
        s.push_str(&format!(" [{}]", i.code));
    }
    s
}

/// Seconds as `1h02m03s`, `4m05s` or `6s`; `-` when unknown (negative or not finite).
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Unix milliseconds as UTC `YYYY-MM-DD HH:MM:SS`; `-` for 0.
pub fn format_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        None => "-".into(),
    }
}

pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn format_params(p: Option<&RenderParams>) -> String {
    let Some(p) = p else { return "-".into() };
    let or_default = |v: u32| {
        if v == 0 {
            "default".to_string()
        } else {
            v.to_string()
        }
    };
    let f = |v: f32| {
        if v == 0.0 {
            "default".to_string()
        } else {
            format!("{v}")
        }
    };
    format!(
        "{}x{}, {} steps, cfg {} (trunc {}, renorm {}), shift {}, {}, {}, model {}",
        or_default(p.width),
        or_default(p.height),
        or_default(p.steps),
        p.cfg_scale.map_or("default".into(), |v| v.to_string()),
        p.cfg_trunc.map_or("default".into(), |v| v.to_string()),
        p.renorm_cfg,
        f(p.shift),
        sampler_name(p.sampler),
        precision_name(p.precision),
        if p.model.is_empty() { "default" } else { &p.model },
    )
}

/// A plain text table: columns padded to their widest cell, two spaces apart.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                if i + 1 == n {
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Human description of a job (`farm status`).
pub fn job_human(j: &Job) -> String {
    let c = j.counts.unwrap_or_default();
    let mut t = String::new();
    let mut kv = |k: &str, v: String| t.push_str(&format!("{k:<15} {v}\n"));
    kv("job", j.job_id.clone());
    if !j.name.is_empty() {
        kv("name", j.name.clone());
    }
    let state = if job_is_final(j.state) && !job_is_done(j) {
        format!("{} ({} running tasks stopping)", job_state_name(j.state), c.running)
    } else {
        job_state_name(j.state).to_string()
    };
    kv("state", state);
    kv(
        "progress",
        format!(
            "{:.1}%  ({} of {} images)",
            j.progress * 100.0,
            c.succeeded,
            c.total
        ),
    );
    kv(
        "tasks",
        format!(
            "queued {}, running {}, succeeded {}, failed {}, cancelled {}, total {}",
            c.queued, c.running, c.succeeded, c.failed, c.cancelled, c.total
        ),
    );
    if !job_is_final(j.state) {
        kv(
            "rate",
            format!(
                "{:.2} images/s, ETA {}",
                j.images_per_second,
                format_duration(j.eta_seconds)
            ),
        );
        // The coordinator stops counting at 100,000.
        let ahead = if j.queue_position >= 100_000 { "100000+".to_string() } else { j.queue_position.to_string() };
        kv("queued ahead", format!("{ahead} tasks of earlier or higher-priority jobs"));
    }
    kv("priority", j.priority.to_string());
    kv("defaults", format_params(j.defaults.as_ref()));
    kv("max attempts", j.max_attempts.to_string());
    kv("created", format_time(j.created_at_ms));
    if j.started_at_ms > 0 {
        kv("started", format_time(j.started_at_ms));
    }
    if j.finished_at_ms > 0 {
        kv("finished", format_time(j.finished_at_ms));
    }
    if !j.idempotency_key.is_empty() {
        kv("idempotency key", j.idempotency_key.clone());
    }
    t
}

/// The `farm jobs` table.
pub fn jobs_table(jobs: &[Job]) -> String {
    let mut t = Table::new(&[
        "JOB", "NAME", "STATE", "DONE", "FAILED", "PROGRESS", "PRIO", "CREATED",
    ]);
    for j in jobs {
        let c = j.counts.unwrap_or_default();
        t.row(vec![
            j.job_id.clone(),
            j.name.clone(),
            job_state_name(j.state).into(),
            format!("{}/{}", c.succeeded, c.total),
            c.failed.to_string(),
            format!("{:.1}%", j.progress * 100.0),
            j.priority.to_string(),
            format_time(j.created_at_ms),
        ]);
    }
    t.render()
}

/// How a result was rendered, from an attempt's metadata: time, batch, precision and worker.
fn render_line(metadata_json: &str) -> Option<String> {
    let m: Value = serde_json::from_str(metadata_json).ok()?;
    let ms = m.get("render_ms")?.as_u64()?;
    let mut line = format!("in {:.1} s ", ms as f64 / 1000.0);
    match m.get("batch_size").and_then(Value::as_u64) {
        Some(n) if n > 1 => line.push_str(&format!("(a batch of {n})")),
        _ => line.push_str("(alone)"),
    }
    for (key, label) in [("precision", ""), ("worker", "on ")] {
        if let Some(v) = m.get(key).and_then(Value::as_str).filter(|v| !v.is_empty()) {
            line.push_str(&format!(", {label}{v}"));
        }
    }
    Some(line)
}

/// Human description of a task with its attempt history (`farm task`).
pub fn task_human(t: &Task) -> String {
    let mut s = String::new();
    let mut kv = |k: &str, v: String| s.push_str(&format!("{k:<11} {v}\n"));
    kv(
        "task",
        format!("{} (job {}, index {})", t.task_id, t.job_id, t.index),
    );
    kv("state", task_state_name(t.state).into());
    if t.state == TaskState::Running as i32 {
        let steps = t.params.as_ref().map(|p| p.steps).unwrap_or(0);
        kv("step", format!("{}/{}", t.current_step, steps));
    }
    kv("seed", t.seed.to_string());
    kv("params", format_params(t.params.as_ref()));
    kv("failures", t.failures.to_string());
    if !t.last_error.is_empty() {
        kv("last error", t.last_error.clone());
    }
    if let Some(r) = &t.result {
        kv(
            "result",
            format!(
                "{} {} sha256 {}",
                format_bytes(r.size_bytes),
                r.content_type,
                r.sha256
            ),
        );
    }
    if let Some(line) = t.attempts.iter().rev().find_map(|a| render_line(&a.metadata_json)) {
        kv("rendered", line);
    }
    kv("prompt", t.prompt.clone());
    if !t.negative_prompt.is_empty() {
        kv("negative", t.negative_prompt.clone());
    }
    if t.attempts.is_empty() {
        s.push_str("\nno attempts yet\n");
    } else {
        let mut tab = Table::new(&["ATTEMPT", "WORKER", "STARTED", "DURATION", "OUTCOME", "ERROR"]);
        for a in &t.attempts {
            let worker = if a.worker_name.is_empty() {
                a.worker_id.clone()
            } else {
                a.worker_name.clone()
            };
            let dur = if a.ended_at_ms > 0 && a.started_at_ms > 0 {
                format_duration((a.ended_at_ms - a.started_at_ms) as f64 / 1000.0)
            } else {
                "-".into()
            };
            tab.row(vec![
                a.attempt.to_string(),
                worker,
                format_time(a.started_at_ms),
                dur,
                a.outcome.clone(),
                a.error.replace('\n', " "),
            ]);
        }
        s.push('\n');
        s.push_str(&tab.render());
    }
    s
}

/// The `farm workers` table.
pub fn workers_table(workers: &[WorkerInfo]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "WORKER",
        "STATUS",
        "DEVICE",
        "MODEL",
        "PREC",
        "BATCH",
        "VERIFIED",
        "BUSY",
        "IMG/S",
        "DONE",
        "FAILED",
        "COORDINATOR",
    ]);
    for w in workers {
        let c = w.capabilities.clone().unwrap_or_default();
        let device = if c.device_name.is_empty() {
            c.device.clone()
        } else {
            format!("{} ({})", c.device, c.device_name)
        };
        let busy = w
            .current_tasks
            .iter()
            .map(|r| format!("{}#{}", short_id(&r.job_id), r.index))
            .collect::<Vec<_>>()
            .join(",");
        t.row(vec![
            w.name.clone(),
            w.worker_id.clone(),
            if w.connected {
                "connected".into()
            } else {
                "gone".into()
            },
            device,
            c.model_name.clone(),
            precision_name(c.precision).into(),
            c.max_batch.to_string(),
            if c.verified { "yes".into() } else { "no".into() },
            if busy.is_empty() { "-".into() } else { busy },
            format!("{:.2}", w.images_per_second),
            w.completed.to_string(),
            w.failed.to_string(),
            w.coordinator.clone(),
        ]);
    }
    t.render()
}

/// The first 8 characters of an id, for narrow columns.
pub fn short_id(id: &str) -> &str {
    match id.char_indices().nth(8) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            job_id: "j-1".into(),
            name: "batch".into(),
            state: JobState::Running as i32,
            priority: 2,
            counts: Some(TaskCounts {
                queued: 3,
                running: 1,
                succeeded: 5,
                failed: 1,
                cancelled: 0,
                total: 10,
            }),
            progress: 0.55,
            images_per_second: 1.5,
            eta_seconds: -1.0,
            queue_position: 0,
            defaults: Some(RenderParams {
                width: 512,
                height: 512,
                steps: 20,
                ..Default::default()
            }),
            max_attempts: 3,
            created_at_ms: 1_700_000_000_000,
            finished_at_ms: 0,
            started_at_ms: 1_700_000_030_000,
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn job_json_has_stable_fields() {
        let v = job_json(&job());
        assert_eq!(v["job_id"], "j-1");
        assert_eq!(v["state"], "running");
        let c = &v["counts"];
        for (k, n) in [
            ("queued", 3),
            ("running", 1),
            ("succeeded", 5),
            ("failed", 1),
            ("cancelled", 0),
            ("total", 10),
        ] {
            assert_eq!(c[k], n, "{k}");
        }
        assert!(v["eta_seconds"].is_null());
        assert!(v["finished_at_ms"].is_null());
        assert_eq!(v["defaults"]["width"], 512);
        assert_eq!(v["defaults"]["sampler"], "default");
        assert_eq!(v["created_at_ms"], 1_700_000_000_000i64);
    }

    #[test]
    fn state_names_are_lowercase() {
        assert_eq!(job_state_name(JobState::Queued as i32), "queued");
        assert_eq!(job_state_name(JobState::Succeeded as i32), "succeeded");
        assert_eq!(job_state_name(JobState::Failed as i32), "failed");
        assert_eq!(job_state_name(JobState::Cancelled as i32), "cancelled");
        assert_eq!(job_state_name(99), "unspecified");
        assert_eq!(task_state_name(TaskState::Running as i32), "running");
        assert!(job_is_final(JobState::Failed as i32));
        let cancelling = Job { state: JobState::Cancelled as i32, ..Default::default() };
        assert!(!job_is_done(&cancelling), "a cancelled job with tasks still stopping is not over");
        assert!(job_is_done(&Job { finished_at_ms: 1, ..cancelling.clone() }));
        assert!(job_is_done(&Job { state: JobState::Failed as i32, ..Default::default() }));
        // A cancelled job whose tasks never stop is over after CANCEL_SETTLE; a retry restarts that.
        let t0 = std::time::Instant::now();
        let mut over = JobOver::default();
        assert!(!over.check_at(&cancelling, t0));
        assert!(!over.check_at(&cancelling, t0 + CANCEL_SETTLE / 2));
        assert!(!over.check_at(&Job { state: JobState::Running as i32, ..Default::default() }, t0 + CANCEL_SETTLE / 2));
        assert!(!over.check_at(&cancelling, t0 + CANCEL_SETTLE));
        assert!(over.check_at(&cancelling, t0 + CANCEL_SETTLE * 2));
        assert!(!job_is_final(JobState::Running as i32));
    }

    #[test]
    fn issue_line_names_file_index_line_and_column() {
        let i = PromptIssue {
            index: 41,
            line: 2,
            column: 7,
            code: "xml_syntax".into(),
            message: "unclosed tag".into(),
            source: "a.xml".into(),
            source_line: 130,
        };
        assert_eq!(
            format_issue(&i),
            "a.xml:130: prompt #41, line 2, column 7: unclosed tag [xml_syntax]"
        );
        let j = issue_json(&i);
        assert_eq!(j["index"], 41);
        assert_eq!(j["column"], 7);
        assert_eq!(j["source"], "a.xml");
    }

    #[test]
    fn durations_times_bytes() {
        assert_eq!(format_duration(5.4), "5s");
        assert_eq!(format_duration(65.0), "1m05s");
        assert_eq!(format_duration(3723.0), "1h02m03s");
        assert_eq!(format_duration(-1.0), "-");
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn render_metadata_of_an_attempt_is_shown() {
        let meta = r#"{"render_ms":12345,"batch_size":4,"precision":"bf16","worker":"gpu-a","seed":7}"#;
        let t = Task {
            state: TaskState::Succeeded as i32,
            attempts: vec![Attempt { attempt: 1, outcome: "succeeded".into(), metadata_json: meta.into(), ..Default::default() }],
            ..Default::default()
        };
        let h = task_human(&t);
        assert!(h.contains("rendered    in 12.3 s (a batch of 4), bf16, on gpu-a"), "{h}");
        let v = task_json(&t);
        assert_eq!(v["attempts"][0]["metadata"]["seed"], 7);
        let none = Task { attempts: vec![Attempt::default()], ..Default::default() };
        assert!(task_json(&none)["attempts"][0]["metadata"].is_null());
    }

    #[test]
    fn task_and_workers_render() {
        use farm_proto::pb::{TaskRef, WorkerCapabilities};
        let t = Task {
            task_id: "t1".into(),
            job_id: "j-1".into(),
            index: 4,
            state: TaskState::Failed as i32,
            prompt: "1girl".into(),
            seed: 77,
            failures: 2,
            last_error: "out of memory".into(),
            attempts: vec![
                Attempt {
                    attempt: 1,
                    worker_name: "gpu-a".into(),
                    started_at_ms: 1_000,
                    ended_at_ms: 6_000,
                    outcome: "failed".into(),
                    error: "out of memory".into(),
                    ..Default::default()
                },
                Attempt {
                    attempt: 2,
                    worker_id: "w2".into(),
                    outcome: "lost".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let h = task_human(&t);
        assert!(!h.contains("rendered"), "no attempt has render metadata: {h}");
        assert!(h.contains("state       failed"), "{h}");
        assert!(h.contains("last error  out of memory"), "{h}");
        let rows: Vec<&str> = h.lines().skip_while(|l| !l.starts_with("ATTEMPT")).collect();
        assert_eq!(rows.len(), 3, "{h}");
        assert!(
            rows[1].contains("gpu-a") && rows[1].contains("5s") && rows[1].contains("failed"),
            "{h}"
        );
        assert!(rows[2].contains("w2") && rows[2].contains("lost"), "{h}");
        let v = task_json(&t);
        assert_eq!(v["attempts"][0]["ended_at_ms"], 6_000);
        assert!(v["attempts"][1]["ended_at_ms"].is_null());
        assert!(v["result"].is_null());
        assert_eq!(v["state"], "failed");

        let w = WorkerInfo {
            worker_id: "w-123456789".into(),
            name: "gpu-a".into(),
            connected: true,
            capabilities: Some(WorkerCapabilities {
                device: "cuda:0".into(),
                precision: Precision::Bf16 as i32,
                verified: true,
                ..Default::default()
            }),
            current_tasks: vec![TaskRef {
                job_id: "job-abcdefghij".into(),
                index: 3,
                task_id: "x".into(),
            }],
            ..Default::default()
        };
        let out = workers_table(std::slice::from_ref(&w));
        assert!(out.lines().nth(1).unwrap().contains("job-abcd#3"), "{out}");
        let v = worker_json(&w);
        assert_eq!(v["precision"], "bf16");
        assert_eq!(v["current_tasks"][0]["index"], 3);
    }

    #[test]
    fn tables_align_columns() {
        let out = jobs_table(&[job()]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("JOB  NAME   STATE"), "{out}");
        let state_col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][state_col..state_col + 7], "running");
        assert!(lines[1].contains("5/10"));
        let h = job_human(&job());
        assert!(h.contains("state           running"), "{h}");
        assert!(h.contains("ETA -"), "{h}");
    }
}
