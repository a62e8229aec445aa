//! The job store and scheduler on PostgreSQL: plain async methods returning the crate's own error.
//! The gRPC layer (`grpc_jobs`, `grpc_workers`) only translates.
//!
//! Invariants kept here:
//! * a task is `running` only under a lease (owner session, fencing token from the `lease_tokens`
//!   sequence, expiry); every report and upload names its token and is refused when it is not current;
//! * losing a worker (stream drop, expired lease, drain) requeues without charging an attempt; only
//!   render failures count toward `max_attempts`;
//! * claims use `FOR UPDATE SKIP LOCKED`, pick the job by priority then least-recently-served (fair
//!   share among equal priorities), then tasks by index, all of one shape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::queries::job_state_name;

pub const TASK_QUEUED: i16 = 1;
pub const TASK_RUNNING: i16 = 2;
pub const TASK_SUCCEEDED: i16 = 3;
pub const TASK_FAILED: i16 = 4;
pub const TASK_CANCELLED: i16 = 5;

pub const JOB_QUEUED: i16 = 1;
pub const JOB_RUNNING: i16 = 2;
pub const JOB_CANCELLED: i16 = 5;

/// Scheduling settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub lease_ttl: Duration,
    /// A worker that failed this many tasks of a job gets no more of that job (while another
    /// connected worker could take it).
    pub max_worker_failures_per_job: i32,
    /// Out-of-memory failures of one task that are not charged as attempts (workers retry with
    /// smaller batches, and report one at batch size 1 as a render failure); later ones are
    /// charged, so that no task loops for ever.
    pub uncharged_out_of_memory: i64,
    /// Backoff after the first render failure; doubles per failure, capped at 60 s.
    pub backoff_base: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            lease_ttl: Duration::from_secs(15),
            max_worker_failures_per_job: 2,
            uncharged_out_of_memory: 6,
            backoff_base: Duration::from_secs(1),
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
    pub cfg: StoreConfig,
    /// Tasks committed per worker since the last [`Store::flush_completed`]. Counted here and added
    /// to `workers.completed` once a second: a per-commit update of the worker's row made the
    /// concurrent uploads of one worker wait for each other's row lock. A crash loses at most a
    /// second of this statistic, never a task state.
    completed: Arc<Mutex<HashMap<Uuid, i64>>>,
}

/// A task handed to a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub task_id: Uuid,
    pub job_id: Uuid,
    pub idx: i64,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: i64,
    pub shape: String,
    pub failures: i32,
    pub lease_token: i64,
    pub lease_expires_at: DateTime<Utc>,
}

/// A task whose state changed, for events.
#[derive(Debug, Clone)]
pub struct Transition {
    pub job_id: Uuid,
    pub idx: i64,
    pub state: i16,
    pub error: Option<String>,
}

/// What a worker session needs to claim work.
#[derive(Debug, Clone)]
pub struct WorkerSlot {
    pub worker_id: Uuid,
    pub name: String,
    pub model: String,
    pub max_pixels: i64,
    /// The precision it renders in (`farm.v1.Precision` number; 0 when it did not say).
    pub precision: i16,
}

/// A lease as its holder names it in a report: the session (`worker`), the task and the token.
/// Only the session holding the lease may report on it: task ids and tokens travel in PNG metadata
/// and are not secrets.
#[derive(Debug, Clone, Copy)]
pub struct HeldLease {
    pub worker: Uuid,
    pub task: Uuid,
    pub token: i64,
}

/// Outcome of a failure report.
#[derive(Debug, Clone)]
pub struct FailureOutcome {
    pub transition: Transition,
    /// Render failures charged so far.
    pub failures: i32,
}

impl Store {
    pub fn new(pool: PgPool, cfg: StoreConfig) -> Self {
        Store { pool, cfg, completed: Default::default() }
    }

    fn ttl_ms(&self) -> i64 {
        self.cfg.lease_ttl.as_millis() as i64
    }

    // ------------------------------------------------------------------------------------------------
    // Dispatch

