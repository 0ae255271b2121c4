#!/usr/bin/env bash
# Traffic capture's cost: two tiproxy processes in front of one MariaDB,
# one capturing (`/api/traffic/capture`, gzip, for the whole run) and one
# not, and sysbench oltp_point_select runs alternating between them in one
# invocation (so both arms see the same machine noise). Measures proxy CPU
# per client command (utime+stime from /proc/<pid>/stat over a run /
# tiproxy_session_query_total over the run), capture on vs off
# (target <= 1.15x, issue 18), and the capture's bytes on disk per command.
#
# A benchmark, not a test: it exits 0 once it has measured something.
#
#   bench/capture.sh                                   # ~4 min
#   BENCH_SECONDS=30 BENCH_ROUNDS=7 bench/capture.sh
#
# Results: printed and written to bench/results/capture.md.
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-15}  # seconds per sysbench run
BENCH_ROUNDS=${BENCH_ROUNDS:-4}     # sysbench runs per arm (off, on alternating)
BENCH_WARMUP=${BENCH_WARMUP:-3}
BENCH_THREADS=${BENCH_THREADS:-8}
BENCH_TABLE_SIZE=${BENCH_TABLE_SIZE:-10000}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TIPROXY_BIN=${TIPROXY_BIN:-$ROOT/target/release/tiproxy}
RESULTS=$BENCH_DIR/results/capture.md
START_TS=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[capture-bench %4ss] %s\n' "$(($(date +%s) - START_TS))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

"$ROOT/scripts/install-deps.sh" sysbench curl mariadb-server mariadb-client >&2
if [ ! -x "$TIPROXY_BIN" ]; then
    command -v cargo >/dev/null || die "no $TIPROXY_BIN and no cargo to build it"
    log "building tiproxy (release)"
    (cd "$ROOT" && cargo build --release -p tiproxy-runtime --bin tiproxy) >&2
fi
CLK_TCK=$(getconf CLK_TCK)

TMP=$(mktemp -d /tmp/tiproxy-capture-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ "$BENCH_KEEP_TMP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
NEXT_PORT=$((20000 + RANDOM % 9000))
free_port() {
    while port_busy "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    printf -v "$1" '%s' "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT + 1))
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
alive() { kill -0 "$1" 2>/dev/null; }
metric() {
    curl -s -m 5 "http://127.0.0.1:$1/api/metrics" |
        awk -v m="$2" '($1 == m || index($1, m "{") == 1) {s += $2} END {printf "%.0f\n", s}'
}

# MariaDB in a temp directory, a password user for sysbench and the proxy.
free_port DB_PORT
mkdir -p "$TMP/data" "$TMP/tmp"
mariadb-install-db --no-defaults --user=root --datadir="$TMP/data" --tmpdir="$TMP/tmp" \
    --auth-root-authentication-method=normal --skip-test-db >"$TMP/install.log" 2>&1 ||
    { tail -20 "$TMP/install.log" >&2; die "mariadb-install-db failed"; }
/usr/sbin/mariadbd --no-defaults --user=root --datadir="$TMP/data" --tmpdir="$TMP/tmp" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --socket="$TMP/sock" --skip-name-resolve \
    --max-connections=1000 --innodb-flush-log-at-trx-commit=0 --log-error="$TMP/mariadb.log" &
DB_PID=$!; PIDS+=("$DB_PID")
for _ in $(seq 150); do
    mariadb --no-defaults --socket="$TMP/sock" -uroot -e 'select 1' >/dev/null 2>&1 && break
    alive "$DB_PID" || { tail -20 "$TMP/mariadb.log" >&2; die "mariadbd exited"; }
    sleep 0.2
done
mariadb --no-defaults --socket="$TMP/sock" -uroot -e "
    DELETE FROM mysql.global_priv WHERE User = '';
    CREATE USER sb@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('sb-Pa55');
    GRANT ALL ON *.* TO sb@'%';
    CREATE DATABASE sbtest;
    FLUSH PRIVILEGES;" || die "MariaDB setup failed"
log "MariaDB on :$DB_PORT"

SB=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user=sb --mysql-password=sb-Pa55
    --mysql-db=sbtest --tables=1 --table-size="$BENCH_TABLE_SIZE" --rand-type=uniform)
sysbench oltp_point_select "${SB[@]}" --mysql-port="$DB_PORT" prepare >"$TMP/prepare.log" 2>&1 ||
    { tail -20 "$TMP/prepare.log" >&2; die "sysbench prepare failed"; }

# start_proxy NAME: a tiproxy on free ports; sets <NAME>_PID, _PORT, _API.
start_proxy() {
    local name=$1 port api pid
    free_port port; free_port api
    cat >"$TMP/$name.toml" <<EOF
[proxy]
addr = "127.0.0.1:$port"
pd-addrs = ""
backend-addrs = ["127.0.0.1:$DB_PORT"]
[api]
addr = "127.0.0.1:$api"
[log]
level = "warn"
EOF
    "$TIPROXY_BIN" --config "$TMP/$name.toml" >>"$TMP/$name.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    for _ in $(seq 100); do
        curl -s -m 2 "http://127.0.0.1:$api/api/metrics" >/dev/null 2>&1 && port_busy "$port" && break
        alive "$pid" || { cat "$TMP/$name.log" >&2; die "tiproxy ($name) exited"; }
        sleep 0.2
    done
    printf -v "${name}_PID" '%s' "$pid"
    printf -v "${name}_PORT" '%s' "$port"
    printf -v "${name}_API" '%s' "$api"
}

