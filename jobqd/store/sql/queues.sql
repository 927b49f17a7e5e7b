-- Queues and tasks as the cluster knows them: pause, events, the definitions daemons
-- publish, and the per-queue counts that status and /metrics show.

-- name: queues_pause
-- `duration` in seconds (NULL: until resumed); `paused_by` is free text saying who.
SELECT {schema}.pause(%(queue)s, %(duration)s * interval '1 second', %(paused_by)s)

-- name: queues_paused_until
SELECT paused_until FROM {schema}.queues WHERE name = %(queue)s

-- name: queues_paused
SELECT paused AND (paused_until IS NULL OR paused_until > now()), paused_until, paused_by
  FROM {schema}.queues WHERE name = %(queue)s

-- name: queues_resume
SELECT {schema}.resume(%(queue)s)

-- name: queues_channel
SELECT {schema}.queue_channel(%(queue)s)

-- name: queues_sync
-- A daemon states its queue's cluster-wide defaults, which database-side duties and the SQL
-- protocol's fail() read (the backoff as jobqd.backoff.Backoff's fields, in JSON).
INSERT INTO {schema}.queues (name, max_attempts, delivery, backoff, updated_at)
VALUES (%(queue)s, %(max_attempts)s, %(delivery)s, %(backoff)s::jsonb, now())
ON CONFLICT (name) DO UPDATE
   SET max_attempts = excluded.max_attempts, delivery = excluded.delivery,
       backoff = excluded.backoff, updated_at = now()
 WHERE (queues.max_attempts, queues.delivery, queues.backoff)
       IS DISTINCT FROM (excluded.max_attempts, excluded.delivery, excluded.backoff)

-- name: queues_sync_events
-- Only a change calls set_events, which briefly locks the jobs table to switch its trigger.
SELECT {schema}.set_events(name, %(enabled)s) FROM {schema}.queues
 WHERE name = %(queue)s AND events IS DISTINCT FROM %(enabled)s

-- name: queues_set_events
SELECT {schema}.set_events(%(queue)s, %(enabled)s)

-- name: queues_with_events
SELECT name FROM {schema}.queues WHERE events ORDER BY name

-- name: queues_status
-- One row per queue that has a row in queues, waiting jobs, dead or cancelled jobs, or jobs
-- that ended in the last hour. The waiting jobs are split without overlap: `queued` can run
-- now, `scheduled` waits for its first run_at, `retrying` waits out a retry backoff.
-- A timed pause whose time is up is not paused (the claim compares paused_until with now()).
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
       coalesce(q.paused AND (q.paused_until IS NULL OR q.paused_until > now()), false)
           AS paused,
       CASE WHEN q.paused AND (q.paused_until IS NULL OR q.paused_until > now())
            THEN q.paused_at END AS paused_at,
       CASE WHEN q.paused AND q.paused_until > now() THEN q.paused_until END AS paused_until,
       CASE WHEN q.paused AND (q.paused_until IS NULL OR q.paused_until > now())
            THEN q.paused_by END AS paused_by,
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

-- name: queues_gauges
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

-- name: tasks_sync
-- A worker publishes a task's queue (where enqueue(queue => NULL) sends its jobs), its retry
-- and delivery settings, and its backoff when it is a Backoff (a function stays Python's).
INSERT INTO {schema}.tasks (name, queue, max_attempts, delivery, backoff, updated_at)
VALUES (%(name)s, %(queue)s, %(max_attempts)s, %(delivery)s, %(backoff)s::jsonb, now())
ON CONFLICT (name) DO UPDATE
   SET queue = excluded.queue, max_attempts = excluded.max_attempts,
       delivery = excluded.delivery, backoff = excluded.backoff, updated_at = now()
 WHERE (tasks.queue, tasks.max_attempts, tasks.delivery, tasks.backoff)
       IS DISTINCT FROM (excluded.queue, excluded.max_attempts, excluded.delivery,
                         excluded.backoff)

-- name: queues_known
-- A queue the cluster knows: one a daemon serves, paused or set, or one that has jobs.
SELECT EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(queue)s)
    OR EXISTS (SELECT 1 FROM {schema}.jobs WHERE queue = %(queue)s)
    OR EXISTS (SELECT 1 FROM {schema}.tasks WHERE queue = %(queue)s)

-- name: queues_due
-- Of the queues that HTTP claims wait on, those with a due job and no pause: the http child's
-- wake-up for jobs that become due without a NOTIFY (delays, retries, snoozes). A hint only;
-- the claim itself decides.
SELECT q FROM unnest(%(queues)s::text[]) AS q
 WHERE EXISTS (SELECT 1 FROM {schema}.jobs j
                WHERE j.queue = q AND j.state = 'queued' AND j.run_at <= now())
   AND NOT EXISTS (SELECT 1 FROM {schema}.queues p
                    WHERE p.name = q AND p.paused
                      AND (p.paused_until IS NULL OR p.paused_until > now()))
