-- Precision matching. jobs.precision is the precision a job asked for (the PRECISION_* numbers of
-- farm.v1.Precision; 0 = any worker's), workers.precision the one a worker renders in. Claims give
-- a job that asked for one only to workers of that precision. Rows stored before these columns
-- existed get 0: such jobs match every worker, as before.
-- Adding a column with a constant default changes only the catalogue, but needs a short exclusive
-- lock on each table: give up rather than queue every claim behind a long-running submission.
set local lock_timeout = '10s';
alter table jobs add column precision smallint not null default 0;
alter table workers add column precision smallint not null default 0;
