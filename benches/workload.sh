#!/usr/bin/env bash
# Cache efficiency on a realistic workload (issue 16), in one run: request and byte hit ratios,
# origin requests, throughput, latency, and memory at the end (RSS, and per cached object) of
# corral, nginx proxy_cache and Varnish, each with the same memory budget MEM, in front of the
# same origin, driven with the same request sequence (benches/workload.rs says how it is made).
#
#   benches/workload.sh                                         # 1M objects, 2M requests, 64 MiB
#   OBJECTS=20000 REQUESTS=100000 MEM=8MiB benches/workload.sh  # a quick try
#   ALPHA=1.0 SCAN=1 SYSTEMS=corral EVICTION=tinyufo benches/workload.sh
#
# Parameters (environment):
#   OBJECTS=1000000   distinct objects, sizes heavy-tailed (median ~3 KiB, a few over 1 MiB)
#   REQUESTS=2000000  Zipf requests per run (with the scan, OBJECTS more requests)
#   ALPHA="0.8 1.0"   Zipf exponents, one run each
#   SCAN="0 1"        0: no scan, 1: a crawler asks for every object once over the middle third
#   MEM=64MiB         the memory budget of each system (KiB/MiB/GiB, k/m/g, or bytes)
#   CONNECTIONS=32    keep-alive connections of the load generator
#   CORRAL_ENV="NAME=value ..." runs corral with these in its environment (allocator tunables)
#   SYSTEMS="corral nginx varnish"; EVICTION=lru|tinyufo|s3fifo sets corral's cache.eviction (unset:
#   corral's default, and the key is not written); TRIM=true|false sets cache.trim_allocator
#   (unset: the default); SEED=16; JSON_OUT=file appends one JSON
#   line per run (the load generator's figures and the memory ones)
#   NGINX_MANAGER_FILES=100 NGINX_MANAGER_SLEEP=50ms NGINX_MANAGER_THRESHOLD=200ms: nginx's
#   cache manager (its defaults); it evicts in the background and falls far behind max_size
#   under this load (README, Benchmarks)
#   SYSTEM_CPUS=0 CLIENT_CPUS=1: the system under test is pinned to SYSTEM_CPUS, the origin and
#   the load generator to CLIENT_CPUS (no pinning on a machine with one CPU)
#   VARNISH_PARAMS="-p nuke_limit=100000": Varnish's default nuke_limit (50 objects evicted to
#   make room for one) fails the fetch of a 4 MiB object into a storage full of small ones
#   (the client gets a 503 or a cut body); its shared memory log (vsl_space, 80 MB by default,
#   written in turn) is part of its RSS: add "-p vsl_space=1M" to leave it out.
#
# Each system starts empty for each run, and is stopped after it. Systems: corral (release
# build, one worker thread, cache.memory_bytes = MEM); nginx (one worker, proxy_cache on a tmpfs
# directory in /dev/shm with max_size = MEM and a keys_zone sized for OBJECTS keys, keep-alive
# to the origin); Varnish (varnishd -s malloc,MEM). A system that is not installed is skipped
# (apt-get install nginx varnish). Memory at the end, 2 s after the run: RSS and PSS summed over
# the system's processes (PSS counts the pages they share once: nginx's shared keys zone, each
# process's libraries), plus, for nginx, the cache files on tmpfs (its bodies live there, not
# in its processes); per cached object: (PSS + files) / objects cached (corral: the
# corral_l1_entries metric, nginx: files in the cache directory, Varnish: MAIN.n_object), and
# the growth over the run: (PSS at the end - PSS once started + files) / objects.
set -euo pipefail
cd "$(dirname "$0")/.."

OBJECTS=${OBJECTS:-1000000}
REQUESTS=${REQUESTS:-2000000}
ALPHA=${ALPHA:-0.8 1.0}
SCAN=${SCAN:-0 1}
MEM=${MEM:-64MiB}
CONNECTIONS=${CONNECTIONS:-32}
SYSTEMS=${SYSTEMS:-corral nginx varnish}
EVICTION=${EVICTION:-}
TRIM=${TRIM:-}
case $TRIM in
  '' | true | false) ;;
  *) echo "workload.sh: TRIM=$TRIM: true, false or unset" >&2; exit 1 ;;
