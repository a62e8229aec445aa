//! `WorkerService`: worker sessions (dispatch by credits, leases, progress, failures) and uploads.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_proto::pb::worker_service_server::WorkerService;
use farm_proto::pb::{
    coordinator_message, job_event, upload_result_request, worker_message, Assign, CoordinatorMessage, Lease,
    ResultInfo, TaskAssignment, TaskProgress, UploadResultRequest, UploadResultResponse, Welcome, WorkerCapabilities,
    WorkerMessage,
};
use futures::Stream;
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::blobs::BlobStore;
use crate::error::Error;
use crate::params::params_of;
use crate::state::{IssuedLease, Metrics, Shared};
use crate::store::{Claimed, HeldLease, Transition, WorkerSlot, TASK_CANCELLED, TASK_FAILED, TASK_RUNNING};

/// Largest result accepted.
pub const MAX_RESULT_BYTES: u64 = 256 << 20;
/// Largest render metadata (`UploadHeader.metadata_json`) accepted.
pub const MAX_METADATA_BYTES: usize = 16 << 10;

/// The render metadata of an upload: `None` when empty, else it must be a JSON object of at most
/// [`MAX_METADATA_BYTES`].
fn check_metadata(json: &str) -> Result<Option<&str>, Status> {
    if json.is_empty() {
        return Ok(None);
    }
    if json.len() > MAX_METADATA_BYTES {
        return Err(Status::invalid_argument(format!(
            "metadata_json: {} bytes exceed the limit of {MAX_METADATA_BYTES} bytes",
            json.len()
        )));
    }
    // PostgreSQL's jsonb cannot hold U+0000 (which JSON text can escape).
    if json.contains("\\u0000") {
        return Err(Status::invalid_argument("metadata_json: U+0000 is not allowed"));
    }
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Object(_)) => Ok(Some(json)),
        Ok(_) => Err(Status::invalid_argument("metadata_json: must be a JSON object")),
        Err(e) => Err(Status::invalid_argument(format!("metadata_json: not JSON ({e})"))),
    }
}

pub struct WorkerApi {
    pub shared: Arc<Shared>,
}

pub fn caps_to_json(c: &WorkerCapabilities) -> serde_json::Value {
    json!({
        "device": c.device, "device_name": c.device_name, "vram_total_bytes": c.vram_total_bytes,
        "vram_free_bytes": c.vram_free_bytes, "model_name": c.model_name, "model_hash": c.model_hash,
        "precision": c.precision, "max_batch": c.max_batch, "max_pixels": c.max_pixels, "version": c.version,
        "verified": c.verified, "verified_at_ms": c.verified_at_ms, "attention_backend": c.attention_backend,
    })
}

pub fn caps_from_json(s: &str) -> WorkerCapabilities {
    let v: serde_json::Value = serde_json::from_str(s).unwrap_or_default();
    let st = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    WorkerCapabilities {
        device: st("device"),
        device_name: st("device_name"),
        vram_total_bytes: u("vram_total_bytes"),
        vram_free_bytes: u("vram_free_bytes"),
        model_name: st("model_name"),
        model_hash: st("model_hash"),
        precision: u("precision") as i32,
        max_batch: u("max_batch") as u32,
        max_pixels: u("max_pixels"),
        version: st("version"),
        verified: v.get("verified").and_then(|x| x.as_bool()).unwrap_or(false),
        verified_at_ms: v.get("verified_at_ms").and_then(|x| x.as_i64()).unwrap_or(0),
        attention_backend: st("attention_backend"),
    }
}

fn parse_lease(l: &Option<Lease>) -> Result<(Uuid, i64), Status> {
    let l = l.as_ref().ok_or_else(|| Status::invalid_argument("lease is required"))?;
    let id = Uuid::parse_str(&l.task_id).map_err(|_| Status::invalid_argument("lease.task_id: not a task id"))?;
    Ok((id, l.lease_token as i64))
}

