"""The leader's periodic duties beside cron (jobqd.cron) and the reaper (jobqd.reaper):
retention (pruning) and priority aging. Each is a function of a connection
and the settings that works in bounded batches and is safe to run twice."""
