//! Read-side queries: job status, listings, task history, results and workers, as `farm.v1` messages.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use farm_proto::pb::{
    Attempt, Job, JobState, ListJobsRequest, ListJobsResponse, RenderParams, ResultInfo, Task, TaskCounts, TaskRef,
    WorkerInfo,
};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::params::params_of;
use crate::store::job_not_found;

fn ms(t: Option<DateTime<Utc>>) -> i64 {
    t.map(|t| t.timestamp_millis()).unwrap_or(0)
}

/// `Job.queue_position` counts queued tasks ahead up to this many: a status query does not walk
/// millions of other jobs' tasks.
pub const QUEUE_POSITION_CAP: i64 = 100_000;

/// The `jobs` columns [`job_status`] reads.
const JOB_COLUMNS: &str = "id, name, state, priority, params::text as params, max_attempts, created_at, finished_at,
     coalesce(idempotency_key, '') as key, total, total_steps, model, precision as job_precision, started_at,
     case when finished_at is not null then final_counts::text end as final_counts";

/// Status of one job of `tenant`.
/// `tenant` None reads any tenant's job (internal use).
pub async fn get_job(pool: &PgPool, tenant: Option<&str>, job_id: Uuid) -> Result<Job> {
    let row = sqlx::query(&format!(
        "select {JOB_COLUMNS} from jobs where id = $1 and ($2::text is null or tenant_id = $2)"
    ))
    .bind(job_id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| job_not_found(job_id))?;
    job_status(pool, &row).await
}

/// A job's status from its `jobs` row ([`JOB_COLUMNS`]): a finished job's counts
/// are stored in the row; an unfinished job's are counted from its tasks.
async fn job_status(pool: &PgPool, row: &sqlx::postgres::PgRow) -> Result<Job> {
    let job_id: Uuid = row.get("id");
    let mut job = job_from_row(row);
    if let Some(stored) = row.get::<Option<String>, _>("final_counts") {
        // A finished job: its counts were stored when it closed; every task counts its steps.
        let total = job.counts.as_ref().map(|c| c.total).unwrap_or(0);
        job.counts = Some(counts_from_json(&stored, total));
        job.progress = 1.0;
        job.eta_seconds = 0.0;
        return Ok(job);
    }
    let total_steps: i64 = row.get("total_steps");
    let counts = sqlx::query(
        "select state, count(*)::bigint, coalesce(sum(steps), 0)::bigint, coalesce(sum(current_step), 0)::bigint
         from tasks where job_id = $1 group by state",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    let mut c = TaskCounts { total: job.counts.as_ref().map(|c| c.total).unwrap_or(0), ..Default::default() };
    let mut done_steps: i64 = 0;
    for r in &counts {
        let state: i16 = r.get(0);
        let n: i64 = r.get(1);
        let steps: i64 = r.get(2);
        let current: i64 = r.get(3);
        set_count(&mut c, state, n as u64);
        // Running tasks count their finished steps; finished ones all of theirs.
        match state {
            2 => done_steps += current,
            3..=5 => done_steps += steps,
            _ => {}
        }
    }
    job.progress = if total_steps > 0 { (done_steps as f64 / total_steps as f64).min(1.0) } else { 0.0 };
    // Results of the last minute over the time they were rendered in: the minute, or since the job
    // started (or was last retried) when that is later, so results from before a retry do not count
    // once a worker has taken a task again. Without a start (a retried job not claimed since, or a
    // first claim that found the job row locked), the last minute.
    // (Measuring from the oldest result of the window would leave out the time spent rendering it:
    // a first image read as 1 image/s.) Both ends come from the database's clock.
    let recent: (i64, f64) = sqlx::query_as(
        "with w as (select greatest(now() - interval '60 seconds', started_at) as since from jobs where id = $1)
         select (select count(*)::bigint from tasks
                 where job_id = $1 and state = 3 and result_at > (select since from w)),
                extract(epoch from now() - (select since from w))::float8",
    )
    .bind(job_id)
    .fetch_one(pool)
    .await?;
    let remaining = (c.queued + c.running) as f64;
    if recent.0 > 0 {
        job.images_per_second = recent.0 as f64 / recent.1.clamp(1.0, 60.0);
        job.eta_seconds = remaining / job.images_per_second;
    } else {
        job.eta_seconds = if remaining == 0.0 { 0.0 } else { -1.0 };
    }
    if c.queued > 0 {
        let ahead: i64 = sqlx::query_scalar(
            "select count(*)::bigint from (
                 select 1 from tasks t join jobs j on j.id = t.job_id
                 where t.state = 1 and j.model = $2 and j.id <> $1 and j.finished_at is null
                   and (j.priority > $3 or (j.priority = $3 and j.created_at < $4))
                 limit $5) ahead",
        )
        .bind(job_id)
        .bind(row.get::<String, _>("model"))
        .bind(job.priority)
        .bind(row.get::<DateTime<Utc>, _>("created_at"))
        .bind(QUEUE_POSITION_CAP)
        .fetch_one(pool)
        .await?;
        job.queue_position = ahead as u64;
    }
    job.counts = Some(c);
    Ok(job)
}

