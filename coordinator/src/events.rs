//! Job events (task state changes, per-step progress, job state changes) with per-job sequence numbers.
//!
//! Two transports behind one type:
//! * **in-process** (no Redis): a per-job ring buffer and a broadcast channel. Watchers on this replica
//!   see what workers on this replica report.
//! * **Redis**: one stream per job (`farm:ev:{job}`); a Lua script assigns the next sequence number and
//!   appends atomically, so every replica sees one order. Watchers read with `XREAD` from their last
//!   sequence, which makes resuming after a disconnect a plain read.
//!
//! Events are not durable state: the job store in PostgreSQL is. When Redis is down, publishing fails
//! fast and is counted; dispatch and status do not depend on it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use farm_proto::pb::{job_event, JobEvent};
use futures::Stream;
use prost::Message;
use redis::aio::ConnectionManager;
use tokio::sync::broadcast;
use uuid::Uuid;

/// The largest sequence number a watch may resume after (2^53: exact in JSON too, and far below
/// what Redis counts in a signed 64-bit integer).
pub const MAX_SEQUENCE: u64 = 1 << 53;

/// Events kept per job for replay.
pub const HISTORY: usize = 10_000;
/// See [`Events::prune`].
const UNCLOSED_IDLE_FACTOR: u32 = 6;
const REDIS_TTL_SECS: u64 = 7 * 24 * 3600;
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed publish, Redis is not tried again for this long (one probe per interval). Publishing
/// sits on the dispatch and upload paths: waiting out PUBLISH_TIMEOUT for every event while Redis is
/// away would slow dispatch to a few tasks per second.
const RETRY_AFTER: Duration = Duration::from_secs(1);

const PUBLISH_SCRIPT: &str = r"
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], tostring(seq) .. '-0', 'e', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
";

/// Raises a job's sequence counter to ARGV[1] when it is lower (a watch resuming after sequence
/// numbers that Redis no longer holds, after a restart without persistence): new events then
/// continue above what the watcher has seen, instead of being numbered from 1 and filtered out.
const RAISE_SCRIPT: &str = r"
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return v
";

struct LocalJob {
    seq: u64,
    history: VecDeque<JobEvent>,
    tx: broadcast::Sender<JobEvent>,
    /// When the last event was published.
    last_at: Instant,
}

impl LocalJob {
    fn new() -> Self {
        LocalJob { seq: 0, history: VecDeque::new(), tx: broadcast::channel(1024).0, last_at: Instant::now() }
    }

    /// Nobody watches it, and it holds nothing, or its last event closed the job more than `idle`
    /// ago, or it has had no event for [`UNCLOSED_IDLE_FACTOR`] times that (a job closed by
    /// another replica, whose closing event this one never sees).
    fn prunable(&self, idle: Duration) -> bool {
        let closed = self.history.back().is_some_and(|e| {
            matches!(&e.event, Some(job_event::Event::Job(j)) if farm_proto::job_state_is_final(j.state))
        });
        let quiet = self.last_at.elapsed();
        self.tx.receiver_count() == 0
            && (self.history.is_empty() || (closed && quiet >= idle) || quiet >= idle * UNCLOSED_IDLE_FACTOR)
    }
}

pub struct Events {
    local: Mutex<HashMap<Uuid, LocalJob>>,
    redis: Option<RedisEvents>,
    /// Events that could not be published (Redis unreachable).
    pub publish_failures: AtomicU64,
}

struct RedisEvents {
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    /// Connected on first use, so that a coordinator starts while Redis is away.
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    /// [`RAISE_SCRIPT`], loaded once like the publishing script.
    raise: redis::Script,
    /// Set while Redis is known to be away: publishes fail fast until then.
    away_until: Mutex<Option<Instant>>,
}

impl RedisEvents {
    /// Whether to call Redis now. While it is away, only the first caller after each RETRY_AFTER
    /// interval probes it; everyone else fails fast.
    fn should_try(&self) -> bool {
        let mut away = self.away_until.lock().unwrap();
        match *away {
            None => true,
            Some(until) if Instant::now() >= until => {
                *away = Some(Instant::now() + RETRY_AFTER);
                true
            }
            Some(_) => false,
        }
    }

