#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind (which counts instructions, not
# seconds, so the figures do not move with the other tenants of this VM):
#   ceiling          the bare hyper server
#   chain            the gateway on the bench's pass-through chain (3 set_attribute + set_response)
#   chain-off        the same chain with the policy's monitoring off
#   refresh          the gateway's refresh grant, monitoring on (policy + both grant nodes)
#   refresh-off      the same with monitoring off
# Each server runs under `valgrind --tool=callgrind` with one worker, driven by the bench's own
# load generator (8 connections); counters are zeroed after a warm-up and dumped after the
# measured window. Kernel time (the loopback TCP stack, about 70% of `ceiling`'s CPU) is not
# counted. Under valgrind SHA-256 runs without the CPU's SHA extensions, so each digest (four per
# refresh grant) counts about 3,600 instructions that cost a few hundred cycles natively.
#
# Usage: bench/scripts/instructions-callgrind.sh [SECONDS]   (default 10; needs valgrind, curl)
#   CASES="chain refresh"   run only these (the summary lines need all five)
#   KEEP=DIR                keep each case's callgrind output as DIR/CASE.out for callgrind_annotate
#   CALLGRIND_OPTS="..."    more callgrind options, e.g. the cache simulation behind the I1-miss
#                           figures of bench/PROFILING.md (read them with callgrind_annotate):
#                           "--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=524288,8,64"
# Builds with: CARGO_TARGET_DIR=target-bench cargo build --release -p bench -p engine
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-10}"
for tool in valgrind callgrind_control curl; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install valgrind curl)" >&2; exit 1; }
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-bench}"
cargo build -q --release -p bench -p engine
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Policy sets: the chain, and the default token endpoint with monitoring on or off for the
# policy and both grant nodes.
for set in chain chain-off refresh refresh-off; do
  mkdir -p "$work/$set"
  printf 'stores:\n  tokens: { type: memory }\napplications: { type: file, path: %s/clients.yaml }\n' "$work" > "$work/$set/gateway.yaml"
done
cat > "$work/chain/chain.yaml" <<'YAML'
policies:
  - name: chain
    route: { path: /, methods: [GET] }
    chain:
      - { name: a1, type: set_attribute, attribute: bench.one, value: "1" }
      - { name: a2, type: set_attribute, attribute: bench.two, value: "2" }
      - { name: a3, type: set_attribute, attribute: bench.three, value: "3" }
      - { name: hello, type: set_response, status: 200, body: "Hello, World!" }
YAML
sed 's|    route: { path: /, methods: \[GET\] }|&\n    monitoring: { enabled: false }|' "$work/chain/chain.yaml" > "$work/chain-off/chain.yaml"
grep -q 'enabled: false' "$work/chain-off/chain.yaml"
for set in refresh refresh-off; do
  enabled=$([ "$set" = refresh ] && echo true || echo false)
  python3 - "$enabled" > "$work/$set/token.yaml" <<'PY'
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
creds="$("$bin/gateway" clients add --policies "$work/refresh" --name bench --scopes read --json)"
id="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["client_id"])' "$creds")"
# The secret goes to the load generator in its environment, never on a command line.
secret="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["client_secret"])' "$creds")"

declare -A per
for case in ${CASES:-ceiling chain chain-off refresh refresh-off}; do
  port=$(free_port)
  if [ "$case" = ceiling ]; then
    server=("$bin/ceiling" "127.0.0.1:$port")
  else
    server=("$bin/gateway" run --policies "$work/$case" --listen "127.0.0.1:$port" --admin "127.0.0.1:$(free_port)")
  fi
  case $case in
    refresh*) load=(--client-id "$id"); secrets="$secret" ;;
    *) load=(--path /); secrets= ;;
  esac
  GATEWAY_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind ${CALLGRIND_OPTS:-} --callgrind-out-file="$work/$case.out" \
    "${server[@]}" > "$work/$case.log" 2>&1 &
  vpid=$!
  for _ in $(seq 1 120); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.5; done
  BENCH_CLIENT_SECRETS="$secrets" "$bin/bench" loadgen --addr "127.0.0.1:$port" --conns 8 --threads 1 --warmup 2 --secs 1 "${load[@]}" > /dev/null
  callgrind_control -z "$vpid" > /dev/null 2>&1
  BENCH_CLIENT_SECRETS="$secrets" "$bin/bench" loadgen --addr "127.0.0.1:$port" --conns 8 --threads 1 --warmup 0 --secs "$secs" "${load[@]}" > "$work/$case.load"
  callgrind_control -d "$vpid" > /dev/null 2>&1
  kill "$vpid"; wait "$vpid" 2>/dev/null || true
  total=$(grep -hE '^(summary|totals):' "$work/$case.out".1 | head -1 | awk '{print $2}')
  requests=$(grep -o '"requests":[0-9]*' "$work/$case.load" | cut -d: -f2)
  non2xx=$(grep -o '"non_2xx":[0-9]*' "$work/$case.load" | cut -d: -f2)
  [ "$non2xx" = 0 ] || { echo "$case: $non2xx answers were not 2xx" >&2; exit 1; }
  per[$case]=$((total / requests))
  [ -z "${KEEP:-}" ] || { mkdir -p "$KEEP"; cp "$work/$case.out".1 "$KEEP/$case.out"; }
  echo "$case: ${per[$case]} instructions per request ($requests requests)"
done
[ -z "${CASES:-}" ] || exit 0
python3 - "${per[ceiling]}" "${per[chain]}" "${per[chain-off]}" "${per[refresh]}" "${per[refresh-off]}" <<'PY'
import sys
ceiling, chain, chain_off, on, off = map(int, sys.argv[1:])
print(f"chain / ceiling = {chain/ceiling:.2f}; refresh / ceiling = {on/ceiling:.2f}")
print(f"monitoring on / off (chain) = {chain/chain_off:.4f} ({(chain/chain_off-1)*100:+.2f}% instructions per request)")
print(f"monitoring on / off (refresh) = {on/off:.4f} ({(on/off-1)*100:+.2f}% instructions per request)")
PY
