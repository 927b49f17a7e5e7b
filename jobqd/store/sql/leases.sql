-- Leases: the hot path. Claim, renew, finish and release are fenced on
-- (id, lease_token, state = 'running'): a worker that lost its lease can never overwrite
-- the next attempt. Expiring and releasing are the leader's (and a replacement worker's) way of
-- taking back jobs whose worker is gone.

-- name: leases_claim
-- Take up to `limit` due jobs of one queue, in claim order, unless the queue is paused: the
-- claim external workers make too (migration 0006), so the two cannot drift.
SELECT id, task, args::text, attempt, max_attempts, lease_token,
       extract(epoch FROM created_at)::float8, extract(epoch FROM started_at)::float8,
       extract(epoch FROM run_at)::float8
  FROM {schema}.claim_batch(%(queue)s, %(limit)s, %(lease)s * interval '1 second',
                            %(process_id)s)

-- name: leases_renew
-- Renew every lease this process holds and its own liveness in one statement; the ids that
-- do not come back were lost (reaped or cancelled) and must not be written about any more.
WITH alive AS (
    UPDATE {schema}.processes SET heartbeat_at = now(), metadata = %(metadata)s::jsonb
     WHERE id = %(process_id)s
    RETURNING id
)
SELECT r.id, (SELECT count(*) FROM alive)
  FROM {schema}.renew_batch(%(ids)s::bigint[], %(tokens)s::bigint[],
                            %(lease)s * interval '1 second') r

-- name: leases_complete_succeeded
-- The common case of `finish`, kept lean: successes without a result value.
SELECT id FROM {schema}.succeed_batch(%(ids)s::bigint[], %(tokens)s::bigint[])

-- name: leases_complete
-- Write a batch of outcomes. `delays` is seconds from now for re-queued jobs; a snoozed
-- attempt is not counted; errors are appended to the capped history.
SELECT id FROM {schema}.finish_batch(%(ids)s::bigint[], %(tokens)s::bigint[], %(states)s::text[],
                                     %(delays)s::float8[], %(results)s::text[]::jsonb[],
                                     %(errors)s::text[]::jsonb[], %(snoozes)s::boolean[])

-- name: leases_release
-- Give unfinished jobs back at once (drain deadline, fast stop): the attempt is not spent,
-- except for at-most-once jobs (job_policy: task, else route, else queue), which must never
-- run twice and end dead instead.
WITH decided AS (
    SELECT j.id, o.token, p.at_most_once
      FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS o(id, token)
      JOIN {schema}.jobs j ON j.id = o.id
     CROSS JOIN LATERAL {schema}.job_policy(j.task, j.queue) p
)
UPDATE {schema}.jobs j
   SET state = CASE WHEN d.at_most_once THEN 'dead' ELSE 'queued' END,
       attempt = CASE WHEN d.at_most_once THEN j.attempt ELSE j.attempt - 1 END,
       finished_at = CASE WHEN d.at_most_once THEN now() END,
       last_error = CASE WHEN d.at_most_once
                         THEN 'interrupted by worker shutdown (at-most-once: not re-run)'
                         ELSE j.last_error END,
       run_at = now(), lease_expires_at = NULL, lease_token = NULL, locked_by = NULL,
       unhandled_since = NULL
  FROM decided d
 WHERE j.id = d.id AND j.lease_token = d.token AND j.state = 'running'
RETURNING j.id

-- name: leases_expire_dead
-- The leases of silent processes end now rather than at their expiry; reap_expired then
-- treats those jobs like any other expired lease (first, as -infinity sorts first).
UPDATE {schema}.jobs SET lease_expires_at = '-infinity'
 WHERE state = 'running' AND lease_expires_at IS NOT NULL
   AND locked_by = ANY(%(process_ids)s::bigint[])

