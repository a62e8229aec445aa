-- Smallest width*height of any task of the job. Claims skip jobs none of whose tasks fits the
-- worker's pixel limit, instead of walking all their queued tasks to find none. Jobs stored before
-- this column existed get 0 (always walked, as before).
alter table jobs add column min_pixels bigint not null default 0;
