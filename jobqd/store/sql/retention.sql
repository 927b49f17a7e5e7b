-- Retention: the pruner's deletes, in bounded batches, and the cluster settings it needs.

-- name: retention_prune_jobs
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

-- name: retention_prune_idempotency_keys
DELETE FROM {schema}.idempotency_keys
 WHERE key IN (SELECT key FROM {schema}.idempotency_keys WHERE expires_at <= now()
                LIMIT %(batch)s FOR UPDATE SKIP LOCKED)

-- name: retention_prune_cron_ticks
-- Tick history older than the retention, except each entry's last tick (the schedule's cursor).
DELETE FROM {schema}.cron_ticks t
 WHERE (t.name, t.tick) IN (
        SELECT name, tick FROM {schema}.cron_ticks
         WHERE tick < now() - %(age)s * interval '1 second'
         LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
   AND NOT EXISTS (SELECT 1 FROM {schema}.cron c WHERE c.name = t.name AND c.last_tick = t.tick)

-- name: retention_prune_bundles
-- Finished bundles past the retention, and bundles that can never finish (made before
-- migration 0004, with no job left that could end) once as old.
DELETE FROM {schema}.bundles
 WHERE id IN (SELECT id FROM {schema}.bundles
               WHERE finished_at < now() - %(age)s * interval '1 second'
               LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
    OR id IN (SELECT b.id FROM {schema}.bundles b
               WHERE b.finished_at IS NULL AND b.created_at < now() - %(age)s * interval '1 second'
                 AND NOT EXISTS (SELECT 1 FROM {schema}.jobs j
                                  WHERE j.bundle_id = b.id AND j.state IN ('queued', 'running'))
               LIMIT %(batch)s FOR UPDATE OF b SKIP LOCKED)

-- name: retention_sync_settings
-- Cluster-wide settings from the config; written only when they differ.
UPDATE {schema}.settings
   SET idempotency_window = %(idempotency)s * interval '1 second'
 WHERE idempotency_window IS DISTINCT FROM %(idempotency)s * interval '1 second'
