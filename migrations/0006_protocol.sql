-- jobqd schema, version 6: the worker protocol as SQL functions, and timed pause.
--
-- What a worker does to a job is public: a worker in any language claims, heartbeats and
-- finishes jobs through these functions, with the same guarantees as the Python worker, which
-- calls the same batch functions (one definition of a claim). docs/protocol.md is the guide.
--
-- Public functions (SECURITY DEFINER; a role needs only jobqd.grant_worker(role)):
--
--   claim(queue_name text, max_jobs integer, lease interval, worker text)
--     -> TABLE (id bigint, queue text, task text, args jsonb, attempt integer,
--               max_attempts integer, lease_token bigint, priority integer,
--               run_at timestamptz, created_at timestamptz, started_at timestamptz,
--               lease_expires_at timestamptz)
--     Up to max_jobs (1 to 1000) due jobs of the queue, in claim order (priority, run_at, id),
--     each now running with a fresh lease_token valid for `lease` (1 second at least). No rows
--     while the queue is paused (a timed pause ends by itself at paused_until). `attempt`
--     counts this claim; `max_attempts` is the job's effective limit (job, else task or route,
--     else queue, else 20). `worker` (1 to 200 characters) names the holder: it is recorded
--     as a `processes` row of role 'external' (host = the name), which jobs.locked_by points
--     at, so jobqctl show and status say who holds a job.
--
--   heartbeat(job_ids bigint[], lease_tokens bigint[], lease interval)
--     -> TABLE (id bigint, lease_expires_at timestamptz)
--     Renews every lease still held (id, token, running) to now() + lease; the ids that do not
--     come back were lost (reaped, cancelled, expired): stop working on them, write nothing.
--
--   complete(job_id bigint, lease_token bigint, result jsonb DEFAULT NULL)
--   fail(job_id bigint, lease_token bigint, error text, retry_in interval DEFAULT NULL,
--        kind text DEFAULT 'Error', traceback text DEFAULT NULL)
--   snooze(job_id bigint, lease_token bigint, seconds double precision)
--   discard(job_id bigint, lease_token bigint, reason text)
--     -> TABLE (id bigint, state text, attempt integer, run_at timestamptz)
--     Each writes one outcome, fenced on (id, lease_token, state = 'running'). One row: the
--     outcome was written, with the job's resulting state (succeeded; queued again or dead;
--     queued; dead) and run_at (when it runs next, if queued). No row: the lease was lost and
--     nothing was written. fail() re-queues after `retry_in`, or when that is NULL after the
--     task's (else the queue's) backoff as the daemons publish it (backoff_delay below, the
--     same formula as jobqd.backoff.Backoff); it ends the job dead when this was its last
--     attempt. snooze() re-queues after `seconds` without spending the attempt. discard()
--     ends the job dead at once.
--
--   grant_worker(role_name name): the role may call exactly the functions above (and
--     queue_channel(queue) to LISTEN for new jobs); it has no right on any table.
--
--   pause(queue_name text, duration interval DEFAULT NULL, paused_by text DEFAULT NULL)
--     Every claim of the queue returns nothing until resume(queue_name) or, with a
--     duration, until now() + duration: the claim compares paused_until with now(), so a
--     timed pause needs no one to end it. paused_by says who (free text; jobqctl writes its
--     user and host).
--
-- Internal batch functions (the Python worker's hot path; the public ones call them):
--   claim_batch(queue_name, max_jobs, lease, holder bigint), renew_batch(ids, tokens, lease),
--   succeed_batch(ids, tokens), finish_batch(ids, tokens, states, delays, results,
--   error_records, snoozes), backoff_delay(task, queue, attempt).

ALTER TABLE queues ADD COLUMN paused_until timestamptz;
ALTER TABLE queues ADD COLUMN paused_by text;
-- {"kind": "exponential" | "fixed", "base": s, "cap": s, "jitter": fraction}; NULL: defaults.
ALTER TABLE queues ADD COLUMN backoff jsonb;
ALTER TABLE tasks ADD COLUMN backoff jsonb;

ALTER TABLE processes DROP CONSTRAINT processes_role_check;
ALTER TABLE processes ADD CONSTRAINT processes_role_check
    CHECK (role IN ('worker', 'maintenance', 'http', 'inline', 'external'));
-- One row per external worker name: claim() finds its holder row by name.
CREATE UNIQUE INDEX processes_external ON processes (host) WHERE role = 'external';

-- The retry delay the Python worker's Backoff computes: exponential base * 2^(attempt-1) up
-- to cap, or fixed base; spread by +/- jitter. The task's (or route's) published backoff, else
-- the queue's, else the defaults (exponential, 1 s, 1 h, 0.1).
CREATE FUNCTION backoff_delay(task text, queue text, attempt integer) RETURNS double precision
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
DECLARE
    b jsonb;
    kind text;
    base float8;
    cap float8;
    jitter float8;
    delay float8;
