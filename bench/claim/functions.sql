-- claim 50 + complete 50 as the worker does now: claim_batch() and succeed_batch()
SET synchronous_commit = off;
SELECT 'default' AS q, 50 AS lim, 30 AS lease, 1 AS holder \gset
BEGIN;
SELECT array_agg(id) AS ids, array_agg(lease_token) AS toks FROM (SELECT id, task, args::text, attempt, max_attempts, lease_token, extract(epoch FROM created_at)::float8, extract(epoch FROM started_at)::float8 FROM jobqd.claim_batch(:q, :lim, :lease * interval '1 second', :holder)) c \gset
SELECT id FROM jobqd.succeed_batch(:ids::bigint[], :toks::bigint[]);
COMMIT;