    fn set_away(&self, away: bool) {
        *self.away_until.lock().unwrap() = away.then(|| Instant::now() + RETRY_AFTER);
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await?;
        *guard = Some(c.clone());
        Ok(c)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Events {
    /// In-process events only.
    pub fn local() -> Self {
        Events { local: Mutex::new(HashMap::new()), redis: None, publish_failures: AtomicU64::new(0) }
    }

    /// Events through Redis. Connects lazily and reconnects by itself; an unreachable Redis at start is
    /// not an error.
    pub async fn redis(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_millis(500))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        Ok(Events {
            local: Mutex::new(HashMap::new()),
            redis: Some(RedisEvents {
                client,
                config,
                conn: tokio::sync::Mutex::new(None),
                script: redis::Script::new(PUBLISH_SCRIPT),
                raise: redis::Script::new(RAISE_SCRIPT),
                away_until: Mutex::new(None),
            }),
            publish_failures: AtomicU64::new(0),
        })
    }

    pub fn uses_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Publishes one event; returns its sequence number (None when it could not be published).
    pub async fn publish(&self, job: Uuid, event: job_event::Event) -> Option<u64> {
        let mut ev = JobEvent { job_id: job.to_string(), sequence: 0, at_ms: now_ms(), event: Some(event) };
        match &self.redis {
            None => {
                let mut map = self.local.lock().unwrap();
                let entry = map.entry(job).or_insert_with(LocalJob::new);
                entry.seq = entry.seq.saturating_add(1);
                entry.last_at = Instant::now();
                ev.sequence = entry.seq;
                if entry.history.len() == HISTORY {
                    entry.history.pop_front();
                }
                entry.history.push_back(ev.clone());
                let _ = entry.tx.send(ev);
                Some(entry.seq)
            }
            Some(r) => {
                if !r.should_try() {
                    self.publish_failures.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                let payload = ev.encode_to_vec();
                let call = async {
                    let mut conn = r.connection().await?;
                    let mut inv = r.script.prepare_invoke();
                    inv.key(format!("farm:seq:{job}"))
                        .key(format!("farm:ev:{job}"))
                        .arg(payload)
                        .arg(HISTORY)
                        .arg(REDIS_TTL_SECS);
                    inv.invoke_async::<u64>(&mut conn).await
                };
                match tokio::time::timeout(PUBLISH_TIMEOUT, call).await {
                    Ok(Ok(seq)) => {
                        r.set_away(false);
                        Some(seq)
                    }
                    Ok(Err(e)) => {
                        r.set_away(true);
                        self.publish_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "event not published");
                        None
                    }
                    Err(_) => {
                        r.set_away(true);
                        self.publish_failures.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        }
    }

    /// Events of `job` with a sequence greater than `after`: the retained history first, then live ones.
    /// The stream never ends by itself; the caller stops reading.
    pub fn subscribe(&self, job: Uuid, after: u64) -> std::pin::Pin<Box<dyn Stream<Item = JobEvent> + Send>> {
        match &self.redis {
            None => {
                let (history, mut rx) = {
                    let mut map = self.local.lock().unwrap();
                    let entry = map.entry(job).or_insert_with(LocalJob::new);
                    // A watch resuming after sequence `after` that this replica never reached (its
                    // history was pruned, or lost with a restart, and the reconnected workers may
                    // have published a few events since): new events continue above it, or the
                    // watcher would filter them all out as already seen.
                    if entry.seq < after {
                        entry.seq = after;
                    }
                    let h: Vec<JobEvent> = entry.history.iter().filter(|e| e.sequence > after).cloned().collect();
                    (h, entry.tx.subscribe())
                };
                Box::pin(async_stream::stream! {
                    let mut last = after;
                    for e in history {
                        last = e.sequence;
                        yield e;
                    }
                    loop {
                        match rx.recv().await {
                            Ok(e) if e.sequence > last => { last = e.sequence; yield e; }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                    }
                })
            }
            Some(r) => {
                let client = r.client.clone();
                let raise = r.raise.clone();
                let key = format!("farm:ev:{job}");
                let seq_key = format!("farm:seq:{job}");
                Box::pin(async_stream::stream! {
                    let mut last = after;
                    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
                    let mut raised = after == 0;
                    loop {
                        if conn.is_none() {
                            match client.get_multiplexed_async_connection().await {
                                Ok(c) => conn = Some(c),
                                Err(_) => { tokio::time::sleep(Duration::from_millis(500)).await; continue; }
                            }
                        }
                        let c = conn.as_mut().unwrap();
                        if !raised {
                            let mut inv = raise.prepare_invoke();
                            inv.key(&seq_key).arg(after).arg(REDIS_TTL_SECS);
                            if inv.invoke_async::<u64>(c).await.is_err() {
                                conn = None;
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                continue;
                            }
                            raised = true;
                        }
                        let opts = redis::streams::StreamReadOptions::default().block(1000).count(1000);
                        let read: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                            redis::AsyncCommands::xread_options(c, &[&key], &[format!("{last}-0")], &opts).await;
                        match read {
                            Ok(Some(reply)) => {
                                for k in reply.keys {
                                    for id in k.ids {
                                        let seq: u64 = id.id.split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                                        let Some(redis::Value::BulkString(bytes)) = id.map.get("e") else { continue };
                                        if let Ok(mut ev) = JobEvent::decode(bytes.as_slice()) {
                                            ev.sequence = seq;
                                            last = last.max(seq);
                                            yield ev;
                                        }
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(_) => {
                                conn = None;
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                })
            }
        }
    }

    /// Drops the in-process history of jobs nobody watches that closed more than `idle` ago, of
    /// jobs without an event for six times that (their closing event went to another replica), and
    /// the empty entries that watches of quiet jobs left (Redis keys expire by themselves). A job
    /// that runs again soon keeps its history, so its sequence numbers go on rising. Returns how
    /// many were dropped.
    pub fn prune(&self, idle: Duration) -> usize {
        let mut map = self.local.lock().unwrap();
        let before = map.len();
        map.retain(|_, j| !j.prunable(idle));
        before - map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::pb::{JobState, JobStateChanged, TaskStateChanged};
    use futures::StreamExt;

    fn job_state(state: JobState) -> job_event::Event {
        job_event::Event::Job(JobStateChanged { state: state as i32, counts: None })
    }

    fn task_event() -> job_event::Event {
        job_event::Event::Task(TaskStateChanged { index: 0, state: 2, worker_id: String::new(), error: String::new() })
    }

    #[tokio::test]
    async fn prune_drops_closed_unwatched_histories_and_keeps_the_rest() {
        let events = Events::local();
        let (closed, running, watched, looked_at, retried) =
            (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for job in [closed, watched, retried] {
            events.publish(job, task_event()).await;
            events.publish(job, job_state(JobState::Succeeded)).await;
        }
        events.publish(running, task_event()).await;
        // A retry after the close: the job runs again.
        events.publish(retried, job_state(JobState::Running)).await;
        let mut watch = events.subscribe(watched, 0);
        assert!(watch.next().await.is_some());
        drop(events.subscribe(looked_at, 0));

        assert_eq!(events.prune(Duration::from_secs(3600)), 1, "only the empty entry a watch left goes at once");
        // (Idle times long enough that the unclosed jobs, quiet for six times as long, stay.)
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(events.prune(Duration::from_millis(250)), 1, "then the closed, unwatched job");
        let kept: std::collections::HashSet<Uuid> = events.local.lock().unwrap().keys().copied().collect();
        assert_eq!(kept, [running, watched, retried].into_iter().collect());
        // The retried job's sequence numbers go on rising.
        assert_eq!(events.publish(retried, task_event()).await, Some(4));
        drop(watch);
        assert_eq!(events.prune(Duration::from_millis(250)), 1, "the watched job goes once its watch ends");
        // Jobs that never saw a closing event here go after six times as long without events.
        std::thread::sleep(Duration::from_millis(1600));
        assert_eq!(events.prune(Duration::from_millis(250)), 2, "the unclosed jobs, quiet for long enough");
        assert!(events.local.lock().unwrap().is_empty());
        // A watch resuming after sequence 3 of a pruned job: the job's next event comes after it.
        let mut resumed = events.subscribe(running, 3);
        assert_eq!(events.publish(running, task_event()).await, Some(4));
        assert_eq!(resumed.next().await.map(|e| e.sequence), Some(4), "the resumed watch sees the new event");
    }

    /// A watch resuming after sequence numbers the events no longer hold (a restarted coordinator
    /// without Redis, or a Redis that lost its keys), after a few new events were published: the
    /// next event is numbered above what the watcher saw, so it reaches it.
    async fn resumed_watch_sees_new_events(events: &Events, redis_url: Option<&str>) {
        let job = Uuid::new_v4();
        for _ in 0..3 {
            events.publish(job, task_event()).await.expect("published");
        }
        let mut resumed = events.subscribe(job, 500);
        if let Some(url) = redis_url {
            // The subscription raises the counter before its first read: drive it until it has.
            let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let first = tokio::time::timeout(Duration::from_millis(50), resumed.next()).await;
                assert!(first.is_err(), "nothing after 500 yet: {first:?}");
                let seq: Option<u64> = redis::AsyncCommands::get(&mut conn, format!("farm:seq:{job}")).await.unwrap();
                if seq >= Some(500) {
                    break;
                }
                assert!(Instant::now() < deadline, "the counter was not raised: {seq:?}");
            }
        }
        assert_eq!(events.publish(job, task_event()).await, Some(501));
        let next = tokio::time::timeout(Duration::from_secs(10), resumed.next()).await;
        assert_eq!(next.ok().flatten().map(|e| e.sequence), Some(501), "the resumed watch sees the new event");
    }

    #[tokio::test]
    async fn a_resumed_watch_sees_new_events_after_the_history_was_lost() {
        resumed_watch_sees_new_events(&Events::local(), None).await;
        let redis = tokio::task::spawn_blocking(|| xtask::redis::RedisServer::start().expect("Redis for the test"))
            .await
            .unwrap();
        let events = Events::redis(&redis.url()).await.unwrap();
        resumed_watch_sees_new_events(&events, Some(&redis.url())).await;
    }
}
