//! State shared by the gRPC services of one coordinator replica. Nothing here must survive a restart:
//! the job store is PostgreSQL, events go through Redis when replicas share one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farm_proto::pb::{coordinator_message, job_event, CancelTasks, CoordinatorMessage, JobStateChanged, Lease, LeaseRevoked,
                     TaskCounts, TaskStateChanged};
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::blobs::BlobStore;
use crate::events::Events;
use crate::store::{Store, Transition};
use crate::submit::SubmitLimits;

/// Counters exported on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub tasks_dispatched: AtomicU64,
    pub dispatch_latency_us_sum: AtomicU64,
    pub dispatch_claims: AtomicU64,
    pub tasks_succeeded: AtomicU64,
    pub tasks_failed_reports: AtomicU64,
    pub requeues: AtomicU64,
    pub lease_expiries: AtomicU64,
    pub stale_refusals: AtomicU64,
    pub jobs_submitted: AtomicU64,
    pub prompts_submitted: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Shared {
    pub store: Store,
    pub auth: Authenticator,
    pub events: Events,
    pub blobs: BlobStore,
    pub limits: SubmitLimits,
    /// Turns to store a submission (`--max-concurrent-submissions`).
    pub submit_slots: tokio::sync::Semaphore,
    pub max_concurrent_submissions: u32,
    /// Worker sessions connected to this replica.
    pub sessions: Mutex<HashMap<Uuid, mpsc::Sender<CoordinatorMessage>>>,
    /// Leases this replica handed out and has not seen end, by task id (see [`IssuedLease`]).
    pub issued: Mutex<HashMap<Uuid, IssuedLease>>,
    /// Woken when work may be available (new job, requeue, retry).
    pub new_work: Notify,
    /// Name of this replica (host:port).
    pub replica: String,
    pub heartbeat_interval: Duration,
    /// How often an idle dispatch loop looks for work without a wake-up.
    pub idle_poll: Duration,
    pub metrics: Metrics,
    /// Jobs with a finish check scheduled on this replica (see [`Shared::schedule_finish_check`]).
    pub finish_pending: Mutex<HashSet<Uuid>>,
}

/// A lease as its claim returned it. An upload whose lease is found here skips the lease check
/// query when it starts: the commit statement checks the token again under the row's lock, so a
/// lease that ended meanwhile (expired, requeued, cancelled) is still refused there, only after its
/// bytes were received. Entries go at the commit, a failure report or release, the session's end, and
/// after four lease TTLs (the sweep).
#[derive(Debug, Clone, Copy)]
pub struct IssuedLease {
    pub token: i64,
    /// Entries older than a few lease TTLs are dropped by the sweep.
    pub issued_at: std::time::Instant,
    pub job_id: Uuid,
    pub idx: i64,
    pub worker_id: Uuid,
}

/// How long a finish check after a commit waits, gathering the commits of the same job meanwhile.
pub const FINISH_CHECK_DELAY: Duration = Duration::from_millis(20);

impl Shared {
    /// Publishes a task state change.
    pub async fn task_event(&self, t: &Transition, worker_id: Option<Uuid>) {
        let ev = job_event::Event::Task(TaskStateChanged {
            index: t.idx as u64,
            state: i32::from(t.state),
            worker_id: worker_id.map(|w| w.to_string()).unwrap_or_default(),
            error: t.error.clone().unwrap_or_default(),
        });
        self.events.publish(t.job_id, ev).await;
    }

    /// After a task reached a final state: closes the job when nothing is left and says so.
    pub async fn maybe_finish_job(&self, job_id: Uuid) {
        match self.store.finish_job_if_done(job_id).await {
            Ok(Some(state)) => self.announce_finished(job_id, state).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, %job_id, "could not close job"),
        }
    }

    /// Publishes a job's final state with its counts.
    pub async fn announce_finished(&self, job_id: Uuid, state: i16) {
        let counts = crate::queries::get_job(&self.store.pool, None, job_id).await.ok();
        let counts = counts.and_then(|j| j.counts).unwrap_or_else(TaskCounts::default);
        self.events
            .publish(job_id, job_event::Event::Job(JobStateChanged { state: i32::from(state), counts: Some(counts) }))
            .await;
    }

    /// After a commit: runs [`Shared::maybe_finish_job`] for the job [`FINISH_CHECK_DELAY`] later,
    /// once for all the commits of that job in between (at full speed a job commits hundreds of
    /// results a second; checking after each one was a query per task). The check starts after the
    /// pending mark is cleared, so it sees every commit that found the mark set. The lease sweep
    /// closes a job whose check was lost with its replica.
    pub fn schedule_finish_check(self: &Arc<Self>, job_id: Uuid) {
        if !self.finish_pending.lock().unwrap().insert(job_id) {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FINISH_CHECK_DELAY).await;
            shared.finish_pending.lock().unwrap().remove(&job_id);
            shared.maybe_finish_job(job_id).await;
        });
    }

    /// Tells this replica's session of `worker_id` that `leases` are no longer its own
    /// (`LeaseRevoked`); best effort, like progress.
    pub fn revoke_local(&self, worker_id: Uuid, leases: &[(Uuid, i64)]) {
        let leases = leases.iter().map(|(task, token)| Lease { task_id: task.to_string(), lease_token: *token as u64 }).collect();
        self.send_local(worker_id, coordinator_message::Msg::Revoked(LeaseRevoked { leases }));
    }

    /// Routes a cancel to a worker session of this replica; false if the session is not here.
    pub fn cancel_local(&self, worker_id: Uuid, task_id: Uuid, token: i64) -> bool {
        let leases = vec![Lease { task_id: task_id.to_string(), lease_token: token as u64 }];
        self.send_local(worker_id, coordinator_message::Msg::Cancel(CancelTasks { leases }))
    }

    /// Queues `msg` on this replica's session of `worker_id` without waiting; false if the session
    /// is not here or its queue is full.
    fn send_local(&self, worker_id: Uuid, msg: coordinator_message::Msg) -> bool {
        let tx = self.sessions.lock().unwrap().get(&worker_id).cloned();
        tx.is_some_and(|tx| tx.try_send(CoordinatorMessage { msg: Some(msg) }).is_ok())
    }
}
