-- The worker protocol for workers outside the daemon (the http child's endpoints): each
-- statement calls the public SQL function of migration 0006, the one definition of a claim
-- and of each fenced outcome. No row from an outcome means the lease was lost.

-- name: protocol_claim
SELECT id, queue, task, args, attempt, max_attempts, lease_token, priority, run_at, created_at,
       started_at, lease_expires_at
  FROM {schema}.claim(%(queue)s, %(max)s, %(lease)s * interval '1 second', %(worker)s)

-- name: protocol_heartbeat
SELECT id, lease_expires_at
  FROM {schema}.heartbeat(%(ids)s::bigint[], %(tokens)s::bigint[],
                          %(lease)s * interval '1 second')

-- name: protocol_complete
SELECT id, state, attempt, run_at
  FROM {schema}.complete(%(id)s, %(token)s, %(result)s::jsonb)

-- name: protocol_fail
SELECT id, state, attempt, run_at
  FROM {schema}.fail(%(id)s, %(token)s, %(error)s,
                     %(retry_in)s::float8 * interval '1 second', %(kind)s, %(traceback)s)

-- name: protocol_snooze
SELECT id, state, attempt, run_at FROM {schema}.snooze(%(id)s, %(token)s, %(seconds)s)

-- name: protocol_discard
SELECT id, state, attempt, run_at FROM {schema}.discard(%(id)s, %(token)s, %(reason)s)
