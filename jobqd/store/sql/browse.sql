-- What the dashboard reads besides jobqctl's status: the jobs list's keyset pages, the last
-- hour minute by minute, pickup latency, and the queues table as it is.

-- name: browse_id_range
-- The smallest and largest job id (two ends of the primary key: instant at any size).
SELECT (SELECT min(id) FROM {schema}.jobs), (SELECT max(id) FROM {schema}.jobs)

-- name: browse_jobs
-- One slice of the jobs list, newest first: ids in [floor, before) matching every filter
-- given (NULL: any). The caller bounds the slice (store.browse), so a filter that matches
-- few jobs costs one bounded range read per slice, never a walk of the whole table; dead
-- and cancelled jobs come from jobs_ended_browse and need no bound. `text` is looked for in
-- the args and the last error, case-insensitively, as plain text (no pattern characters).
WITH picked AS (
    SELECT id FROM {schema}.jobs
     WHERE id < %(before)s AND id >= %(floor)s
       AND (%(queue)s::text IS NULL OR queue = %(queue)s)
       AND (%(state)s::text IS NULL OR state = %(state)s)
       AND (%(task)s::text IS NULL OR task = %(task)s)
       AND (%(bundle)s::bigint IS NULL OR bundle_id = %(bundle)s)
       AND (%(text)s::text IS NULL
            OR strpos(lower(args::text), lower(%(text)s)) > 0
            OR strpos(lower(coalesce(last_error, '')), lower(%(text)s)) > 0)
     ORDER BY id DESC
     LIMIT %(limit)s
)
SELECT j.id, j.queue, j.task, j.state, j.attempt, j.max_attempts, j.priority, j.run_at,
       j.created_at, j.started_at, j.finished_at, j.last_error, j.bundle_id,
       left(j.args::text, 200) AS args_preview
  FROM picked JOIN {schema}.jobs j USING (id)
 ORDER BY j.id DESC

-- name: browse_last_hour
-- Jobs that ended in each of the last 60 minutes, per queue: succeeded and dead (an index
-- range on jobs_finished).
SELECT queue,
       floor(extract(epoch FROM now() - finished_at) / 60)::int AS minutes_ago,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'dead') AS dead
  FROM {schema}.jobs
 WHERE state IN ('succeeded', 'dead', 'cancelled') AND finished_at > now() - interval '1 hour'
 GROUP BY 1, 2

-- name: browse_pickup
-- Pickup latency per queue: seconds from a job being due (run_at) to its last claim
-- (started_at), over the jobs that ended in the last hour and those running now.
SELECT queue, count(*) AS jobs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY wait) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY wait) AS p95
  FROM (SELECT queue, greatest(0, extract(epoch FROM started_at - run_at))::float8 AS wait
          FROM {schema}.jobs
         WHERE state IN ('succeeded', 'dead', 'cancelled')
           AND finished_at > now() - interval '1 hour' AND started_at IS NOT NULL
        UNION ALL
        SELECT queue, greatest(0, extract(epoch FROM started_at - run_at))::float8
          FROM {schema}.jobs
         WHERE lease_expires_at IS NOT NULL AND state = 'running') w
 GROUP BY queue

-- name: browse_queues
-- Every row of the queues table as JSON, so columns a later migration adds (who paused,
-- until when) show without a change here.
SELECT name, to_jsonb(q) FROM {schema}.queues q ORDER BY name
