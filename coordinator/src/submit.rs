//! `SubmitJob`: validate a streamed batch and store it atomically.
//!
//! The job row is inserted first (claiming the idempotency key), then every task is streamed into
//! PostgreSQL with `COPY ... FROM STDIN` inside the same transaction as chunks arrive, so memory stays
//! bounded for a million prompts. Any invalid prompt aborts the COPY and rolls everything back: the
//! reply lists the errors (index, line, column) and nothing is stored. A repeated idempotency key
//! returns the job stored first.

use std::time::Duration;

use farm_proto::limits::{self, LimitError};
use farm_proto::pb::{PromptIssue, PromptSpec, RenderParams, SubmitHeader, SubmitJobResponse};
use farm_proto::prompt::{check_characters, parse_prompt, PromptLimits};
use futures::{Stream, StreamExt};
use rand::{Rng, SeedableRng};
use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::params::shape_of;
use crate::store::Store;

/// Most errors and warnings reported back for one submission.
pub const MAX_ISSUES: usize = 1000;

/// Submission limits.
#[derive(Debug, Clone)]
pub struct SubmitLimits {
    pub max_prompts: u64,
    pub prompt: PromptLimits,
    /// Longest wait between two messages of a submission.
    pub idle_timeout: Duration,
    /// Longest time a submission may go without a prompt while it sends empty chunks (the
    /// client's keep-alive while its input is quiet): it holds a database connection and one of
    /// the replica's turns to store submissions meanwhile.
    pub quiet_limit: Duration,
}

impl Default for SubmitLimits {
    fn default() -> Self {
        SubmitLimits {
            max_prompts: limits::MAX_PROMPTS_PER_JOB,
            prompt: PromptLimits::default(),
            idle_timeout: Duration::from_secs(60),
            quiet_limit: Duration::from_secs(600),
        }
    }
}

/// One incoming message after the header.
#[derive(Debug)]
pub enum SubmitItem {
    Prompts(Vec<PromptSpec>),
    /// The end marker with the number of prompts the client sent.
    End(u64),
    /// Nothing arrived for [`SubmitLimits::idle_timeout`]: after the end marker the submission is
    /// complete (a client may keep its side open while it waits for the answer); before it, the
    /// submission is refused.
    Idle,
}

pub type ChunkStream<'a> = std::pin::Pin<Box<dyn Stream<Item = Result<SubmitItem>> + Send + 'a>>;

/// What the store needs of a submission's outcome.
pub struct SubmitOutcome {
    pub response: SubmitJobResponse,
    /// Set when a new job was stored (for events and wake-ups).
    pub created: Option<Uuid>,
}

fn issue(index: u64, spec: &PromptSpec, line: u32, column: u32, code: &str, message: String) -> PromptIssue {
    PromptIssue {
        index,
        line,
        column,
        code: code.to_string(),
        message,
        source: spec.source.clone(),
        source_line: spec.source_line,
    }
}

/// Task ids of one submission: UUIDv7 layout (48-bit Unix milliseconds, version 7, variant 10) with a
/// random per-submission prefix and a counter in the low bits. Ids of one job are increasing, so the
/// primary-key index takes them at its right edge instead of at random pages (a random UUIDv4 per row
/// made the bulk insert markedly slower); across jobs the millisecond and 42 random bits keep them apart.
struct TaskIds {
    high: u128,
    next: u32,
}

impl TaskIds {
    fn new(rng: &mut impl Rng) -> Self {
        let millis = chrono::Utc::now().timestamp_millis().max(0) as u128 & ((1 << 48) - 1);
        let rand_a = u128::from(rng.gen::<u16>() & 0x0fff);
        let rand_b = u128::from(rng.gen::<u32>() & 0x3fff_ffff);
        let high = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | (rand_b << 32);
        TaskIds { high, next: 0 }
    }

    fn next(&mut self) -> Uuid {
        let id = Uuid::from_u128(self.high | u128::from(self.next));
        self.next = self.next.wrapping_add(1);
        id
    }
}