BEGIN
    b := coalesce((SELECT r.backoff FROM task_route(backoff_delay.task) r),
                  (SELECT q.backoff FROM queues q WHERE q.name = backoff_delay.queue),
                  '{}');
    kind := coalesce(b->>'kind', 'exponential');
    base := coalesce((b->>'base')::float8, 1.0);
    cap := coalesce((b->>'cap')::float8, 3600.0);
    jitter := coalesce((b->>'jitter')::float8, 0.1);
    IF kind = 'fixed' THEN
        delay := base;
    ELSE
        delay := least(cap, base * power(2::float8, greatest(0, least(attempt - 1, 62))));
    END IF;
    IF jitter <> 0 THEN
        delay := delay * (1 + (random() * 2 - 1) * jitter);
    END IF;
    IF kind <> 'fixed' THEN
        delay := least(cap, delay);
    END IF;
    RETURN greatest(0.0, delay);
END
$$;

-- The one definition of a claim: due jobs of one unpaused queue, in claim order, each with a
-- fresh lease token, its attempt counted, held by `holder` (a processes id).
--
-- Planned once per session (plan_cache_mode): replanning the claim on every call, as the
-- inline statement it replaces was, cost about a third of its time (pgbench, claim 50 +
-- complete 50). The one right plan is index scans: jobs_claim in claim order, then the primary
-- key for the picked ids. A plan made once must not depend on the statistics of its day (a
-- plan made on an empty table would scan the whole table for ever after), so sequential and
-- bitmap scans are ruled out, and the picked ids go through an array so that the plan, which
-- cannot know max_jobs, looks them up by primary key instead of hashing the table.
CREATE FUNCTION claim_batch(queue_name text, max_jobs integer, lease interval, holder bigint)
RETURNS TABLE (id bigint, queue text, task text, args jsonb, attempt integer,
               max_attempts integer, lease_token bigint, priority integer, run_at timestamptz,
               created_at timestamptz, started_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH claimed AS (
        UPDATE jobs j
           SET state = 'running', attempt = j.attempt + 1, started_at = now(),
               lease_expires_at = now() + lease,
               lease_token = nextval('lease_tokens'), locked_by = holder
         WHERE j.id = ANY(ARRAY(
               SELECT p.id FROM jobs p
                WHERE p.queue = queue_name AND p.state = 'queued' AND p.run_at <= now()
                  AND NOT EXISTS (SELECT 1 FROM queues q
                                   WHERE q.name = queue_name AND q.paused
                                     AND (q.paused_until IS NULL OR q.paused_until > now()))
                ORDER BY p.priority, p.run_at, p.id
                LIMIT max_jobs
                  FOR UPDATE SKIP LOCKED))
        RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.max_attempts, j.lease_token,
                  j.priority, j.run_at, j.created_at, j.started_at, j.lease_expires_at
    )
    SELECT c.id, c.queue, c.task, c.args, c.attempt, c.max_attempts, c.lease_token,
           c.priority, c.run_at, c.created_at, c.started_at, c.lease_expires_at
      FROM claimed c
     ORDER BY c.priority, c.run_at, c.id;
END
$$;

-- Renew the leases still held; `holder` is who holds each (processes id).
CREATE FUNCTION renew_batch(job_ids bigint[], lease_tokens bigint[], lease interval)
RETURNS TABLE (id bigint, lease_expires_at timestamptz, holder bigint)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE jobs j
       SET lease_expires_at = now() + lease
      FROM unnest(job_ids, lease_tokens) AS held(id, token)
     WHERE j.id = held.id AND j.lease_token = held.token AND j.state = 'running'
    RETURNING j.id, j.lease_expires_at, j.locked_by;
END
$$;

-- Successes without a result value: the common outcome, kept lean.
CREATE FUNCTION succeed_batch(job_ids bigint[], lease_tokens bigint[])
RETURNS TABLE (id bigint, state text, attempt integer, run_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE jobs j
       SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL, lease_token = NULL,
           locked_by = NULL
      FROM unnest(job_ids, lease_tokens) AS o(id, token)
     WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'
    RETURNING j.id, j.state, j.attempt, j.run_at;
END
$$;

-- Any batch of outcomes. `delays` is seconds from now for re-queued jobs; a snoozed attempt is
-- not counted; errors are appended to the capped history; any outcome ends unhandled_since.
CREATE FUNCTION finish_batch(job_ids bigint[], lease_tokens bigint[], states text[],
                             delays double precision[], results jsonb[],
                             error_records jsonb[], snoozes boolean[])
RETURNS TABLE (id bigint, state text, attempt integer, run_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE jobs j
       SET state = o.state,
           run_at = CASE WHEN o.state = 'queued'
                         THEN now() + o.delay * interval '1 second' ELSE j.run_at END,
           finished_at = CASE WHEN o.state = 'queued' THEN NULL ELSE now() END,
           attempt = j.attempt - o.snooze::int,
           result = o.result,
           last_error = coalesce(o.error->>'message', j.last_error),
           errors = CASE WHEN o.error IS NULL THEN j.errors
                         ELSE (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]')
                                 FROM jsonb_array_elements(j.errors || jsonb_build_array(o.error))
                                      WITH ORDINALITY AS h(e, n)
                                WHERE n > jsonb_array_length(j.errors) + 1
                                          - (SELECT s.error_history FROM settings s))
                    END,
           lease_expires_at = NULL, lease_token = NULL, locked_by = NULL, unhandled_since = NULL
      FROM unnest(job_ids, lease_tokens, states, delays, results, error_records, snoozes)
           AS o(id, token, state, delay, result, error, snooze)
     WHERE j.id = o.id AND j.lease_token = o.token AND j.state = 'running'
    RETURNING j.id, j.state, j.attempt, j.run_at;
END
$$;

-- The public protocol.

CREATE FUNCTION claim(queue_name text, max_jobs integer, lease interval, worker text)
RETURNS TABLE (id bigint, queue text, task text, args jsonb, attempt integer,
               max_attempts integer, lease_token bigint, priority integer, run_at timestamptz,
               created_at timestamptz, started_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    holder_id bigint;
BEGIN
    IF name_ok(queue_name) IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid queue name: a queue name is 1 to 200 characters, none of them '
                        'a control character' USING ERRCODE = '22J01';
    END IF;
    IF name_ok(worker) IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid worker name: a worker name is 1 to 200 characters, none of '
                        'them a control character' USING ERRCODE = '22J01';
    END IF;
    IF max_jobs IS NULL OR max_jobs NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'max_jobs must be between 1 and 1000' USING ERRCODE = '22023';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' THEN
        RAISE EXCEPTION 'lease must be at least 1 second' USING ERRCODE = '22023';
    END IF;
    INSERT INTO processes AS p (host, pid, role, queue)
    VALUES (worker, 0, 'external', queue_name)
    ON CONFLICT (host) WHERE role = 'external'
    DO UPDATE SET heartbeat_at = now(), queue = excluded.queue
    RETURNING p.id INTO holder_id;
    RETURN QUERY SELECT * FROM claim_batch(queue_name, max_jobs, lease, holder_id);
END
$$;

CREATE FUNCTION heartbeat(job_ids bigint[], lease_tokens bigint[], lease interval)
RETURNS TABLE (id bigint, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(job_ids) IS DISTINCT FROM cardinality(lease_tokens) THEN
        RAISE EXCEPTION 'heartbeat: job_ids and lease_tokens must have the same length'
            USING ERRCODE = '22023';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' THEN
        RAISE EXCEPTION 'lease must be at least 1 second' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    WITH renewed AS (
        SELECT * FROM renew_batch(job_ids, lease_tokens, lease)
    ), seen AS (
        UPDATE processes p SET heartbeat_at = now()
         WHERE p.id IN (SELECT r.holder FROM renewed r) AND p.role = 'external'
    )
    SELECT r.id, r.lease_expires_at FROM renewed r ORDER BY r.id;
END
$$;

CREATE FUNCTION complete(job_id bigint, lease_token bigint, result jsonb DEFAULT NULL)
RETURNS TABLE (id bigint, state text, attempt integer, run_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    limit_bytes integer;
BEGIN
    IF result IS NULL THEN
        RETURN QUERY SELECT * FROM succeed_batch(ARRAY[job_id], ARRAY[lease_token]);
        RETURN;
    END IF;
    SELECT s.max_payload_bytes INTO limit_bytes FROM settings s;
    IF pg_column_size(result) > limit_bytes THEN
        RAISE EXCEPTION 'job result is % bytes, over the limit of % bytes',
            pg_column_size(result), limit_bytes
            USING ERRCODE = '22023', HINT = 'store large results elsewhere and return a reference';
    END IF;
    RETURN QUERY SELECT * FROM finish_batch(ARRAY[job_id], ARRAY[lease_token],
                                            ARRAY['succeeded'], ARRAY[NULL::float8],
                                            ARRAY[result], ARRAY[NULL::jsonb], ARRAY[false]);
END
$$;

CREATE FUNCTION fail(job_id bigint, lease_token bigint, error text,
                     retry_in interval DEFAULT NULL, kind text DEFAULT 'Error',
                     traceback text DEFAULT NULL)
RETURNS TABLE (id bigint, state text, attempt integer, run_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    j jobs%ROWTYPE;
    attempts integer;
    next_state text := 'queued';
    delay float8;
BEGIN
    IF retry_in < interval '0' THEN
        RAISE EXCEPTION 'retry_in must not be negative' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO j FROM jobs
     WHERE jobs.id = fail.job_id AND jobs.lease_token = fail.lease_token
       AND jobs.state = 'running';
    IF NOT FOUND THEN
        RETURN;  -- the lease was lost
    END IF;
    attempts := coalesce((SELECT p.max_attempts FROM job_policy(j.task, j.queue, j.max_attempts) p),
                         20);
    IF j.attempt >= attempts THEN
        next_state := 'dead';
    ELSE
        delay := coalesce(extract(epoch FROM retry_in)::float8,
                          backoff_delay(j.task, j.queue, j.attempt));
    END IF;
    RETURN QUERY SELECT * FROM finish_batch(
        ARRAY[j.id], ARRAY[j.lease_token], ARRAY[next_state], ARRAY[delay], ARRAY[NULL::jsonb],
        ARRAY[jsonb_build_object('attempt', j.attempt,
                                 'kind', left(coalesce(kind, 'Error'), 200),
                                 'message', left(coalesce(error, ''), 2000),
                                 'traceback', right(traceback, 8000))],
        ARRAY[false]);
END
$$;

CREATE FUNCTION snooze(job_id bigint, lease_token bigint, seconds double precision)
RETURNS TABLE (id bigint, state text, attempt integer, run_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    IF seconds IS NULL OR NOT (seconds >= 0 AND seconds < 'Infinity') THEN
        RAISE EXCEPTION 'snooze: seconds must be a finite number, 0 or more'
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY SELECT * FROM finish_batch(ARRAY[job_id], ARRAY[lease_token], ARRAY['queued'],
                                            ARRAY[seconds], ARRAY[NULL::jsonb],
                                            ARRAY[NULL::jsonb], ARRAY[true]);
END
$$;

CREATE FUNCTION discard(job_id bigint, lease_token bigint, reason text)
RETURNS TABLE (id bigint, state text, attempt integer, run_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN QUERY
    SELECT f.* FROM jobs j
     CROSS JOIN LATERAL finish_batch(
            ARRAY[j.id], ARRAY[j.lease_token], ARRAY['dead'], ARRAY[NULL::float8],
            ARRAY[NULL::jsonb],
            ARRAY[jsonb_build_object('attempt', j.attempt, 'kind', 'Discard',
                                     'message', left(coalesce(reason, ''), 2000),
                                     'traceback', NULL)],
            ARRAY[false]) f
     WHERE j.id = discard.job_id AND j.lease_token = discard.lease_token
       AND j.state = 'running';
END
$$;

REVOKE EXECUTE ON FUNCTION claim(text, integer, interval, text),
                           heartbeat(bigint[], bigint[], interval),
                           complete(bigint, bigint, jsonb),
                           fail(bigint, bigint, text, interval, text, text),
                           snooze(bigint, bigint, double precision),
                           discard(bigint, bigint, text) FROM PUBLIC;

-- An external worker's role: it may claim and finish jobs through the protocol functions and
-- nothing else (no table rights; it cannot enqueue, read other jobs or change queues).
CREATE FUNCTION grant_worker(role_name name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.claim(text, integer, interval, text),'
                   ' %1$I.heartbeat(bigint[], bigint[], interval),'
                   ' %1$I.complete(bigint, bigint, jsonb),'
                   ' %1$I.fail(bigint, bigint, text, interval, text, text),'
                   ' %1$I.snooze(bigint, bigint, double precision),'
                   ' %1$I.discard(bigint, bigint, text),'
                   ' %1$I.queue_channel(text) TO %2$I',
                   current_schema(), role_name);
END
$$;
REVOKE EXECUTE ON FUNCTION grant_worker(name) FROM PUBLIC;

-- Roles already given the daemon's rights (grant_daemon: they may update jobs) may call the
-- protocol too: the http child serves it, and grant_daemon granted only the functions that
-- existed when it ran.
SELECT grant_worker(a.grantee::regrole::name)
  FROM (SELECT DISTINCT a.grantee
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'jobs'::regclass AND a.privilege_type = 'UPDATE'
           AND a.grantee <> 0 AND a.grantee <> c.relowner) a;

-- Timed pause: pause(queue) as before, or for a while, saying by whom.
DROP FUNCTION pause(text);
CREATE FUNCTION pause(queue_name text, duration interval DEFAULT NULL,
                      paused_by text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
BEGIN
    IF name_ok(queue_name) IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid queue name: a queue name is 1 to 200 characters, none of them '
                        'a control character' USING ERRCODE = '22J01';
    END IF;
    IF duration <= interval '0' THEN
        RAISE EXCEPTION 'pause: duration must be positive' USING ERRCODE = '22023';
    END IF;
    INSERT INTO queues AS q (name, paused, paused_at, paused_until, paused_by, updated_at)
    VALUES (queue_name, true, now(), now() + duration, left(pause.paused_by, 200), now())
    ON CONFLICT (name) DO UPDATE
       SET paused = true, paused_at = now(), paused_until = excluded.paused_until,
           paused_by = excluded.paused_by, updated_at = now();
END
$$;

CREATE OR REPLACE FUNCTION resume(queue_name text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO queues (name, paused, updated_at) VALUES (queue_name, false, now())
    ON CONFLICT (name) DO UPDATE
       SET paused = false, paused_at = NULL, paused_until = NULL, paused_by = NULL,
           updated_at = now();
    PERFORM pg_notify(queue_channel(queue_name), '');
END
$$;
