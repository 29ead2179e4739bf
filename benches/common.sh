# Shared by the load scripts (sourced from the repository root): release build, a scratch
# directory and the processes to stop on exit, loopback ports.
# (apart: the example's dev-dependencies would change the features, and with them the
# symbols' names, that build.rs's link order was written for)
cargo build --release --quiet --bin corral
cargo build --release --quiet --example origin
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# Start the release corral on $proxy_port / $admin_port in front of $origin_port, with two
# worker threads and these extra TOML sections ($1); sets $corral_pid. $CORRAL_ENV and
# $CORRAL_WRAP (e.g. valgrind) are put in front of it.
start_corral() {
  cat >"$dir/corral.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy_port"
admin = "127.0.0.1:$admin_port"
threads = 2
[upstream]
address = "127.0.0.1:$origin_port"
[log]
level = "warn"
access_log = false
$1
TOML
  env ${CORRAL_ENV:-} ${CORRAL_WRAP:-} target/release/corral -c "$dir/corral.toml" >"$dir/corral.log" 2>&1 &
  corral_pid=$!
  pids+=($corral_pid)
}

# nginx.conf of the reference: proxy_cache on port $1 in front of the origin ($origin_port);
# $2 = extra lines for the main context, $3 = extra server blocks, $4 = extra lines for its
# location
nginx_conf() {
  cat >"$dir/nginx.conf" <<NGINX
user root;
worker_processes 1;
$2
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  proxy_cache_path $dir/nginx-cache keys_zone=c:10m max_size=256m;
  $3
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://127.0.0.1:$origin_port;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache c;
      proxy_cache_lock on;
      ${4:-}
    }
  }
}
NGINX
}
