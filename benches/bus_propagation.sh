#!/usr/bin/env bash
# Purge propagation through RabbitMQ (issue 13): corral A and C on loopback with [bus], a
# broker of their own on a free port; benches/bus_propagation.py times, over COUNT sequential
# purges, A's answer (the broker's confirm) -> C having applied it, p50 / p99.
#
#   benches/bus_propagation.sh            # 1,000 purges
#   COUNT=5000 benches/bus_propagation.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-1000}
source benches/common.sh

rabbit_port=$(free_port)
# its own directory, which the rabbitmq user (the broker drops to it as root) can reach
rdir=$(mktemp -d /tmp/corral-bench-rabbit.XXXXXX); chmod 755 "$rdir"
chown -R rabbitmq:rabbitmq "$rdir" 2>/dev/null || true
node="corralbench$rabbit_port@localhost"
env RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$rabbit_port" \
  RABBITMQ_DIST_PORT=$((10000 + rabbit_port % 20000)) RABBITMQ_MNESIA_BASE="$rdir/mnesia" \
  RABBITMQ_LOG_BASE="$rdir/log" RABBITMQ_FEATURE_FLAGS_FILE="$rdir/ff" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$rdir/plugins" RABBITMQ_PLUGINS_EXPAND_DIR="$rdir/plugins-expand" \
  RABBITMQ_CONFIG_FILE="$rdir/rabbitmq" RABBITMQ_ADVANCED_CONFIG_FILE="$rdir/advanced.config" \
  RABBITMQ_PID_FILE="$rdir/pid" HOME="$rdir" /usr/sbin/rabbitmq-server >"$rdir/console.log" 2>&1 &
pids+=($!)
stop_rabbit() {
  # the Erlang VM runs as the rabbitmq user with the node name in its environment only
  for p in /proc/[0-9]*; do
    grep -qz "^RABBITMQ_NODENAME=$node\$" "$p/environ" 2>/dev/null && kill -9 "${p#/proc/}" 2>/dev/null
  done
  return 0
}
trap 'stop_rabbit; rm -rf "$rdir"; cleanup' EXIT
for i in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$rabbit_port") 2>/dev/null && break; sleep 0.1; done
((i < 600)) || { echo "RabbitMQ did not start:" >&2; tail -20 "$rdir/console.log" >&2; exit 1; }

origin_port=$(free_port)
target/release/examples/origin "127.0.0.1:$origin_port" >"$dir/origin.log" 2>&1 &
pids+=($!)
wait_port "$origin_port"

start_member() {
  cat >"$dir/corral-$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin = "127.0.0.1:$3"
threads = 1
[upstream]
address = "127.0.0.1:$origin_port"
[log]
level = "warn"
access_log = false
[bus]
amqp_url = "amqp://guest:guest@127.0.0.1:$rabbit_port/%2f"
exchange = "corral.bench"
TOML
  target/release/corral -c "$dir/corral-$1.toml" >"$dir/corral-$1.log" 2>&1 &
  pids+=($!)
}
a_port=$(free_port); a_admin=$(free_port); c_port=$(free_port); c_admin=$(free_port)
start_member a "$a_port" "$a_admin"
start_member c "$c_port" "$c_admin"
wait_port "$a_port"; wait_port "$c_port"; wait_port "$c_admin"
for _ in $(seq 300); do
  curl -s "127.0.0.1:$c_admin/metrics" | grep -q '^corral_bus_connected 1' \
    && curl -s "127.0.0.1:$a_admin/metrics" | grep -q '^corral_bus_connected 1' && break
  sleep 0.1
done
python3 benches/bus_propagation.py "$a_port" "$c_admin" "$COUNT"
