#!/usr/bin/env bash
# Adjacent runs of two (or more) gateway binaries on one bench case, alternated A B A B, with
# the medians of requests/s, server CPU per request, p99 and RSS: how bench/PROFILING.md decides whether
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
p99, peak, idle = d["p99_us"], d["peak_rss_kb"] / 1024, d["idle_rss_kb"] / 1024
print(f"{bin:30s} {rps:9.0f} req/s {cpu:6.3f} us CPU/req p99 {p99:7.0f} us RSS {peak:6.1f} MB peak {idle:5.1f} MB idle")'
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    bin, doc = line.split(" ", 1)
    d = json.loads(doc)
    runs.setdefault(bin, []).append(d)
for bin, v in runs.items():
    med = lambda k: statistics.median(x[k] for x in v)
    print(f"median {bin:30s} {med('rps'):9.0f} req/s {med('server_cpu_us_per_req'):6.3f} us CPU/req "
          f"p99 {med('p99_us'):7.0f} us RSS {med('peak_rss_kb') / 1024:6.1f} MB peak "
          f"{med('idle_rss_kb') / 1024:5.1f} MB idle ({len(v)} runs)")
PY
