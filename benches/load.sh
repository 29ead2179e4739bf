#!/usr/bin/env bash
# Load test of the real binary, in one run: req/s and p99 latency of
#   (a) the demo origin directly, (b) corral cache hits in front of it, and their ratio.
#
#   benches/load.sh                 # 10 s per target, 64 connections, 1 KiB body
#   DURATION=30 CONNS=128 SIZE=16384 benches/load.sh
#   ROUNDS=7 benches/load.sh         # 7 alternating corral / nginx proxy_cache pairs: median ratio
#
# The server under test (origin or corral, one worker thread) is pinned to CPU 0 and wrk to
# CPU 1, so the two do not compete for a core. Needs wrk (Debian package `wrk`); measures nginx
# too when it is installed (Debian package `nginx`).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
SIZE=${SIZE:-1024}
command -v wrk >/dev/null || { echo "load.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }

source benches/common.sh

origin_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
taskset -c 0 target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
cat >"$dir/corral.toml" <<EOF
[server]
listen = "127.0.0.1:$proxy_port"
admin = "127.0.0.1:$admin_port"
threads = 1
[upstream]
address = "127.0.0.1:$origin_port"
[log]
level = "warn"
access_log = false
EOF
taskset -c 0 target/release/corral -c "$dir/corral.toml" >"$dir/corral.log" 2>&1 &
pids+=($!)
wait_port "$origin_port"; wait_port "$proxy_port"

# L2: when memcached is installed, a second corral whose L1 (1 KiB) cannot hold the object,
# so every request is an L2 hit from memcached (memcached pinned to CPU 0 with it)
l2_port=0
if command -v memcached >/dev/null; then
  mc_port=$(free_port); l2_port=$(free_port); l2_admin=$(free_port)
  taskset -c 0 memcached -p "$mc_port" -l 127.0.0.1 -U 0 -u root -t 1 >"$dir/memcached.log" 2>&1 &
  pids+=($!)
  cat >"$dir/corral-l2.toml" <<L2CONF
[server]
listen = "127.0.0.1:$l2_port"
admin = "127.0.0.1:$l2_admin"
threads = 1
[upstream]
address = "127.0.0.1:$origin_port"
[cache]
memory_bytes = "1KiB"
max_object_bytes = "1KiB"
[memcached]
servers = ["127.0.0.1:$mc_port"]
[log]
level = "warn"
access_log = false
L2CONF
  wait_port "$mc_port"
  taskset -c 0 target/release/corral -c "$dir/corral-l2.toml" >"$dir/corral-l2.log" 2>&1 &
  pids+=($!)
  wait_port "$l2_port"
fi

path="/bench?size=$SIZE"

# nginx, when installed: the same bytes as a static file, and proxy_cache hits in front of the
# same origin (one worker process, same pinning): the reference corral must beat
nginx_port=0; nginx_cache_port=0
if command -v nginx >/dev/null; then
  nginx_port=$(free_port); nginx_cache_port=$(free_port)
  mkdir -p "$dir/www" "$dir/nginx-cache"
  head -c "$SIZE" /dev/zero | tr '\0' x >"$dir/www/bench"
  nginx_conf "$nginx_cache_port" "" \
    "server { listen 127.0.0.1:$nginx_port; root $dir/www; location / { try_files /bench =404; } }"
  taskset -c 0 nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/nginx.log" 2>&1 &
  pids+=($!)
  wait_port "$nginx_port"; wait_port "$nginx_cache_port"
  curl -sf -o /dev/null "http://127.0.0.1:$nginx_cache_port$path"
fi
curl -sf -o /dev/null "http://127.0.0.1:$proxy_port$path"   # fill the cache
status=$(curl -sf -D - -o /dev/null "http://127.0.0.1:$proxy_port$path" | tr -d '\r' | grep -i '^cache-status' || true)
echo "warm-up: $status"

run() { # $1 = label, $2 = url
  local out rps p99
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$2")
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  printf '%-22s %12s req/s   p99 %s\n' "$1" "$rps" "$p99" >&2
  echo "$rps"
}

echo "wrk: ${DURATION}s, $CONNS connections, ${SIZE}-byte body; server on CPU 0, wrk on CPU 1" >&2
origin_rps=$(run "origin direct" "http://127.0.0.1:$origin_port$path")
hit_rps=$(run "corral cache hits" "http://127.0.0.1:$proxy_port$path")
python3 -c "print(f'ratio corral hits / origin direct: {$hit_rps / $origin_rps:.2f}x')"
if [ "$l2_port" != 0 ]; then
  l2_url="http://127.0.0.1:$l2_port/l2?size=$SIZE"
  curl -sf -o /dev/null "$l2_url"   # fills memcached (and cannot stay in the 1 KiB L1)
  sleep 0.5                          # the L2 write is asynchronous
  status=$(curl -sf -D - -o /dev/null "$l2_url" | tr -d '\r' | grep -i '^cache-status' || true)
  echo "L2 warm-up: $status" >&2
  l2_rps=$(run "corral L2 hits" "$l2_url")
  python3 -c "print(f'ratio corral L2 hits / L1 hits: {$l2_rps / $hit_rps:.2f}x; L2 hits / origin direct: {$l2_rps / $origin_rps:.2f}x')"
fi
if [ "$nginx_port" != 0 ]; then
  static_rps=$(run "nginx static file" "http://127.0.0.1:$nginx_port$path")
  ncache_rps=$(run "nginx proxy_cache hits" "http://127.0.0.1:$nginx_cache_port$path")
  python3 - <<PY
print(f"ratio nginx proxy_cache hits / nginx static: {$ncache_rps / $static_rps:.2f}x")
print(f"ratio corral hits / nginx static: {$hit_rps / $static_rps:.2f}x")
print(f"ratio corral hits / nginx proxy_cache hits: {$hit_rps / $ncache_rps:.2f}x")
PY
  # ROUNDS > 1: more alternating corral / nginx proxy_cache pairs, for a median that one
  # noisy run cannot swing
  ratios="$hit_rps/$ncache_rps"
  for _ in $(seq 2 "${ROUNDS:-1}"); do
    h=$(run "corral cache hits" "http://127.0.0.1:$proxy_port$path")
    n=$(run "nginx proxy_cache hits" "http://127.0.0.1:$nginx_cache_port$path")
    ratios="$ratios $h/$n"
  done
  if [ "${ROUNDS:-1}" -gt 1 ]; then
    python3 - "$ratios" <<'PY'
import statistics, sys
rs = [eval(p) for p in sys.argv[1].split()]
print("ratios corral hits / nginx proxy_cache hits, per round: " + " ".join(f"{r:.2f}" for r in rs))
print(f"median over {len(rs)} rounds: {statistics.median(rs):.2f}x")
PY
  fi
fi
