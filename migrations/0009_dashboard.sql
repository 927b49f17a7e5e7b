-- The dashboard's jobs list, filtered by dead or cancelled (the states operators browse most):
-- newest first by id, so a keyset page is an index range read, however many jobs the table
-- holds. The queue is included so a queue filter is checked in the index too. Only jobs
-- ending dead or cancelled enter it, so the worker's claim and success never write to it.
CREATE INDEX jobs_ended_browse ON jobs (state, id) INCLUDE (queue)
    WHERE state IN ('dead', 'cancelled');
