-- The render metadata a worker sends with a result (seed, steps, precision, worker, render time,
-- batch size, ...: the JSON of the PNG's `farm` chunk without the prompt texts), kept with the
-- attempt that produced it and shown by GetTask. Null for attempts without a result and for attempts from before this column.
-- A short exclusive lock on task_attempts: give up rather than queue commits behind it.
set local lock_timeout = '10s';
alter table task_attempts add column metadata jsonb;
