-- jobqd schema, version 4: right answers at the edges.
--
-- * Names: queue and task names are checked by the SQL API before anything is written, with
--   SQLSTATE 22J01 and a message naming the rule (1 to 200 characters, no control character),
--   so a client never sees a constraint's DETAIL (the failing row, payload included).
-- * Routing: a NULL queue means the task's queue, as the workers publish it in `tasks`
--   (exact name, else the longest `prefix.*` route), else `default`.
-- * enqueue() takes `delay`; enqueue_many() takes idempotency keys and a bundle.
-- * Idempotency keys: the key is claimed before the job is inserted, so concurrent enqueues
--   with one key wait for the first and return its job instead of failing.
-- * Bundles always finish, and only their creator adds to them:
--     - a bundle's jobs are enqueued in the transaction that created it (42501 otherwise);
--     - at that transaction's commit exactly `total` jobs must have joined (22J02 otherwise);
--     - an empty bundle (total 0) finishes at once: its callback is enqueued with it;
--     - a member deduplicated onto another job (dedup_key or idempotency_key) is refused
--       (22J02): the other job is not the bundle's, so the bundle could not count it;
--     - a member cancelled, or deleted before it ended, counts as cancelled.

-- Where a task's jobs go when the caller names no queue (NULL: not published).
ALTER TABLE tasks ADD COLUMN queue text;

-- How many jobs joined a bundle, and the transaction that created it (its only writer).
ALTER TABLE bundles ADD COLUMN joined integer NOT NULL DEFAULT 0;
ALTER TABLE bundles ADD COLUMN creator_xact xid8;
UPDATE bundles SET joined = total;

-- The pruner finds bundles that can no longer finish (made before this version).
CREATE INDEX bundles_unfinished ON bundles (created_at) WHERE finished_at IS NULL;

