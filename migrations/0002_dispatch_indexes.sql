-- Faster bulk submission and stable dispatch plans on large jobs.

-- The foreign key from tasks to jobs ran one lookup of the job row per inserted task (a third of the
-- COPY time of a 100,000-prompt job). Integrity holds without it: the only writer of tasks
-- (`submit.rs`) inserts the job row first in the same transaction, and jobs are never deleted while
-- their tasks exist (a retention job must delete a job's tasks, attempts and failures first).
alter table tasks drop constraint tasks_job_id_fkey;

-- (job_id, state) let the planner, with the row estimates of a freshly copied job, find a job's first
-- queued task by reading every queued task and sorting them (a second per claim on a 100,000-task
-- job) instead of walking tasks_queued in index order. The queries that used it now use the
-- partial indexes: tasks_queued (state 1), tasks_running_job (state 2), tasks_results (state 3), and
-- tasks_job_idx for a job's counts by state.
drop index tasks_job_state;
create index tasks_running_job on tasks (job_id) where state = 2;

-- Same key and predicate as tasks_results (a succeeded task's result_at is its finished_at): one
-- index fewer to maintain per commit.
drop index tasks_finished_recent;
