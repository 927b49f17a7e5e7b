"""The maintenance process: competes for the leader lock and, as leader, runs the duties
(cron, reaper, pruner, aging) on the session that holds it."""
