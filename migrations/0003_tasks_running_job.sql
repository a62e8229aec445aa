-- no-transaction
-- Running tasks of a job (finish checks), replacing what tasks_job_state (dropped by 0004) served for
-- state 2. Built concurrently: claims and commits go on while it is built.
create index concurrently if not exists tasks_running_job on tasks (job_id) where state = 2;
