#!/usr/bin/env bash
# Drain benchmark: N idle sessions on one TiDB double behind tiproxy; that
# TiDB shuts down gracefully; how long until every session has moved to the
# other TiDB, how many moves per second, and whether any session was lost.
#
#   bench/migration.sh            (BENCH_SESSIONS=9500 by default)
#
# Sessions are capped at 9,000 by the machine's 20,000 file descriptor
# hard limit: the proxy holds two sockets per session, three while it moves.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_SESSIONS:-9000}
PROCS=${BENCH_IDLE_PROCS:-4}
OUT=bench/results/migration.md

scripts/install-deps.sh protobuf-compiler libmariadb-dev gcc
cargo build --release -q -p tiproxy-runtime -p tiproxy-sim
TMP=$(mktemp -d /tmp/tiproxy-drain.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; cp "$TMP/proxy.log" /tmp/drain-proxy.log 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
log() { echo "[$(date +%T)] $*" >&2; }
gcc -O2 -o "$TMP/myclient" bench/myclient.c $(mariadb_config --cflags --libs)

# Two TiDB instances that keep serving 60 s after a shutdown request, so the
# measurement is the proxy's moves, not the TiDB closing connections.
target/release/tidb-double --instances 2 --graceful-wait 60 >"$TMP/tidb.json" 2>"$TMP/tidb.log" &
pids+=($!)
for _ in $(seq 1 100); do [[ -s "$TMP/tidb.json" ]] && break; sleep 0.1; done
CONTROL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["control"])' "$TMP/tidb.json")
inst() { curl -s "http://$CONTROL/instances"; }
field() { inst | python3 -c "import json,sys; d=json.load(sys.stdin); d=d.get('instances',d) if isinstance(d,dict) else d; print(d[$1]['$2'])"; }
A_SQL=$(field 0 sql) A_ST=$(field 0 status) B_SQL=$(field 1 sql) B_ST=$(field 1 status)

# Take B down so every session lands on A.
curl -s -X POST "http://$CONTROL/instances/1/kill" >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
API=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$TMP/proxy.toml" <<TOML
[proxy]
addr = "127.0.0.1:$PORT"
pd-addrs = ""
backend-addrs = [{ addr = "$A_SQL", status-addr = "$A_ST" }, { addr = "$B_SQL", status-addr = "$B_ST" }]
[api]
addr = "127.0.0.1:$API"
[log]
level = "info"
# All sessions stay on A until it drains: no evening out by count when B
# comes back (the drain moves every one of them).
[balance]
policy = "connection"
[balance.conn-count]
count-ratio-threshold = 1000000
TOML
target/release/tiproxy --config "$TMP/proxy.toml" 2>"$TMP/proxy.log" &
PROXY=$!
pids+=($PROXY)
sleep 4
metric() { curl -s "http://127.0.0.1:$API/api/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}'; }

log "opening $N idle sessions through tiproxy (all on $A_SQL)"
"$TMP/myclient" idle 127.0.0.1 "$PORT" app app-Pa55word "$N" "$PROCS" >"$TMP/idle.out" 2>"$TMP/idle.err" &
CLIENT=$!
pids+=($CLIENT)
for _ in $(seq 1 600); do grep -q READY "$TMP/idle.out" 2>/dev/null && break; sleep 0.2; done
grep READY "$TMP/idle.out" >&2 || { cat "$TMP/idle.err" >&2; exit 1; }
OPENED=$(sed -n 's/^READY opened=\([0-9]*\).*/\1/p' "$TMP/idle.out")

log "bringing $B_SQL back and waiting for the proxy to see it healthy"
curl -s -X POST "http://$CONTROL/instances/1/restart" >/dev/null
for _ in $(seq 1 100); do
    [[ "$(curl -s "http://127.0.0.1:$API/api/metrics" | grep "tiproxy_backend_b_status{backend=\"$B_SQL\"}" | awk '{print $2}')" == 1 ]] && break
    sleep 0.1
done
sleep 4 # past the failed-backend pause
A_BEFORE=$(field 0 connections)
DISC_BEFORE=$(metric tiproxy_server_disconnection_total)

# The poll is curl and sed only: a python start-up per poll would take CPU
# from the drain it measures on a 2-core machine.
a_conns() { curl -s "http://$CONTROL/instances" | tr '{}' '\n\n' | grep '"index":0,' | sed -n 's/.*"connections":\([0-9]*\).*/\1/p'; }
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
TIDB=${pids[0]}
log "draining $A_SQL ($A_BEFORE sessions)"
P0=$(cpu_ticks "$PROXY") D0=$(cpu_ticks "$TIDB")
T0=$(date +%s.%N)
curl -s -X POST "http://$CONTROL/instances/0/shutdown" >/dev/null
while :; do
    a=$(a_conns)
    [[ -n "${BENCH_TRACE:-}" ]] && echo "$(date +%s.%N) $a pending=$(metric tiproxy_balance_pending_migrate)" >&2
    [[ "$a" == 0 ]] && break
    now=$(date +%s.%N)
    if python3 -c "import sys; sys.exit(0 if $now - $T0 > 60 else 1)"; then log "timeout: $a sessions left"; break; fi
    sleep 0.05
done
T1=$(date +%s.%N)
P1=$(cpu_ticks "$PROXY") D1=$(cpu_ticks "$TIDB")
sleep 1
SECS=$(python3 -c "print(f'{$T1 - $T0:.2f}')")
RATE=$(python3 -c "print(f'{$A_BEFORE / max($T1 - $T0, 1e-9):.0f}')")
HZ=$(getconf CLK_TCK)
PROXY_CPU=$(python3 -c "print(f'{($P1 - $P0) / $HZ:.2f}')")
TIDB_CPU=$(python3 -c "print(f'{($D1 - $D0) / $HZ:.2f}')")
PER_MOVE=$(python3 -c "print(f'{($P1 - $P0) / $HZ / max($A_BEFORE, 1) * 1e6:.0f}')")
B_AFTER=$(field 1 connections)
CONNS=$(metric tiproxy_server_connections)
DISC=$(( $(metric tiproxy_server_disconnection_total) - DISC_BEFORE ))
OK=$(curl -s "http://127.0.0.1:$API/api/metrics" | awk '/^tiproxy_balance_migrate_total/ && /migrate_res="succeed"/ {s+=$2} END {print s+0}')
FAIL=$(curl -s "http://127.0.0.1:$API/api/metrics" | awk '/^tiproxy_balance_migrate_total/ && /migrate_res="fail"/ {s+=$2} END {print s+0}')
mkdir -p bench/results
cat >"$OUT" <<MD
# Drain benchmark (bench/migration.sh)

- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(nproc) cores; tiproxy $(git rev-parse --short HEAD)
- $OPENED idle sessions opened through tiproxy, all on TiDB double A; A shut down gracefully (graceful-wait 60 s)

| measure | value |
| --- | ---: |
| sessions on A when the drain began | $A_BEFORE |
| time until A had no session | ${SECS} s |
| moves per second | $RATE |
| proxy CPU during the drain (user + system) | ${PROXY_CPU} s |
| proxy CPU per move | ${PER_MOVE} µs |
| TiDB double CPU during the drain (both instances, one process) | ${TIDB_CPU} s |
| sessions on B afterwards | $B_AFTER |
| client connections open at the proxy afterwards | $CONNS |
| client disconnections during the drain | $DISC |
| successful moves (metric) | $OK |
| failed moves (metric, retried) | $FAIL |

Target (issue 15): 9,000 moved in under 3 s with zero errors. The proxy, the
TiDB double and the clients share the machine's cores.
MD
cat "$OUT"
