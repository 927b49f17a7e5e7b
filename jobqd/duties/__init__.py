"""The leader's periodic duties beside cron (jobqd.cron) and the reaper (jobqd.reaper):
retention (pruning), priority aging and the queue gauges. Each is a function of a connection
and the settings that works in bounded batches and is safe to run twice."""