fn assignment(c: &Claimed) -> TaskAssignment {
    TaskAssignment {
        lease: Some(Lease { task_id: c.task_id.to_string(), lease_token: c.lease_token as u64 }),
        job_id: c.job_id.to_string(),
        index: c.idx as u64,
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        params: Some(params_of(&c.shape)),
        seed: c.seed as u64,
        attempt: c.failures as u32 + 1,
        lease_expires_at_ms: c.lease_expires_at.timestamp_millis(),
    }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type ConnectStream = ConnectStream;

    async fn connect(&self, req: Request<Streaming<WorkerMessage>>) -> Result<Response<ConnectStream>, Status> {
        let shared = self.shared.clone();
        let principal = shared.auth.authenticate(req.metadata()).await?;
        principal.require_worker()?;
        // Kept to check the token again on heartbeats: a revoked token ends the session.
        let credentials = req.metadata().clone();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
        let Some(WorkerMessage { msg: Some(worker_message::Msg::Hello(hello)) }) = first else {
            return Err(Status::invalid_argument("the first message must be a hello"));
        };
        let caps = hello.capabilities.clone().unwrap_or_default();
        if caps.model_name.is_empty() {
            return Err(Status::invalid_argument("hello.capabilities.model_name is required"));
        }
        let max_batch = caps.max_batch.clamp(1, 256);
        let max_pixels = if caps.max_pixels == 0 { 1024 * 1024 } else { caps.max_pixels } as i64;
        let name = if hello.name.is_empty() { "worker".to_string() } else { hello.name.clone() };
        let slot = WorkerSlot {
            worker_id: Uuid::new_v4(),
            name,
            model: caps.model_name.clone(),
            max_pixels,
            precision: i16::try_from(caps.precision).unwrap_or(0),
        };
        shared.store.register_worker(&principal.tenant, &slot, caps_to_json(&caps), max_batch as i32, &shared.replica).await?;
        let (worker_id, name) = (slot.worker_id, &slot.name);
        let held: Vec<(Uuid, i64)> = hello
            .held_leases
            .iter()
            .filter_map(|l| Uuid::parse_str(&l.task_id).ok().map(|id| (id, l.lease_token as i64)))
            .collect();
        let kept = shared.store.adopt_leases(worker_id, &held).await?;
        tracing::info!(%worker_id, %name, model = %caps.model_name, max_batch, held = held.len(), kept = kept.len(),
                       "worker connected");
        let (tx, rx) = mpsc::channel::<CoordinatorMessage>(256);
        let welcome = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(Welcome {
                worker_id: worker_id.to_string(),
                lease_ttl_ms: shared.store.cfg.lease_ttl.as_millis() as u32,
                heartbeat_interval_ms: shared.heartbeat_interval.as_millis() as u32,
                coordinator: shared.replica.clone(),
                kept_leases: kept.iter().map(|(id, t)| Lease { task_id: id.to_string(), lease_token: *t as u64 }).collect(),
            })),
        };
        tx.send(welcome).await.map_err(|_| Status::cancelled("stream closed"))?;
        shared.sessions.lock().unwrap().insert(worker_id, tx.clone());
        tokio::spawn(run_session(shared, slot, max_batch, credentials, inbound, tx));
        let out = ReceiverStream::new(rx).map(Ok::<_, Status>);
        Ok(Response::new(Box::pin(out)))
    }

    async fn upload_result(
        &self,
        req: Request<Streaming<UploadResultRequest>>,
    ) -> Result<Response<UploadResultResponse>, Status> {
        let shared = &self.shared;
        let principal = shared.auth.authenticate(req.metadata()).await?;
        principal.require_worker()?;
        let mut inbound = req.into_inner();
        let Some(UploadResultRequest { msg: Some(upload_result_request::Msg::Header(header)) }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("the first upload message must be a header"));
        };
        let (task_id, token) = parse_lease(&header.lease)?;
        let issued = shared.issued.lock().unwrap().get(&task_id).copied().filter(|l| l.token == token);
        let (job_id, idx) = match issued {
            Some(l) => (l.job_id, l.idx),
            None => match shared.store.check_lease(task_id, token).await {
                Ok(v) => v,
                Err(e) => {
                    Metrics::add(&shared.metrics.stale_refusals, 1);
                    return Err(e.into());
                }
            },
        };
        if header.size_bytes > MAX_RESULT_BYTES {
            return Err(Status::invalid_argument(format!("result exceeds the limit of {MAX_RESULT_BYTES} bytes")));
        }
        let metadata = check_metadata(&header.metadata_json)?.map(str::to_string);
        let key = BlobStore::key_for(&job_id, idx as u64, token as u64);
        let mut blob = shared.blobs.create(&key).await.map_err(Status::from)?;
        let received: Result<(), Status> = async {
            while let Some(m) = inbound.message().await? {
                match m.msg {
                    Some(upload_result_request::Msg::Data(d)) => {
                        if blob.size + d.len() as u64 > MAX_RESULT_BYTES {
                            return Err(Status::invalid_argument(format!(
                                "result exceeds the limit of {MAX_RESULT_BYTES} bytes"
                            )));
                        }
                        blob.write(&d).await?;
                    }
                    _ => return Err(Status::invalid_argument("only data may follow the header")),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = received {
            blob.discard().await;
            return Err(e);
        }
        let sha = match blob.finish().await {
            Ok(s) => s,
            Err(e) => {
                blob.discard().await;
                return Err(e.into());
            }
        };
        if (header.size_bytes != 0 && header.size_bytes != blob.size) || (!header.sha256.is_empty() && header.sha256 != sha) {
            blob.discard().await;
            return Err(Status::data_loss("result size or sha256 does not match the header"));
        }
        let size = blob.size;
        // Publish, commit and clean-up run to their end in their own task: a caller that goes away
        // meanwhile must not leave a published blob behind without its commit or its removal.
        let placing = {
            let (shared, key, sha, tenant) = (shared.clone(), key.clone(), sha.clone(), principal.tenant.clone());
            tokio::spawn(async move {
                place_result(&shared, blob, &key, task_id, token, &tenant, size, &sha, metadata.as_deref()).await
            })
        };
        match placing.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(Status::internal(format!("result commit task: {e}"))),
        }
        Ok(Response::new(UploadResultResponse {
            result: Some(ResultInfo {
                job_id: job_id.to_string(),
                index: idx as u64,
                size_bytes: size,
                sha256: sha,
                content_type: if header.content_type.is_empty() { "image/png".into() } else { header.content_type },
                created_at_ms: chrono::Utc::now().timestamp_millis(),
                worker_id: String::new(),
            }),
        }))
    }
}

