-- Initial schema of the farm coordinator. Migrations are append-only: never edit a released one.

-- A tenant owns jobs and tokens; every query from a client is scoped to one tenant.
create table tenants (
    id          text primary key,
    created_at  timestamptz not null default now()
);

-- Bearer tokens. Only the SHA-256 of the token is stored; the token itself is shown once at creation.
create table api_tokens (
    token_sha256 text primary key,               -- lower-case hex SHA-256 of the full bearer token
    tenant_id    text not null references tenants (id),
    role         text not null check (role in ('client', 'worker', 'admin')),
    label        text not null default '',
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz                      -- set = token refused
);

create table jobs (
    id               uuid primary key,
    tenant_id        text not null references tenants (id),
    name             text not null default '',
    idempotency_key  text,                         -- unique per tenant when set (see constraint)
    priority         integer not null default 0,   -- higher runs first
    state            smallint not null default 1,  -- farm.v1.JobState number, maintained on every transition
    params           jsonb not null,               -- the job's default RenderParams (proto JSON names)
    model            text not null,                -- model the job's tasks need (workers must have it loaded)
    max_pixels       bigint not null,              -- largest width*height of any task: workers below it are skipped
    max_attempts     integer not null,             -- render failures allowed per task before it fails
    total            bigint not null,              -- number of tasks
    total_steps      bigint not null,              -- sum of denoising steps of all tasks (progress weighting)
    last_claimed_at  timestamptz,                  -- fair share: the least recently served job of equal priority goes next
    cancelled_at     timestamptz,
    finished_at      timestamptz,                  -- set when no task is queued or running any more
    created_at       timestamptz not null default now(),
    constraint jobs_tenant_idempotency_key unique (tenant_id, idempotency_key)
);
create index jobs_tenant_created on jobs (tenant_id, created_at desc, id desc);
-- Dispatch scans only unfinished jobs.
create index jobs_open on jobs (model, priority desc, last_claimed_at nulls first) where finished_at is null;

-- Fencing tokens for leases: only ever grow, across every coordinator replica.
create sequence lease_tokens;

-- One task = one prompt = one image. `state` uses the numbers of farm.v1.TaskState:
-- 1 queued, 2 running, 3 succeeded, 4 failed, 5 cancelled.
create table tasks (
    id               uuid primary key,
    job_id           uuid not null references jobs (id) on delete cascade,
    idx              bigint not null,              -- 0-based position in the submission
    state            smallint not null default 1,
    prompt           text not null,                -- exactly what the text encoders receive
    negative_prompt  text not null default '',
    seed             bigint not null,              -- u64 stored bit-for-bit in a signed column
    shape            text not null,                -- complete RenderParams as canonical JSON (sorted keys): equal
                                                   -- shape = may share one GPU batch; parsed back when assigned
    steps            integer not null,
    pixels           bigint not null,              -- width*height
    failures         integer not null default 0,   -- render failures charged (lost workers are not charged)
    not_before       timestamptz,                  -- exponential backoff: not dispatched before this time
    lease_owner      uuid,                         -- worker session holding the lease while running
    lease_token      bigint,                       -- current fencing token; stale tokens are refused
    lease_expires_at timestamptz,                  -- renewed by heartbeats; expired leases are requeued
    current_step     integer not null default 0,
    last_error       text,
    result_key       text,                         -- object-store key of the committed result
    result_size      bigint,
    result_sha256    text,
    result_worker    text,
    result_at        timestamptz,
    finished_at      timestamptz,
    constraint tasks_job_idx unique (job_id, idx)
);
-- Dispatch: queued tasks of a job in index order.
create index tasks_queued on tasks (job_id, idx) where state = 1;
-- Status counts by state.
create index tasks_job_state on tasks (job_id, state);
-- Lease sweeps and requeue on disconnect.
create index tasks_running_lease on tasks (lease_expires_at) where state = 2;
create index tasks_lease_owner on tasks (lease_owner) where state = 2;
-- Incremental result listing.
create index tasks_results on tasks (job_id, result_at) where state = 3;

-- Every time a task was handed to a worker.
create table task_attempts (
    id           bigserial primary key,
    task_id      uuid not null references tasks (id) on delete cascade,
    attempt      integer not null,                -- failures charged before this attempt + 1
    worker_id    uuid not null,
    worker_name  text not null,
    lease_token  bigint not null,
    started_at   timestamptz not null default now(),
    ended_at     timestamptz,
    outcome      text not null default 'running', -- running, succeeded, failed, lost, cancelled, released, expired
    error        text
);
create index task_attempts_task on task_attempts (task_id, id);
create index task_attempts_open on task_attempts (lease_token) where ended_at is null;

-- One row per worker session (a connection of a worker process).
create table workers (
    id               uuid primary key,
    tenant_id        text not null references tenants (id),
    name             text not null,
    capabilities     jsonb not null,              -- WorkerCapabilities from the hello (proto JSON names)
    model            text not null,
    max_pixels       bigint not null,
    max_batch        integer not null,
    coordinator      text not null,               -- replica the session is connected to
    connected_at     timestamptz not null default now(),
    last_heartbeat   timestamptz not null default now(),
    disconnected_at  timestamptz,
    completed        bigint not null default 0,
    failed           bigint not null default 0
);
create index workers_connected on workers (disconnected_at, last_heartbeat);

-- Render failures per (job, worker name): a worker that failed a job repeatedly stops getting it.
create table job_worker_failures (
    job_id       uuid not null references jobs (id) on delete cascade,
    worker_name  text not null,
    failures     integer not null,
    primary key (job_id, worker_name)
);

-- Completion times, for images/s over the last minute (per job and per worker).
create index tasks_finished_recent on tasks (job_id, finished_at) where state = 3;
