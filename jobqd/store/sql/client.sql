-- Statements of the client library and jobqctl: enqueue, inspect, and operate on jobs.

-- name: enqueue
SELECT {schema}.enqueue(
    %(queue)s, %(task)s, %(args)s::jsonb,
    coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second'),
    %(priority)s, %(max_attempts)s, %(dedup_key)s, %(idempotency_key)s, %(bundle_id)s)

-- name: enqueue_many
SELECT id FROM {schema}.enqueue_many(
    %(queues)s::text[], %(tasks)s::text[], %(args)s::text[]::jsonb[],
    (SELECT array_agg(coalesce(r, now() + d * interval '1 second') ORDER BY i)
       FROM unnest(%(run_ats)s::timestamptz[], %(delays)s::float8[]) WITH ORDINALITY AS t(r, d, i)),
    %(priorities)s::int[], %(max_attempts)s::int[], %(dedup_keys)s::text[])
ORDER BY ord

-- name: create_bundle
SELECT {schema}.create_bundle(
    %(total)s, %(name)s, %(callback_task)s, %(callback_queue)s, %(callback_args)s::jsonb)

-- name: get_bundle
SELECT id, name, total, succeeded, dead, cancelled, callback_task, callback_queue,
       callback_job_id, created_at, finished_at
  FROM {schema}.bundles WHERE id = %(id)s

-- name: get_job
SELECT id, queue, task, args, state, attempt, max_attempts, priority, run_at, created_at,
       started_at, finished_at, lease_expires_at, locked_by, last_error, errors, result,
       dedup_key, idempotency_key, bundle_id
  FROM {schema}.jobs WHERE id = %(id)s

-- name: list_jobs
SELECT id, queue, task, args, state, attempt, max_attempts, priority, run_at, created_at,
       started_at, finished_at, lease_expires_at, locked_by, last_error, errors, result,
       dedup_key, idempotency_key, bundle_id
  FROM {schema}.jobs
 WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
   AND (%(state)s::text IS NULL OR state = %(state)s)
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: retry_job
SELECT {schema}.retry(%(id)s)

-- name: retry_queue
SELECT {schema}.retry_queue(%(queue)s, %(state)s)

-- name: cancel_job
SELECT {schema}.cancel(%(id)s)

-- name: pause_queue
SELECT {schema}.pause(%(queue)s)

-- name: resume_queue
SELECT {schema}.resume(%(queue)s)

-- name: queue_channel
SELECT {schema}.queue_channel(%(queue)s)