/// Publishes a checked result under its lease's key and commits it. The key carries the lease token,
/// so no upload of another lease writes it: the blob can be published before the commit, and a
/// definite refusal removes it again. When the refusal is because this very key was committed
/// already (a retry whose first answer was lost), the blob is that result: it stays, and the retry
/// gets the answer the first upload should have had. When the commit's outcome is unknown (the
/// database went away mid-statement), the blob stays too: it may be committed.
#[allow(clippy::too_many_arguments)]
async fn place_result(
    shared: &Arc<Shared>,
    blob: crate::blobs::PendingBlob,
    key: &str,
    task_id: Uuid,
    token: i64,
    tenant: &str,
    size: u64,
    sha: &str,
    metadata: Option<&str>,
) -> Result<(), Status> {
    shared.blobs.publish(blob, key).await.map_err(Status::from)?;
    match shared.store.commit_result(task_id, token, tenant, key, size as i64, sha, metadata).await {
        Ok(t) => {
            forget_lease(shared, task_id, token);
            Metrics::add(&shared.metrics.tasks_succeeded, 1);
            shared.task_event(&t, None).await;
            shared.schedule_finish_check(t.job_id);
            Ok(())
        }
        Err(Error::FailedPrecondition(message)) => {
            forget_lease(shared, task_id, token);
            match shared.store.committed_result(task_id).await {
                Ok(Some((committed_key, committed_sha))) if committed_key == key => {
                    if committed_sha == sha {
                        Ok(())
                    } else {
                        Err(Status::failed_precondition(message))
                    }
                }
                Ok(_) => {
                    Metrics::add(&shared.metrics.stale_refusals, 1);
                    shared.blobs.delete(key).await;
                    Err(Status::failed_precondition(message))
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs a store call once more after a transient database error: a pooled connection broken by a
/// database restart fails its next query, and workers do not resend failure or release reports
/// (both calls check the lease token, so a second run after a first that did commit is a no-op).
async fn retry_transient<T, F, Fut>(mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    match call().await {
        Err(e) if e.is_transient() => {
            tracing::debug!(error = %e, "store call failed; retrying once");
            tokio::time::sleep(Duration::from_millis(100)).await;
            call().await
        }
        other => other,
    }
}

/// Drops a lease from [`Shared::issued`] if it is still the one recorded for its task.
fn forget_lease(shared: &Shared, task_id: Uuid, token: i64) {
    let mut issued = shared.issued.lock().unwrap();
    if issued.get(&task_id).is_some_and(|l| l.token == token) {
        issued.remove(&task_id);
    }
}

/// One worker session: a dispatch loop driven by credits, and the inbound message loop. When the
/// stream ends, for whatever reason, every lease the session holds is requeued at once.
async fn run_session(
    shared: Arc<Shared>,
    slot: WorkerSlot,
    max_batch: u32,
    credentials: tonic::metadata::MetadataMap,
    mut inbound: Streaming<WorkerMessage>,
    tx: mpsc::Sender<CoordinatorMessage>,
) {
    let worker_id = slot.worker_id;
    let credits = Arc::new(AtomicU32::new(0));
    let credit_added = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let dispatcher = tokio::spawn(dispatch_loop(
        shared.clone(),
        slot.clone(),
        max_batch,
        credits.clone(),
        credit_added.clone(),
        stop_rx,
        tx.clone(),
    ));

    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::info!(%worker_id, error = %e, "worker stream dropped");
                break;
            }
        };
        let Some(msg) = msg.msg else { continue };
        if matches!(msg, worker_message::Msg::Heartbeat(_)) {
            if let Err(Error::Unauthenticated(m)) = shared.auth.authenticate(&credentials).await {
                tracing::warn!(%worker_id, reason = %m, "the worker's token is no longer valid; ending its session");
                break;
            }
        }
        if let Err(e) = handle_message(&shared, &slot, msg, &credits, &credit_added).await {
            tracing::warn!(%worker_id, error = %e, "worker message not handled");
        }
    }

    let _ = stop_tx.send(true);
    let _ = dispatcher.await;
    shared.sessions.lock().unwrap().remove(&worker_id);
    shared.issued.lock().unwrap().retain(|_, l| l.worker_id != worker_id);
    let _ = shared.store.flush_completed().await;
    // Requeue what the session held; retry while the database is away (the lease sweep is the backstop).
    for attempt in 0..5 {
        match shared.store.requeue_worker(worker_id, "lost").await {
            Ok(ts) => {
                Metrics::add(&shared.metrics.requeues, ts.len() as u64);
                for t in &ts {
                    shared.task_event(t, Some(worker_id)).await;
                }
                if !ts.is_empty() {
                    let _ = shared.store.notify_new_work().await;
                    tracing::info!(%worker_id, requeued = ts.len(), "requeued the tasks of a lost worker");
                }
                break;
            }
            Err(e) => {
                tracing::warn!(%worker_id, error = %e, attempt, "requeue failed; retrying");
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
    }
    tracing::info!(%worker_id, "worker session ended");
}

async fn handle_message(
    shared: &Arc<Shared>,
    slot: &WorkerSlot,
    msg: worker_message::Msg,
    credits: &AtomicU32,
    credit_added: &Notify,
) -> Result<(), Error> {
    let worker_id = slot.worker_id;
    // A lease named in a report, as this session holds it.
    let held = |l: &Option<Lease>| -> Result<HeldLease, Error> {
        let (task, token) = parse_lease(l).map_err(|s| Error::InvalidArgument(s.message().into()))?;
        Ok(HeldLease { worker: worker_id, task, token })
    };
    match msg {
        worker_message::Msg::Hello(_) => {}
        worker_message::Msg::Credits(c) => {
            if c.withdraw {
                credits.store(c.add, Ordering::SeqCst);
            } else {
                credits.fetch_add(c.add, Ordering::SeqCst);
            }
            credit_added.notify_one();
        }
        worker_message::Msg::Heartbeat(h) => {
            // A malformed entry renews nothing but does not cost the worker its other leases.
            let mut leases = Vec::with_capacity(h.leases.len());
            for l in h.leases {
                match parse_lease(&Some(l)) {
                    Ok(lease) => leases.push(lease),
                    Err(s) => tracing::warn!(%worker_id, error = %s.message(), "heartbeat entry ignored"),
                }
            }
            let gone = shared.store.heartbeat(worker_id, &leases, h.vram_free_bytes).await?;
            if !gone.is_empty() {
                // Renders of tasks that went elsewhere (the lease expired and another worker took
                // it): the worker stops them between steps instead of rendering them for nothing.
                tracing::info!(%worker_id, leases = gone.len(), "leases no longer the worker's: revoked");
                shared.revoke_local(worker_id, &gone);
            }
        }
        worker_message::Msg::Progress(p) => {
            if let Some((job_id, idx)) = shared.store.progress(held(&p.lease)?, p.step as i32).await? {
                shared
                    .events
                    .publish(
                        job_id,
                        job_event::Event::Progress(TaskProgress {
                            index: idx as u64,
                            step: p.step,
                            total_steps: p.total_steps,
                            worker_id: worker_id.to_string(),
                        }),
                    )
                    .await;
            } else {
                Metrics::add(&shared.metrics.stale_refusals, 1);
            }
        }
        worker_message::Msg::Rendered(_) => {}
        worker_message::Msg::Failed(f) => {
            let lease = held(&f.lease)?;
            Metrics::add(&shared.metrics.tasks_failed_reports, 1);
            forget_lease(shared, lease.task, lease.token);
            let reported =
                retry_transient(|| shared.store.report_failure(lease, &slot.name, &f.error, f.retryable, &f.kind)).await?;
            match reported {
                Some(out) => {
                    shared.task_event(&out.transition, Some(worker_id)).await;
                    if matches!(out.transition.state, TASK_FAILED | TASK_CANCELLED) {
                        shared.maybe_finish_job(out.transition.job_id).await;
                    } else {
                        shared.store.notify_new_work().await?;
                    }
                }
                None => Metrics::add(&shared.metrics.stale_refusals, 1),
            }
        }
        worker_message::Msg::Released(r) => {
            let lease = held(&r.lease)?;
            forget_lease(shared, lease.task, lease.token);
            let retry_after = i64::from(r.retry_after_ms);
            if let Some(t) = retry_transient(|| shared.store.release(lease, &r.reason, retry_after)).await? {
                Metrics::add(&shared.metrics.requeues, 1);
                shared.task_event(&t, Some(worker_id)).await;
                shared.store.notify_new_work().await?;
            }
        }
        worker_message::Msg::Goodbye(g) => tracing::info!(%worker_id, reason = %g.reason, "worker says goodbye"),
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn dispatch_loop(
    shared: Arc<Shared>,
    slot: WorkerSlot,
    max_batch: u32,
    credits: Arc<AtomicU32>,
    credit_added: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<CoordinatorMessage>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let available = credits.load(Ordering::SeqCst);
        if available == 0 {
            tokio::select! {
                _ = credit_added.notified() => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let want = available.min(max_batch);
        let started = Instant::now();
        match shared.store.claim(&slot, want).await {
            Ok(claimed) if !claimed.is_empty() => {
                let n = claimed.len() as u32;
                // Saturating: a withdraw (a draining worker) may have zeroed the count during the claim.
                let _ = credits.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| Some(c.saturating_sub(n)));
                {
                    let mut issued = shared.issued.lock().unwrap();
                    for c in &claimed {
                        let lease = IssuedLease {
                            token: c.lease_token,
                            issued_at: std::time::Instant::now(),
                            job_id: c.job_id,
                            idx: c.idx,
                            worker_id: slot.worker_id,
                        };
                        issued.insert(c.task_id, lease);
                    }
                }
                Metrics::add(&shared.metrics.tasks_dispatched, u64::from(n));
                Metrics::add(&shared.metrics.dispatch_claims, 1);
                Metrics::add(&shared.metrics.dispatch_latency_us_sum, started.elapsed().as_micros() as u64);
                // RUNNING goes out before the worker can see the tasks: its progress and results,
                // published from the session's other handlers, then always follow it.
                for c in &claimed {
                    let t = Transition { job_id: c.job_id, idx: c.idx, state: TASK_RUNNING, error: None };
                    shared.task_event(&t, Some(slot.worker_id)).await;
                }
                let msg = CoordinatorMessage {
                    msg: Some(coordinator_message::Msg::Assign(Assign { tasks: claimed.iter().map(assignment).collect() })),
                };
                if tx.send(msg).await.is_err() {
                    return; // the session ends; its leases are requeued there
                }
            }
            Ok(_) => {
                tokio::select! {
                    _ = shared.new_work.notified() => {}
                    _ = tokio::time::sleep(shared.idle_poll) => {}
                    _ = stop.changed() => return,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claim failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_metadata_is_an_object_within_the_limit_or_nothing() {
        assert_eq!(check_metadata("").unwrap(), None);
        assert_eq!(check_metadata(r#"{"seed":1}"#).unwrap(), Some(r#"{"seed":1}"#));
        for bad in ["[1]", "7", "{\"seed\":", r#"{"worker":"a\u0000b"}"#] {
            assert_eq!(check_metadata(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_METADATA_BYTES));
        let e = check_metadata(&big).unwrap_err();
        assert!(e.message().contains(&MAX_METADATA_BYTES.to_string()), "{}", e.message());
    }
}
