-- jobqd schema, version 5: one policy resolver, and jobs whose task no worker knows.
--
-- * task_route(task): the `tasks` row that serves a task name: the exact name, else the
--   `prefix.*` route with the longest prefix. The one routing rule; task_queue() (where a job
--   enqueued without a queue goes) and job_policy() both use it.
-- * job_policy(task, queue, max_attempts): what applies to a job: its delivery (the task's or
--   route's, else its queue's, else at least once) and its attempt limit (the job's own, else
--   the task's or route's, else the queue's; NULL when none of them is published, so the
--   caller applies its configured default). The reaper, the release of a dead worker's jobs,
--   a worker's release at shutdown and jobqctl's effective limit all read it, so they agree.
--   Like the worker's registry it picks one task row and falls back to the queue for what
--   that row leaves unset, never to a shorter route.
-- * jobs.unhandled_since: when a worker first gave the job back because it knows no task of
--   that name (NULL otherwise). Such a job is queued again without spending an attempt; the
--   leader ends it dead once it has been unhandled for `unknown_task_window`. Any outcome a
--   worker writes clears it, and so does retry(), which starts a job over.

ALTER TABLE jobs ADD COLUMN unhandled_since timestamptz;
CREATE INDEX jobs_unhandled ON jobs (unhandled_since) WHERE unhandled_since IS NOT NULL;

CREATE FUNCTION task_route(task text) RETURNS SETOF tasks
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    SELECT t.* FROM tasks t
     WHERE t.name = task_route.task
        OR (right(t.name, 2) = '.*' AND starts_with(task_route.task, left(t.name, -1)))
     ORDER BY t.name = task_route.task DESC, length(t.name) DESC
     LIMIT 1
$$;

CREATE OR REPLACE FUNCTION task_queue(task text) RETURNS text
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$ SELECT coalesce((SELECT r.queue FROM task_route(task_queue.task) r), 'default') $$;

CREATE FUNCTION job_policy(task text, queue text, max_attempts integer DEFAULT NULL)
RETURNS TABLE (at_most_once boolean, max_attempts integer)
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    SELECT coalesce(r.delivery, q.delivery, 'at_least_once') = 'at_most_once',
           coalesce(job_policy.max_attempts, r.max_attempts, q.max_attempts)
      FROM (VALUES (1)) AS one(x)
      LEFT JOIN task_route(job_policy.task) r ON true
      LEFT JOIN queues q ON q.name = job_policy.queue
$$;

CREATE OR REPLACE FUNCTION retry(job_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
DECLARE
    q text;
BEGIN
    UPDATE jobs SET state = 'queued', run_at = now(), attempt = 0, finished_at = NULL,
                    lease_expires_at = NULL, lease_token = NULL, locked_by = NULL,
                    unhandled_since = NULL
     WHERE id = job_id AND state IN ('dead', 'cancelled', 'queued')
    RETURNING queue INTO q;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(queue_channel(q), '');
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION retry_queue(queue_name text, from_state text DEFAULT 'dead')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
DECLARE
    n bigint;
BEGIN
    IF from_state NOT IN ('dead', 'cancelled') THEN
        RAISE EXCEPTION 'retry_queue: state must be dead or cancelled, got %', from_state
            USING ERRCODE = '22023';
    END IF;
    UPDATE jobs SET state = 'queued', run_at = now(), attempt = 0, finished_at = NULL,
                    lease_expires_at = NULL, lease_token = NULL, locked_by = NULL,
                    unhandled_since = NULL
     WHERE queue = queue_name AND state = from_state;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify(queue_channel(queue_name), '');
    END IF;
    RETURN n;
END
$$;
