#!/usr/bin/env bash
# The cost of monitoring on the refresh grant, in instructions per request: the gateway runs
# under `valgrind --tool=callgrind` (which counts instructions, not seconds, so the figure does
# not move with the other tenants of this VM) with monitoring on, then off, driven by the
# bench's own load generator for the same time; counters are zeroed after a warm-up and dumped
# after the measured window. Prints instructions per request for each and the ratio.
#
# Usage: bench/scripts/metrics-cost-callgrind.sh [SECONDS]   (default 15; needs valgrind)
# Builds with: CARGO_TARGET_DIR=target-bench cargo build --release -p bench -p engine
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-15}"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-bench}"
cargo build -q --release -p bench -p engine
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for m in on off; do
  enabled=$([ "$m" = on ] && echo true || echo false)
  mkdir -p "$work/$m"
  printf 'stores:\n  tokens: { type: memory }\napplications: { type: file, path: %s/clients.yaml }\n' "$work" > "$work/$m/gateway.yaml"
  # The default token endpoint, with monitoring switched on or off for the policy and both
  # grant nodes.
  python3 - "$enabled" > "$work/$m/token.yaml" <<'PY'
import sys
en = sys.argv[1]
s = open("policies/token.yaml").read()
s = s.replace("    route: { path: /oauth/token, methods: [POST] }\n",
              "    route: { path: /oauth/token, methods: [POST] }\n    monitoring: { enabled: %s }\n" % en, 1)
s = s.replace("        monitoring:\n          enabled: true\n", "        monitoring:\n          enabled: %s\n" % en)
s = s.replace("        refresh_token: { expiry_secs: 43200, length: 46 }\n",
              "        refresh_token: { expiry_secs: 43200, length: 46 }\n        monitoring: { enabled: %s }\n" % en)
print(s, end="")
PY
done
creds="$("$bin/gateway" clients add --policies "$work/on" --name bench --scopes read --json)"
id="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["client_id"])' "$creds")"
secret="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["client_secret"])' "$creds")"

declare -A per
for m in on off; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  GATEWAY_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/$m.out" \
    "$bin/gateway" run --policies "$work/$m" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
    > "$work/$m.log" 2>&1 &
  vpid=$!
  for _ in $(seq 1 120); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.5; done
  "$bin/bench" loadgen --addr "127.0.0.1:$port" --conns 8 --threads 1 --warmup 2 --secs 1 \
    --client-id "$id" --secret "$secret" > /dev/null
  callgrind_control -z "$vpid" > /dev/null 2>&1
  "$bin/bench" loadgen --addr "127.0.0.1:$port" --conns 8 --threads 1 --warmup 0 --secs "$secs" \
    --client-id "$id" --secret "$secret" > "$work/$m.load"
  callgrind_control -d "$vpid" > /dev/null 2>&1
  kill "$vpid"; wait "$vpid" 2>/dev/null || true
  total=$(grep -hE '^(summary|totals):' "$work/$m.out".1 | head -1 | awk '{print $2}')
  requests=$(grep -o '"requests":[0-9]*' "$work/$m.load" | cut -d: -f2)
  per[$m]=$((total / requests))
  echo "monitoring $m: ${per[$m]} instructions per refresh grant ($requests requests)"
done
python3 -c "import sys; on, off = int(sys.argv[1]), int(sys.argv[2]); print(f'on / off = {on/off:.4f} (+{(on/off-1)*100:.2f}% instructions per request)')" "${per[on]}" "${per[off]}"
