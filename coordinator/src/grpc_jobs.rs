//! `JobService`: the client API. Every call authenticates and is scoped to the caller's tenant.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use farm_proto::job_state_is_final as is_final;
use farm_proto::pb::job_service_server::JobService;
use farm_proto::pb::{
    job_event, submit_job_request, CancelJobRequest, CancelJobResponse, DownloadResultChunk, DownloadResultRequest,
    GetJobRequest, GetTaskRequest, Job, JobEvent, JobState, JobStateChanged, ListJobsRequest, ListJobsResponse,
    ListResultsRequest, ListResultsResponse, ListWorkersRequest, ListWorkersResponse, RetryJobRequest,
    RetryJobResponse, SubmitJobRequest, SubmitJobResponse, Task, WatchJobRequest,
};
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Principal;
use crate::error::Error;
use crate::queries;
use crate::state::{Metrics, Shared};
use crate::store::parse_job_id;
use crate::submit::{submit, ChunkStream, SubmitItem};

/// How long a watch waits after a final-state event for anything that follows it (see `watch_job`).
const FINAL_SETTLE: Duration = Duration::from_millis(200);
/// How long a submission waits for a turn to be stored (see `--max-concurrent-submissions`).
const SUBMIT_TURN_WAIT: Duration = Duration::from_secs(30);

pub struct JobApi {
    pub shared: Arc<Shared>,
}

impl JobApi {
    async fn client<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let p = self.shared.auth.authenticate(req.metadata()).await?;
        p.require_client()?;
        Ok(p)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;
type DownloadStream = Pin<Box<dyn Stream<Item = Result<DownloadResultChunk, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    type WatchJobStream = EventStream;
    type DownloadResultStream = DownloadStream;

