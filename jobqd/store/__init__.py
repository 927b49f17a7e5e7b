"""Everything that talks to Postgres for more than one process: connections and the embedded
server, the migration runner, advisory-lock keys, the named SQL statements by subject and the
plain functions over a connection that the client, jobqctl and the http child call."""
