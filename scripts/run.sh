#!/usr/bin/env bash
# Runs tiproxy.
#
#   scripts/run.sh                      playground: a private etcd (PD), a TiDB
#                                       double cluster of 2 instances registered
#                                       in it, and tiproxy on 127.0.0.1:6000
#   scripts/run.sh --config my.toml     tiproxy with your configuration
#
# Installs what it needs (Debian packages, the release build) first.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--config" ]]; then
    scripts/install-deps.sh protobuf-compiler
    cargo build --release -q -p tiproxy-runtime
    exec target/release/tiproxy "$@"
fi

scripts/install-deps.sh protobuf-compiler etcd-server mariadb-client
cargo build --release -q -p tiproxy-runtime -p tiproxy-sim

dir=$(mktemp -d /tmp/tiproxy-playground.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

PD=127.0.0.1:2379 CONTROL=127.0.0.1:4080
echo "playground: starting etcd (PD) on $PD"
etcd --data-dir "$dir/etcd" --listen-client-urls "http://$PD" --advertise-client-urls "http://$PD" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 >"$dir/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null && break; sleep 0.1; done

echo "playground: starting 2 TiDB doubles (SQL 4000+, status 10080+), registered in PD"
target/release/tidb-double --instances 2 --sql-port-base 4000 --status-port-base 10080 \
    --graceful-wait 5 --pd "$PD" --pd-ttl 10 --control-addr "$CONTROL" >"$dir/tidb.json" 2>"$dir/tidb.log" &
pids+=($!)
for _ in $(seq 1 100); do [[ -s "$dir/tidb.json" ]] && break; sleep 0.1; done

cat >"$dir/proxy.toml" <<TOML
[proxy]
addr = "127.0.0.1:6000"
pd-addrs = "$PD"
[api]
addr = "127.0.0.1:3080"
TOML

cat <<MSG

tiproxy is starting on 127.0.0.1:6000 in front of the TiDB doubles.
  connect:     mariadb -h 127.0.0.1 -P 6000 -u root      (or -u app -papp-Pa55word)
               then: SHOW PROCESSLIST; SELECT @@port;
  scale out:   curl -X POST http://$CONTROL/instances
  scale in:    curl -X POST http://$CONTROL/instances/1/shutdown   (graceful: sessions move)
  kill one:    curl -X POST http://$CONTROL/instances/1/kill
  list TiDBs:  curl http://$CONTROL/instances
  the proxy:   target/release/tiproxyctl backends | sessions | health
Ctrl-C stops everything.

MSG
target/release/tiproxy --config "$dir/proxy.toml" &
proxy=$!
pids+=($proxy)
wait "$proxy"
