#!/usr/bin/env bash
# Purge propagation latency between corrals (issue 11): corral A and N peers on loopback, all
# listing each other in [peers]. benches/propagation.py sends, over one keep-alive connection
# to A, COUNT sequential `PURGE /bench/<i>?wait=peers` (answered once every peer has applied
# the purge and said so: the round trip bounds "from A's accept to every peer having applied
# it") and COUNT plain PURGEs (answered once applied locally and queued), and prints p50 / p99
# of both, for each N. Exits non-zero if an answer is not 200, a peer result is not
# "delivered", or a peer's applied count does not reach what A sent.
#
#   benches/propagation.sh                  # N = 2 and 8, 1,000 purges each way
#   PEERS="2 4 8" COUNT=5000 benches/propagation.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=${PEERS:-2 8}
COUNT=${COUNT:-1000}
source benches/common.sh

origin_port=$(free_port)
target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
wait_port "$origin_port"

# Start corral number $1 of a fleet whose proxy ports are $ports (A first), its admin port
# being ${admins[$1]}; every corral lists every one, itself included (it skips itself).
start_member() {
  local i=$1 urls="" p
  for p in "${ports[@]}"; do urls+="\"http://127.0.0.1:$p\", "; done
  cat >"$dir/corral-$i.toml" <<TOML
[server]
listen = "127.0.0.1:${ports[$i]}"
admin = "127.0.0.1:${admins[$i]}"
threads = 1
[upstream]
address = "127.0.0.1:$origin_port"
[log]
level = "warn"
access_log = false
[peers]
urls = [${urls%, }]
token = "bench-token"
timeout = "1s"
retry_delay = "30s"
TOML
  target/release/corral -c "$dir/corral-$i.toml" >"$dir/corral-$i.log" 2>&1 &
  fleet_pids+=($!)
  pids+=($!)
}

for n in $PEERS; do
  ports=(); admins=(); fleet_pids=()
  for _ in $(seq 0 "$n"); do ports+=("$(free_port)"); admins+=("$(free_port)"); done
  for i in $(seq 0 "$n"); do start_member "$i"; done
  for i in $(seq 0 "$n"); do wait_port "${ports[$i]}"; wait_port "${admins[$i]}"; done
  echo "== A + $n peers, $COUNT purges each way (one keep-alive connection, sequential)"
  peer_urls=(); peer_admins=()
  for i in $(seq 1 "$n"); do
    peer_urls+=("http://127.0.0.1:${ports[$i]}")
    peer_admins+=("${admins[$i]}")
  done
  if ! python3 benches/propagation.py "${ports[0]}" "$COUNT" \
      "$(IFS=,; echo "${peer_urls[*]}")" "$(IFS=,; echo "${peer_admins[*]}")"; then
    for i in $(seq 0 "$n"); do
      echo "---- corral $i log (tail)" >&2; tail -n 20 "$dir/corral-$i.log" >&2
    done
    exit 1
  fi
  kill "${fleet_pids[@]}" 2>/dev/null || true
  wait "${fleet_pids[@]}" 2>/dev/null || true
done
