-- Bundles: groups of jobs whose last end enqueues a callback.

-- name: bundles_create
SELECT {schema}.create_bundle(
    %(total)s, %(name)s, %(callback_task)s, %(callback_queue)s, %(callback_args)s::jsonb)

-- name: bundles_get
SELECT id, name, total, succeeded, dead, cancelled, callback_task, callback_queue,
       callback_job_id, created_at, finished_at
  FROM {schema}.bundles WHERE id = %(id)s

-- name: bundles_list
SELECT id, name, total, succeeded, dead, cancelled, callback_task, callback_queue,
       callback_job_id, created_at, finished_at
  FROM {schema}.bundles
 WHERE NOT %(unfinished)s OR finished_at IS NULL
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: bundles_members
SELECT state, count(*) FROM {schema}.jobs WHERE bundle_id = %(id)s GROUP BY state ORDER BY state
