#!/usr/bin/env bash
# Adjacent runs of two (or more) gateway binaries on one bench case, alternated A B A B, with
# the medians of requests/s and server CPU per request: how bench/PROFILING.md decides whether
# a change is kept. Builds nothing: build each variant and copy it aside first, e.g.
#   cargo build --release -p bench -p engine && cp target/release/gateway /tmp/gw-before
# Usage: bench/scripts/ab.sh CASE SECS ROUNDS BINARY...   (EXTRA=--unpinned for that placement)
# Leaves the last binary in target/release/gateway.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 4 ] || { sed -n 2,7p "$0" >&2; exit 2; }
case=$1 secs=$2 rounds=$3
shift 3
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for r in $(seq 1 "$rounds"); do
  for bin in "$@"; do
    cp "$bin" target/release/gateway
    line=$(target/release/bench one "$case" ${EXTRA:-} --no-build --secs "$secs" --warmup 1 2>/dev/null | tail -1)
    echo "$bin $line" | tee -a "$out" | python3 -c '
import json, sys
bin, doc = sys.stdin.read().split(" ", 1)
d = json.loads(doc)
rps, cpu = d["rps"], d["server_cpu_us_per_req"]
print(f"{bin:30s} {rps:9.0f} req/s {cpu:6.3f} us CPU/req")'
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    bin, doc = line.split(" ", 1)
    d = json.loads(doc)
    runs.setdefault(bin, []).append((d["rps"], d["server_cpu_us_per_req"]))
for bin, v in runs.items():
    print(f"median {bin:30s} {statistics.median(r for r, _ in v):9.0f} req/s "
          f"{statistics.median(c for _, c in v):6.3f} us CPU/req ({len(v)} runs)")
PY
