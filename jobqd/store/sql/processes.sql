-- The jobqd.processes rows: every daemon process registers, heartbeats and deregisters.

-- name: processes_register
INSERT INTO {schema}.processes (host, pid, role, queue, metadata)
VALUES (%(host)s, %(pid)s, %(role)s, %(queue)s, %(metadata)s::jsonb)
RETURNING id

-- name: processes_deregister
DELETE FROM {schema}.processes WHERE id = %(process_id)s

-- name: processes_heartbeat
UPDATE {schema}.processes SET heartbeat_at = now(), metadata = %(metadata)s::jsonb
 WHERE id = %(process_id)s
RETURNING id

-- name: processes_silent
-- Processes that stopped heartbeating longer than the grace ago. The row lock makes a late
-- heartbeat of such a process wait, then find its row gone and register again. An external
-- worker (the SQL protocol's claim) owes no heartbeat of its own: its jobs' leases expire like
-- any other, and its row goes only once it holds none.
SELECT id, host, pid, role, queue, heartbeat_at FROM {schema}.processes p
 WHERE heartbeat_at < now() - %(grace)s * interval '1 second'
   AND (role <> 'external'
        OR NOT EXISTS (SELECT 1 FROM {schema}.jobs j
                        WHERE j.locked_by = p.id AND j.lease_expires_at IS NOT NULL))
 ORDER BY heartbeat_at
 LIMIT %(batch)s
   FOR UPDATE SKIP LOCKED

-- name: processes_remove
-- Only rows still silent: a process that came back meanwhile keeps its registration.
DELETE FROM {schema}.processes
 WHERE id = ANY(%(process_ids)s::bigint[])
   AND heartbeat_at < now() - %(grace)s * interval '1 second'
RETURNING id

-- name: processes_list
-- The registered processes, with their heartbeat age in database time.
SELECT id, host, pid, role, queue, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age, metadata
  FROM {schema}.processes
 ORDER BY host, role, queue NULLS FIRST, pid
