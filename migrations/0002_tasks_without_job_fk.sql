-- Faster bulk submission: the foreign key from tasks to jobs ran one lookup of the job row per copied
-- task (a third of the COPY time of a 100,000-prompt job). Integrity holds without it: the only
-- writer of tasks (`submit.rs`) inserts the job row first in the same transaction, and jobs are never
-- deleted while their tasks exist (a retention job must delete a job's tasks, attempts and failures
-- first). Dropping it needs a short exclusive lock on tasks: give up rather than queue every claim
-- behind a long-running submission.
set local lock_timeout = '10s';
alter table tasks drop constraint tasks_job_id_fkey;