start_proxy off
start_proxy on
log "tiproxy off :$off_PORT (pid $off_PID), on :$on_PORT (pid $on_PID)"
for arm in off on; do
    port_var=${arm}_PORT
    sysbench oltp_point_select "${SB[@]}" --mysql-port="${!port_var}" --threads="$BENCH_THREADS" \
        --time="$BENCH_WARMUP" run >"$TMP/warmup-$arm.log" 2>&1 ||
        die "warm-up ($arm) failed: $(tail -5 "$TMP/warmup-$arm.log")"
done
CAP=$TMP/capture
out=$(curl -s -m 5 -d "output=$CAP" -d "duration=1h" "http://127.0.0.1:$on_API/api/traffic/capture")
[ "$out" = "capture started" ] || die "capture did not start: $out"

RUNS=$TMP/runs.tsv # arm round cmds cpu_s tps
: >"$RUNS"
for r in $(seq "$BENCH_ROUNDS"); do
    for arm in off on; do
        pid_var=${arm}_PID port_var=${arm}_PORT api_var=${arm}_API
        pid=${!pid_var} api=${!api_var}
        q0=$(metric "$api" tiproxy_session_query_total)
        c0=$(cpu_ticks "$pid")
        out=$TMP/sb-$arm-$r.log
        sysbench oltp_point_select "${SB[@]}" --mysql-port="${!port_var}" --threads="$BENCH_THREADS" \
            --time="$BENCH_SECONDS" run >"$out" 2>&1 || log "sysbench failed: $(grep -m2 -E 'FATAL|error' "$out")"
        c1=$(cpu_ticks "$pid")
        alive "$pid" || die "tiproxy ($arm) died in round $r"
        sleep 0.5
        q1=$(metric "$api" tiproxy_session_query_total)
        tps=$(grep -m1 -E '^ *transactions:' "$out" | sed -E 's/.*\(([0-9.]+) per sec.*/\1/' || echo NA)
        cpu=$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')
        printf '%s\t%s\t%s\t%s\t%s\n' "$arm" "$r" "$((q1 - q0))" "$cpu" "${tps:-NA}" >>"$RUNS"
        log "round $r capture=$arm: commands=$((q1 - q0)) cpu=${cpu}s tps=$tps"
    done
done
curl -s -m 5 -X POST "http://127.0.0.1:$on_API/api/traffic/cancel" >/dev/null || true
for _ in $(seq 100); do [ -f "$CAP/meta" ] && break; sleep 0.1; done
SHOW=$(curl -s -m 5 "http://127.0.0.1:$on_API/api/traffic/show")
CAP_BYTES=$(du -sb "$CAP" | cut -f1)
CAP_CMDS=$(sed -E 's/.*"Cmds":([0-9]+).*/\1/' "$CAP/meta" 2>/dev/null || echo 0)

# Per arm: CPU microseconds per command (all rounds), its spread, TPS.
summary() {
    awk -v arm="$1" -F'\t' '$1 == arm && $3 > 0 {
        n++; cmds += $3; cpu += $4; tps += $5; per = $4 / $3 * 1e6
        if (n == 1 || per < lo) lo = per; if (n == 1 || per > hi) hi = per
    } END { if (cmds > 0) printf "%.2f %.2f %.2f %.0f %d\n", cpu / cmds * 1e6, lo, hi, tps / n, cmds; else print "NA NA NA NA 0" }' "$RUNS"
}
read -r OFF_US OFF_LO OFF_HI OFF_TPS OFF_CMDS < <(summary off)
read -r ON_US ON_LO ON_HI ON_TPS ON_CMDS < <(summary on)
RATIO=$(awk -v a="$ON_US" -v b="$OFF_US" 'BEGIN{ if (b > 0) printf "%.3f", a / b; else print "NA" }')
PER_CMD=$(awk -v b="$CAP_BYTES" -v n="$CAP_CMDS" 'BEGIN{ if (n > 0) printf "%.1f", b / n; else print "NA" }')
VERDICT=$(awk -v r="$RATIO" 'BEGIN{ print (r != "NA" && r <= 1.15) ? "meets" : "misses" }')

mkdir -p "$(dirname "$RESULTS")"
{
    echo "# Traffic capture overhead"
    echo
    echo "bench/capture.sh on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load before: $LOAD_START;"
    echo "MariaDB $(mariadbd --version | awk '{print $3}'), sysbench oltp_point_select, $BENCH_THREADS threads,"
    echo "$BENCH_ROUNDS rounds of ${BENCH_SECONDS}s per arm, alternating."
    echo
    echo "| arm | proxy CPU per command (µs) | per-round range | TPS | commands |"
    echo "|---|---|---|---|---|"
    echo "| capture off | $OFF_US | $OFF_LO-$OFF_HI | $OFF_TPS | $OFF_CMDS |"
    echo "| capture on (gzip) | $ON_US | $ON_LO-$ON_HI | $ON_TPS | $ON_CMDS |"
    echo
    echo "On/off: **${RATIO}x** ($VERDICT the issue's <= 1.15x). Capture on disk: $CAP_BYTES bytes for"
    echo "$CAP_CMDS commands ($PER_CMD bytes per command, gzip)."
    echo
    echo "The capture job at the end: \`$SHOW\`"
    echo
    echo "Raw rounds (arm, round, commands, CPU s, TPS):"
    echo
    echo '```'
    cat "$RUNS"
    echo '```'
} | tee "$RESULTS"
