-- Task counts of a finished job, stored when it closes: status and listings of finished jobs read
-- them instead of counting the job's tasks again (a million rows for the largest jobs). A retry,
-- which opens the job again, clears them. Jobs closed before this column existed have null and are
-- counted as before.
-- A short exclusive lock on jobs: give up rather than queue every claim behind a long submission.
set local lock_timeout = '10s';
alter table jobs add column final_counts jsonb;