/// Escapes one field for PostgreSQL's COPY text format.
fn copy_field(out: &mut String, s: &str) {
    if !s.bytes().any(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t')) {
        out.push_str(s);
        return;
    }
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

/// Job-level checks of the header; returns the complete default parameters.
pub fn check_header(h: &SubmitHeader) -> Result<RenderParams> {
    let d = limits::with_defaults(&h.defaults.clone().unwrap_or_default());
    limits::check_params(&d).map_err(|LimitError(m)| Error::InvalidArgument(format!("job defaults: {m}")))?;
    if h.name.len() > 256 {
        return Err(Error::InvalidArgument("name: at most 256 bytes".into()));
    }
    if h.idempotency_key.len() > 256 {
        return Err(Error::InvalidArgument("idempotency_key: at most 256 bytes".into()));
    }
    for (field, text) in [("name", &h.name), ("idempotency_key", &h.idempotency_key)] {
        check_characters(text).map_err(|d| Error::InvalidArgument(format!("{field}: {}", d.message)))?;
    }
    if h.max_attempts > limits::MAX_ATTEMPTS {
        return Err(Error::InvalidArgument(format!("max_attempts: at most {}", limits::MAX_ATTEMPTS)));
    }
    Ok(d)
}

/// Validates one prompt and merges its parameters with the defaults.
fn prepare(
    index: u64,
    spec: &PromptSpec,
    defaults: &RenderParams,
    limits: &SubmitLimits,
    warnings: &mut Vec<PromptIssue>,
) -> std::result::Result<(String, RenderParams), PromptIssue> {
    if spec.text.len() > limits.prompt.max_bytes {
        return Err(issue(
            index,
            spec,
            0,
            0,
            "too_large",
            format!("prompt is {} bytes; the limit is {} bytes", spec.text.len(), limits.prompt.max_bytes),
        ));
    }
    if spec.negative_prompt.len() > limits.prompt.max_bytes {
        return Err(issue(
            index,
            spec,
            0,
            0,
            "too_large",
            format!("negative prompt exceeds the limit of {} bytes", limits.prompt.max_bytes),
        ));
    }
    let parsed = parse_prompt(&spec.text, &limits.prompt)
        .map_err(|d| issue(index, spec, d.line, d.column, d.code, d.message.clone()))?;
    check_characters(&spec.negative_prompt)
        .map_err(|d| issue(index, spec, d.line, d.column, d.code, format!("negative prompt: {}", d.message)))?;
    for w in &parsed.warnings {
        if warnings.len() < MAX_ISSUES {
            warnings.push(issue(index, spec, w.line, w.column, w.code, w.message.clone()));
        }
    }
    let mut p = defaults.clone();
    if let Some(w) = spec.width {
        p.width = w;
    }
    if let Some(h) = spec.height {
        p.height = h;
    }
    if let Some(s) = spec.steps {
        p.steps = s;
    }
    if let Some(c) = spec.cfg_scale {
        p.cfg_scale = Some(c);
    }
    limits::check_params(&p).map_err(|LimitError(m)| issue(index, spec, 0, 0, "limit", m))?;
    Ok((parsed.text, p))
}

/// Stores a job from its header and prompt chunks (see the module docs).
pub async fn submit(
    store: &Store,
    limits: &SubmitLimits,
    tenant: &str,
    header: SubmitHeader,
    mut chunks: ChunkStream<'_>,
) -> Result<SubmitOutcome> {
    let defaults = check_header(&header)?;
    let max_attempts = if header.max_attempts == 0 { limits::DEFAULT_MAX_ATTEMPTS } else { header.max_attempts };
    let job_id = Uuid::new_v4();
    // A validate-only call stores nothing, so it neither claims the key nor answers with the job
    // that holds it: its prompts are checked whatever the key.
    let key = (!header.idempotency_key.is_empty() && !header.validate_only).then(|| header.idempotency_key.clone());
    let mut tx = store.pool.begin().await?;

    let inserted = sqlx::query(
        "insert into jobs (id, tenant_id, name, idempotency_key, priority, params, model, max_pixels, max_attempts,
                           total, total_steps, precision)
         values ($1, $2, $3, $4, $5, $6::jsonb, $7, 0, $8, 0, 0, $9)
         on conflict on constraint jobs_tenant_idempotency_key do nothing
         returning id",
    )
    .bind(job_id)
    .bind(tenant)
    .bind(&header.name)
    .bind(&key)
    .bind(header.priority)
    .bind(shape_of(&defaults))
    .bind(&defaults.model)
    .bind(max_attempts as i32)
    // The precision the client asked for (0: any worker's; the shape then records bf16, the
    // default, and each PNG the precision it was rendered in).
    .bind(header.defaults.as_ref().map_or(0, |d| i16::try_from(d.precision).unwrap_or(0)))
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_none() {
        tx.rollback().await?;
        let row = sqlx::query("select id, total from jobs where tenant_id = $1 and idempotency_key = $2")
            .bind(tenant)
            .bind(&key)
            .fetch_one(&store.pool)
            .await?;
        let id: Uuid = row.get(0);
        let total: i64 = row.get(1);
        return Ok(SubmitOutcome {
            response: SubmitJobResponse {
                job_id: id.to_string(),
                accepted: total as u64,
                warnings: vec![],
                errors: vec![],
                duplicate: true,
            },
            created: None,
        });
    }

    let (count, total_steps, min_pixels, max_pixels, mut errors, warnings) = {
        let mut copy = Some(
            tx.copy_in_raw(
                "copy tasks (id, job_id, idx, state, prompt, negative_prompt, seed, shape, steps, pixels) from stdin",
            )
            .await?,
        );
        let mut errors: Vec<PromptIssue> = Vec::new();
        let mut warnings: Vec<PromptIssue> = Vec::new();
        let mut count: u64 = 0;
        let mut total_steps: i64 = 0;
        let mut max_pixels: i64 = 0;
        let mut min_pixels: i64 = i64::MAX;
        let mut buf = String::new();
        let mut rng = rand::rngs::StdRng::from_entropy();
        let job_str = job_id.to_string();
        let mut task_ids = TaskIds::new(&mut rng);
        // Most prompts only take the job defaults: their shape is serialised once, not per prompt.
        let default_shape = shape_of(&defaults);
        let mut over_limit = false;

        let mut ended: Option<u64> = None;
        let mut last_prompt_at = std::time::Instant::now();
        while let Some(item) = chunks.next().await {
            let chunk = match item {
                Ok(SubmitItem::Prompts(_)) if ended.is_some() => {
                    if let Some(c) = copy.take() {
                        let _ = c.abort("prompts after the end marker").await;
                    }
                    return Err(Error::InvalidArgument("prompts after the end marker".into()));
                }
                Ok(SubmitItem::Prompts(c)) if c.is_empty() && last_prompt_at.elapsed() > limits.quiet_limit => {
                    if let Some(c) = copy.take() {
                        let _ = c.abort("submission sent no prompt").await;
                    }
                    return Err(Error::Aborted(format!(
                        "the submission sent no prompt for {} s (the coordinator's limit, --submit-quiet-limit-s); \
                         nothing was stored",
                        limits.quiet_limit.as_secs()
                    )));
                }
                Ok(SubmitItem::Prompts(c)) => {
                    if !c.is_empty() {
                        last_prompt_at = std::time::Instant::now();
                    }
                    c
                }
                Ok(SubmitItem::End(n)) => {
                    ended = Some(n);
                    continue;
                }
                Ok(SubmitItem::Idle) if ended.is_some() => break,
                Ok(SubmitItem::Idle) => {
                    if let Some(c) = copy.take() {
                        let _ = c.abort("submission went quiet").await;
                    }
                    return Err(Error::Aborted(format!(
                        "the submission sent nothing for {} s (the coordinator's limit between messages, \
                         --submit-idle-timeout-s); nothing was stored",
                        limits.idle_timeout.as_secs()
                    )));
                }
                Err(e) => {
                    if let Some(c) = copy.take() {
                        let _ = c.abort("submission stream failed").await;
                    }
                    return Err(e);
                }
            };
            buf.clear();
            for spec in &chunk {
                let index = count;
                count += 1;
                if count > limits.max_prompts {
                    // Nothing past the limit can be stored: stop reading here.
                    over_limit = true;
                    errors.push(issue(
                        index,
                        spec,
                        0,
                        0,
                        "too_many_prompts",
                        format!("a job holds at most {} prompts; split the batch into several jobs", limits.max_prompts),
                    ));
                    break;
                }
                match prepare(index, spec, &defaults, limits, &mut warnings) {
                    Err(e) => {
                        if errors.len() < MAX_ISSUES {
                            errors.push(e);
                        }
                    }
                    Ok((text, p)) if errors.is_empty() => {
                        let seed = spec.seed.unwrap_or_else(|| rng.gen());
                        let pixels = i64::from(p.width) * i64::from(p.height);
                        max_pixels = max_pixels.max(pixels);
                        min_pixels = min_pixels.min(pixels);
                        total_steps += i64::from(p.steps);
                        buf.push_str(task_ids.next().hyphenated().encode_lower(&mut Uuid::encode_buffer()));
                        buf.push('\t');
                        buf.push_str(&job_str);
                        buf.push('\t');
                        buf.push_str(&index.to_string());
                        buf.push_str("\t1\t");
                        copy_field(&mut buf, &text);
                        buf.push('\t');
                        copy_field(&mut buf, &spec.negative_prompt);
                        buf.push('\t');
                        buf.push_str(&(seed as i64).to_string());
                        buf.push('\t');
                        let own_shape;
                        let shape = if p == defaults {
                            &default_shape
                        } else {
                            own_shape = shape_of(&p);
                            &own_shape
                        };
                        copy_field(&mut buf, shape);
                        buf.push('\t');
                        buf.push_str(&p.steps.to_string());
                        buf.push('\t');
                        buf.push_str(&pixels.to_string());
                        buf.push('\n');
                    }
                    Ok(_) => {}
                }
            }
            if errors.is_empty() && !buf.is_empty() {
                if let Some(c) = copy.as_mut() {
                    c.send(buf.as_bytes()).await?;
                }
            } else if !errors.is_empty() {
                if let Some(c) = copy.take() {
                    c.abort("invalid prompts").await.ok();
                }
            }
            if over_limit {
                break;
            }
        }
        match ended {
            // Refused at the limit: the rest of the stream (and its end marker) was not read.
            _ if over_limit => {}
            None => {
                if let Some(c) = copy.take() {
                    c.abort("no end marker").await.ok();
                }
                return Err(Error::Aborted(
                    "the submission ended without its end marker (client went away?); nothing was stored".into(),
                ));
            }
            Some(n) if n != count => {
                if let Some(c) = copy.take() {
                    c.abort("count mismatch").await.ok();
                }
                return Err(Error::InvalidArgument(format!(
                    "the end marker says {n} prompts but {count} arrived; nothing was stored"
                )));
            }
            Some(_) => {}
        }
        if errors.is_empty() && count > 0 && !header.validate_only {
            if let Some(c) = copy.take() {
                c.finish().await?;
            }
        } else if let Some(c) = copy.take() {
            c.abort("not stored").await.ok();
        }
        (count, total_steps, min_pixels, max_pixels, errors, warnings)
    };

    if count == 0 && errors.is_empty() {
        errors.push(PromptIssue {
            index: 0,
            code: "empty".into(),
            message: "the submission has no prompts".into(),
            ..Default::default()
        });
    }
    if !errors.is_empty() || header.validate_only {
        tx.rollback().await?;
        let accepted = if errors.is_empty() { count } else { 0 };
        return Ok(SubmitOutcome {
            response: SubmitJobResponse { job_id: String::new(), accepted, warnings, errors, duplicate: false },
            created: None,
        });
    }
    sqlx::query("update jobs set total = $2, total_steps = $3, max_pixels = $4, min_pixels = $5 where id = $1")
        .bind(job_id)
        .bind(count as i64)
        .bind(total_steps)
        .bind(max_pixels)
        .bind(min_pixels)
        .execute(&mut *tx)
        .await?;
    sqlx::query("select pg_notify('farm_tasks', $1)").bind(&defaults.model).execute(&mut *tx).await?;
    match tx.commit().await {
        Ok(()) => {}
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(crate::error::SQLSTATE_UNIQUE_VIOLATION) => {
            // Not expected: the insert above waits for a concurrent submission with the key and then
            // answers with its job. Kept as a safety net, answered as a race, not as bad input.
            return Err(Error::Aborted("a job with this idempotency key was stored concurrently; submit again to get it".into()));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(SubmitOutcome {
        response: SubmitJobResponse {
            job_id: job_id.to_string(),
            accepted: count,
            warnings,
            errors: vec![],
            duplicate: false,
        },
        created: Some(job_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escaping() {
        let mut s = String::new();
        copy_field(&mut s, "a\tb\nc\\d\re");
        assert_eq!(s, "a\\tb\\nc\\\\d\\re");
    }

    #[test]
    fn task_ids_are_v7_increasing_and_apart_across_submissions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut a = TaskIds::new(&mut rng);
        let mut b = TaskIds::new(&mut rng);
        let ids: Vec<Uuid> = (0..1000).map(|_| a.next()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing within a submission");
        assert!(ids.iter().all(|u| u.get_version_num() == 7 && u.get_variant() == uuid::Variant::RFC4122));
        let millis = ids[0].as_u128() >> 80;
        let now = chrono::Utc::now().timestamp_millis() as u128;
        assert!(now.abs_diff(millis) < 60_000, "timestamp prefix is the current time");
        let other: Vec<Uuid> = (0..1000).map(|_| b.next()).collect();
        assert!(other.iter().all(|u| !ids.contains(u)), "another submission's ids differ");
    }

    #[test]
    fn header_limits() {
        let h = SubmitHeader {
            defaults: Some(RenderParams { steps: 201, ..Default::default() }),
            ..Default::default()
        };
        let e = check_header(&h).unwrap_err().to_string();
        assert!(e.contains("200"), "{e}");
        let h = SubmitHeader { defaults: Some(RenderParams { width: 1000, ..Default::default() }), ..Default::default() };
        assert!(check_header(&h).unwrap_err().to_string().contains("multiples of 16"));
        assert!(check_header(&SubmitHeader::default()).is_ok());
        // An explicit 0 is kept (guidance on no step), and survives the stored shape.
        let h = SubmitHeader {
            defaults: Some(RenderParams { cfg_trunc: Some(0.0), cfg_scale: Some(0.0), ..Default::default() }),
            ..Default::default()
        };
        let d = check_header(&h).unwrap();
        assert_eq!((d.cfg_trunc, d.cfg_scale), (Some(0.0), Some(0.0)));
        let stored = crate::params::params_of(&crate::params::shape_of(&d));
        assert_eq!((stored.cfg_trunc, stored.cfg_scale), (Some(0.0), Some(0.0)));
    }

    #[test]
    fn prompt_checks_name_position_and_limit() {
        let d = limits::with_defaults(&RenderParams::default());
        let l = SubmitLimits::default();
        let mut w = vec![];
        let bad = PromptSpec { text: "<character_1>\n  <n>miku</x>\n</character_1>".into(), ..Default::default() };
        let e = prepare(4, &bad, &d, &l, &mut w).unwrap_err();
        assert_eq!((e.index, e.line), (4, 2), "{e:?}");
        assert!(e.column > 0);
        let big = PromptSpec { text: "a".repeat(l.prompt.max_bytes + 1), ..Default::default() };
        let e = prepare(0, &big, &d, &l, &mut w).unwrap_err();
        assert!(e.message.contains(&l.prompt.max_bytes.to_string()));
        let steps = PromptSpec { text: "1girl".into(), steps: Some(0), ..Default::default() };
        assert_eq!(prepare(0, &steps, &d, &l, &mut w).unwrap_err().code, "limit");
        let ok = PromptSpec { text: "  1girl, solo ".into(), width: Some(512), ..Default::default() };
        let (text, p) = prepare(0, &ok, &d, &l, &mut w).unwrap();
        assert_eq!((text.as_str(), p.width, p.height), ("1girl, solo", 512, 1024));
    }
}
