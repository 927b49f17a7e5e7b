-- Jobs as the client, jobqctl and the http child see them: enqueue, read, retry, cancel,
-- delete; and priority aging, the one leader duty that moves queued jobs.

-- name: jobs_enqueue
SELECT {schema}.enqueue(
    %(queue)s, %(task)s, %(args)s::jsonb,
    coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second'),
    %(priority)s, %(max_attempts)s, %(dedup_key)s, %(idempotency_key)s, %(bundle_id)s)

-- name: jobs_enqueue_many
SELECT id FROM {schema}.enqueue_many(
    %(queues)s::text[], %(tasks)s::text[], %(args)s::text[]::jsonb[],
    (SELECT array_agg(coalesce(r, now() + d * interval '1 second') ORDER BY i)
       FROM unnest(%(run_ats)s::timestamptz[], %(delays)s::float8[]) WITH ORDINALITY AS t(r, d, i)),
    %(priorities)s::int[], %(max_attempts)s::int[], %(dedup_keys)s::text[],
    %(idempotency_keys)s::text[], %(bundle_id)s)
ORDER BY ord

-- name: jobs_get
-- effective_max_attempts: job_policy's (the job's limit, else its task's: exact name, else the
-- longest `prefix.*` route, else its queue's); NULL leaves the configured default.
SELECT id, queue, task, args, state, attempt, max_attempts, priority, run_at, created_at,
       started_at, finished_at, lease_expires_at, locked_by, last_error, errors, result,
       dedup_key, idempotency_key, bundle_id,
       (SELECT p.max_attempts FROM {schema}.job_policy(j.task, j.queue, j.max_attempts) p)
           AS effective_max_attempts
  FROM {schema}.jobs j WHERE id = %(id)s

-- name: jobs_list
SELECT id, queue, task, args, state, attempt, max_attempts, priority, run_at, created_at,
       started_at, finished_at, lease_expires_at, locked_by, last_error, errors, result,
       dedup_key, idempotency_key, bundle_id,
       (SELECT p.max_attempts FROM {schema}.job_policy(j.task, j.queue, j.max_attempts) p)
           AS effective_max_attempts
  FROM {schema}.jobs j
 WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
   AND (%(state)s::text IS NULL OR state = %(state)s)
   AND (%(before)s::bigint IS NULL OR id < %(before)s)
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: jobs_states
SELECT id, state FROM {schema}.jobs WHERE id = ANY(%(ids)s::bigint[])

-- name: jobs_count_in_state
SELECT count(*) FROM {schema}.jobs WHERE queue = %(queue)s AND state = %(state)s

-- name: jobs_retry
SELECT {schema}.retry(%(id)s)

-- name: jobs_retry_in_queue
SELECT {schema}.retry_queue(%(queue)s, %(state)s)

-- name: jobs_cancel
SELECT {schema}.cancel(%(id)s)

-- name: jobs_cancel_in_queue
-- Bulk form of cancel(): the same columns, for one queue's queued or running jobs.
UPDATE {schema}.jobs SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                         locked_by = NULL
 WHERE queue = %(queue)s AND state = %(state)s AND state IN ('queued', 'running')

-- name: jobs_delete
-- Running jobs are left alone: their worker still holds a lease (cancel them first).
DELETE FROM {schema}.jobs WHERE id = ANY(%(ids)s::bigint[]) AND state <> 'running'
RETURNING id

-- name: jobs_age_priorities
-- Queued jobs of one queue that have waited `after` past their run_at move `step` closer to
-- the front per `every` waited (the first step when `after` is reached), not past `floor`.
-- The target is computed from the priority they were enqueued with, so passes can run at any
-- rate; a job is only ever moved forward.
WITH aged AS (
    SELECT id, greatest(%(floor)s::float8,
                        coalesce(base_priority, priority) - %(step)s::float8 * (1 + floor(
                            (extract(epoch FROM now() - run_at) - %(after)s::float8)
                            / %(every)s::float8)))::integer AS target
      FROM {schema}.jobs
     WHERE queue = %(queue)s AND state = 'queued' AND priority > %(floor)s
       AND run_at <= now() - %(after)s * interval '1 second'
), picked AS (
    SELECT j.id, a.target FROM aged a JOIN {schema}.jobs j ON j.id = a.id
     WHERE a.target < j.priority
     ORDER BY j.run_at
     LIMIT %(batch)s
       FOR UPDATE OF j SKIP LOCKED
)
UPDATE {schema}.jobs j
   SET base_priority = coalesce(j.base_priority, j.priority), priority = p.target
  FROM picked p
 WHERE j.id = p.id AND j.state = 'queued'
RETURNING j.id
