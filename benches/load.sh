#!/usr/bin/env bash
# Load test of the real binary, in one run: req/s, MB/s and p99 latency of
#   (a) the demo origin directly, (b) corral cache hits in front of it, and their ratio; then,
#   when they are installed, the same bytes from nginx (a static file, proxy_cache hits and
#   `return 200` from memory) and Varnish cache hits, with corral's ratio to each.
#
#   benches/load.sh                 # 10 s per target, 64 connections, 1 KiB body
#   DURATION=30 CONNS=128 SIZE=16384 benches/load.sh
#   ROUNDS=7 benches/load.sh         # 7 alternating corral / nginx proxy_cache pairs: median ratio
#   SIZE=1048576 DURATION=10 benches/load.sh                    # large objects: read the MB/s
#   SIZE=8388608 RANGE=bytes=4194304-4259839 benches/load.sh   # 64 KiB ranges of an 8 MiB object
#
# Parameters (environment): DURATION=10 seconds per target; CONNS=64 wrk connections;
# SIZE=1024 body bytes; ROUNDS=1 (more: alternating corral / nginx proxy_cache pairs);
# RANGE=bytes=A-B: every measured request to a system that honours Range (corral, nginx static
# file, nginx proxy_cache with proxy_force_ranges, Varnish) carries `Range: $RANGE`, and the
# warm-up fails unless corral answers 206 with the range's Content-Length; the demo origin and
# nginx `return 200` ignore Range, so they are not measured then. MB/s = req/s x the body
# bytes of one response (the Content-Length seen in the warm-up), headers not counted. The
# warm-up prints the status, Content-Length (and Cache-Status) each system answers to one
# request made as measured.
#
# The server under test (origin, corral, nginx or Varnish: one worker thread / process / thread
# pool) is pinned to CPU 0 and wrk to CPU 1, so the two do not compete for a core. Needs wrk
# (Debian package `wrk`); measures nginx and Varnish too when they are installed (Debian
# packages `nginx`, `varnish`), and corral's L2 hits when memcached is. nginx `return 200` is
# measured only when SIZE <= 65536.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
SIZE=${SIZE:-1024}
RANGE=${RANGE:-}
command -v wrk >/dev/null || { echo "load.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }

# RANGE: the Range header for wrk and curl, and the body bytes a 206 answer carries
range_hdr=()
body=$SIZE
if [ -n "$RANGE" ]; then
  [[ $RANGE =~ ^bytes=([0-9]+)-([0-9]+)$ ]] \
    || { echo "load.sh: RANGE=$RANGE is not like bytes=0-65535" >&2; exit 1; }
  first=$((10#${BASH_REMATCH[1]})); last=$((10#${BASH_REMATCH[2]}))
  if [ "$first" -gt "$last" ] || [ "$first" -ge "$SIZE" ]; then
    echo "load.sh: RANGE=$RANGE is not satisfiable for SIZE=$SIZE" >&2; exit 1
  fi
  body=$(((last < SIZE ? last : SIZE - 1) - first + 1))
  range_hdr=(-H "Range: $RANGE")
fi

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
[cache]
eviction = "${EVICTION:-s3fifo}"
[log]
level = "warn"
access_log = false
EOF
taskset -c 0 target/release/corral -c "$dir/corral.toml" >"$dir/corral.log" 2>&1 &
pids+=($!)
wait_port "$origin_port"; wait_port "$proxy_port"

# L2: when memcached is installed, a second corral whose L1 cannot hold the object (its budget
# is the object's size, and an entry weighs more: body, header and bookkeeping, so it is
# refused as it is admitted), so every request is an L2 hit from memcached (memcached pinned
# to CPU 0 with it); measured only if its warm-up answer says `detail=l2`
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
memory_bytes = "$(((SIZE + 1023) / 1024))KiB"
max_object_bytes = "$(((SIZE + 1023) / 1024))KiB"
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

# nginx, when installed: the same bytes as a static file, as proxy_cache hits in front of the
# same origin, and (SIZE <= 65536) from memory with `return 200` (one worker process, same
# pinning): the references corral must beat
nginx_port=0; nginx_cache_port=0; nginx_ret_port=0
if command -v nginx >/dev/null; then
  nginx_port=$(free_port); nginx_cache_port=$(free_port)
  mkdir -p "$dir/www" "$dir/nginx-cache"
  head -c "$SIZE" /dev/zero | tr '\0' x >"$dir/www/bench"
  extra="server { listen 127.0.0.1:$nginx_port; root $dir/www; location / { try_files /bench =404; } }"
  if [ "$SIZE" -le 65536 ]; then
    # nginx refuses a configuration token over 4 KiB: a larger body is the concatenation of
    # constant map variables of 4,000 bytes (one copy per request into the answer)
    nginx_ret_port=$(free_port)
    chunk=$(head -c 4000 /dev/zero | tr '\0' x)
    if [ "$SIZE" -le 4000 ]; then
      ret_body=${chunk:0:SIZE}
    else
      ret_body=""; left=$SIZE; i=0
      while [ "$left" -gt 0 ]; do
        n=$((left < 4000 ? left : 4000))
        extra+=$'\n  '"map \$host \$ret_body_$i { default \"${chunk:0:n}\"; }"
        ret_body+="\$ret_body_$i"; left=$((left - n)); i=$((i + 1))
      done
    fi
    extra+=$'\n  '"server { listen 127.0.0.1:$nginx_ret_port; location / { return 200 \"$ret_body\"; } }"
  fi
  # the demo origin sends no Accept-Ranges, without which nginx answers a Range on a proxied
  # (cached) response with the whole body
  if [ -n "$RANGE" ]; then extra+=$'\n  proxy_force_ranges on;'; fi
  # X-Cache-Status: what the probe checks before measuring (HIT, or the figure is not hits)
  nginx_conf "$nginx_cache_port" "" "$extra" 'add_header X-Cache-Status $upstream_cache_status always;'
  taskset -c 0 nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/nginx.log" 2>&1 &
  pids+=($!)
  wait_port "$nginx_port"; wait_port "$nginx_cache_port"
  [ "$nginx_ret_port" = 0 ] || wait_port "$nginx_ret_port"
  curl -sf -o /dev/null "http://127.0.0.1:$nginx_cache_port$path"
fi

# Varnish, when installed: cache hits in front of the same origin (one thread pool, same
# pinning; -s malloc,256m like corral's default memory_bytes)
varnish_port=0
if command -v varnishd >/dev/null; then
  varnish_port=$(free_port)
  chmod 755 "$dir"   # Varnish's jailed child must reach its work directory
  taskset -c 0 varnishd -F -n "$dir/varnish" -a "127.0.0.1:$varnish_port" -b "127.0.0.1:$origin_port" \
    -s malloc,256m -p thread_pools=1 >"$dir/varnish.log" 2>&1 &
  pids+=($!)
  wait_port "$varnish_port"
  # its child (compiling the VCL first) accepts a second or so after the manager listens
  curl -sf --max-time 30 --retry 10 --retry-connrefused -o /dev/null "http://127.0.0.1:$varnish_port$path" \
    || { echo "load.sh: Varnish did not answer; its log:" >&2; tail -n 20 "$dir/varnish.log" >&2; exit 1; }
fi
curl -sf -o /dev/null "http://127.0.0.1:$proxy_port$path"   # fill the cache

# One request to $2 made as measured (with the Range header when RANGE is set); prints
# "warm-up $1: status, Content-Length[; Cache-Status]" and sets probe_code, probe_len. With $3,
# an extended regular expression that one of the answer's header lines must match (what shows
# a cache hit: Cache-Status for corral, X-Cache-Status for nginx, X-Varnish's two ids for
# Varnish): otherwise the run stops, rather than report a rate that is not one of hits.
probe() {
  local head cs
  head=$(curl -s -D - -o /dev/null "${range_hdr[@]}" "$2" | tr -d '\r')
  probe_code=$(awk 'NR == 1 {print $2}' <<<"$head")
  probe_len=$(awk -F': *' 'tolower($1) == "content-length" {print $2}' <<<"$head")
  cs=$(grep -iE '^(cache-status|x-cache-status|x-varnish):' <<<"$head" | paste -sd ';' - || true)
  printf 'warm-up %-22s %s, content-length %s%s\n' "$1" "${probe_code:-none}" "${probe_len:-none}" "${cs:+; $cs}"
  if [ -n "${3:-}" ] && ! grep -qiE "$3" <<<"$head"; then
    echo "load.sh: $1 is not answered from the cache (no header line matches '$3'):" >&2
    echo "$head" >&2
    exit 1
  fi
}

origin_len=$SIZE; static_len=$body; ncache_len=$body; ret_len=$SIZE; varnish_len=$body
if [ -z "$RANGE" ]; then
  probe "origin direct" "http://127.0.0.1:$origin_port$path"; origin_len=${probe_len:-$SIZE}
fi
probe "corral cache hits" "http://127.0.0.1:$proxy_port$path" '^cache-status: corral; hit'; hit_len=${probe_len:-$body}
if [ -n "$RANGE" ] && { [ "$probe_code" != 206 ] || [ "$probe_len" != "$body" ]; }; then
  echo "load.sh: corral answered $probe_code with Content-Length ${probe_len:-none} to Range: $RANGE (expected 206, $body)" >&2
  exit 1
fi
if [ "$nginx_port" != 0 ]; then
  probe "nginx static file" "http://127.0.0.1:$nginx_port$path"; static_len=${probe_len:-$body}
  probe "nginx proxy_cache hits" "http://127.0.0.1:$nginx_cache_port$path" '^x-cache-status: HIT'; ncache_len=${probe_len:-$body}
  if [ "$nginx_ret_port" != 0 ] && [ -z "$RANGE" ]; then
    probe "nginx return 200" "http://127.0.0.1:$nginx_ret_port$path"; ret_len=${probe_len:-$SIZE}
  fi
fi
if [ "$varnish_port" != 0 ]; then
  probe "varnish cache hits" "http://127.0.0.1:$varnish_port$path" '^x-varnish: [0-9]+ [0-9]+'; varnish_len=${probe_len:-$body}
fi

run() { # $1 = label, $2 = url, $3 = body bytes per response, then more wrk arguments
  local label=$1 url=$2 bytes=$3 out rps p99 mbs errs
  shift 3
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$@" "$url")
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  mbs=$(awk -v r="$rps" -v b="$bytes" 'BEGIN {printf "%.1f", r * b / 1e6}')
  errs=$(grep -E 'Non-2xx|Socket errors' <<<"$out" | sed 's/^ *//' | paste -sd ';' - || true)
  printf '%-22s %12s req/s %9s MB/s   p99 %s%s\n' "$label" "$rps" "$mbs" "$p99" "${errs:+   ($errs)}" >&2
  echo "$rps"
}

echo "wrk: ${DURATION}s, $CONNS connections, ${SIZE}-byte body${RANGE:+, Range: $RANGE ($body bytes)}; server on CPU 0, wrk on CPU 1" >&2
if [ -z "$RANGE" ]; then
  origin_rps=$(run "origin direct" "http://127.0.0.1:$origin_port$path" "$origin_len")
else
  echo "origin direct: not measured with RANGE (the demo origin ignores Range)" >&2
fi
hit_rps=$(run "corral cache hits" "http://127.0.0.1:$proxy_port$path" "$hit_len" "${range_hdr[@]}")
if [ -z "$RANGE" ]; then
  python3 -c "print(f'ratio corral hits / origin direct: {$hit_rps / $origin_rps:.2f}x')"
fi
if [ "$l2_port" != 0 ]; then
  l2_url="http://127.0.0.1:$l2_port/l2?size=$SIZE"
  curl -sf -o /dev/null "$l2_url"   # fills memcached (and cannot stay in that L1)
  sleep 0.5                          # the L2 write is asynchronous
  probe "corral L2 hits" "$l2_url" >&2
  l2_head=$(curl -s -D - -o /dev/null "${range_hdr[@]}" "$l2_url")
  if ! grep -qi '^cache-status:.*detail=l2' <<<"$l2_head"; then
    # e.g. an object over memcached's item limit (1 MB by default): never stored there
    echo "corral L2 hits: not measured, the warm-up answers are not L2 hits (Cache-Status above; memcached stores items up to 1 MB by default)" >&2
  else
    l2_rps=$(run "corral L2 hits" "$l2_url" "${probe_len:-$body}" "${range_hdr[@]}")
    python3 - <<PY
l2, hit = $l2_rps, $hit_rps
origin = ${origin_rps:-0}
print(f"ratio corral L2 hits / L1 hits: {l2 / hit:.2f}x" + (f"; L2 hits / origin direct: {l2 / origin:.2f}x" if origin else ""))
PY
  fi
fi
if [ "$nginx_port" != 0 ]; then
  static_rps=$(run "nginx static file" "http://127.0.0.1:$nginx_port$path" "$static_len" "${range_hdr[@]}")
  ncache_rps=$(run "nginx proxy_cache hits" "http://127.0.0.1:$nginx_cache_port$path" "$ncache_len" "${range_hdr[@]}")
  python3 - <<PY
print(f"ratio nginx proxy_cache hits / nginx static: {$ncache_rps / $static_rps:.2f}x")
print(f"ratio corral hits / nginx static: {$hit_rps / $static_rps:.2f}x")
print(f"ratio corral hits / nginx proxy_cache hits: {$hit_rps / $ncache_rps:.2f}x")
PY
  if [ "$nginx_ret_port" = 0 ]; then
    echo "nginx return 200: not measured (SIZE $SIZE > 65536)" >&2
  elif [ -n "$RANGE" ]; then
    echo "nginx return 200: not measured with RANGE (return ignores Range)" >&2
  else
    ret_rps=$(run "nginx return 200" "http://127.0.0.1:$nginx_ret_port$path" "$ret_len")
    python3 -c "print(f'ratio corral hits / nginx return 200: {$hit_rps / $ret_rps:.2f}x')"
  fi
  # ROUNDS > 1: more alternating corral / nginx proxy_cache pairs, for a median that one
  # noisy run cannot swing
  ratios="$hit_rps/$ncache_rps"
  for _ in $(seq 2 "${ROUNDS:-1}"); do
    h=$(run "corral cache hits" "http://127.0.0.1:$proxy_port$path" "$hit_len" "${range_hdr[@]}")
    n=$(run "nginx proxy_cache hits" "http://127.0.0.1:$nginx_cache_port$path" "$ncache_len" "${range_hdr[@]}")
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
if [ "$varnish_port" != 0 ]; then
  varnish_rps=$(run "varnish cache hits" "http://127.0.0.1:$varnish_port$path" "$varnish_len" "${range_hdr[@]}")
  python3 -c "print(f'ratio corral hits / varnish hits: {$hit_rps / $varnish_rps:.2f}x')"
fi
