-- jobqd schema, version 2: what the leader's duties need beyond version 1.

-- Priority aging lowers `priority` (the claim order column) step by step; `base_priority`
-- keeps the priority the job was enqueued with, so each aging pass computes the target from
-- the original and the wait so far, whatever the passes' frequency or a leader change.
-- NULL until the job is first aged.
ALTER TABLE jobs ADD COLUMN base_priority integer;

-- When the leader first saw a cron entry: an entry that never fired is due from here, so a
-- tick that falls between one leader seeing the entry and the next leader taking over is
-- not lost, and a new entry does not fire ticks from before it existed.
ALTER TABLE cron ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();

-- A tick enqueued by hand (`jobqctl cron run NAME`) rather than by the schedule.
ALTER TABLE cron_ticks ADD COLUMN manual boolean NOT NULL DEFAULT false;

-- The pruner deletes old ticks without scanning the whole table.
CREATE INDEX cron_ticks_tick ON cron_ticks (tick);

-- /metrics (every scrape) and jobqctl status count dead and cancelled jobs per queue. Only rows
-- that end that way get an entry, so the hot path does not pay for it.
CREATE INDEX jobs_ended_badly ON jobs (queue, state) WHERE state IN ('dead', 'cancelled');

-- The reaper finds processes that stopped heartbeating.
CREATE INDEX processes_heartbeat ON processes (heartbeat_at);

-- The pruner deletes finished bundles.
CREATE INDEX bundles_finished ON bundles (finished_at) WHERE finished_at IS NOT NULL;

-- Queues that have waiting jobs, for jobqctl status and the /metrics gauges: a skip scan that
-- jumps through jobs_claim one queue at a time instead of reading every waiting job's entry.
CREATE FUNCTION waiting_queues() RETURNS SETOF text
LANGUAGE sql STABLE SET search_path FROM CURRENT
AS $$
    WITH RECURSIVE waiting(queue) AS (
        (SELECT queue FROM jobs WHERE state = 'queued' ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT j.queue FROM jobs j
                 WHERE j.state = 'queued' AND j.queue > w.queue ORDER BY j.queue LIMIT 1)
          FROM waiting w
         WHERE w.queue IS NOT NULL
    )
    SELECT queue FROM waiting WHERE queue IS NOT NULL
$$;