esac
SEED=${SEED:-16}
JSON_OUT=${JSON_OUT:-}
SYSTEM_CPUS=${SYSTEM_CPUS:-0}
CLIENT_CPUS=${CLIENT_CPUS:-1}
VARNISH_PARAMS=${VARNISH_PARAMS:--p nuke_limit=100000}

mem_bytes=$(python3 - "$MEM" <<'PY'
import re, sys
m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)(i?[bB])?\s*", sys.argv[1])
if not m:
    sys.exit(f"workload.sh: MEM={sys.argv[1]!r} is not a size like 64MiB")
num, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3) or ""
base = 1000 if suffix in ("B", "b") and unit else 1024   # 64MB: decimal; 64MiB, 64m: binary
print(int(num * base ** " kmg".index(unit or " ")))
PY
)
[ "$mem_bytes" -ge 1048576 ] || { echo "workload.sh: MEM=$MEM is below 1 MiB" >&2; exit 1; }

# the bench binary (release-like `bench` profile): its path from cargo's JSON messages. Built
# before common.sh's release build: `cargo bench` also builds corral under the `bench` profile
# (not link-time optimised) and puts it at target/release/corral, where the release build is;
# common.sh's `cargo build --release` then puts the release build back, which is what runs
bench_bin=$(cargo bench --quiet --bench workload --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "workload" and m.get("executable"):
        print(m["executable"])
' | tail -n 1)
[ -x "$bench_bin" ] || { echo "workload.sh: cannot find the workload bench binary" >&2; exit 1; }
source benches/common.sh

# nginx's cache on tmpfs, like its memory; Varnish's jailed child must reach its work directory
shm=$(mktemp -d /dev/shm/corral-workload.XXXXXX 2>/dev/null || mktemp -d)
trap 'cleanup; rm -rf "$shm"' EXIT
chmod 755 "$dir"

if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  pin_sys=(taskset -c "$SYSTEM_CPUS"); pin_client=(taskset -c "$CLIENT_CPUS")
else
  pin_sys=(); pin_client=()
fi

origin_port=$(free_port)
"${pin_client[@]}" "$bench_bin" origin --port "$origin_port" --objects "$OBJECTS" --seed "$SEED" \
  >"$dir/origin.log" 2>&1 &
pids+=($!)
wait_port "$origin_port"
head -n 1 "$dir/origin.log"

# Wait for a system's port; on failure show its log. $1 = port, $2 = log, $3 = pid
wait_up() {
  for _ in $(seq 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || break
    sleep 0.05
  done
  echo "workload.sh: the system on port $1 did not start; its log ($2):" >&2
  tail -n 20 "$2" >&2
  return 1
}

# "rss pss processes" of a process and its descendants, in bytes
mem_of() {
  python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
children = {}
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        with open(f"/proc/{p}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        continue
    children.setdefault(ppid, []).append(int(p))
tree, todo = [], [root]
while todo:
    p = todo.pop()
    tree.append(p)
    todo.extend(children.get(p, []))
rss = pss = 0
for p in tree:
    try:
        with open(f"/proc/{p}/status") as f:
            rss += sum(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        with open(f"/proc/{p}/smaps_rollup") as f:
            pss += sum(int(l.split()[1]) * 1024 for l in f if l.startswith("Pss:"))
    except OSError:
        pass
print(rss, pss, len(tree))
PY
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# Start a system ($1) empty; sets sys_pid, sys_port, sys_log, sys_name. Returns 2 when it is
# skipped (not installed), 1 when it did not start.
start_system() {
  sys_port=$(free_port)
  sys_name=$1
  case $1 in
    corral)
      local admin eviction="" max_object=$((mem_bytes < 8388608 ? mem_bytes : 8388608))
      admin=$(free_port)
      if [ -n "$EVICTION" ]; then
        eviction="eviction = \"$EVICTION\""
        sys_name="corral-$EVICTION"
      fi
      corral_admin=$admin
      cat >"$dir/corral.toml" <<TOML
[server]
listen = "127.0.0.1:$sys_port"
admin = "127.0.0.1:$admin"
threads = 1
[upstream]
address = "127.0.0.1:$origin_port"
[cache]
memory_bytes = $mem_bytes
max_object_bytes = $max_object
$eviction
${TRIM:+trim_allocator = $TRIM}
[log]
level = "warn"
access_log = false
TOML
      sys_log=$dir/corral.log
      env ${CORRAL_ENV:-} "${pin_sys[@]}" target/release/corral -c "$dir/corral.toml" >"$sys_log" 2>&1 &
      ;;
    nginx)
      if ! command -v nginx >/dev/null; then
        echo "nginx: skipped (not installed: apt-get install nginx)"
        return 2
      fi
      rm -rf "$shm/nginx-cache"
      mkdir -p "$shm/nginx-cache"
      # about 8,000 keys per MiB of keys_zone (nginx's documentation)
      local zone_mib=$((OBJECTS / 8000 + 1))
      cat >"$dir/nginx.conf" <<NGINX
user root;
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  proxy_cache_path $shm/nginx-cache levels=1:2 keys_zone=c:${zone_mib}m max_size=$mem_bytes use_temp_path=off manager_files=${NGINX_MANAGER_FILES:-100} manager_sleep=${NGINX_MANAGER_SLEEP:-50ms} manager_threshold=${NGINX_MANAGER_THRESHOLD:-200ms};
  upstream origin {
    server 127.0.0.1:$origin_port;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$sys_port;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache c;
      proxy_cache_lock on;
    }
  }
}
NGINX
      sys_log=$dir/nginx.log
      "${pin_sys[@]}" nginx -c "$dir/nginx.conf" -p "$dir" >"$sys_log" 2>&1 &
      ;;
    varnish)
      if ! command -v varnishd >/dev/null; then
        echo "varnish: skipped (not installed: apt-get install varnish; stop the service it starts)"
        return 2
      fi
      rm -rf "$dir/varnish"
      local params
      read -r -a params <<<"$VARNISH_PARAMS"
      sys_log=$dir/varnish.log
      "${pin_sys[@]}" varnishd -F -n "$dir/varnish" -a "127.0.0.1:$sys_port" -b "127.0.0.1:$origin_port" \
        -s "malloc,$((mem_bytes / 1024))k" "${params[@]}" >"$sys_log" 2>&1 &
      ;;
    *)
      echo "workload.sh: unknown system $1 (corral, nginx, varnish)" >&2
      exit 1
      ;;
  esac
  sys_pid=$!
  pids+=($sys_pid)
  wait_up "$sys_port" "$sys_log" "$sys_pid"
}

