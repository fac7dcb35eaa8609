-- Each task row is written four times in a few seconds (claimed, its stream id recorded,
-- started, finished), and a bulk submit writes 100 000 at once: every index on tasks costs
-- on each of those writes. Two go:
--
-- * `tasks_placed`: `tasks_leased` has the same predicate (queued or running), so the
--   dispatcher's count of placed tasks reads that index instead.
-- * `tasks_pending`: `tasks_pending_tenant` (0011) serves the dispatch order, and the head
--   of the queue is found with one probe of it per (tenant, priority) class.
DROP INDEX tasks_placed;
DROP INDEX tasks_pending;
