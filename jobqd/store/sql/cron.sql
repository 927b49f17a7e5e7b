-- Cron: one row per entry with its last fired tick, written on the leader session.

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
