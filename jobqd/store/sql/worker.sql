-- Statements of the worker process: the hot path (claim, heartbeat, finish) and its
-- registration. Every write about a job is fenced on (id, lease_token, state = 'running'):
-- a worker that lost its lease can never overwrite the next attempt.

-- name: claim
-- Take up to `limit` due jobs of one queue, in claim order, unless the queue is paused.
WITH picked AS (
    SELECT id FROM {schema}.jobs
     WHERE queue = %(queue)s AND state = 'queued' AND run_at <= now()
       AND NOT EXISTS (SELECT 1 FROM {schema}.queues q WHERE q.name = %(queue)s AND q.paused)
     ORDER BY priority, run_at, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs j
   SET state = 'running', attempt = j.attempt + 1, started_at = now(),
       lease_expires_at = now() + %(lease)s * interval '1 second',
       lease_token = nextval('{schema}.lease_tokens'), locked_by = %(process_id)s
  FROM picked
 WHERE j.id = picked.id
RETURNING j.id, j.task, j.args::text, j.attempt, j.max_attempts, j.lease_token,
          extract(epoch FROM j.created_at)::float8, extract(epoch FROM j.started_at)::float8

-- name: heartbeat
-- Renew every lease this process holds and its own liveness in one statement; the ids that
-- do not come back were lost (reaped or cancelled) and must not be written about any more.
WITH alive AS (
    UPDATE {schema}.processes SET heartbeat_at = now(), metadata = %(metadata)s::jsonb
     WHERE id = %(process_id)s
    RETURNING id
)
UPDATE {schema}.jobs j
   SET lease_expires_at = now() + %(lease)s * interval '1 second'
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS held(id, token)
 WHERE j.id = held.id AND j.lease_token = held.token AND j.state = 'running'
RETURNING j.id, (SELECT count(*) FROM alive)

-- name: heartbeat_idle
UPDATE {schema}.processes SET heartbeat_at = now(), metadata = %(metadata)s::jsonb
 WHERE id = %(process_id)s
RETURNING id

-- name: finish_succeeded
-- The common case of `finish`, kept lean: successes without a result value.
UPDATE {schema}.jobs j
   SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL, lease_token = NULL,
       locked_by = NULL
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS o(id, token)
 WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'
RETURNING j.id

-- name: finish
-- Write a batch of outcomes. `delays` is seconds from now for re-queued jobs; a snoozed
-- attempt is given back; errors are appended to the capped history.
UPDATE {schema}.jobs j
   SET state = o.state,
       run_at = CASE WHEN o.state = 'queued'
                     THEN now() + o.delay * interval '1 second' ELSE j.run_at END,
       finished_at = CASE WHEN o.state = 'queued' THEN NULL ELSE now() END,
       attempt = j.attempt - o.snooze::int,
       result = o.result,
       last_error = coalesce(o.error->>'message', j.last_error),
       errors = CASE WHEN o.error IS NULL THEN j.errors
                     ELSE (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]')
                             FROM jsonb_array_elements(j.errors || jsonb_build_array(o.error))
                                  WITH ORDINALITY AS h(e, n)
                            WHERE n > jsonb_array_length(j.errors) + 1
                                      - (SELECT error_history FROM {schema}.settings))
                END,
       lease_expires_at = NULL, lease_token = NULL, locked_by = NULL
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(states)s::text[],
              %(delays)s::float8[], %(results)s::text[]::jsonb[], %(errors)s::text[]::jsonb[],
              %(snoozes)s::boolean[])
       AS o(id, token, state, delay, result, error, snooze)
 WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'
RETURNING j.id

-- name: release
-- Give unfinished jobs back at once (drain deadline, fast stop): the attempt is not spent,
-- except for at-most-once jobs, which must never run twice and end dead instead.
UPDATE {schema}.jobs j
   SET state = CASE WHEN o.at_most_once THEN 'dead' ELSE 'queued' END,
       attempt = CASE WHEN o.at_most_once THEN j.attempt ELSE j.attempt - 1 END,
       finished_at = CASE WHEN o.at_most_once THEN now() END,
       last_error = CASE WHEN o.at_most_once
                         THEN 'interrupted by worker shutdown (at-most-once: not re-run)'
                         ELSE j.last_error END,
       run_at = now(), lease_expires_at = NULL, lease_token = NULL, locked_by = NULL
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(at_most_once)s::boolean[])
       AS o(id, token, at_most_once)
 WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'
RETURNING j.id

-- name: register_process
INSERT INTO {schema}.processes (host, pid, role, queue, metadata)
VALUES (%(host)s, %(pid)s, %(role)s, %(queue)s, %(metadata)s::jsonb)
RETURNING id

-- name: deregister_process
DELETE FROM {schema}.processes WHERE id = %(process_id)s

-- name: sync_queue
-- A daemon states its queue's cluster-wide defaults, which database-side duties read.
INSERT INTO {schema}.queues (name, max_attempts, delivery, updated_at)
VALUES (%(queue)s, %(max_attempts)s, %(delivery)s, now())
ON CONFLICT (name) DO UPDATE
   SET max_attempts = excluded.max_attempts, delivery = excluded.delivery, updated_at = now()
 WHERE (queues.max_attempts, queues.delivery)
       IS DISTINCT FROM (excluded.max_attempts, excluded.delivery)

-- name: sync_events
-- Only a change calls set_events, which briefly locks the jobs table to switch its trigger.
SELECT {schema}.set_events(name, %(enabled)s) FROM {schema}.queues
 WHERE name = %(queue)s AND events IS DISTINCT FROM %(enabled)s

-- name: sync_task
INSERT INTO {schema}.tasks (name, max_attempts, delivery, updated_at)
VALUES (%(name)s, %(max_attempts)s, %(delivery)s, now())
ON CONFLICT (name) DO UPDATE
   SET max_attempts = excluded.max_attempts, delivery = excluded.delivery, updated_at = now()
 WHERE (tasks.max_attempts, tasks.delivery)
       IS DISTINCT FROM (excluded.max_attempts, excluded.delivery)
