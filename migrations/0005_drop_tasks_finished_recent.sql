-- no-transaction
-- Same key and predicate as tasks_results (a succeeded task's result_at is its finished_at, and the
-- images/s query reads result_at): one index fewer to maintain per commit.
drop index concurrently if exists tasks_finished_recent;
