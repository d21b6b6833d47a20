#!/bin/sh
# Run every benchmark with its defaults; JSON results land in bench/results/ (git-ignored).
# Each bench isolates itself in a private network+mount namespace (root needed).
# Usage: bench/run_all.sh [--quick]   (--quick: smoke-test sizes, about 2 minutes in all;
# without it, scale and restart run at the issue's sizes, 1,000 networks / 10,000 endpoints)
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/results
mkdir -p "$OUT"
QUICK=""
SIZES="--networks 1000 --endpoints 10000"
[ "${1:-}" = "--quick" ] && QUICK="--quick" && SIZES=""
failed=""
run() {
    name=$1; shift
    echo "=== $name ==="
    if ! "$PY" "bench/$name.py" "$@"; then
        failed="$failed $name"
    fi
    # The kernel frees the previous run's namespaces asynchronously: let it settle.
    sleep 3
}
run bench_ipam --json "$OUT/ipam.json"
run bench_serialize --json "$OUT/serialize.json"
run bench_store --json "$OUT/store.json"
run bench_attach $QUICK
run bench_churn $QUICK
run bench_scale $QUICK $SIZES
run bench_restart $QUICK $SIZES
run bench_cli $QUICK
run bench_docker $QUICK
run bench_reactions $QUICK
run bench_events --json "$OUT/events.json"
run bench_dns $QUICK
run bench_metrics $QUICK
run bench_dataplane $QUICK
if [ -n "$failed" ]; then
    echo "FAILED:$failed" >&2
    exit 1
fi
echo "all results in $OUT/"