# Objects the system holds now
cached_objects() {
  case $1 in
    corral)
      python3 - "$corral_admin" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
print(next((int(float(l.split()[1])) for l in text.splitlines() if l.startswith("corral_l1_entries ")), 0))
PY
      ;;
    nginx) find "$shm/nginx-cache" -type f | wc -l ;;
    varnish)
      varnishstat -1 -n "$dir/varnish" -f MAIN.n_object 2>/dev/null \
        | awk '$1 == "MAIN.n_object" { print $2; found = 1 } END { if (!found) print 0 }'
      ;;
  esac
}

failed=0
for alpha in $ALPHA; do
  for scan in $SCAN; do
    scan_args=()
    if [ "$scan" = 1 ]; then scan_args=(--scan); fi
    echo
    echo "== alpha $alpha, scan $([ "$scan" = 1 ] && echo yes || echo no): $OBJECTS objects, $REQUESTS Zipf requests, MEM $MEM ($mem_bytes bytes), $CONNECTIONS connections"
    for system in $SYSTEMS; do
      started=0
      start_system "$system" || started=$?
      if [ "$started" = 2 ]; then continue; fi
      if [ "$started" != 0 ]; then
        failed=1
        stop "$sys_pid"
        continue
      fi
      sleep 1   # Varnish's child, nginx's cache manager: all up before the first figure
      read -r _ pss_start _ < <(mem_of "$sys_pid")
      status=0
      "${pin_client[@]}" "$bench_bin" drive --target "$sys_name=http://127.0.0.1:$sys_port" \
        --origin "http://127.0.0.1:$origin_port" --objects "$OBJECTS" --seed "$SEED" \
        --requests "$REQUESTS" --alpha "$alpha" "${scan_args[@]}" --connections "$CONNECTIONS" \
        --json >"$dir/drive.out" || status=$?
      grep -v '^{' "$dir/drive.out" || true
      if [ "$status" != 0 ]; then
        failed=1
        echo "$sys_name: the run failed (exit $status); the system's log: $sys_log" >&2
        tail -n 5 "$sys_log" >&2 || true
      fi
      if [ "$system" = corral ] && [ "${TRIM:-true}" = true ] && [ "$status" = 0 ]; then
        # RSS at rest: the allocator trim after the last release (src/trim.rs) comes at least
        # 10 s after the one before (checked each second); wait up to 30 s for it
        python3 - "$corral_admin" <<'PY' || true