CREATE FUNCTION name_ok(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT length(name) BETWEEN 1 AND 200 AND name !~ '[[:cntrl:]]' $$;

CREATE FUNCTION task_queue(task text) RETURNS text
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    SELECT coalesce(
        (SELECT t.queue FROM tasks t
          WHERE t.queue IS NOT NULL
            AND (t.name = task OR (right(t.name, 2) = '.*' AND starts_with(task, left(t.name, -1))))
          ORDER BY t.name = task DESC, length(t.name) DESC
          LIMIT 1),
        'default')
$$;

-- Who may run the functions that are replaced below keeps that right.
CREATE TEMP TABLE enqueue_grantees ON COMMIT DROP AS
SELECT DISTINCT a.grantee::regrole::name AS role_name
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'enqueue(text, text, jsonb, timestamptz, integer, integer, text, text, bigint)'
               ::regprocedure
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;

DROP FUNCTION enqueue(text, text, jsonb, timestamptz, integer, integer, text, text, bigint);
DROP FUNCTION enqueue_many(text[], text[], jsonb[], timestamptz[], integer[], integer[], text[]);
DROP FUNCTION create_bundle(integer, text, text, text, jsonb);

-- A member joins its bundle: only in the creating transaction, only up to `total`.
CREATE FUNCTION bundle_join(bundle bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
DECLARE
    b bundles%ROWTYPE;
BEGIN
    SELECT * INTO b FROM bundles WHERE id = bundle FOR UPDATE;
    IF NOT FOUND OR b.creator_xact IS DISTINCT FROM pg_current_xact_id() THEN
        RAISE EXCEPTION 'bundle % was not created in this transaction', bundle
            USING ERRCODE = '42501',
                  HINT = 'a bundle''s jobs are enqueued in the transaction that creates it';
    END IF;
    IF b.joined >= b.total THEN
        RAISE EXCEPTION 'bundle % already has the % jobs it was created for', bundle, b.total
            USING ERRCODE = '22J02';
    END IF;
    UPDATE bundles SET joined = joined + 1 WHERE id = bundle;
END
$$;

CREATE FUNCTION enqueue(
    queue            text,
    task             text,
    args             jsonb DEFAULT '{}',
    run_at           timestamptz DEFAULT NULL,
    priority         integer DEFAULT 0,
    max_attempts     integer DEFAULT NULL,
    dedup_key        text DEFAULT NULL,
    idempotency_key  text DEFAULT NULL,
    bundle_id        bigint DEFAULT NULL,
    delay            interval DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
    limit_bytes integer;
    window_ interval;
BEGIN
    IF name_ok(enqueue.task) IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid task name: a task name is 1 to 200 characters, none of them '
                        'a control character' USING ERRCODE = '22J01';
    END IF;
    IF enqueue.queue IS NULL THEN
        enqueue.queue := task_queue(enqueue.task);
    ELSIF name_ok(enqueue.queue) IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid queue name: a queue name is 1 to 200 characters, none of them '
                        'a control character' USING ERRCODE = '22J01';
    END IF;
    IF enqueue.max_attempts < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF enqueue.delay IS NOT NULL THEN
        IF enqueue.run_at IS NOT NULL THEN
            RAISE EXCEPTION 'give run_at or delay, not both' USING ERRCODE = '22023';
        END IF;
        enqueue.run_at := now() + enqueue.delay;
    END IF;
    args := coalesce(args, '{}');
    enqueue.run_at := coalesce(enqueue.run_at, now());
    SELECT max_payload_bytes INTO limit_bytes FROM settings;
    IF pg_column_size(args) > limit_bytes THEN
        RAISE EXCEPTION 'job payload is % bytes, over the limit of % bytes',
            pg_column_size(args), limit_bytes
            USING ERRCODE = '22023', HINT = 'store large data elsewhere and pass a reference';
    END IF;

    IF enqueue.idempotency_key IS NOT NULL THEN
        -- Claim the key before inserting the job: a concurrent enqueue with the same key
        -- waits on our row here until we commit, then finds it and returns our job.
        SELECT idempotency_window INTO window_ FROM settings;
        INSERT INTO idempotency_keys AS k (key, job_id, expires_at)
        VALUES (enqueue.idempotency_key, 0, now() + window_)
        ON CONFLICT (key) DO UPDATE SET job_id = 0, expires_at = excluded.expires_at
            WHERE k.expires_at <= now();
        IF NOT FOUND THEN
            SELECT k.job_id INTO new_id FROM idempotency_keys k
             WHERE k.key = enqueue.idempotency_key;
            IF enqueue.bundle_id IS NOT NULL THEN
                RAISE EXCEPTION 'a job of bundle % has the idempotency key of job %',
                    enqueue.bundle_id, new_id
                    USING ERRCODE = '22J02',
                          HINT = 'a bundle''s jobs cannot be deduplicated onto other jobs';
            END IF;
            RETURN new_id;
        END IF;
    END IF;
    IF enqueue.bundle_id IS NOT NULL THEN
        PERFORM bundle_join(enqueue.bundle_id);
    END IF;

    IF dedup_key IS NULL THEN
        -- The common case, kept to one plain INSERT.
        INSERT INTO jobs AS j (queue, task, args, run_at, priority, max_attempts,
                               idempotency_key, bundle_id)
        VALUES (enqueue.queue, enqueue.task, args, enqueue.run_at,
                coalesce(enqueue.priority, 0), enqueue.max_attempts, enqueue.idempotency_key,
                enqueue.bundle_id)
        RETURNING j.id INTO new_id;
    ELSE
        LOOP
            INSERT INTO jobs AS j (queue, task, args, run_at, priority, max_attempts, dedup_key,
                                   idempotency_key, bundle_id)
            VALUES (enqueue.queue, enqueue.task, args, enqueue.run_at,
                    coalesce(enqueue.priority, 0), enqueue.max_attempts, dedup_key,
                    enqueue.idempotency_key, enqueue.bundle_id)
            ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL
                                             AND state IN ('queued', 'running')
            DO NOTHING
            RETURNING j.id INTO new_id;
            EXIT WHEN new_id IS NOT NULL;
            SELECT j.id INTO new_id FROM jobs j
             WHERE j.queue = enqueue.queue AND j.dedup_key = enqueue.dedup_key
               AND j.state IN ('queued', 'running');
            IF new_id IS NOT NULL AND enqueue.bundle_id IS NOT NULL THEN
                RAISE EXCEPTION 'a job of bundle % has the dedup key of live job %',
                    enqueue.bundle_id, new_id
                    USING ERRCODE = '22J02',
                          HINT = 'a bundle''s jobs cannot be deduplicated onto other jobs';
            END IF;
            -- The live duplicate can finish between the two statements; then insert again.
            EXIT WHEN new_id IS NOT NULL;
        END LOOP;
    END IF;

    IF enqueue.idempotency_key IS NOT NULL THEN
        UPDATE idempotency_keys SET job_id = new_id WHERE key = enqueue.idempotency_key;
    END IF;

    IF enqueue.run_at <= now() THEN
        -- Same expression as queue_channel(), inlined: this is the hot path of enqueue.
        PERFORM pg_notify(current_schema() || '_' || md5(enqueue.queue), '');
    END IF;
    RETURN new_id;
END
$$;

-- Batch enqueue: element i of every array describes job i. Returns (ord, id) with ord
-- 1-based, so callers map ids back to their input even when dedup collapsed some rows. A NULL
-- queue is the task's. With idempotency keys or a bundle, each row goes through enqueue().
CREATE FUNCTION enqueue_many(
    queues            text[],
    tasks             text[],
    args              jsonb[],
    run_ats           timestamptz[] DEFAULT NULL,
    priorities        integer[] DEFAULT NULL,
    max_attempts      integer[] DEFAULT NULL,
    dedup_keys        text[] DEFAULT NULL,
    idempotency_keys  text[] DEFAULT NULL,
    bundle_id         bigint DEFAULT NULL
) RETURNS TABLE (ord bigint, id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    limit_bytes integer;
    bad bigint;
    bad_what text;
    channel_queue text;
    seq regclass;
BEGIN
    IF cardinality(queues) <> cardinality(tasks) OR cardinality(queues) <> cardinality(args) THEN
        RAISE EXCEPTION 'enqueue_many: queues, tasks and args must have the same length'
            USING ERRCODE = '22023';
    END IF;
    SELECT u.i, CASE WHEN name_ok(u.t) IS NOT TRUE THEN 'task' ELSE 'queue' END
      INTO bad, bad_what
      FROM unnest(queues, tasks) WITH ORDINALITY AS u(q, t, i)
     WHERE name_ok(u.t) IS NOT TRUE OR (u.q IS NOT NULL AND name_ok(u.q) IS NOT TRUE)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'job % of the batch has an invalid % name: a % name is 1 to 200 '
                        'characters, none of them a control character', bad, bad_what, bad_what
            USING ERRCODE = '22J01';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(max_attempts) AS m WHERE m < 1) THEN
        RAISE EXCEPTION 'max_attempts must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF array_position(queues, NULL) IS NOT NULL THEN
        queues := ARRAY(SELECT coalesce(u.q, task_queue(u.t))
                          FROM unnest(queues, tasks) WITH ORDINALITY AS u(q, t, i)
                         ORDER BY u.i);
    END IF;
    SELECT max_payload_bytes INTO limit_bytes FROM settings;
    SELECT a.i INTO bad FROM unnest(args) WITH ORDINALITY AS a(v, i)
     WHERE pg_column_size(a.v) > limit_bytes LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'job % of the batch has a payload over the limit of % bytes',
            bad, limit_bytes USING ERRCODE = '22023';
    END IF;

    IF bundle_id IS NOT NULL OR EXISTS (SELECT 1 FROM unnest(idempotency_keys) AS k
                                        WHERE k IS NOT NULL) THEN
        FOR i IN 1 .. coalesce(cardinality(queues), 0) LOOP
            ord := i;
            id := enqueue(queues[i], tasks[i], args[i], run_ats[i], priorities[i],
                          max_attempts[i], dedup_keys[i], idempotency_keys[i], bundle_id);
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;

    seq := pg_get_serial_sequence('jobs', 'id')::regclass;
    -- Ids are drawn before the insert so that every input row knows its own id. Without dedup
    -- keys nothing can conflict and every row is inserted; with them, a row that lost to a
    -- live duplicate answers with the duplicate's id.
    IF dedup_keys IS NULL OR NOT EXISTS (SELECT 1 FROM unnest(dedup_keys) AS k
                                          WHERE k IS NOT NULL) THEN
        RETURN QUERY
        WITH input AS MATERIALIZED (
            SELECT u.ord, nextval(seq) AS id, u.queue, u.task, u.args, u.run_at, u.priority,
                   u.max_attempts
              FROM unnest(queues, tasks, args, run_ats, priorities, max_attempts)
                   WITH ORDINALITY AS u(queue, task, args, run_at, priority, max_attempts, ord)
        ), inserted AS (
            INSERT INTO jobs (id, queue, task, args, run_at, priority, max_attempts)
            SELECT input.id, input.queue, input.task, coalesce(input.args, '{}'),
                   coalesce(input.run_at, now()), coalesce(input.priority, 0),
                   input.max_attempts
              FROM input ORDER BY input.ord
        )
        SELECT input.ord, input.id FROM input ORDER BY input.ord;
    ELSE
        RETURN QUERY
        WITH input AS MATERIALIZED (
            SELECT u.ord, nextval(seq) AS id, u.queue, u.task, coalesce(u.args, '{}') AS args,
                   coalesce(u.run_at, now()) AS run_at, coalesce(u.priority, 0) AS priority,
                   u.max_attempts, u.dedup_key
              FROM unnest(queues, tasks, args, run_ats, priorities, max_attempts, dedup_keys)
                   WITH ORDINALITY AS u(queue, task, args, run_at, priority, max_attempts,
                                        dedup_key, ord)
        ), inserted AS (
            INSERT INTO jobs AS j (id, queue, task, args, run_at, priority, max_attempts,
                                   dedup_key)
            SELECT input.id, input.queue, input.task, input.args, input.run_at, input.priority,
                   input.max_attempts, input.dedup_key
              FROM input ORDER BY input.ord
            ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL
                                             AND state IN ('queued', 'running')
            DO NOTHING
            RETURNING j.id
        )
        SELECT input.ord,
               coalesce(
                   ins.id,
                   (SELECT first.id FROM input first JOIN inserted fi ON fi.id = first.id
                     WHERE first.queue = input.queue AND first.dedup_key = input.dedup_key),
                   (SELECT j.id FROM jobs j
                     WHERE j.queue = input.queue AND j.dedup_key = input.dedup_key
                       AND j.state IN ('queued', 'running')))
          FROM input
          LEFT JOIN inserted ins ON ins.id = input.id
         ORDER BY input.ord;
    END IF;

    FOR channel_queue IN SELECT DISTINCT u FROM unnest(queues) AS u LOOP
        PERFORM pg_notify(queue_channel(channel_queue), '');
    END LOOP;
END
$$;

-- Mark a bundle finished and enqueue its callback, once.
CREATE FUNCTION bundle_finish(bundle bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
DECLARE
    b bundles%ROWTYPE;
BEGIN
    SELECT * INTO b FROM bundles WHERE id = bundle FOR UPDATE;
    IF NOT FOUND OR b.finished_at IS NOT NULL THEN
        RETURN;
    END IF;
    IF b.callback_task IS NOT NULL THEN
        b.callback_job_id := enqueue(
            b.callback_queue, b.callback_task,
            coalesce(b.callback_args, '{}') || jsonb_build_object(
                'bundle', jsonb_build_object('id', b.id, 'name', b.name, 'total', b.total,
                                             'succeeded', b.succeeded, 'dead', b.dead,
                                             'cancelled', b.cancelled)));
    END IF;
    UPDATE bundles SET finished_at = now(), callback_job_id = b.callback_job_id WHERE id = b.id;
END
$$;

-- Create a bundle of `total` jobs; the same transaction enqueues them with this bundle id.
CREATE FUNCTION create_bundle(
    total integer, name text DEFAULT NULL, callback_task text DEFAULT NULL,
    callback_queue text DEFAULT NULL, callback_args jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    new_id bigint;
BEGIN
    IF total IS NULL OR total < 0 THEN
        RAISE EXCEPTION 'a bundle''s total is 0 or more jobs' USING ERRCODE = '22023';
    END IF;
    IF callback_task IS NOT NULL THEN
        IF name_ok(callback_task) IS NOT TRUE THEN
            RAISE EXCEPTION 'invalid task name: a task name is 1 to 200 characters, none of '
                            'them a control character' USING ERRCODE = '22J01';
        END IF;
        IF callback_queue IS NULL THEN
            callback_queue := task_queue(callback_task);
        ELSIF name_ok(callback_queue) IS NOT TRUE THEN
            RAISE EXCEPTION 'invalid queue name: a queue name is 1 to 200 characters, none of '
                            'them a control character' USING ERRCODE = '22J01';
        END IF;
    END IF;
    INSERT INTO bundles AS b (total, name, callback_task, callback_queue, callback_args,
                              creator_xact)
    VALUES (total, name, callback_task,
            CASE WHEN callback_task IS NULL THEN NULL ELSE callback_queue END, callback_args,
            pg_current_xact_id())
    RETURNING b.id INTO new_id;
    IF total = 0 THEN
        PERFORM bundle_finish(new_id);
    END IF;
    RETURN new_id;
END
$$;

-- At the commit of the transaction that created a bundle, its jobs must all have joined.
-- (Rows written directly by the schema owner or the daemon role, not by create_bundle, have no
-- creator transaction and are left alone.) It runs with the owner's rights: the enqueue-only
-- role that created the bundle cannot read the table itself.
CREATE FUNCTION bundle_sealed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    b bundles%ROWTYPE;
BEGIN
    SELECT * INTO b FROM bundles WHERE id = NEW.id;
    IF FOUND AND b.creator_xact IS NOT NULL AND b.joined <> b.total THEN
        RAISE EXCEPTION 'bundle % was created for % jobs but % joined it', b.id, b.total, b.joined
            USING ERRCODE = '22J02',
                  HINT = 'enqueue exactly the bundle''s jobs in the transaction that creates it';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER bundles_sealed
    AFTER INSERT ON bundles
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION bundle_sealed();

-- A member moved from state `was` to state `now_in`: keep the counts, finish when all ended.
CREATE FUNCTION bundle_count(bundle bigint, was text, now_in text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
DECLARE
    b bundles%ROWTYPE;
BEGIN
    UPDATE bundles SET succeeded = succeeded + (now_in = 'succeeded')::int
                                             - (was = 'succeeded')::int,
                       dead = dead + (now_in = 'dead')::int - (was = 'dead')::int,
                       cancelled = cancelled + (now_in = 'cancelled')::int
                                             - (was = 'cancelled')::int
     WHERE id = bundle AND finished_at IS NULL
    RETURNING * INTO b;
    IF FOUND AND now_in IN ('succeeded', 'dead', 'cancelled')
       AND b.succeeded + b.dead + b.cancelled >= b.total THEN
        PERFORM bundle_finish(bundle);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION bundle_job_ended() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM bundle_count(NEW.bundle_id, OLD.state, NEW.state);
    RETURN NULL;
END
$$;

-- A member deleted before it ended counts as cancelled.
CREATE FUNCTION bundle_job_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM bundle_count(OLD.bundle_id, OLD.state, 'cancelled');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_bundle_deleted
    AFTER DELETE ON jobs
    FOR EACH ROW
    WHEN (OLD.bundle_id IS NOT NULL AND OLD.state IN ('queued', 'running'))
    EXECUTE FUNCTION bundle_job_deleted();

REVOKE EXECUTE ON FUNCTION enqueue(text, text, jsonb, timestamptz, integer, integer, text, text,
                                   bigint, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION enqueue_many(text[], text[], jsonb[], timestamptz[], integer[],
                                        integer[], text[], text[], bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION create_bundle(integer, text, text, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION grant_enqueue(role_name name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.enqueue(text, text, jsonb, timestamptz, integer,'
                   ' integer, text, text, bigint, interval), %I.enqueue_many(text[], text[],'
                   ' jsonb[], timestamptz[], integer[], integer[], text[], text[], bigint),'
                   ' %I.create_bundle(integer, text, text, text, jsonb), %I.queue_channel(text)'
                   ' TO %I',
                   current_schema(), current_schema(), current_schema(), current_schema(),
                   role_name);
END
$$;

SELECT grant_enqueue(role_name) FROM enqueue_grantees;
