-- claim 50 + complete 50 as the worker did before migration 0006: inline statements, bound parameters
SET synchronous_commit = off;
SELECT 'default' AS q, 50 AS lim, 30 AS lease, 1 AS holder \gset
BEGIN;
WITH picked AS (SELECT id FROM jobqd.jobs WHERE queue = :q AND state = 'queued' AND run_at <= now() AND NOT EXISTS (SELECT 1 FROM jobqd.queues q WHERE q.name = :q AND q.paused) ORDER BY priority, run_at, id LIMIT :lim FOR UPDATE SKIP LOCKED), c AS (UPDATE jobqd.jobs j SET state = 'running', attempt = j.attempt + 1, started_at = now(), lease_expires_at = now() + :lease * interval '1 second', lease_token = nextval('jobqd.lease_tokens'), locked_by = :holder FROM picked WHERE j.id = picked.id RETURNING j.id, j.task, j.args::text, j.attempt, j.max_attempts, j.lease_token, extract(epoch FROM j.created_at)::float8, extract(epoch FROM j.started_at)::float8) SELECT array_agg(id) AS ids, array_agg(lease_token) AS toks FROM c \gset
UPDATE jobqd.jobs j SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL, lease_token = NULL, locked_by = NULL FROM unnest(:ids::bigint[], :toks::bigint[]) AS o(id, token) WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running' RETURNING j.id;
COMMIT;
