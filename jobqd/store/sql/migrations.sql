-- The migration runner's own statements: its lock and the table that records what is applied,
-- which it creates before any migration has made the schema.

-- name: migrations_lock
SELECT pg_advisory_lock(%(key)s)

-- name: migrations_unlock
SELECT pg_advisory_unlock(%(key)s)

-- name: migrations_table_exists
SELECT to_regclass(format('%%I.migrations', %(schema)s::text)) IS NOT NULL

-- name: migrations_applied
SELECT version, checksum FROM {schema}.migrations

-- name: migrations_create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: migrations_create_table
CREATE TABLE IF NOT EXISTS {schema}.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())

-- name: migrations_search_path
-- A migration file names its objects without the schema: they land in the one being migrated.
SET LOCAL search_path TO {schema}, pg_temp

-- name: migrations_record
INSERT INTO {schema}.migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s)
