#!/usr/bin/env bash
# Purge soak: a corral with memcached receives a purge every 100 ms (bans by URL pattern, tag
# purges, URL purges in turn) for DURATION seconds while a client reads pages; prints RSS at
# start and end and the purge records kept (count and bytes). Bounded: stops by itself.
#
#   benches/purge_soak.sh               # 300 s
#   DURATION=60 benches/purge_soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-300}
command -v memcached >/dev/null || { echo "purge_soak.sh: needs memcached (apt-get install memcached)" >&2; exit 1; }
source benches/common.sh

origin_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port); mc_port=$(free_port)
target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
memcached -p "$mc_port" -l 127.0.0.1 -U 0 -u root -m 64 >"$dir/memcached.log" 2>&1 &
pids+=($!)
start_corral "[memcached]
servers = [\"127.0.0.1:$mc_port\"]"
wait_port "$origin_port"; wait_port "$mc_port"; wait_port "$proxy_port"

python3 - "$proxy_port" "$admin_port" "$corral_pid" "$DURATION" <<'PY'
import http.client, sys, time
port, admin, pid, duration = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) * 1024
def metrics():
    c = http.client.HTTPConnection("127.0.0.1", admin)
    c.request("GET", "/metrics"); text = c.getresponse().read().decode()
    out = {}
    for l in text.splitlines():
        if l and not l.startswith("#"):
            k, v = l.rsplit(" ", 1); out[k] = float(v)
    return out
c = http.client.HTTPConnection("127.0.0.1", port)
errors = []
def req(method, path, headers={}):
    global c
    try:
        c.request(method, path, headers=dict({"Host": "soak.test"}, **headers))
        r = c.getresponse(); r.read(); return r.status
    except (OSError, http.client.HTTPException) as e:
        errors.append(f"{method} {path}: {e!r}")
        c = http.client.HTTPConnection("127.0.0.1", port)
        return 0
for i in range(200):
    req("GET", f"/soak/{i}")
M = 1 << 20
start_rss = rss()
print(f"RSS at start: {start_rss / M:.1f} MiB")
t0 = time.time(); n = 0; failed = 0
while time.time() - t0 < duration:
    kind = n % 3
    if kind == 0:
        s = req("BAN", "/", {"X-Url": f"^/soak/{n % 500}/page-{n}$"})
    elif kind == 1:
        s = req("PURGE", f"/soak/{n % 200}?v={n}")
    else:
        s = req("PURGEKEYS", "/", {"xkey-purge": f"tag-{n}"})
    failed += s != 200
    n += 1
    req("GET", f"/soak/{n % 200}")
    time.sleep(max(0.0, t0 + n * 0.1 - time.time()))
m = metrics()
end_rss = rss()
print(f"purges: {n} ({failed} not 200) in {time.time() - t0:.0f} s; connection errors: {len(errors)} {errors[:3]}")
print(f"RSS at end: {end_rss / M:.1f} MiB (+{(end_rss - start_rss) / M:.1f} MiB)")
print(f"corral_purge_records {m.get('corral_purge_records', 0):.0f}, corral_purge_record_bytes {m.get('corral_purge_record_bytes', 0):.0f}")
recs = m.get('corral_purge_records', 0)
if recs:
    print(f"RSS growth per record kept: {(end_rss - start_rss) / recs:.0f} bytes")
PY
