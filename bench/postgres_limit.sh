#!/usr/bin/env bash
# What Postgres itself does for the statements a queue needs: pgbench driving the shared
# harness's claim-100 + complete-100 script (two commits per 100 jobs) on its minimal job
# table. jobqd's drain rate is reported as a fraction of this. Usage:
#   bench/postgres_limit.sh [reps=3] [seconds=10] [clients="4 8"]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
scripts=${BENCH_PEERS:-$here/../../shared/bench-peers}/pgbench
reps=${1:-3}; secs=${2:-10}; clients=${3:-"4 8"}
h="-h ${PGHOST:-127.0.0.1} -p ${PGPORT:-5432} -U ${PGUSER:-postgres}"
db=bench_pgbench
psql $h -d postgres -qtAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
    || createdb $h "$db"
psql $h -d "$db" -q -f "$scripts/schema.sql"
for c in $clients; do
    for rep in $(seq 1 "$reps"); do
        psql $h -d "$db" -q -c "TRUNCATE jobs RESTART IDENTITY" \
            -c "INSERT INTO jobs (priority) SELECT 0 FROM generate_series(1, 1500000)" \
            -c "VACUUM ANALYZE jobs" -c "CHECKPOINT"
        tps=$(pgbench $h -n -M prepared -c "$c" -j 2 -T "$secs" -f "$scripts/claim100.sql" "$db" \
              2>&1 | sed -n 's/^tps = \([0-9.]*\) (without initial.*/\1/p')
        echo "pgbench claim100+complete clients=$c rep=$rep: $(python3 -c "print(round($tps * 100))") jobs/s"
    done
done
