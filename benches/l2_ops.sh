#!/usr/bin/env bash
# memcached operations per L2 lookup, counted by memcached itself, and L2-hit throughput.
#
#   benches/l2_ops.sh                          # this tree's release build
#   CORRAL=/path/to/other/corral benches/l2_ops.sh   # another build (e.g. an older commit)
#
# One corral whose L1 (1 KiB) cannot hold the 1 KiB object, so every request is an L2 lookup
# (a hit in memcached). memcached's `stats` (every get, set, delete, incr/decr and touch it
# served) are read before and after a wrk run of $DURATION seconds; their difference over the
# corral's own count of L2 lookups is the cost of one lookup, background reads included (the
# corral's purge log and generation watch). Needs memcached and wrk (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-16}
command -v wrk >/dev/null || { echo "l2_ops.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
command -v memcached >/dev/null || { echo "l2_ops.sh: needs memcached (apt-get install memcached)" >&2; exit 1; }

source benches/common.sh
CORRAL=${CORRAL:-target/release/corral}

origin_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port); mc_port=$(free_port)
taskset -c 0 target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
taskset -c 0 memcached -p "$mc_port" -l 127.0.0.1 -U 0 -u root -t 1 >"$dir/memcached.log" 2>&1 &
pids+=($!)
cat >"$dir/corral.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy_port"
admin = "127.0.0.1:$admin_port"
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
TOML
wait_port "$origin_port"; wait_port "$mc_port"
taskset -c 0 "$CORRAL" -c "$dir/corral.toml" >"$dir/corral.log" 2>&1 &
pids+=($!)
wait_port "$proxy_port"

url="http://127.0.0.1:$proxy_port/l2?size=1024"
curl -sf -o /dev/null "$url"   # fills memcached
sleep 0.5                      # the L2 write is asynchronous
curl -sf -D - -o /dev/null "$url" | tr -d '\r' | grep -i '^cache-status' >&2 || true

mc_ops() { # every operation memcached served
  python3 - "$mc_port" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"stats\r\n")
buf = b""
while not buf.endswith(b"END\r\n"):
    buf += s.recv(65536)
st = dict(l.split()[1:3] for l in buf.decode().splitlines() if l.startswith("STAT "))
keys = ["cmd_get", "cmd_set", "cmd_touch", "delete_hits", "delete_misses",
        "incr_hits", "incr_misses", "decr_hits", "decr_misses", "cas_hits", "cas_misses", "cas_badval"]
print(sum(int(st.get(k, 0)) for k in keys))
PY
}
lookups() {
  curl -sf "http://127.0.0.1:$admin_port/metrics" \
    | awk '/^corral_l2_lookups_total/ {s += $2} END {print s + 0}'
}

ops0=$(mc_ops); l0=$(lookups)
out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url")
ops1=$(mc_ops); l1=$(lookups)
rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
python3 - "$ops0" "$ops1" "$l0" "$l1" "$rps" "$p99" <<'PY'
import sys
o0, o1, l0, l1 = map(float, sys.argv[1:5])
print(f"L2 lookups: {l1 - l0:.0f}, memcached operations: {o1 - o0:.0f}, "
      f"operations per L2 lookup: {(o1 - o0) / max(l1 - l0, 1):.2f}")
print(f"L2 hits: {sys.argv[5]} req/s, p99 {sys.argv[6]}")
PY
