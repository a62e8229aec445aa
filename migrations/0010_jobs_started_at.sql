-- When a worker first took a task of the job since it was submitted or last retried: the start of the
-- window over which a running job's images/s is measured (before it, a job that had just produced its
-- first images looked as if it rendered them all in the last second). Null until then, and for jobs
-- from before this column.
-- A short exclusive lock on jobs: give up rather than queue every claim behind a long submission.
set local lock_timeout = '10s';
alter table jobs add column started_at timestamptz;
