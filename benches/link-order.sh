#!/usr/bin/env bash
# Writes link/symbol-order.txt, the order build.rs gives the linker for corral's functions: the
# functions a release corral runs, under callgrind, for a start-up and then misses, hits, Vary
# variants, HEAD and range requests, purges, objects too large to keep, and the admin API;
# the busiest first. They then lie together in the binary, and fewer of its pages are mapped
# (README, "Where the RSS at α 0.8 goes"). Run it again when the list is stale (a new rustc or
# new dependencies rename the symbols; symbols not found are left where they are; build.rs
# warns when the rustc or Cargo.lock differs from the list's first two lines).
#
#   benches/link-order.sh     # needs valgrind (Debian package `valgrind`); then rebuild
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "link-order.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
source benches/common.sh

origin_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
CORRAL_WRAP="valgrind --tool=callgrind --demangle=no --compress-pos=no --callgrind-out-file=$dir/callgrind.out" \
  start_corral "[cache]
memory_bytes = \"4MiB\"
max_object_bytes = \"1MiB\"
[purge]
allow = [\"127.0.0.1/32\"]"
wait_port "$origin_port"
for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null && break; sleep 0.1; done
python3 - "$proxy_port" "$admin_port" <<'PY'
import http.client, sys
port, admin = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
def req(method, path, headers={}, want=None):
    c.request(method, path, headers=headers)
    r = c.getresponse(); r.read()
    assert want is None or r.status in want, (method, path, r.status)
for rnd in range(3):
    for i in range(400):
        req("GET", f"/mem/{i}?size={1000 + 37 * i}", want=(200,))
    for i in range(0, 400, 3):
        req("GET", f"/mem/{i}?size={1000 + 37 * i}&vary=accept-encoding", {"Accept-Encoding": "gzip"}, want=(200,))
        req("HEAD", f"/mem/{i}?size={1000 + 37 * i}", want=(200,))
        req("GET", f"/mem/{i}?size={1000 + 37 * i}", {"Range": "bytes=10-99"}, want=(206,))
    for i in range(0, 100, 7):
        req("PURGE", f"/mem/{i}?size={1000 + 37 * i}", want=(200, 404))
    for i in range(50):
        req("GET", f"/mem/big{i}?size=300000", want=(200,))
for _ in range(2000):
    req("GET", "/bench?size=1024", want=(200,))
a = http.client.HTTPConnection("127.0.0.1", admin, timeout=120)
for p in ["/metrics", "/keys", "/stats"]:
    a.request("GET", p)
    r = a.getresponse(); r.read()
    assert r.status == 200, (p, r.status)
PY
kill -INT "$corral_pid"; wait "$corral_pid" || true

python3 - "$dir/callgrind.out" link/symbol-order.txt "$(rustc --version)" <<'PY'
import collections, re, sys
names, objs, cost, obj_of = {}, {}, collections.Counter(), {}
cur = obj = None
after_call = False
for line in open(sys.argv[1]):
    # the cost line after `calls=` is the callee's inclusive cost: not the caller's own
    if after_call:
        after_call = False
        continue
    if line.startswith("calls="):
        after_call = True
        continue
    m = re.match(r"^(c?)(fn|ob|fl|fi|fe|cfi|cfl)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        called, kind, id_, name = m.groups()
        if kind == "fn":
            if name:
                names[id_] = name
            if not called:
                cur = id_
                obj_of[cur] = obj
        elif kind == "ob":
            if name:
                objs[id_] = name
            if not called:
                obj = id_
        continue
    if line[:1].isdigit() and cur is not None:
        parts = line.split()
        if len(parts) >= 2:
            cost[cur] += int(parts[1])
ours = [i for i in names if objs.get(obj_of.get(i), "").endswith("/corral")]
order, seen = [], set()
for i in sorted(ours, key=lambda i: -cost[i]):
    name = re.sub(r"'\d+$", "", names[i])   # callgrind's mark of a recursion level
    if not name.startswith("(") and name not in seen:
        seen.add(name)
        order.append(name)
assert len(order) > 300, f"only {len(order)} functions: did the workload run?"
# the first line names the rustc whose symbols these are, the second the Cargo.lock (FNV-1a,
# 64 bits): the dependencies' versions are in the names' hashes too. build.rs warns when either
# differs
lock = 0xcbf29ce484222325
for b in open("Cargo.lock", "rb").read():
    lock = ((lock ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
open(sys.argv[2], "w").write(f"# {sys.argv[3]}\n# Cargo.lock fnv1a64 {lock:016x}\n"
                             + "".join(n + "\n" for n in order))
print(f"link-order.sh: {len(order)} functions in {sys.argv[2]}; rebuild (cargo build --release) to use it")
PY