/// Whether the job has finished (one row read; false for a job that does not exist).
pub async fn job_finished(pool: &PgPool, job_id: Uuid) -> Result<bool> {
    let finished: Option<bool> = sqlx::query_scalar("select finished_at is not null from jobs where id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    Ok(finished.unwrap_or(false))
}

/// Stores `n` tasks of task state number `state` into `c` (unknown states are ignored).
fn set_count(c: &mut TaskCounts, state: i16, n: u64) {
    match state {
        1 => c.queued = n,
        2 => c.running = n,
        3 => c.succeeded = n,
        4 => c.failed = n,
        5 => c.cancelled = n,
        _ => {}
    }
}

/// Task counts from the `final_counts` object (`{"3": 5, "4": 1}`: task state number to count).
fn counts_from_json(stored: &str, total: u64) -> TaskCounts {
    let map: HashMap<String, u64> = serde_json::from_str(stored).unwrap_or_default();
    let mut c = TaskCounts { total, ..Default::default() };
    for (state, n) in map {
        if let Ok(state) = state.parse() {
            set_count(&mut c, state, n);
        }
    }
    c
}

fn job_from_row(row: &sqlx::postgres::PgRow) -> Job {
    let id: Uuid = row.get("id");
    let state: i16 = row.get("state");
    let total: i64 = row.get("total");
    Job {
        job_id: id.to_string(),
        name: row.get("name"),
        state: i32::from(state),
        priority: row.get("priority"),
        counts: Some(TaskCounts { total: total as u64, ..Default::default() }),
        progress: 0.0,
        images_per_second: 0.0,
        eta_seconds: -1.0,
        queue_position: 0,
        defaults: Some(RenderParams {
            // The precision asked for: 0 (any worker's) where the stored shape records the default.
            precision: i32::from(row.get::<i16, _>("job_precision")),
            ..params_of(&row.get::<String, _>("params"))
        }),
        max_attempts: row.get::<i32, _>("max_attempts") as u32,
        created_at_ms: ms(Some(row.get("created_at"))),
        finished_at_ms: ms(row.get("finished_at")),
        started_at_ms: ms(row.get("started_at")),
        idempotency_key: row.get("key"),
    }
}

/// The tenant's jobs, newest first. The cursor is `<created_at micros>:<id>`.
pub async fn list_jobs(pool: &PgPool, tenant: &str, req: &ListJobsRequest) -> Result<ListJobsResponse> {
    let size = match req.page_size {
        0 => 50,
        n => n.min(1000),
    } as i64;
    // The first page starts after every job: 9999-12-31, in microseconds since 1970.
    const LAST_CURSOR: i64 = 253_402_300_799_999_999;
    let (cur_ts, cur_id) = if req.page_token.is_empty() {
        (LAST_CURSOR, Uuid::max())
    } else {
        let (a, b) = req
            .page_token
            .split_once(':')
            .ok_or_else(|| Error::InvalidArgument("page_token: malformed".into()))?;
        (
            a.parse::<i64>().map_err(|_| Error::InvalidArgument("page_token: malformed".into()))?.clamp(0, LAST_CURSOR),
            Uuid::parse_str(b).map_err(|_| Error::InvalidArgument("page_token: malformed".into()))?,
        )
    };
    let states: Vec<i16> = req.states.iter().map(|s| *s as i16).filter(|s| *s != 0).collect();
    // The cursor compares (created_at, id) as the index `jobs_tenant_created` orders them, so a
    // page starts where the last one ended without reading the rows before it.
    let rows = sqlx::query(&format!(
        "select {JOB_COLUMNS}, (extract(epoch from created_at) * 1000000)::bigint as cursor_ts
         from jobs
         where tenant_id = $1
           and (cardinality($2::smallint[]) = 0 or state = any($2))
           and ($3 = '' or strpos(name, $3) > 0)
           and (created_at, id) < (timestamptz 'epoch' + $4 * interval '1 microsecond', $5)
         order by created_at desc, id desc
         limit $6"
    ))
    .bind(tenant)
    .bind(&states)
    .bind(&req.name_contains)
    .bind(cur_ts)
    .bind(cur_id)
    .bind(size + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > size;
    let mut jobs = Vec::new();
    let mut next = String::new();
    for r in rows.iter().take(size as usize) {
        let id: Uuid = r.get("id");
        // Counts and progress as GetJob fills them, from the row read here (a finished job's are
        // in it; only unfinished jobs count their tasks).
        jobs.push(job_status(pool, r).await?);
        if more {
            next = format!("{}:{}", r.get::<i64, _>("cursor_ts"), id);
        }
    }
    Ok(ListJobsResponse { jobs, next_page_token: next })
}

pub async fn get_task(pool: &PgPool, tenant: &str, job_id: Uuid, index: u64) -> Result<Task> {
    let row = sqlx::query(
        "select t.id, t.state, t.prompt, t.negative_prompt, t.seed, t.shape, t.failures, t.current_step,
                coalesce(t.last_error, '') as last_error, t.result_size, t.result_sha256, t.result_at,
                coalesce(t.result_worker, '') as result_worker
         from tasks t join jobs j on j.id = t.job_id
         where t.job_id = $1 and j.tenant_id = $2 and t.idx = $3",
    )
    .bind(job_id)
    .bind(tenant)
    .bind(index as i64)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Error::NotFound(format!("task {index} of job {job_id} not found")))?;
    let task_id: Uuid = row.get("id");
    let attempts = sqlx::query(
        "select attempt, worker_id, worker_name, started_at, ended_at, outcome, coalesce(error, '') as error,
                lease_token, coalesce(metadata::text, '') as metadata
         from task_attempts where task_id = $1 order by id",
    )
    .bind(task_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|a| Attempt {
        attempt: a.get::<i32, _>("attempt") as u32,
        worker_id: a.get::<Uuid, _>("worker_id").to_string(),
        worker_name: a.get("worker_name"),
        started_at_ms: ms(Some(a.get("started_at"))),
        ended_at_ms: ms(a.get("ended_at")),
        outcome: a.get("outcome"),
        error: a.get("error"),
        lease_token: a.get::<i64, _>("lease_token") as u64,
        metadata_json: a.get("metadata"),
    })
    .collect();
    let state: i16 = row.get("state");
    let result = (state == 3).then(|| ResultInfo {
        job_id: job_id.to_string(),
        index,
        size_bytes: row.get::<Option<i64>, _>("result_size").unwrap_or(0) as u64,
        sha256: row.get::<Option<String>, _>("result_sha256").unwrap_or_default(),
        content_type: "image/png".into(),
        created_at_ms: ms(row.get("result_at")),
        worker_id: row.get("result_worker"),
    });
    Ok(Task {
        task_id: task_id.to_string(),
        job_id: job_id.to_string(),
        index,
        state: i32::from(state),
        prompt: row.get("prompt"),
        negative_prompt: row.get("negative_prompt"),
        params: Some(params_of(&row.get::<String, _>("shape"))),
        seed: row.get::<i64, _>("seed") as u64,
        failures: row.get::<i32, _>("failures") as u32,
        current_step: row.get::<i32, _>("current_step") as u32,
        attempts,
        result,
        last_error: row.get("last_error"),
    })
}

/// Committed results of a job ordered by index; the cursor is the next index.
pub async fn list_results(
    pool: &PgPool,
    tenant: &str,
    job_id: Uuid,
    from_index: u64,
    since_ms: i64,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<ResultInfo>, String)> {
    let exists: Option<i32> = sqlx::query_scalar("select 1 from jobs where id = $1 and tenant_id = $2")
        .bind(job_id)
        .bind(tenant)
        .fetch_optional(pool)
        .await?;
    exists.ok_or_else(|| job_not_found(job_id))?;
    let start = if page_token.is_empty() {
        i64::try_from(from_index)
            .map_err(|_| Error::InvalidArgument(format!("from_index: at most {}", i64::MAX)))?
    } else {
        page_token.parse::<i64>().map_err(|_| Error::InvalidArgument("page_token: malformed".into()))?
    };
    let size = match page_size {
        0 => 1000,
        n => n.min(10_000),
    } as i64;
    let rows = sqlx::query(
        "select idx, result_size, result_sha256, result_at, coalesce(result_worker, '') as w from tasks
         where job_id = $1 and state = 3 and idx >= $2
           and ($3 = 0 or result_at > to_timestamp($3::double precision / 1000))
         order by idx limit $4",
    )
    .bind(job_id)
    .bind(start)
    .bind(since_ms)
    .bind(size + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > size;
    let results: Vec<ResultInfo> = rows
        .iter()
        .take(size as usize)
        .map(|r| ResultInfo {
            job_id: job_id.to_string(),
            index: r.get::<i64, _>("idx") as u64,
            size_bytes: r.get::<Option<i64>, _>("result_size").unwrap_or(0) as u64,
            sha256: r.get::<Option<String>, _>("result_sha256").unwrap_or_default(),
            content_type: "image/png".into(),
            created_at_ms: ms(r.get("result_at")),
            worker_id: r.get("w"),
        })
        .collect();
    let next = if more { (results.last().map(|r| r.index).unwrap_or(0) + 1).to_string() } else { String::new() };
    Ok((results, next))
}

/// Storage key and metadata of one committed result.
pub async fn result_of(pool: &PgPool, tenant: &str, job_id: Uuid, index: u64) -> Result<(String, ResultInfo)> {
    let row = sqlx::query(
        "select t.result_key, t.result_size, t.result_sha256, t.result_at, coalesce(t.result_worker, '') as w
         from tasks t join jobs j on j.id = t.job_id
         where t.job_id = $1 and j.tenant_id = $2 and t.idx = $3 and t.state = 3",
    )
    .bind(job_id)
    .bind(tenant)
    .bind(index as i64)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Error::NotFound(format!("no result for task {index} of job {job_id}")))?;
    Ok((
        row.get("result_key"),
        ResultInfo {
            job_id: job_id.to_string(),
            index,
            size_bytes: row.get::<Option<i64>, _>("result_size").unwrap_or(0) as u64,
            sha256: row.get::<Option<String>, _>("result_sha256").unwrap_or_default(),
            content_type: "image/png".into(),
            created_at_ms: ms(row.get("result_at")),
            worker_id: row.get("w"),
        },
    ))
}

/// How many of the most recent task attempts `ListWorkers` reads to compute each worker's images per
/// second over the last minute: a bounded backward scan of the primary key instead of a scan of the
/// whole (ever-growing) attempts table per worker. Exact while the farm finishes fewer than this many
/// attempts in the horizon plus the longest render.
pub const RECENT_ATTEMPTS_SCANNED: i64 = 200_000;

/// The farm's workers (shared by every tenant). Each worker's current tasks are listed only where
/// they belong to `tenant`'s jobs: other tenants' job and task ids are not shown.
pub async fn list_workers(pool: &PgPool, tenant: &str, include_disconnected: bool) -> Result<Vec<WorkerInfo>> {
    let rows = sqlx::query(
        // At most 10,000 sessions, the connected ones first and then the most recent: old
        // sessions (a row is kept per session) never push a live worker out of the listing.
        "select * from (
             select w.id, w.name, w.capabilities::text as caps, w.connected_at, w.last_heartbeat, w.disconnected_at,
                    w.completed, w.failed, w.coordinator,
                    extract(epoch from least(interval '60 seconds', now() - w.connected_at))::float8 as rate_window_s
             from workers w
             where $1 or w.disconnected_at is null
             order by w.disconnected_at is not null, w.connected_at desc
             limit 10000) w
         order by w.name, w.connected_at desc",
    )
    .bind(include_disconnected)
    .fetch_all(pool)
    .await?;
    let recent: HashMap<Uuid, i64> = sqlx::query(
        "select worker_id, count(*)::bigint
         from (select worker_id, outcome, ended_at from task_attempts order by id desc limit $1) a
         where a.outcome = 'succeeded' and a.ended_at > now() - interval '60 seconds'
         group by worker_id",
    )
    .bind(RECENT_ATTEMPTS_SCANNED)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let mut current: HashMap<Uuid, Vec<TaskRef>> = HashMap::new();
    for t in sqlx::query(
        "select t.lease_owner, t.job_id, t.idx, t.id from tasks t join jobs j on j.id = t.job_id
         where t.state = 2 and t.lease_owner is not null and j.tenant_id = $1",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?
    {
        current.entry(t.get::<Uuid, _>(0)).or_default().push(TaskRef {
            job_id: t.get::<Uuid, _>(1).to_string(),
            index: t.get::<i64, _>(2) as u64,
            task_id: t.get::<Uuid, _>(3).to_string(),
        });
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: Uuid = r.get("id");
        let caps: farm_proto::pb::WorkerCapabilities =
            crate::grpc_workers::caps_from_json(&r.get::<String, _>("caps"));
        out.push(WorkerInfo {
            worker_id: id.to_string(),
            name: r.get("name"),
            capabilities: Some(caps),
            connected: r.get::<Option<DateTime<Utc>>, _>("disconnected_at").is_none(),
            connected_at_ms: ms(Some(r.get("connected_at"))),
            last_heartbeat_ms: ms(Some(r.get("last_heartbeat"))),
            current_tasks: current.remove(&id).unwrap_or_default(),
            // Over the last minute, or over the session when it is younger.
            images_per_second: recent.get(&id).copied().unwrap_or(0) as f64
                / r.get::<f64, _>("rate_window_s").clamp(1.0, 60.0),
            completed: r.get::<i64, _>("completed") as u64,
            failed: r.get::<i64, _>("failed") as u64,
            coordinator: r.get("coordinator"),
        });
    }
    Ok(out)
}

/// Maps a JobState number to its lower-case name (for logs and metrics).
pub fn job_state_name(s: i32) -> &'static str {
    match JobState::try_from(s).unwrap_or(JobState::Unspecified) {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Unspecified => "unknown",
    }
}
