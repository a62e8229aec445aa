-- no-transaction
-- (job_id, state) let the planner, with the row estimates of a freshly copied job, find a job's first
-- queued task by reading every queued task and sorting them (a second per claim on a 100,000-task
-- job) instead of walking tasks_queued in index order. Its queries now use the partial indexes
-- (tasks_queued for state 1, tasks_running_job for state 2, tasks_results for state 3) and
-- tasks_job_idx for a job's counts by state.
drop index concurrently if exists tasks_job_state;