    async fn submit_job(&self, req: Request<Streaming<SubmitJobRequest>>) -> Result<Response<SubmitJobResponse>, Status> {
        let p = self.client(&req).await?;
        let idle = self.shared.limits.idle_timeout;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(idle, inbound.message()).await.map_err(|_| {
            Status::aborted(format!(
                "the submission sent no header for {} s (the coordinator's limit between messages, \
                 --submit-idle-timeout-s); nothing was stored",
                idle.as_secs()
            ))
        })?;
        let Some(SubmitJobRequest { msg: Some(submit_job_request::Msg::Header(header)) }) = first? else {
            return Err(Status::invalid_argument("the first SubmitJob message must be a header"));
        };
        // Each submission stored at once holds a database connection: they take turns, so that
        // many large or slow ones cannot take the connections that dispatch needs.
        let _turn = match tokio::time::timeout(SUBMIT_TURN_WAIT, self.shared.submit_slots.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(Status::unavailable(format!(
                    "{} submissions are being stored (the coordinator's limit, --max-concurrent-submissions); \
                     nothing was stored, try again",
                    self.shared.max_concurrent_submissions
                )))
            }
        };
        let chunks: ChunkStream<'_> = Box::pin(inbound.timeout(idle).map(move |m| match m {
            Ok(Ok(SubmitJobRequest { msg: Some(submit_job_request::Msg::Chunk(c)) })) => Ok(SubmitItem::Prompts(c.prompts)),
            Ok(Ok(SubmitJobRequest { msg: Some(submit_job_request::Msg::End(e)) })) => Ok(SubmitItem::End(e.prompt_count)),
            Ok(Ok(_)) => Err(Error::InvalidArgument("only prompt chunks and the end marker may follow the header".into())),
            Ok(Err(s)) => Err(Error::Aborted(format!("submission stream broke ({}); nothing was stored", s.message()))),
            Err(_) => Ok(SubmitItem::Idle),
        }));
        let out = submit(&self.shared.store, &self.shared.limits, &p.tenant, header, chunks).await?;
        if let Some(job) = out.created {
            Metrics::add(&self.shared.metrics.jobs_submitted, 1);
            Metrics::add(&self.shared.metrics.prompts_submitted, out.response.accepted);
            self.shared.new_work.notify_waiters();
            tracing::info!(%job, tenant = %p.tenant, prompts = out.response.accepted, "job stored");
        }
        Ok(Response::new(out.response))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let p = self.client(&req).await?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        Ok(Response::new(queries::get_job(&self.shared.store.pool, Some(&p.tenant), id).await?))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let p = self.client(&req).await?;
        Ok(Response::new(queries::list_jobs(&self.shared.store.pool, &p.tenant, req.get_ref()).await?))
    }

    async fn get_task(&self, req: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let p = self.client(&req).await?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        Ok(Response::new(queries::get_task(&self.shared.store.pool, &p.tenant, id, req.get_ref().index).await?))
    }

    async fn watch_job(&self, req: Request<WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        let p = self.client(&req).await?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        self.shared.store.job_of_tenant(&p.tenant, id).await?;
        let after = req.get_ref().after_sequence;
        // Sequence numbers are counted in a signed 64-bit Redis integer: a resume point past what
        // can be counted would stop the job's counter (see `Events::subscribe`).
        if after > crate::events::MAX_SEQUENCE {
            return Err(Status::invalid_argument(format!(
                "after_sequence {after} is past the largest sequence number ({})",
                crate::events::MAX_SEQUENCE
            )));
        }
        let shared = self.shared.clone();
        let mut events = shared.events.subscribe(id, after);
        let stream = async_stream::stream! {
            let mut last = after;
            let mut check = tokio::time::interval(Duration::from_secs(2));
            // An event that arrived while deciding whether a final-state event ends the watch.
            let mut next_up: Option<JobEvent> = None;
            loop {
                tokio::select! {
                    ev = async { match next_up.take() { Some(ev) => Some(ev), None => events.next().await } } => {
                        let Some(ev) = ev else { break };
                        last = last.max(ev.sequence);
                        if matches!(&ev.event, Some(job_event::Event::Job(j)) if is_final(j.state)) {
                            // A final state ends the watch only if it is the job's last word: the
                            // job has finished and nothing follows it (a replayed final state that
                            // a retry has since superseded is followed by the retry's events).
                            if matches!(queries::job_finished(&shared.store.pool, id).await, Ok(false)) {
                                continue;
                            }
                            if let Ok(Some(following)) = tokio::time::timeout(FINAL_SETTLE, events.next()).await {
                                next_up = Some(following);
                                continue;
                            }
                            yield Ok(ev);
                            break;
                        }
                        yield Ok(ev);
                    }
                    _ = check.tick() => {
                        // The final event may have been published before this watch started (or lost
                        // while Redis was away): the job store is the source of truth.
                        // One row read while the job runs; the counts only once it has finished.
                        if !matches!(queries::job_finished(&shared.store.pool, id).await, Ok(true)) {
                            continue;
                        }
                        match queries::get_job(&shared.store.pool, None, id).await {
                            Ok(job) if is_final(job.state) => {
                                // Drain what is already published, then close with the final state.
                                // (Final-state events among them are history: the job's state
                                // as read now closes the watch.)
                                let mut pending = next_up.take();
                                loop {
                                    let ev = match pending.take() {
                                        Some(ev) => ev,
                                        None => match tokio::time::timeout(FINAL_SETTLE, events.next()).await {
                                            Ok(Some(ev)) => ev,
                                            _ => break,
                                        },
                                    };
                                    last = last.max(ev.sequence);
                                    if !matches!(&ev.event, Some(job_event::Event::Job(j)) if is_final(j.state)) {
                                        yield Ok(ev);
                                    }
                                }
                                // A sequence of its own: clients drop an event whose sequence they
                                // have seen.
                                yield Ok(JobEvent {
                                    job_id: id.to_string(),
                                    sequence: last + 1,
                                    at_ms: chrono::Utc::now().timestamp_millis(),
                                    event: Some(job_event::Event::Job(JobStateChanged { state: job.state, counts: job.counts })),
                                });
                                break;
                            }
                            _ => {}
                        }
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        let p = self.client(&req).await?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        let (queued, running) = match self.shared.store.cancel_job(&p.tenant, id).await {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, Error::FailedPrecondition(_)) {
                    // A job refused because all its tasks settled closes now, with its own outcome.
                    self.shared.maybe_finish_job(id).await;
                }
                return Err(e.into());
            }
        };
        for (task, token, owner) in &running {
            if !self.shared.cancel_local(*owner, *task, *token) {
                // The cancel is committed; a notice that cannot reach the worker's replica only
                // lets that render run to its end (its result is kept) instead of stopping it
                // early, so it does not fail the call.
                if let Err(e) = self.shared.store.notify_cancel(*owner, *task, *token).await {
                    tracing::warn!(error = %e, job = %id, task = %task, "cancel notice to another replica not sent");
                }
            }
        }
        // The job's CANCELLED event, with its counts, comes when it closes: at once when nothing
        // runs, else once its running tasks have stopped.
        self.shared.maybe_finish_job(id).await;
        Ok(Response::new(CancelJobResponse { cancelled_queued: queued, cancelling_running: running.len() as u64 }))
    }

    async fn retry_job(&self, req: Request<RetryJobRequest>) -> Result<Response<RetryJobResponse>, Status> {
        let p = self.client(&req).await?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        let n = self.shared.store.retry_job(&p.tenant, id, req.get_ref().include_cancelled).await?;
        if n > 0 {
            // Watchers learn that the job runs again (and a watch replaying its earlier final state
            // does not stop there).
            let counts = queries::get_job(&self.shared.store.pool, None, id).await.ok().and_then(|j| j.counts);
            self.shared
                .events
                .publish(id, job_event::Event::Job(JobStateChanged { state: JobState::Running as i32, counts }))
                .await;
            self.shared.store.notify_new_work().await?;
        }
        Ok(Response::new(RetryJobResponse { requeued: n }))
    }

    async fn list_results(&self, req: Request<ListResultsRequest>) -> Result<Response<ListResultsResponse>, Status> {
        let p = self.client(&req).await?;
        let r = req.get_ref();
        let id = parse_job_id(&r.job_id)?;
        let (results, next) = queries::list_results(
            &self.shared.store.pool,
            &p.tenant,
            id,
            r.from_index,
            r.since_ms,
            r.page_size,
            &r.page_token,
        )
        .await?;
        Ok(Response::new(ListResultsResponse { results, next_page_token: next }))
    }

    async fn download_result(&self, req: Request<DownloadResultRequest>) -> Result<Response<DownloadStream>, Status> {
        let p = self.client(&req).await?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        let (key, info) = queries::result_of(&self.shared.store.pool, &p.tenant, id, req.get_ref().index).await?;
        let mut blob = self.shared.blobs.open_read(&key).await?;
        let expected = info.size_bytes;
        let stream = async_stream::stream! {
            let mut first = Some(info);
            let mut sent: u64 = 0;
            while let Some(chunk) = blob.next().await {
                match chunk {
                    Ok(data) => {
                        sent += data.len() as u64;
                        yield Ok(DownloadResultChunk { info: first.take(), data: data.to_vec() });
                    }
                    Err(e) => {
                        yield Err(Status::from(e));
                        return;
                    }
                }
            }
            if let Some(info) = first.take() {
                yield Ok(DownloadResultChunk { info: Some(info), data: Vec::new() });
            }
            // Stored bytes that were cut short or replaced must not end as a complete download.
            if sent != expected {
                yield Err(Status::data_loss(format!(
                    "the stored result has {sent} bytes where {expected} were committed; it is damaged"
                )));
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let p = self.client(&req).await?;
        let workers =
            queries::list_workers(&self.shared.store.pool, &p.tenant, req.get_ref().include_disconnected).await?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }
}
