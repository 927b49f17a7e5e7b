-- The database itself, as operators see it: its clock.

-- name: database_now
SELECT now()