-- name: leases_release_expired
-- Running jobs whose lease expired (their worker died or froze) go back to queued after a
-- short backoff, or to dead when out of attempts or delivered at most once (job_policy: 20
-- attempts when neither job, task, route nor queue sets a limit). The error names
-- the process that lost the job, and `reason` (NULL: unknown) how that process died.
WITH expired AS (
    SELECT id FROM {schema}.jobs
     WHERE state = 'running' AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT j.id,
           pol.at_most_once,
           j.attempt >= coalesce(pol.max_attempts, 20) AS exhausted,
           jsonb_build_object(
               'attempt', j.attempt,
               'kind', CASE WHEN %(reason)s::text IS NULL THEN 'LeaseExpired'
                            ELSE 'WorkerExited' END,
               'message', CASE
                   WHEN %(reason)s::text IS NULL AND p.role = 'external'
                   THEN format('lease expired: external worker %%L stopped renewing it', p.host)
                   WHEN %(reason)s::text IS NULL
                   THEN format('lease expired: worker process %%s (%%s pid %%s) stopped renewing it',
                               j.locked_by, coalesce(p.host, 'unknown host'),
                               coalesce(p.pid::text, '?'))
                   ELSE format('worker process exited: %%s (process %%s, %%s pid %%s)',
                               %(reason)s::text, j.locked_by, coalesce(p.host, 'unknown host'),
                               coalesce(p.pid::text, '?'))
               END,
               'traceback', NULL) AS error
      FROM expired e
      JOIN {schema}.jobs j ON j.id = e.id
     CROSS JOIN LATERAL {schema}.job_policy(j.task, j.queue, j.max_attempts) pol
      LEFT JOIN {schema}.processes p ON p.id = j.locked_by
)
UPDATE {schema}.jobs j
   SET state = CASE WHEN d.at_most_once OR d.exhausted THEN 'dead' ELSE 'queued' END,
       run_at = now() + least(power(2, greatest(j.attempt - 1, 0)), 300) * interval '1 second',
       finished_at = CASE WHEN d.at_most_once OR d.exhausted THEN now() END,
       last_error = d.error->>'message',
       errors = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]')
                   FROM jsonb_array_elements(j.errors || jsonb_build_array(d.error))
                        WITH ORDINALITY AS h(e, n)
                  WHERE n > jsonb_array_length(j.errors) + 1
                            - (SELECT error_history FROM {schema}.settings)),
       lease_expires_at = NULL, lease_token = NULL, locked_by = NULL, unhandled_since = NULL
  FROM decided d
 WHERE j.id = d.id
RETURNING j.id, j.queue, j.task, j.state, j.attempt

-- name: leases_release_unknown
-- Jobs whose task this worker does not know go back to queued without spending an attempt,
-- for a node that knows the task (a rolling deploy reaches some nodes first). They come due
-- again after as long as they have been unhandled, 1 s at least and 60 s at most, so no node
-- spins on them; the leader ends them dead after `unknown_task_window` (leases_end_unhandled).
UPDATE {schema}.jobs j
   SET state = 'queued', attempt = j.attempt - 1,
       unhandled_since = coalesce(j.unhandled_since, now()),
       run_at = now() + least(greatest(extract(epoch FROM now()
                                                        - coalesce(j.unhandled_since, now())),
                                       1), 60) * interval '1 second',
       last_error = o.message,
       lease_expires_at = NULL, lease_token = NULL, locked_by = NULL
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(messages)s::text[])
       AS o(id, token, message)
 WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'
RETURNING j.id

-- name: leases_end_unhandled
-- Queued jobs that no worker could run for `window` seconds end dead, with an error saying so.
WITH ended AS (
    SELECT id FROM {schema}.jobs
     WHERE unhandled_since <= now() - %(window)s * interval '1 second' AND state = 'queued'
     ORDER BY unhandled_since
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT j.id, j.unhandled_since AS since,
           jsonb_build_object(
               'attempt', j.attempt,
               'kind', 'UnknownTask',
               'message', format('unknown task %%L: no worker knew it for %%s (since %%s, '
                                 'unknown_task_window); deploy a worker whose imports register '
                                 'it, then jobqctl retry this job',
                                 j.task, justify_interval(date_trunc('second', now()
                                                                    - j.unhandled_since)),
                                 j.unhandled_since),
               'unhandled_since', j.unhandled_since,
               'traceback', NULL) AS error
      FROM ended e JOIN {schema}.jobs j ON j.id = e.id
)
UPDATE {schema}.jobs j
   SET state = 'dead', finished_at = now(), unhandled_since = NULL,
       last_error = d.error->>'message',
       errors = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]')
                   FROM jsonb_array_elements(j.errors || jsonb_build_array(d.error))
                        WITH ORDINALITY AS h(e, n)
                  WHERE n > jsonb_array_length(j.errors) + 1
                            - (SELECT error_history FROM {schema}.settings))
  FROM decided d
 WHERE j.id = d.id
RETURNING j.id, j.queue, j.task, j.attempt, extract(epoch FROM now() - d.since)::float8

-- name: leases_unhandled
-- jobqctl status: queued jobs that a worker released because it knew no such task, by queue
-- and task, with how long the oldest has waited so and when the first ends dead.
SELECT queue, task, count(*) AS jobs,
       extract(epoch FROM now() - min(unhandled_since))::float8 AS unhandled_for,
       greatest(0, extract(epoch FROM min(unhandled_since) + %(window)s * interval '1 second'
                                      - now()))::float8 AS dead_in
  FROM {schema}.jobs
 WHERE unhandled_since IS NOT NULL AND state = 'queued'
 GROUP BY queue, task
 ORDER BY queue, task
