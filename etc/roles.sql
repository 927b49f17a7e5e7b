-- Database roles for jobqd. Run as the owner of the jobqd schema (the role that ran
-- `jobqctl migrate`), for example:  psql "$OWNER_URL" -f /etc/jobqd/roles.sql
--
-- webapp: may only enqueue. It calls jobqd.enqueue(...) / jobqd.enqueue_many(...) and
--   jobqd.create_bundle(...), which run with the schema owner's rights; it has no privilege on
--   any table, so it cannot read other jobs' payloads or change any job's state.
-- jobqd: the daemon and jobqctl. Reads and writes every jobqd table and may call every jobqd
--   function, but does not own the schema; run it with `database.migrate: false` and apply
--   migrations as the owner during upgrades.
--
-- Rename the roles to taste; re-run the two SELECTs after an upgrade that adds tables.

CREATE ROLE webapp LOGIN;   -- set a password or use your usual authentication
CREATE ROLE jobqd LOGIN;

SELECT jobqd.grant_enqueue('webapp');
SELECT jobqd.grant_daemon('jobqd');
