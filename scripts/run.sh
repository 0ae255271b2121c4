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
#
# Playground ports can be moved with PLAYGROUND_SQL_PORT (6000),
# PLAYGROUND_API_PORT (3080), PLAYGROUND_PD_PORT (2379; its peer port is the
# next one), PLAYGROUND_CONTROL_PORT (4080), PLAYGROUND_TIDB_SQL_BASE (4000)
# and PLAYGROUND_TIDB_STATUS_BASE (10080); PLAYGROUND_TIDBS (2) is the
# number of TiDB doubles at the start. TIPROXY_BIN_DIR=dir uses binaries
# already built there instead of the release build (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
SQL_PORT=${PLAYGROUND_SQL_PORT:-6000}
API_PORT=${PLAYGROUND_API_PORT:-3080}
PD_PORT=${PLAYGROUND_PD_PORT:-2379}
CONTROL_PORT=${PLAYGROUND_CONTROL_PORT:-4080}
TIDB_SQL_BASE=${PLAYGROUND_TIDB_SQL_BASE:-4000}
TIDB_STATUS_BASE=${PLAYGROUND_TIDB_STATUS_BASE:-10080}
TIDBS=${PLAYGROUND_TIDBS:-2}
bin=${TIPROXY_BIN_DIR:-target/release}
build() {
    if [[ -z "${TIPROXY_BIN_DIR:-}" ]]; then cargo build --release -q "$@"; fi
}

if [[ "${1:-}" == "--config" ]]; then
    scripts/install-deps.sh protobuf-compiler
    build -p tiproxy-runtime
    exec "$bin/tiproxy" "$@"
fi

scripts/install-deps.sh protobuf-compiler etcd-server mariadb-client sysbench
build -p tiproxy-runtime -p tiproxy-sim

dir=$(mktemp -d /tmp/tiproxy-playground.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

PD=127.0.0.1:$PD_PORT CONTROL=127.0.0.1:$CONTROL_PORT PEER=http://127.0.0.1:$((PD_PORT + 1))
echo "playground: starting etcd (PD) on $PD"
etcd --data-dir "$dir/etcd" --listen-client-urls "http://$PD" --advertise-client-urls "http://$PD" \
    --listen-peer-urls "$PEER" --initial-advertise-peer-urls "$PEER" \
    --initial-cluster "default=$PEER" >"$dir/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PD_PORT") 2>/dev/null && break; sleep 0.1; done
if ! (exec 3<>"/dev/tcp/127.0.0.1/$PD_PORT") 2>/dev/null; then
    echo "playground: etcd did not start on $PD:" >&2
    cat "$dir/etcd.log" >&2
    exit 1
fi

echo "playground: starting $TIDBS TiDB doubles (SQL $TIDB_SQL_BASE+, status $TIDB_STATUS_BASE+), registered in PD"
"$bin/tidb-double" --instances "$TIDBS" --sql-port-base "$TIDB_SQL_BASE" --status-port-base "$TIDB_STATUS_BASE" \
    --graceful-wait 5 --pd "$PD" --pd-ttl 10 --control-addr "$CONTROL" >"$dir/tidb.json" 2>"$dir/tidb.log" &
pids+=($!)
for _ in $(seq 1 100); do [[ -s "$dir/tidb.json" ]] && break; sleep 0.1; done
if [[ ! -s "$dir/tidb.json" ]]; then
    echo "playground: the TiDB doubles did not start:" >&2
    cat "$dir/tidb.log" >&2
    exit 1
fi

cat >"$dir/proxy.toml" <<TOML
[proxy]
addr = "127.0.0.1:$SQL_PORT"
pd-addrs = "$PD"
[api]
addr = "127.0.0.1:$API_PORT"
TOML

ctl="$bin/tiproxyctl --port $API_PORT"
# sysbench against the playground: the database `test` exists. The doubles'
# transactions are pessimistic, as TiDB's: conflicting writers wait for the
# row lock, so sysbench runs with its default error handling.
sb="sysbench oltp_read_write --mysql-host=127.0.0.1 --mysql-port=$SQL_PORT --mysql-user=root --mysql-db=test --tables=1 --table-size=10000 --rand-type=uniform"
tidb="$ctl tidb --control $CONTROL"
cat <<MSG

tiproxy is starting on 127.0.0.1:$SQL_PORT in front of the TiDB doubles.
  connect:     mariadb -h 127.0.0.1 -P $SQL_PORT -u root      (or -u app -papp-Pa55word)
               then: SHOW PROCESSLIST; SELECT @@port;
  TiDBs:       $tidb list
  scale out:   $tidb add                 (registers in PD; sessions spread)
  scale in:    $tidb shutdown 1          (graceful: its sessions move)
  kill one:    $tidb kill 1              (a crash: its sessions get an error)
  load one:    $tidb load 1 --cpu 0.9    (its /metrics: sessions move off it)
  the proxy:   $ctl backends | sessions | health
  status page: http://127.0.0.1:$API_PORT/
  sysbench:    $sb prepare
               $sb --threads=8 --time=60 --report-interval=1 run
               (scripts/demo.sh: 32 threads through scale-out, scale-in and a restart, with a graph)
Ctrl-C stops everything.

MSG
"$bin/tiproxy" --config "$dir/proxy.toml" &
proxy=$!
pids+=($proxy)
wait "$proxy"
