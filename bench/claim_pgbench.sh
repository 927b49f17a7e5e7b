#!/usr/bin/env bash
# The claim and complete statements against the protocol's batch functions, server side only:
# pgbench (prepared, 2 clients, synchronous_commit off) runs claim 50 + complete 50 per
# transaction from bench/claim/inline.sql (the statements before migration 0006) and
# bench/claim/functions.sql (claim_batch, succeed_batch), alternating, each round on 41,000
# fresh jobs. Prints each round's tps and per-statement latency, then the medians.
#   PYTHON=.venv/bin/python bench/claim_pgbench.sh [rounds]
# (PYTHON: one with this tree's jobqd installed; BENCH_DSN: a server to create a database on)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rounds=${1:-8}
base=${BENCH_DSN:-postgresql://postgres@127.0.0.1:5432/postgres}
db="bench_claim_$$"
dsn="${base%/*}/$db"
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
psql -q "$base" -c "CREATE DATABASE $db"
trap 'psql -q "$base" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
(cd /tmp && "${PYTHON:-python3}" -m jobqd.cli.ctl --dsn "$dsn" migrate > /dev/null)
psql -q "$dsn" -c "INSERT INTO jobqd.processes (id, host, pid, role) OVERRIDING SYSTEM VALUE
                   VALUES (1, 'bench', 1, 'worker')"
out=$(mktemp)
for i in $(seq 1 "$rounds"); do
  order="inline functions"; [ $((i % 2)) = 0 ] && order="functions inline"
  for s in $order; do
    psql -q "$dsn" -c "TRUNCATE jobqd.jobs" \
      -c "INSERT INTO jobqd.jobs (queue, task) SELECT 'default', 'noop' FROM generate_series(1, 41000)" \
      -c "VACUUM ANALYZE jobqd.jobs"
    "$pgbench" -n -M prepared -c 2 -j 2 -t 400 -r -f "$here/claim/$s.sql" "$dsn" > "$out" 2>&1
    tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' "$out")
    claim=$(awk '$3 ~ /^(WITH|SELECT)$/ && $4 ~ /^(picked|array_agg)/ {print $1}' "$out")
    done_=$(awk '$3 ~ /^(UPDATE|SELECT)$/ && $4 ~ /^(jobqd.jobs|id)$/ {print $1}' "$out")
    echo "$s tps=$tps claim_ms=$claim complete_ms=$done_"
  done
done | tee "$out.all"
python3 - "$out.all" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for name in ("inline", "functions"):
    runs = [dict(kv.split("=") for kv in r[1:]) for r in rows if r[0] == name]
    print(name + ": median " + " ".join(
        f"{k}={statistics.median(float(r[k]) for r in runs):.3f}"
        for k in ("tps", "claim_ms", "complete_ms")))
PY
rm -f "$out" "$out.all"
