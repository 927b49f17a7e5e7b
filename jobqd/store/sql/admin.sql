-- Statements of jobqctl and the http child: status, process lists, bulk operations, events.

-- name: queue_status
-- One row per queue that has a row in queues, waiting jobs, dead or cancelled jobs, or jobs
-- that ended in the last hour. The waiting jobs are split without overlap: `queued` can run
-- now, `scheduled` waits for its first run_at, `retrying` waits out a retry backoff.
-- `per_minute` counts jobs that ended succeeded or dead in the last 5 minutes. Every count is
-- an index range (succeeded jobs only those of the last hour), so the cost follows the work
-- waiting and the last hour's traffic, not how many finished jobs retention keeps.
WITH RECURSIVE ended_badly(queue) AS (
    (SELECT queue FROM {schema}.jobs WHERE state IN ('dead', 'cancelled') ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {schema}.jobs j
             WHERE j.state IN ('dead', 'cancelled') AND j.queue > e.queue
             ORDER BY j.queue LIMIT 1)
      FROM ended_badly e
     WHERE e.queue IS NOT NULL
), recent AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'succeeded') AS succeeded_1h,
           count(*) FILTER (WHERE state IN ('succeeded', 'dead')
                              AND finished_at > now() - interval '5 minutes') / 5.0
               AS per_minute
      FROM {schema}.jobs
     WHERE state IN ('succeeded', 'dead', 'cancelled') AND finished_at > now() - interval '1 hour'
     GROUP BY queue
), names AS (
    SELECT {schema}.waiting_queues() AS queue
    UNION SELECT queue FROM ended_badly WHERE queue IS NOT NULL
    UNION SELECT queue FROM recent
    UNION SELECT name FROM {schema}.queues
)
SELECT n.queue,
       coalesce(q.paused, false) AS paused,
       coalesce(q.events, false) AS events,
       w.queued,
       w.scheduled,
       w.retrying,
       (SELECT count(*) FROM {schema}.jobs
         WHERE queue = n.queue AND state = 'running' AND lease_expires_at IS NOT NULL)
           AS running,
       (SELECT count(*) FROM {schema}.jobs WHERE queue = n.queue AND state = 'dead') AS dead,
       (SELECT count(*) FROM {schema}.jobs WHERE queue = n.queue AND state = 'cancelled')
           AS cancelled,
       coalesce(r.succeeded_1h, 0) AS succeeded_1h,
       coalesce(r.per_minute, 0)::float8 AS per_minute,
       w.oldest_age
  FROM names n
  LEFT JOIN {schema}.queues q ON q.name = n.queue
  LEFT JOIN recent r ON r.queue = n.queue
 CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE run_at <= now()) AS queued,
               count(*) FILTER (WHERE run_at > now() AND attempt = 0) AS scheduled,
               count(*) FILTER (WHERE run_at > now() AND attempt > 0) AS retrying,
               extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8
                   AS oldest_age
          FROM {schema}.jobs
         WHERE queue = n.queue AND state = 'queued'
       ) w
 ORDER BY 1

-- name: processes
-- The registered processes, with their heartbeat age in database time.
SELECT id, host, pid, role, queue, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age, metadata
  FROM {schema}.processes
 ORDER BY host, role, queue NULLS FIRST, pid

-- name: queue_gauges
-- The /metrics gauges in one statement: for every queue with a row in `queues` (served,
-- paused or set) or with waiting jobs, its queued, running and dead jobs and how long its
-- oldest due job has waited; each an index range scan. Finished states other than dead are
-- not counted (that would read most of the table on every scrape).
SELECT n.queue,
       (SELECT count(*) FROM {schema}.jobs WHERE queue = n.queue AND state = 'queued'),
       (SELECT count(*) FROM {schema}.jobs
         WHERE queue = n.queue AND state = 'running' AND lease_expires_at IS NOT NULL),
       (SELECT count(*) FROM {schema}.jobs WHERE queue = n.queue AND state = 'dead'),
       (SELECT extract(epoch FROM now() - min(run_at)) FROM {schema}.jobs
         WHERE queue = n.queue AND state = 'queued' AND run_at <= now())
  FROM (SELECT {schema}.waiting_queues() AS queue
        UNION
        SELECT name FROM {schema}.queues) n

-- name: count_in_state
SELECT count(*) FROM {schema}.jobs WHERE queue = %(queue)s AND state = %(state)s

-- name: cancel_queue
-- Bulk form of cancel(): the same columns, for one queue's queued or running jobs.
UPDATE {schema}.jobs SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                         locked_by = NULL
 WHERE queue = %(queue)s AND state = %(state)s AND state IN ('queued', 'running')

-- name: delete_jobs
-- Running jobs are left alone: their worker still holds a lease (cancel them first).
DELETE FROM {schema}.jobs WHERE id = ANY(%(ids)s::bigint[]) AND state <> 'running'
RETURNING id

-- name: job_states
SELECT id, state FROM {schema}.jobs WHERE id = ANY(%(ids)s::bigint[])

-- name: set_events
SELECT {schema}.set_events(%(queue)s, %(enabled)s)

-- name: events_queues
SELECT name FROM {schema}.queues WHERE events ORDER BY name

-- name: database_now
SELECT now()

-- name: advisory_lock_holder
-- The backend holding a session advisory lock on a bigint key (split as Postgres stores it).
SELECT pid FROM pg_locks
 WHERE locktype = 'advisory' AND granted AND objsubid = 1
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
 LIMIT 1
