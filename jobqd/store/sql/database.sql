-- The database itself, as operators see it: its clock, and what keeps vacuum from cleaning
-- jobqd's tables. Only statistics views and shared-memory lists are read, never a table, so
-- these cost the same on a table of ten rows or ten million.

-- name: database_now
SELECT now()

-- name: database_vacuum_holder
-- The oldest transaction or snapshot that keeps vacuum of this database's tables from removing
-- dead rows: a session's xmin or xid (this database's sessions, and those of no database:
-- walsenders, whose hot_standby_feedback xmin holds back every database), a prepared
-- transaction of this database, or a replication slot's xmin. A slot's catalog_xmin only
-- holds back system catalogs, not jobqd's tables, and is left out; so are this session and
-- autovacuum workers. pg_stat_activity shows pid, database, application_name, user name and
-- backend_xmin/backend_xid of every session to every role, but state, backend_type and the
-- start times only to the session's own role, members of it and pg_read_all_stats:
-- `visible` says whether they were shown.
WITH holders AS (
    SELECT 'session' AS kind,
           pid,
           application_name,
           usename::text AS role,
           NULL::text AS name,
           state,
           greatest(age(backend_xid), age(backend_xmin)) AS xid_age,
           coalesce(xact_start, backend_start) AS since,
           (backend_start IS NOT NULL) AS visible
    FROM pg_stat_activity
    WHERE (datname = current_database() OR datid IS NULL)
      AND pid <> pg_backend_pid()
      AND backend_type IS DISTINCT FROM 'autovacuum worker'
      AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
    UNION ALL
    SELECT 'prepared transaction', NULL, NULL, owner::text, gid, 'prepared',
           age(transaction), prepared, true
    FROM pg_prepared_xacts
    WHERE database = current_database()
    UNION ALL
    SELECT 'replication slot', active_pid, NULL, NULL, slot_name,
           CASE WHEN active THEN 'active' ELSE 'inactive' END,
           age(xmin), NULL, true
    FROM pg_replication_slots
    WHERE xmin IS NOT NULL
)
SELECT kind, pid, application_name, role, name, state, xid_age,
       extract(epoch FROM now() - since)::float8 AS age,
       visible
FROM holders
ORDER BY xid_age DESC, since
LIMIT 1

-- name: database_tables
-- Dead and live row estimates and the last vacuum of each of the schema's tables, from the
-- statistics collector (as current as the last few seconds of activity).
SELECT schemaname || '.' || relname AS "table",
       n_live_tup AS live_tuples,
       n_dead_tup AS dead_tuples,
       last_vacuum,
       last_autovacuum,
       greatest(last_vacuum, last_autovacuum) AS vacuumed_at,
       extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum))::float8 AS vacuum_age
FROM pg_stat_user_tables
WHERE schemaname = %(schema)s
ORDER BY n_dead_tup DESC, relname

-- name: database_name
SELECT current_database()