import sys, time, urllib.request
def trims():
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
    return next((float(l.split()[1]) for l in text.splitlines()
                 if l.startswith("corral_allocator_trim_duration_seconds_count ")), None)
start, t0 = trims(), time.monotonic()
if start is None:
    print("corral: no allocator trim in this build (not glibc)")
    sys.exit(0)
while trims() == start and time.monotonic() - t0 < 30:
    time.sleep(0.2)
came = "came" if trims() != start else "did not come"
print(f"corral: the allocator trim at rest {came} ({time.monotonic() - t0:.1f} s)")
PY
      fi
      sleep 2   # let eviction (nginx's cache manager) and the allocators settle
      read -r rss pss procs < <(mem_of "$sys_pid")
      files=0
      if [ "$system" = nginx ]; then files=$(du -s --block-size=1 "$shm/nginx-cache" | cut -f1); fi
      objects=$(cached_objects "$system" || echo 0)
      python3 - "$sys_name" "$rss" "$pss" "$procs" "$pss_start" "$files" "${objects:-0}" "$mem_bytes" \
        "$JSON_OUT" "$dir/drive.out" <<'PY'
import json, sys
name, rss, pss, procs, pss_start, files, objects, mem = sys.argv[1], *map(int, sys.argv[2:9])
json_out, drive_out = sys.argv[9], sys.argv[10]
M = 1 << 20
def per(x):
    return f"{x / objects:,.0f} B" if objects else "-"
print(f"{name:<10} memory: RSS {rss / M:.1f} MiB, PSS {pss / M:.1f} MiB ({procs} processes)"
      + (f" + cache files {files / M:.1f} MiB" if files else "")
      + f"; (PSS + files) / MEM {(pss + files) / mem:.2f}; {objects} objects cached:"
      f" {per(pss + files)} per object, {per(pss - pss_start + files)} growth per object")
if json_out:
    lines = [l for l in open(drive_out) if l.startswith("{")]
    record = json.loads(lines[-1]) if lines else {"system": name}
    record.update(mem_bytes=mem, rss_bytes=rss, pss_bytes=pss, pss_start_bytes=pss_start,
                  cache_file_bytes=files, processes=procs, cached_objects=objects)
    with open(json_out, "a") as f:
        f.write(json.dumps(record) + "\n")
PY
      if [ "$system" = corral ] && [ "$status" = 0 ]; then
        # what src/trim.rs did during the run: how often, and for how long in all
        python3 - "$corral_admin" "$sys_name" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
value = lambda n: next((float(l.split()[1]) for l in text.splitlines() if l.startswith(n + " ")), 0.0)
print(f"{sys.argv[2]:<10} allocator: free pages given back {value('corral_allocator_trim_duration_seconds_count'):.0f} times,"
      f" {value('corral_allocator_trim_duration_seconds_sum') * 1000:.0f} ms in all")
PY
      fi
      stop "$sys_pid"
    done
  done
done
if [ "$failed" != 0 ]; then
  echo "workload.sh: some runs failed (errors above)" >&2
  exit 1
fi
