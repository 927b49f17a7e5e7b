#!/usr/bin/env bash
# Run jobqd and its Python peers through the same shared harness, in one run, so figures can
# be compared as ratios. Usage: bench/side_by_side.sh [reps=3] [n=20000]
#   PEERS="pgqueuer procrastinate" (default) selects the peers run beside jobqd; PEERS= none.
#   JOBQD_SWEEP, PGQUEUER_SWEEP, PROCRASTINATE_SWEEP override the processing configs:
#   "procs concurrency extra-json" items separated by ';', e.g. JOBQD_SWEEP='2 50 {};2 100 {}'
#   (no spaces inside the JSON). jobqd's default sweep ends with {"unbatched":true}: every
#   outcome in a transaction of its own, to measure what writing them in batches gains.
# The harness is copied to a scratch directory (never modified in place); results land in
# bench/results/<date>/. Needs PostgreSQL on 127.0.0.1:5432 (PGHOST/PGUSER to change).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
harness=${BENCH_PEERS:-$repo/../shared/bench-peers}
reps=${1:-3}; n=${2:-20000}
scratch=${BENCH_SCRATCH:-/tmp/jobqd-bench}
out=$here/results/$(date -u +%Y%m%dT%H%M)

mkdir -p "$scratch" "$out"
rsync -a --exclude 'results/' --exclude '.venv-*' "$harness/" "$scratch/"
mkdir -p "$scratch/results"
cp "$here/jobqd_adapter.py" "$scratch/adapters/jobqd_adapter.py"
cd "$scratch"

echo "== venvs (progress: one line per peer)"
[ -x .venv-jobqd/bin/python ] || python3 -m venv .venv-jobqd
.venv-jobqd/bin/pip install -q -e "$repo" && echo "jobqd installed"
for peer in ${PEERS-pgqueuer procrastinate}; do
    [ -x ".venv-$peer/bin/python" ] || ./setup_venvs.sh "$peer"
    echo "$peer ready"
done

run() {  # peer, then "procs conc extra" items
    local peer=$1; shift
    local py=.venv-$peer/bin/python
    psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -d postgres -qtAc \
        "SELECT 1 FROM pg_database WHERE datname='bench_$peer'" | grep -q 1 \
        || createdb -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" "bench_$peer"
    $py bench.py "$peer" setup
    echo "== $peer"
    $py bench.py "$peer" enqueue --mode single --n "$n" --reps "$reps" | grep SUMMARY
    $py bench.py "$peer" enqueue --mode bulk --batch 1000 --n "$n" --reps "$reps" | grep SUMMARY
    for cfg in "$@"; do
        set -- $cfg
        $py bench.py "$peer" process --n "$n" --procs "$1" --concurrency "$2" --extra "$3" \
            --reps "$reps" | grep SUMMARY
    done
    $py bench.py "$peer" latency --samples 200 --spacing 0.02 --concurrency 10 --reps "$reps" \
        | grep SUMMARY
}

sweep_for() {  # peer -> its sweep items, one per line
    local var default
    var=$(echo "$1" | tr a-z A-Z)_SWEEP
    case $1 in
        jobqd) default='1 50 {};2 50 {};2 100 {};2 50 {"unbatched":true}' ;;
        pgqueuer) default='2 50 {};1 100 {}' ;;
        *) default='4 10 {}' ;;
    esac
    echo "${!var:-$default}" | tr ';' '\n'
}

{
    for peer in jobqd ${PEERS-pgqueuer procrastinate}; do
        mapfile -t sweep < <(sweep_for "$peer")
        run "$peer" "${sweep[@]}"
    done
} 2>&1 | tee "$out/summary.txt"
cp results/*.jsonl "$out/"
echo "results in $out"
