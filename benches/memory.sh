#!/usr/bin/env bash
# L1 memory against its budget, measured as the kernel sees it (RSS), not corral's counter:
# fills a corral whose cache.memory_bytes is MEM with PASSES x 3 x MEM of distinct SIZE-byte
# objects (so most are evicted again), then prints RSS before and after, corral_l1_bytes, and
# RSS over memory_bytes.
#
#   benches/memory.sh                       # MEM=32MiB, SIZE=100000, PASSES=1
#   MEM=64MiB SIZE=10000 benches/memory.sh
#   OBJECTS=1000000 SIZE=100 MEM=4GiB benches/memory.sh   # overhead per entry: 1M small objects,
#                                                         # nothing evicted (OBJECTS replaces 3x MEM)
#   EVICTION=lru benches/memory.sh          # another eviction policy (default s3fifo)
#   VARY=accept-encoding benches/memory.sh  # responses that vary on that request field
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${MEM:-32MiB}
SIZE=${SIZE:-100000}
PASSES=${PASSES:-1}
source benches/common.sh

origin_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
start_corral "[cache]
memory_bytes = \"$MEM\"
eviction = \"${EVICTION:-s3fifo}\""
wait_port "$origin_port"; wait_port "$proxy_port"

rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$corral_pid/status"; }
metric() { python3 -c "
import sys, urllib.request
for l in urllib.request.urlopen('http://127.0.0.1:$admin_port/metrics').read().decode().splitlines():
    if l.startswith('$1 '): print(int(float(l.split()[1])))"; }

base=$(rss)
python3 - "$proxy_port" "$SIZE" "$MEM" "$PASSES" "${OBJECTS:-0}" "${VARY:-}" <<'PY'
import http.client, sys, threading
port, size, passes, objects = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
vary = f"&vary={sys.argv[6]}" if sys.argv[6] else ""
mem = sys.argv[3]
units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
budget = next(int(mem[:-3]) * m for u, m in units.items() if mem.endswith(u)) if not mem.isdigit() else int(mem)
n = objects or 3 * budget // size
def worker(k):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for p in range(passes):
        for i in range(k, n, 4):
            c.request("GET", f"/mem/{i}?size={size}{vary}")
            r = c.getresponse(); r.read()
            assert r.status == 200, r.status
threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(f"requests: {n * passes} distinct objects of {size} bytes ({n * size * passes / budget:.1f}x memory_bytes)")
PY
sleep 2  # let the eviction and the allocator settle
# the stored header: what the origin sends (status line and fields), as corral stores it
head=$(curl -s -D - -o /dev/null "http://127.0.0.1:$origin_port/mem/0?size=$SIZE${VARY:+&vary=$VARY}" | wc -c)
end=$(rss)
l1=$(metric corral_l1_bytes)
entries=$(metric corral_l1_entries)
python3 - "$base" "$end" "$l1" "$MEM" "$entries" "$SIZE" "$head" <<'PY'
import sys
base, end, l1, mem, entries, size, head = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
budget = next(int(mem[:-3]) * m for u, m in units.items() if mem.endswith(u))
M = 1 << 20
print(f"memory_bytes {budget / M:.1f} MiB; corral_l1_bytes {l1 / M:.1f} MiB")
print(f"RSS at start {base / M:.1f} MiB, after the fill {end / M:.1f} MiB")
print(f"RSS / memory_bytes: {end / budget:.2f}; (RSS - start) / memory_bytes: {(end - base) / budget:.2f}")
print(f"entries {entries}: RSS growth per entry {(end - base) / entries:.0f} bytes, {(end - base) / entries - size:.0f} beyond the body, {(end - base) / entries - size - head:.0f} beyond body and header ({head} bytes on the wire); weight per entry {l1 / entries:.0f}")
PY
