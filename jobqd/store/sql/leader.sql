-- The leader lock session and who holds an advisory lock. Every leader write is made on
-- the session that holds the lock, so a write can only succeed while the lock is held.

-- name: leader_try_lock
SELECT pg_try_advisory_lock(%(key)s), pg_backend_pid()

-- name: leader_release
-- A graceful release: the notification reaches the standbys on commit, after the unlock.
SELECT pg_advisory_unlock(%(key)s), pg_notify(%(channel)s, '')

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

-- name: leader_set_option
SELECT set_config(%(name)s, %(value)s, false)

-- name: leader_backend_pid
SELECT pg_backend_pid()

-- name: leader_current
-- The maintenance process that holds the leader lock right now, from the lock itself.
SELECT p.id, p.host, p.pid, p.started_at, p.heartbeat_at, l.pid AS backend_pid
  FROM pg_locks l
  LEFT JOIN {schema}.processes p
         ON p.role = 'maintenance' AND (p.metadata->>'backend_pid')::int = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s

-- name: locks_holder
-- The backend holding a session advisory lock on a bigint key (split as Postgres stores it).
SELECT pid FROM pg_locks
 WHERE locktype = 'advisory' AND granted AND objsubid = 1
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
 LIMIT 1
