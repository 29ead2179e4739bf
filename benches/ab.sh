#!/usr/bin/env bash
# Two corral builds and nginx `return 200` in one run: 1 KiB hits, alternating 5 s wrk runs
# (ROUNDS rounds of base, new, nginx), each server pinned to CPU 0 with one worker, wrk on
# CPU 1, 64 connections (as benches/load.sh). Prints each round's rates and ratios, then the
# medians: a change measured against the build before it in the same minutes, on a machine
# where either server alone swings by tens of percent between runs.
#
#   git worktree add /tmp/base <commit> && (cd /tmp/base && CARGO_TARGET_DIR=$PWD/../main/target \
#     cargo build --release --bin corral) && cp target/release/corral /tmp/corral-base
#   benches/ab.sh /tmp/corral-base            # against the build of this tree
#
# ROUNDS=5, DURATION=5 (seconds). Needs wrk and nginx (Debian packages `wrk`, `nginx`).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: benches/ab.sh BASE_BINARY [NEW_BINARY]}
command -v wrk >/dev/null || { echo "ab.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "ab.sh: needs nginx (apt-get install nginx)" >&2; exit 1; }
source benches/common.sh
new=${2:-target/release/corral}
ROUNDS=${ROUNDS:-5}; DURATION=${DURATION:-5}

origin_port=$(free_port)
taskset -c 0 target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
declare -A port
for who in base new; do
  port[$who]=$(free_port)
  printf '[server]\nlisten = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\nthreads = 1\n[upstream]\naddress = "127.0.0.1:%s"\n[log]\nlevel = "warn"\naccess_log = false\n' \
    "${port[$who]}" "$(free_port)" "$origin_port" >"$dir/$who.toml"
  bin=$base; [ "$who" = new ] && bin=$new
  taskset -c 0 "$bin" -c "$dir/$who.toml" >"$dir/$who.log" 2>&1 &
  pids+=($!)
done
port[nginx]=$(free_port)
body=$(head -c 1024 /dev/zero | tr '\0' x)
# common.sh's nginx.conf (its proxy_cache server, unused here) with the `return 200` server
mkdir -p "$dir/nginx-cache"
nginx_conf "$(free_port)" "" "server { listen 127.0.0.1:${port[nginx]}; location / { return 200 \"$body\"; } }"
taskset -c 0 nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/nginx.log" 2>&1 &
pids+=($!)
for who in base new nginx; do wait_port "${port[$who]}"; done
path="/bench?size=1024"
for who in base new; do
  curl -sf -o /dev/null "http://127.0.0.1:${port[$who]}$path"
  status=$(curl -sf -D - -o /dev/null "http://127.0.0.1:${port[$who]}$path" | tr -d '\r' | grep -i '^cache-status:')
  echo "warm-up $who: $status"
  [[ $status == *"; hit"* ]] || { echo "ab.sh: $who does not answer hits" >&2; exit 1; }
done

rate() { taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$1$path" | awk '/Requests\/sec/ {print $2}'; }
rows=()
for r in $(seq "$ROUNDS"); do
  b=$(rate "${port[base]}"); n=$(rate "${port[new]}"); g=$(rate "${port[nginx]}")
  row=$(python3 -c "b,n,g=$b,$n,$g; print(f'{n/b:.2f} {n/g:.2f} {b/g:.2f}')")
  rows+=("$row")
  read -r nb ng bg <<<"$row"
  printf 'round %d: base %9.0f  new %9.0f  nginx return 200 %9.0f req/s   new/base %s  new/nginx %s  base/nginx %s\n' \
    "$r" "$b" "$n" "$g" "$nb" "$ng" "$bg"
done
printf '%s\n' "${rows[@]}" | python3 -c '
import sys, statistics
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
m = [statistics.median(c) for c in zip(*rows)]
print(f"median over {len(rows)} rounds: new/base {m[0]:.2f}x  new/nginx return 200 {m[1]:.2f}x  base/nginx return 200 {m[2]:.2f}x")'