    /// Claims up to `n` queued tasks of one shape for `w`.
    pub async fn claim(&self, w: &WorkerSlot, n: u32) -> Result<Vec<Claimed>> {
        let rows = sqlx::query(
            r#"
            with job as (
                -- The first queued task is looked up per candidate job as a scalar subquery in index
                -- order (tasks_queued), which stops at the first row. Written as EXISTS, the planner
                -- turned it into a hash semi-join over every queued task of every job: 40 ms per
                -- claim on one 100,000-task job, seconds under concurrent claims.
                select j.id, q.shape from jobs j
                cross join lateral (
                    select t.shape from tasks t
                    where t.job_id = j.id and t.state = 1 and t.pixels <= $2
                      and (t.not_before is null or t.not_before <= now())
                    order by t.idx limit 1
                ) q
                where j.finished_at is null and j.cancelled_at is null and j.model = $1
                  and (j.precision = 0 or j.precision = $8)
                  -- A job none of whose tasks fits is not walked at all.
                  and j.min_pixels <= $2
                  -- A worker that failed this job's tasks repeatedly gets no more of them while
                  -- another connected worker of the model that fits the job and has not been
                  -- excluded could take them. When none is left it keeps getting them (each task
                  -- still ends after max_attempts), so no job waits for a worker that is not there.
                  and (not exists (select 1 from job_worker_failures f
                                   where f.job_id = j.id and f.worker_name = $3 and f.failures >= $4)
                       or not exists (select 1 from workers o
                                      where o.disconnected_at is null and o.model = $1 and o.name <> $3
                                        and o.max_pixels >= j.min_pixels
                                        and (j.precision = 0 or o.precision = j.precision)
                                        and not exists (select 1 from job_worker_failures f
                                                        where f.job_id = j.id and f.worker_name = o.name
                                                          and f.failures >= $4)))
                order by j.priority desc, j.last_claimed_at asc nulls first, j.created_at
                limit 1
            ),
            -- The job and the shape are scalars (`= (select ...)`), not joins, so that the scan walks
            -- the tasks_queued index in idx order and stops after a few rows. As a join the planner
            -- sorted every queued task of the job on each claim (estimates are off right after a bulk
            -- COPY).
            picked as (
                select t.id from tasks t
                where t.job_id = (select id from job) and t.state = 1 and t.shape = (select shape from job)
                  and (t.not_before is null or t.not_before <= now())
                order by t.idx
                limit $5
                for update of t skip locked
            ),
            upd as (
                update tasks t
                set state = 2, lease_owner = $6, lease_token = nextval('lease_tokens'),
                    lease_expires_at = now() + $7 * interval '1 millisecond', current_step = 0
                -- `= any(array(...))`, not a join with picked: a generic plan (prepared statement, row
                -- count of picked unknown) hash-joined picked with a sequential scan of every task.
                where t.id = any(array(select id from picked))
                returning t.id, t.job_id, t.idx, t.prompt, t.negative_prompt, t.seed, t.shape, t.failures,
                          t.lease_token, t.lease_expires_at
            ),
            attempts as (
                insert into task_attempts (task_id, attempt, worker_id, worker_name, lease_token)
                select id, failures + 1, $6, $3, lease_token from upd
            ),
            touch as (
                update jobs set last_claimed_at = clock_timestamp(),
                                started_at = coalesce(started_at, clock_timestamp()),
                                state = case when state = 1 then 2 else state end
                where id = (select j.id from jobs j join job on j.id = job.id for update of j skip locked)
            )
            select * from upd order by idx
            "#,
        )
        .bind(&w.model)
        .bind(w.max_pixels)
        .bind(&w.name)
        .bind(self.cfg.max_worker_failures_per_job)
        .bind(n as i64)
        .bind(w.worker_id)
        .bind(self.ttl_ms())
        .bind(w.precision)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                task_id: r.get("id"),
                job_id: r.get("job_id"),
                idx: r.get("idx"),
                prompt: r.get("prompt"),
                negative_prompt: r.get("negative_prompt"),
                seed: r.get("seed"),
                shape: r.get("shape"),
                failures: r.get("failures"),
                lease_token: r.get("lease_token"),
                lease_expires_at: r.get("lease_expires_at"),
            })
            .collect())
    }

    /// A new worker session (`w.worker_id` is its id).
    pub async fn register_worker(
        &self,
        tenant: &str,
        w: &WorkerSlot,
        capabilities: serde_json::Value,
        max_batch: i32,
        coordinator: &str,
    ) -> Result<()> {
        sqlx::query(
            "insert into workers (id, tenant_id, name, capabilities, model, max_pixels, max_batch, coordinator, precision)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(w.worker_id)
        .bind(tenant)
        .bind(&w.name)
        .bind(capabilities)
        .bind(&w.model)
        .bind(w.max_pixels)
        .bind(max_batch)
        .bind(coordinator)
        .bind(w.precision)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Leases a reconnecting worker still holds: those still current (running, or requeued but not yet
    /// claimed again, with the same token) move to the new session. Returns the kept ones.
    pub async fn adopt_leases(&self, worker_id: Uuid, leases: &[(Uuid, i64)]) -> Result<Vec<(Uuid, i64)>> {
        if leases.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<Uuid> = leases.iter().map(|l| l.0).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.1).collect();
        let rows = sqlx::query(
            r#"
            with held as (select * from unnest($1::uuid[], $2::bigint[]) as h(id, token)),
            upd as (
                update tasks t set state = 2, lease_owner = $3,
                       lease_expires_at = now() + $4 * interval '1 millisecond'
                from held, jobs j
                where t.id = held.id and t.lease_token = held.token and t.state in (1, 2)
                  and j.id = t.job_id and j.cancelled_at is null
                  -- Only a lease a worker of this tenant held (task ids and tokens are not secrets).
                  and exists (select 1 from task_attempts a
                              join workers w on w.id = a.worker_id
                              join workers me on me.id = $3
                              where a.task_id = t.id and a.lease_token = held.token and w.tenant_id = me.tenant_id)
                returning t.id, t.lease_token
            ),
            att as (
                update task_attempts a set worker_id = $3, outcome = 'running', ended_at = null
                from upd where a.lease_token = upd.lease_token
            )
            select id, lease_token from upd
            "#,
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(worker_id)
        .bind(self.ttl_ms())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Renews the leases the worker lists (task id and current token) that its session holds.
    /// A lease it no longer lists (a task it lost track of) is not renewed: it expires after the
    /// TTL and the sweep requeues it, though the session stays up. A lease assigned after the
    /// worker built its list is still fresh and gets listed by the next heartbeat (the TTL is at
    /// least two heartbeat intervals).
    ///
    /// A listed lease whose task the sweep requeued (its renewals did not reach the database within
    /// the TTL, say during a database outage) and that no other worker has claimed since (the token
    /// is still the task's) is taken back, as a hello would: the worker is still rendering it, and
    /// its result can still be committed.
    ///
    /// `vram_free_bytes`, when the worker measured it (non-zero), replaces the hello's figure in
    /// the worker's capabilities, so listings show the memory free now.
    /// Returns the listed leases that are no longer this worker's (neither renewed nor taken back:
    /// their task was claimed by another worker, finished, failed or cancelled), for it to drop.
    pub async fn heartbeat(&self, worker_id: Uuid, leases: &[(Uuid, i64)], vram_free_bytes: u64) -> Result<Vec<(Uuid, i64)>> {
        let (ids, tokens): (Vec<Uuid>, Vec<i64>) = leases.iter().copied().unzip();
        let gone = sqlx::query(
            "with t as (update tasks t set lease_expires_at = now() + $2 * interval '1 millisecond'
                        from unnest($3::uuid[], $4::bigint[]) as l(id, token)
                        where t.id = l.id and t.lease_token = l.token and t.lease_owner = $1 and t.state = 2
                        returning t.id),
                  back as (update tasks t set state = 2, lease_owner = $1,
                                  lease_expires_at = now() + $2 * interval '1 millisecond'
                           from unnest($3::uuid[], $4::bigint[]) as l(id, token), jobs j
                           where t.id = l.id and t.lease_token = l.token and t.state = 1 and t.lease_owner is null
                             and j.id = t.job_id and j.cancelled_at is null
                             -- Given up by neither side, and held before by a worker of this tenant.
                             and exists (select 1 from task_attempts a
                                         join workers w on w.id = a.worker_id
                                         join workers me on me.id = $1
                                         where a.task_id = t.id and a.lease_token = l.token
                                           and a.outcome in ('expired', 'lost') and w.tenant_id = me.tenant_id)
                           returning t.id, t.lease_token),
                  att as (update task_attempts a set worker_id = $1, outcome = 'running', ended_at = null
                          from back where a.task_id = back.id and a.lease_token = back.lease_token),
                  w as (update workers set last_heartbeat = now(), disconnected_at = null,
                               capabilities = case when $5 > 0
                                                   then jsonb_set(capabilities, '{vram_free_bytes}', to_jsonb($5))
                                                   else capabilities end
                        where id = $1)
             select l.id, l.token from unnest($3::uuid[], $4::bigint[]) as l(id, token)
             where l.id not in (select id from t) and l.id not in (select id from back)",
        )
        .bind(worker_id)
        .bind(self.ttl_ms())
        .bind(&ids)
        .bind(&tokens)
        .bind(i64::try_from(vram_free_bytes).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let gone: Vec<(Uuid, i64)> = gone.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        if gone.is_empty() {
            return Ok(gone);
        }
        // The statement above read one snapshot: a lease the sweep requeued while it waited for the
        // row is neither renewed nor taken back there, though the next heartbeat (or an upload)
        // would take it back. Only leases that are really gone, read now, are revoked.
        let (ids, tokens): (Vec<Uuid>, Vec<i64>) = gone.into_iter().unzip();
        let really: Vec<(Uuid, i64)> = sqlx::query_as(
            "select l.id, l.token from unnest($1::uuid[], $2::bigint[]) as l(id, token)
             where not exists (select 1 from tasks t
                               where t.id = l.id and t.lease_token = l.token and t.state in (1, 2))",
        )
        .bind(&ids)
        .bind(&tokens)
        .fetch_all(&self.pool)
        .await?;
        Ok(really)
    }

    /// The session ended: every lease it holds goes back to the queue, no attempt charged.
    pub async fn requeue_worker(&self, worker_id: Uuid, outcome: &str) -> Result<Vec<Transition>> {
        let rows = sqlx::query(
            r#"
            with upd as (
                update tasks set state = 1, lease_owner = null, lease_expires_at = null, current_step = 0
                where lease_owner = $1 and state = 2
                returning id, job_id, idx, lease_token
            ),
            att as (
                update task_attempts a set ended_at = now(), outcome = $2
                from upd where a.lease_token = upd.lease_token and a.ended_at is null
            ),
            w as (update workers set disconnected_at = coalesce(disconnected_at, now()) where id = $1)
            select job_id, idx from upd
            "#,
        )
        .bind(worker_id)
        .bind(outcome)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Transition { job_id: r.get(0), idx: r.get(1), state: TASK_QUEUED, error: None })
            .collect())
    }

    /// Requeues tasks whose lease expired (silent workers), and marks silent sessions disconnected.
    pub async fn sweep_expired(&self) -> Result<Vec<Transition>> {
        let rows = sqlx::query(
            r#"
            with exp as (
                select id from tasks where state = 2 and lease_expires_at < now()
                for update skip locked
            ),
            upd as (
                update tasks t set state = 1, lease_owner = null, lease_expires_at = null, current_step = 0
                from exp where t.id = exp.id
                returning t.job_id, t.idx, t.lease_token
            ),
            att as (
                update task_attempts a set ended_at = now(), outcome = 'expired'
                from upd where a.lease_token = upd.lease_token and a.ended_at is null
            )
            select job_id, idx from upd
            "#,
        )
        .fetch_all(&self.pool)
        .await?;
        sqlx::query(
            "update workers set disconnected_at = now()
             where disconnected_at is null and last_heartbeat < now() - $1 * interval '1 millisecond'",
        )
        .bind(self.ttl_ms())
        .execute(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Transition { job_id: r.get(0), idx: r.get(1), state: TASK_QUEUED, error: None })
            .collect())
    }

    /// Records a denoising step. Returns the task's job and index, or None when the lease is stale.
    pub async fn progress(&self, lease: HeldLease, step: i32) -> Result<Option<(Uuid, i64)>> {
        let HeldLease { worker, task: task_id, token } = lease;
        let row = sqlx::query(
            "update tasks set current_step = $3 where id = $1 and lease_token = $2 and state = 2 and lease_owner = $4
             returning job_id, idx",
        )
        .bind(task_id)
        .bind(token)
        .bind(step)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// A render failed (or was cancelled). Charges the attempt unless the failure is not the task's fault.
    pub async fn report_failure(
        &self,
        lease: HeldLease,
        worker_name: &str,
        error: &str,
        retryable: bool,
        kind: &str,
    ) -> Result<Option<FailureOutcome>> {
        let HeldLease { worker, task: task_id, token } = lease;
        let (error, kind) = (&storable_text(error), &storable_text(kind));
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "select t.job_id, t.idx, t.failures, j.max_attempts, j.cancelled_at is not null as cancelled,
                    (select count(*) from task_attempts a where a.task_id = t.id and a.outcome = 'out_of_memory')
             from tasks t join jobs j on j.id = t.job_id
             where t.id = $1 and t.lease_token = $2 and t.state = 2 and t.lease_owner = $3
             -- The job row in share mode: a concurrent cancel or retry (which update it) is either
             -- seen whole or waits for this report; reading a stale cancelled_at here marked a task
             -- cancelled after a retry had already un-cancelled its job, and the job then closed
             -- without it.
             for update of t for share of j",
        )
        .bind(task_id)
        .bind(token)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let job_id: Uuid = row.get(0);
        let idx: i64 = row.get(1);
        let failures: i32 = row.get(2);
        let max_attempts: i32 = row.get(3);
        let cancelled: bool = row.get(4);
        let earlier_out_of_memory: i64 = row.get(5);
        // Cancellation is not the task's fault, and neither are the first out-of-memory failures
        // (the worker halves its batch and tries again); once they repeat, they are charged.
        let free_out_of_memory =
            kind == "out_of_memory" && earlier_out_of_memory < self.cfg.uncharged_out_of_memory;
        let charged = !(cancelled || kind == "cancelled" || free_out_of_memory);
        let failures = if charged { failures + 1 } else { failures };
        let (state, outcome) = if cancelled {
            (TASK_CANCELLED, "cancelled")
        } else if charged && (!retryable || failures >= max_attempts) {
            (TASK_FAILED, "failed")
        } else if charged {
            (TASK_QUEUED, "failed")
        } else if free_out_of_memory {
            (TASK_QUEUED, "out_of_memory")
        } else {
            (TASK_QUEUED, "released")
        };
        let backoff_ms = if charged && state == TASK_QUEUED {
            let base = self.cfg.backoff_base.as_millis() as i64;
            (base << (failures - 1).clamp(0, 16)).min(60_000)
        } else {
            0
        };
        sqlx::query(
            "update tasks set state = $2, failures = $3, last_error = $4, lease_owner = null,
                    lease_expires_at = null, current_step = 0,
                    not_before = case when $5 > 0 then now() + $5 * interval '1 millisecond' else null end,
                    finished_at = case when $2 in (4, 5) then now() else null end
             where id = $1",
        )
        .bind(task_id)
        .bind(state)
        .bind(failures)
        .bind(error)
        .bind(backoff_ms)
        .execute(&mut *tx)
        .await?;
        let attempt_worker: Option<Uuid> = sqlx::query_scalar(
            "update task_attempts set ended_at = now(), outcome = $2, error = $3
             where lease_token = $1 and ended_at is null
             returning worker_id",
        )
        .bind(token)
        .bind(outcome)
        .bind(error)
        .fetch_optional(&mut *tx)
        .await?;
        if charged {
            sqlx::query(
                "insert into job_worker_failures (job_id, worker_name, failures) values ($1, $2, 1)
                 on conflict (job_id, worker_name) do update set failures = job_worker_failures.failures + 1",
            )
            .bind(job_id)
            .bind(worker_name)
            .execute(&mut *tx)
            .await?;
            if let Some(worker) = attempt_worker {
                sqlx::query("update workers set failed = failed + 1 where id = $1")
                    .bind(worker)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(Some(FailureOutcome {
            transition: Transition { job_id, idx, state, error: Some(error.to_string()) },
            failures,
        }))
    }

    /// The worker hands a task back (drain, or a result it could not upload): requeued, no attempt
    /// charged. `reason` is kept as the attempt's error; with `retry_after_ms` (a hand-back after a
    /// failure) it is also the task's last error and the next claim waits that long.
    pub async fn release(&self, lease: HeldLease, reason: &str, retry_after_ms: i64) -> Result<Option<Transition>> {
        let HeldLease { worker, task: task_id, token } = lease;
        let reason = &storable_text(reason);
        let row = sqlx::query(
            r#"
            with upd as (
                update tasks set state = 1, lease_owner = null, lease_expires_at = null, current_step = 0,
                                 last_error = case when $5 > 0 and $4 <> '' then $4 else last_error end,
                                 not_before = case when $5 > 0 then now() + $5 * interval '1 millisecond' else not_before end
                where id = $1 and lease_token = $2 and state = 2 and lease_owner = $3
                returning job_id, idx
            ),
            att as (
                update task_attempts a set ended_at = now(), outcome = 'released', error = nullif($4, '')
                from upd where a.lease_token = $2 and a.ended_at is null
            )
            select job_id, idx from upd
            "#,
        )
        .bind(task_id)
        .bind(token)
        .bind(worker)
        .bind(reason)
        .bind(retry_after_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Transition { job_id: r.get(0), idx: r.get(1), state: TASK_QUEUED, error: None }))
    }

    // ------------------------------------------------------------------------------------------------
    // Results

    /// Job and index of a task whose lease `token` is current, or was requeued without its worker
    /// giving it up and nobody claimed it since (see [`Store::commit_result`]); FAILED_PRECONDITION
    /// otherwise.
    pub async fn check_lease(&self, task_id: Uuid, token: i64) -> Result<(Uuid, i64)> {
        let row = sqlx::query(
            "select job_id, idx from tasks t where id = $1 and lease_token = $2
               and (state = 2
                    or (state = 1 and lease_owner is null
                        and exists (select 1 from task_attempts a
                                    where a.task_id = t.id and a.lease_token = $2 and a.outcome in ('expired', 'lost'))))",
        )
            .bind(task_id)
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| (r.get(0), r.get(1))).ok_or_else(stale_lease)
    }

    /// Marks the task succeeded with its stored result if `token` is still its current lease (one
    /// statement); FAILED_PRECONDITION otherwise. `metadata` (a JSON object, checked by the caller)
    /// is kept with the attempt.
    ///
    /// A lease the sweep requeued (its renewals missed the TTL) or a lost session gave back, and that
    /// nobody claimed since, is still current: the token is still the task's, and its worker may have
    /// rendered the image. Its result is committed too, if the job was not cancelled, so a worker
    /// that was only late (a database outage longer than the TTL) loses nothing.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_result(
        &self,
        task_id: Uuid,
        token: i64,
        tenant: &str,
        key: &str,
        size: i64,
        sha256: &str,
        metadata: Option<&str>,
    ) -> Result<Transition> {
        // One statement: the task and its open attempt (the attempt only if the task was updated).
        let row = sqlx::query(
            "with t as (
                 update tasks set state = 3, result_key = $3, result_size = $4, result_sha256 = $5,
                        result_worker = coalesce((select w.name from workers w where w.id = tasks.lease_owner),
                                                 (select a.worker_name from task_attempts a
                                                  where a.task_id = tasks.id and a.lease_token = $2 limit 1), ''),
                        result_at = clock_timestamp(), finished_at = clock_timestamp(), current_step = steps,
                        lease_owner = null, lease_expires_at = null
                 where id = $1 and lease_token = $2
                   -- Only a worker of the lease holder's tenant commits (task ids and tokens are
                   -- not secrets).
                   and ((state = 2 and exists (select 1 from workers w
                                               where w.id = tasks.lease_owner and w.tenant_id = $6))
                        -- Requeued by the sweep or a lost session, not claimed since.
                        or (state = 1 and lease_owner is null
                            and exists (select 1 from task_attempts a join workers w on w.id = a.worker_id
                                        where a.task_id = tasks.id and a.lease_token = $2
                                          and a.outcome in ('expired', 'lost') and w.tenant_id = $6)
                            and exists (select 1 from jobs j where j.id = tasks.job_id and j.cancelled_at is null)))
                 returning job_id, idx),
             a as (
                 update task_attempts set ended_at = now(), outcome = 'succeeded', metadata = $7::jsonb
                 where task_id = $1 and lease_token = $2 and exists (select 1 from t)
                 returning worker_id)
             select t.job_id, t.idx, (select worker_id from a limit 1) from t",
        )
        .bind(task_id)
        .bind(token)
        .bind(key)
        .bind(size)
        .bind(sha256)
        .bind(tenant)
        .bind(metadata)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Err(stale_lease()) };
        if let Some(worker) = row.get::<Option<Uuid>, _>(2) {
            *self.completed.lock().unwrap().entry(worker).or_default() += 1;
        }
        Ok(Transition { job_id: row.get(0), idx: row.get(1), state: TASK_SUCCEEDED, error: None })
    }

    /// Marks the job finished when no task is queued or running any more. Returns its final state.
    ///
    /// The job row is locked first and the tasks are checked in a later statement, whose snapshot
    /// then includes whatever a concurrent retry or cancel (which lock the job row) committed. A
    /// single UPDATE that waited for that lock would re-check the row alone, its sub-selects still on
    /// the snapshot from before, and could close a job whose tasks a retry had just queued again.
    pub async fn finish_job_if_done(&self, job_id: Uuid) -> Result<Option<i16>> {
        // Cheap first look without a lock: most checks find work left.
        if self.has_open_tasks(job_id).await? {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        let open = sqlx::query("select 1 from jobs where id = $1 and finished_at is null for update")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
        if open.is_none() {
            tx.rollback().await?;
            return Ok(None);
        }
        let row = sqlx::query(
            "update jobs set finished_at = now(),
                    state = case when cancelled_at is not null then 5
                                 when exists (select 1 from tasks where job_id = $1 and state = 4) then 4
                                 else 3 end,
                    final_counts = (select jsonb_object_agg(state::text, n)
                                    from (select state, count(*) as n from tasks where job_id = $1 group by state) c)
             where id = $1
               and (select 1 from tasks where job_id = $1 and state = 1 limit 1) is null
               and (select 1 from tasks where job_id = $1 and state = 2 limit 1) is null
             returning state",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Whether the job has a queued or running task (scalar sub-selects: each reads its partial
    /// index and stops at the first row).
    async fn has_open_tasks(&self, job_id: Uuid) -> Result<bool> {
        has_open_tasks_in(&self.pool, job_id).await
    }

    /// The key and SHA-256 of a task's committed result, if it has one.
    pub async fn committed_result(&self, task_id: Uuid) -> Result<Option<(String, String)>> {
        let row = sqlx::query("select result_key, result_sha256 from tasks where id = $1 and state = 3")
            .bind(task_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// The backstop of the lease sweep: cancels the queued tasks of cancelled jobs (a running task
    /// of a cancelled job that was requeued, by a lost worker or an expired lease, would otherwise
    /// stay queued forever, as claims skip cancelled jobs), then closes every open job with no
    /// queued or running task left (finish checks lost with a replica). Returns the jobs closed and
    /// their final states.
    pub async fn finish_idle_jobs(&self) -> Result<Vec<(Uuid, i16)>> {
        let mut tx = self.pool.begin().await?;
        // Job rows first (a retry that un-cancels holds them), then the tasks in a later statement.
        let cancelled: Vec<Uuid> =
            sqlx::query_scalar("select id from jobs where cancelled_at is not null and finished_at is null for update")
                .fetch_all(&mut *tx)
                .await?;
        if !cancelled.is_empty() {
            sqlx::query("update tasks set state = 5, finished_at = now() where state = 1 and job_id = any($1)")
                .bind(&cancelled)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let idle: Vec<Uuid> = sqlx::query_scalar(
            "select j.id from jobs j
             where j.finished_at is null and j.total > 0
               and (select 1 from tasks where job_id = j.id and state = 1 limit 1) is null
               and (select 1 from tasks where job_id = j.id and state = 2 limit 1) is null",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut finished = Vec::new();
        for job_id in idle {
            if let Some(state) = self.finish_job_if_done(job_id).await? {
                finished.push((job_id, state));
            }
        }
        Ok(finished)
    }

    /// Adds the tasks committed since the last call to `workers.completed` (one statement). On
    /// failure the counts are kept for the next call.
    pub async fn flush_completed(&self) -> Result<()> {
        let pending: Vec<(Uuid, i64)> = self.completed.lock().unwrap().drain().collect();
        if pending.is_empty() {
            return Ok(());
        }
        let (ids, counts): (Vec<Uuid>, Vec<i64>) = pending.iter().copied().unzip();
        let done = sqlx::query(
            "update workers w set completed = w.completed + c.n
             from unnest($1::uuid[], $2::bigint[]) as c(id, n) where w.id = c.id",
        )
        .bind(&ids)
        .bind(&counts)
        .execute(&self.pool)
        .await;
        if let Err(e) = done {
            let mut map = self.completed.lock().unwrap();
            for (id, n) in pending {
                *map.entry(id).or_default() += n;
            }
            return Err(e.into());
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------
    // Control

    /// Cancels a job: queued tasks at once; returns the running leases (task, token, owner) to stop.
    /// Cancelling a cancelled job again changes nothing; a job that finished otherwise keeps its
    /// outcome (FAILED_PRECONDITION).
    pub async fn cancel_job(&self, tenant: &str, job_id: Uuid) -> Result<(u64, Vec<(Uuid, i64, Uuid)>)> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(
            "select state, finished_at is not null, cancelled_at is not null from jobs
             where id = $1 and tenant_id = $2 for update",
        )
        .bind(job_id)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = found else { return Err(job_not_found(job_id)) };
        let (state, finished, cancelled): (i16, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if finished && !cancelled {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} already {}; there is nothing to cancel",
                job_state_name(i32::from(state))
            )));
        }
        // Every task settled and the job is about to close (its finish check runs a moment after
        // the last commit): a cancel now would turn a finished outcome into CANCELLED.
        if !cancelled && !has_open_tasks_in(&mut *tx, job_id).await? {
            let failed: bool = sqlx::query_scalar("select exists (select 1 from tasks where job_id = $1 and state = 4)")
                .bind(job_id)
                .fetch_one(&mut *tx)
                .await?;
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} has no queued or running task left and is closing as {}; there is nothing to cancel",
                if failed { "failed" } else { "succeeded" }
            )));
        }
        sqlx::query("update jobs set cancelled_at = coalesce(cancelled_at, now()), state = 5 where id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("update tasks set state = 5, finished_at = now() where job_id = $1 and state = 1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let running = sqlx::query("select id, lease_token, lease_owner from tasks where job_id = $1 and state = 2")
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((n, running.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()))
    }

    /// Queues failed (and optionally cancelled) tasks again with a fresh attempt budget. A cancelled
    /// job is only retried with its cancelled tasks (its failed tasks alone would be cancelled again
    /// by the sweep): FAILED_PRECONDITION otherwise.
    pub async fn retry_job(&self, tenant: &str, job_id: Uuid, include_cancelled: bool) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let found: Option<bool> =
            sqlx::query_scalar("select cancelled_at is not null from jobs where id = $1 and tenant_id = $2 for update")
                .bind(job_id)
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(cancelled) = found else { return Err(job_not_found(job_id)) };
        if cancelled && !include_cancelled {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} was cancelled; retrying it needs include_cancelled (farm retry --include-cancelled), \
                 which queues its cancelled tasks with the failed ones"
            )));
        }
        // In a cancelled job, a task still queued (requeued from a lost worker before the sweep
        // cancelled it) counts as cancelled: it starts afresh too, and its old lease ends here.
        let n = sqlx::query(
            "update tasks set state = 1, failures = 0, not_before = null, last_error = null, finished_at = null,
                    current_step = 0, lease_token = null
             where job_id = $1 and (state = 4 or ($2 and state = 5) or ($3 and state = 1))",
        )
        .bind(job_id)
        .bind(include_cancelled)
        .bind(cancelled)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            sqlx::query("delete from job_worker_failures where job_id = $1").bind(job_id).execute(&mut *tx).await?;
            sqlx::query(
                "update jobs set finished_at = null, state = 2, final_counts = null, started_at = null,
                        cancelled_at = case when $2 then null else cancelled_at end
                 where id = $1",
            )
            .bind(job_id)
            .bind(include_cancelled)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Wakes dispatch loops on every replica (new or requeued work).
    pub async fn notify_new_work(&self) -> Result<()> {
        sqlx::query("select pg_notify('farm_tasks', '')").execute(&self.pool).await?;
        Ok(())
    }

    /// Asks the replica holding a worker session to cancel a task there.
    pub async fn notify_cancel(&self, worker_id: Uuid, task_id: Uuid, token: i64) -> Result<()> {
        sqlx::query("select pg_notify('farm_cancel', $1)")
            .bind(format!("{worker_id} {task_id} {token}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The tenant owning a job, or NOT_FOUND for anyone else.
    pub async fn job_of_tenant(&self, tenant: &str, job_id: Uuid) -> Result<()> {
        let found = sqlx::query("select 1 from jobs where id = $1 and tenant_id = $2")
            .bind(job_id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        found.map(|_| ()).ok_or_else(|| job_not_found(job_id))
    }
}

pub fn stale_lease() -> Error {
    Error::FailedPrecondition("lease is not current (expired, reassigned or already committed)".into())
}

pub fn job_not_found(job_id: Uuid) -> Error {
    Error::NotFound(format!("job {job_id} not found"))
}

/// Parses a job id from the API; a malformed id is simply not found.
pub fn parse_job_id(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s.trim()).map_err(|_| Error::NotFound(format!("job {s:?} not found")))
}

/// Whether the job has a queued or running task, read through `ex` (the pool, or a transaction).
async fn has_open_tasks_in<'e>(ex: impl sqlx::PgExecutor<'e>, job_id: Uuid) -> Result<bool> {
    let open: bool = sqlx::query_scalar(
        "select (select 1 from tasks where job_id = $1 and state = 1 limit 1) is not null
             or (select 1 from tasks where job_id = $1 and state = 2 limit 1) is not null",
    )
    .bind(job_id)
    .fetch_one(ex)
    .await?;
    Ok(open)
}

/// Longest failure text stored (longer ones are cut at a character boundary, with a mark).
pub const MAX_ERROR_TEXT: usize = 8 * 1024;

/// A worker's failure text as PostgreSQL can store it: without NUL bytes (which a text column
/// refuses: the report would fail, and the task come back uncharged at every lease expiry) and
/// at most [`MAX_ERROR_TEXT`] bytes.
pub fn storable_text(text: &str) -> String {
    let mut out = text.replace('\0', "\u{FFFD}");
    if out.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(" [...]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_texts_are_stored_without_nul_and_within_the_limit() {
        assert_eq!(storable_text("CUDA error\0 at 0x0"), "CUDA error\u{FFFD} at 0x0");
        assert_eq!(storable_text("fine"), "fine");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let cut = storable_text(&long);
        assert!(cut.len() <= MAX_ERROR_TEXT + 6 && cut.ends_with(" [...]"), "{}", cut.len());
        assert!(cut.starts_with("éé"));
    }
}
