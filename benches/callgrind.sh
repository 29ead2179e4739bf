#!/usr/bin/env bash
# Instructions per cache hit in user space, counted by callgrind rather than timed: stable on a
# noisy machine where req/s swings by tens of percent between identical runs.
#
#   benches/callgrind.sh            # corral, and nginx proxy_cache when nginx is installed
#
# Each server runs under valgrind twice, answering 1,000 and then 5,000 hits of one 1 KiB
# object over 8 keep-alive connections; the difference of the two totals over 4,000 is the
# cost of one hit, start-up excluded. Needs valgrind (Debian package `valgrind`).
#
#   MEMCPY=vector benches/callgrind.sh   # glibc's memcpy without `rep movsb`, for both servers
#
# callgrind counts each byte a `rep movsb` moves as one instruction, and glibc's memcpy uses
# it for copies of 4 KiB and more: Pingora moves its per-request future (about 13.4 KB) into a
# box, which then counts as about 13.4k instructions of a corral hit, where the vector loop
# that glibc uses below that size takes about 1.3k. MEMCPY=vector sets glibc's threshold for
# it (`glibc.cpu.x86_rep_movsb_threshold`) above any copy of a hit, so that such a copy counts
# what its loop executes. Both figures are instructions as callgrind counts them; neither is
# time.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "callgrind.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
source benches/common.sh
case ${MEMCPY:-} in
  '') ;;
  vector) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.cpu.x86_rep_movsb_threshold=4194304" ;;
  *) echo "callgrind.sh: MEMCPY=$MEMCPY: vector or unset" >&2; exit 1 ;;
esac

origin_port=$(free_port)
target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)

# exactly $2 GETs of one URL on port $1, 8 connections in lock step
hits() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
req = b"GET /bench?size=1024 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
done = 0
while done < n:
    for c in conns:
        c.sendall(req)
    for c in conns:
        data = b""
        while True:
            data += c.recv(65536)
            end = data.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = data[:end].decode().lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(data) >= end + 4 + length:
                break
        done += 1
PY
}

# total instructions of one server run under callgrind that answers $2 hits; $1 = corral|nginx
count() {
  local who=$1 n=$2 port out=$dir/cg.$1.$2 pid
  port=$(free_port)
  if [ "$who" = corral ]; then
    printf '[server]\nlisten = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\nthreads = 1\n[upstream]\naddress = "127.0.0.1:%s"\n[log]\nlevel = "warn"\naccess_log = false\n' \
      "$port" "$(free_port)" "$origin_port" >"$dir/corral.toml"
    valgrind --tool=callgrind --callgrind-out-file="$out" target/release/corral -c "$dir/corral.toml" >"$dir/$who.log" 2>&1 &
  else
    rm -rf "$dir/nginx-cache"; mkdir -p "$dir/nginx-cache"
    nginx_conf "$port" "master_process off;" ""
    valgrind --tool=callgrind --callgrind-out-file="$out" nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/$who.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$port/bench?size=1024" && break; sleep 0.2; done
  curl -sf -o /dev/null "http://127.0.0.1:$port/bench?size=1024"   # stored; the rest are hits
  hits "$port" "$n"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [ -n "${KEEP_CALLGRIND:-}" ] && cp "$out" "$KEEP_CALLGRIND.$who.$n"
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

per_hit() { # $1 = corral|nginx
  local small big
  small=$(count "$1" 1000); big=$(count "$1" 5000)
  python3 -c "print(f'{\"$1\":<18} {($big - $small) / 4000:>8.0f} instructions per hit (user space)')"
}

per_hit corral
if [ "${NGINX:-1}" = 1 ] && command -v nginx >/dev/null; then per_hit nginx; fi
