-- Statements of the maintenance process: leader election and the leader's duties (cron,
-- reaper, pruner, aging). The leader runs every write here on the session that
-- holds the advisory lock, so a write can only succeed while the lock is held.

-- name: leader_try_lock
SELECT pg_try_advisory_lock(%(key)s), pg_backend_pid()

-- name: leader_verify
-- Cheap proof, every tick, that this very backend still holds the leader lock (a pooler that
-- moved us to another backend, or a lock that is gone, answers false) and the database time.
SELECT pg_backend_pid(),
       EXISTS (SELECT 1 FROM pg_locks
                WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
                  AND objsubid = 1),
       now()

-- name: leader_session_settings
-- What the server applied of the options we connected with; a pooler that drops startup
-- options (pgbouncer's ignore_startup_parameters) shows up here.
SELECT (SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'),
       pg_backend_pid()

-- name: set_session_option
SELECT set_config(%(name)s, %(value)s, false)

-- name: backend_pid
SELECT pg_backend_pid()

-- name: current_leader
-- The maintenance process that holds the leader lock right now, from the lock itself.
SELECT p.id, p.host, p.pid, p.started_at, p.heartbeat_at, l.pid AS backend_pid
  FROM pg_locks l
  LEFT JOIN {schema}.processes p
         ON p.role = 'maintenance' AND (p.metadata->>'backend_pid')::int = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s

-- name: reap_expired
-- Running jobs whose lease expired (their worker died or froze) go back to queued after a
-- short backoff, or to dead when out of attempts or delivered at most once. The error names
-- the process that lost the job.
WITH expired AS (
    SELECT id FROM {schema}.jobs
     WHERE state = 'running' AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT j.id,
           coalesce(t.delivery, q.delivery, 'at_least_once') = 'at_most_once' AS at_most_once,
           j.attempt >= coalesce(j.max_attempts, t.max_attempts, q.max_attempts, 20)
               AS exhausted,
           jsonb_build_object(
               'attempt', j.attempt, 'kind', 'LeaseExpired',
               'message', format('lease expired: worker process %%s (%%s pid %%s) stopped renewing it',
                                 j.locked_by, coalesce(p.host, 'unknown host'),
                                 coalesce(p.pid::text, '?')),
               'traceback', NULL) AS error
      FROM expired e
      JOIN {schema}.jobs j ON j.id = e.id
      LEFT JOIN {schema}.tasks t ON t.name = j.task
      LEFT JOIN {schema}.queues q ON q.name = j.queue
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
       lease_expires_at = NULL, lease_token = NULL, locked_by = NULL
  FROM decided d
 WHERE j.id = d.id
RETURNING j.id, j.queue, j.task, j.state, j.attempt

-- name: silent_processes
-- Processes that stopped heartbeating longer than the grace ago. The row lock makes a late
-- heartbeat of such a process wait, then find its row gone and register again.
SELECT id, host, pid, role, queue, heartbeat_at FROM {schema}.processes
 WHERE heartbeat_at < now() - %(grace)s * interval '1 second'
 ORDER BY heartbeat_at
 LIMIT %(batch)s
   FOR UPDATE SKIP LOCKED

-- name: revoke_leases
-- The leases of silent processes end now rather than at their expiry; reap_expired then
-- treats those jobs like any other expired lease (first, as -infinity sorts first).
UPDATE {schema}.jobs SET lease_expires_at = '-infinity'
 WHERE state = 'running' AND lease_expires_at IS NOT NULL
   AND locked_by = ANY(%(process_ids)s::bigint[])

-- name: remove_processes
-- Only rows still silent: a process that came back meanwhile keeps its registration.
DELETE FROM {schema}.processes
 WHERE id = ANY(%(process_ids)s::bigint[])
   AND heartbeat_at < now() - %(grace)s * interval '1 second'
RETURNING id

-- name: cron_state
-- The database time and, per known entry, the instant after which its ticks are due: its
-- last fired tick, or when it was first seen.
SELECT now(), array_agg(name), array_agg(coalesce(last_tick, created_at))
  FROM {schema}.cron WHERE name = ANY(%(names)s::text[])

-- name: cron_add_entries
INSERT INTO {schema}.cron (name) SELECT unnest(%(names)s::text[])
ON CONFLICT (name) DO NOTHING

-- name: cron_lock_entry
-- Lock the entry's row for this transaction: a second leader waits here, then reads the tick
-- the first one committed.
SELECT coalesce(last_tick, created_at), now() FROM {schema}.cron
 WHERE name = %(name)s
   FOR UPDATE

-- name: cron_claim_tick
-- The tick's row is the once-only guarantee: no row back means the tick already fired. The
-- job id is filled in by cron_enqueue_tick in the same transaction.
INSERT INTO {schema}.cron_ticks (name, tick, job_id, manual)
VALUES (%(name)s, coalesce(%(tick)s::timestamptz, now()), 0, %(manual)s)
ON CONFLICT (name, tick) DO NOTHING
RETURNING tick

-- name: cron_enqueue_tick
UPDATE {schema}.cron_ticks
   SET job_id = {schema}.enqueue(%(queue)s, %(task)s, %(args)s::jsonb, now(), %(priority)s)
 WHERE name = %(name)s AND tick = %(tick)s
RETURNING job_id

-- name: cron_advance
UPDATE {schema}.cron SET last_tick = %(tick)s, updated_at = now()
 WHERE name = %(name)s AND (last_tick IS NULL OR last_tick < %(tick)s)

-- name: cron_entries
SELECT now(), n.name, c.last_tick, t.job_id
  FROM unnest(%(names)s::text[]) AS n(name)
  LEFT JOIN {schema}.cron c ON c.name = n.name
  LEFT JOIN {schema}.cron_ticks t ON t.name = c.name AND t.tick = c.last_tick

-- name: prune_jobs
-- One small batch of finished jobs past their retention, oldest first along jobs_finished.
-- The arrays carry the per-queue overrides (seconds, NULL: the top-level value), `shortest`
-- the shortest retention of all, which bounds the index range. The caller loops.
WITH retention AS (
    SELECT * FROM unnest(%(queues)s::text[], %(succeeded_by_queue)s::float8[],
                         %(dead_by_queue)s::float8[]) AS r(queue, succeeded, dead)
), doomed AS (
    SELECT j.id FROM {schema}.jobs j
      LEFT JOIN retention r ON r.queue = j.queue
     WHERE j.state IN ('succeeded', 'dead', 'cancelled')
       AND j.finished_at < now() - %(shortest)s * interval '1 second'
       AND j.finished_at < now() - interval '1 second' * CASE
               WHEN j.state = 'dead' THEN coalesce(r.dead, %(dead)s)
               ELSE coalesce(r.succeeded, %(succeeded)s) END
     ORDER BY j.finished_at
     LIMIT %(batch)s
       FOR UPDATE OF j SKIP LOCKED
)
DELETE FROM {schema}.jobs j USING doomed WHERE j.id = doomed.id
RETURNING j.state

-- name: prune_idempotency_keys
DELETE FROM {schema}.idempotency_keys
 WHERE key IN (SELECT key FROM {schema}.idempotency_keys WHERE expires_at <= now()
                LIMIT %(batch)s FOR UPDATE SKIP LOCKED)

-- name: prune_cron_ticks
-- Tick history older than the retention, except each entry's last tick (the schedule's cursor).
DELETE FROM {schema}.cron_ticks t
 WHERE (t.name, t.tick) IN (
        SELECT name, tick FROM {schema}.cron_ticks
         WHERE tick < now() - %(age)s * interval '1 second'
         LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
   AND NOT EXISTS (SELECT 1 FROM {schema}.cron c WHERE c.name = t.name AND c.last_tick = t.tick)

-- name: prune_bundles
DELETE FROM {schema}.bundles
 WHERE id IN (SELECT id FROM {schema}.bundles
               WHERE finished_at < now() - %(age)s * interval '1 second'
               LIMIT %(batch)s FOR UPDATE SKIP LOCKED)

-- name: sync_settings
-- Cluster-wide settings from the config; written only when they differ.
UPDATE {schema}.settings
   SET idempotency_window = %(idempotency)s * interval '1 second'
 WHERE idempotency_window IS DISTINCT FROM %(idempotency)s * interval '1 second'

-- name: age_priorities
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
