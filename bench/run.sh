#!/usr/bin/env bash
# tiproxy vs HAProxy vs direct MariaDB: throughput, CPU per query, idle memory
# per connection and added latency. A benchmark, not a test: it always exits 0
# once it has measured something, and prints whether each target was met.
#
#   bench/run.sh                       # quick run (~6 min)
#   BENCH_SECONDS=60 BENCH_ROUNDS=3 bench/run.sh   # longer, steadier
#
# Results: printed at the end and written to bench/results/latest.md.
# Everything runs on private ports under a temp dir, stopped on exit.
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-20}          # seconds per sysbench run
BENCH_ROUNDS=${BENCH_ROUNDS:-2}             # direct,haproxy,tiproxy repeated this many times
BENCH_WARMUP=${BENCH_WARMUP:-3}             # seconds of unmeasured sysbench per target and workload
BENCH_THREADS=${BENCH_THREADS:-16}
BENCH_WORKLOADS=${BENCH_WORKLOADS:-"oltp_point_select oltp_read_only"}
BENCH_TABLES=${BENCH_TABLES:-1}
BENCH_TABLE_SIZE=${BENCH_TABLE_SIZE:-100000}
BENCH_IDLE_CONNS=${BENCH_IDLE_CONNS:-9900}
BENCH_IDLE_PROCS=${BENCH_IDLE_PROCS:-4}     # client processes opening the idle connections
BENCH_IDLE_SETTLE=${BENCH_IDLE_SETTLE:-3}   # seconds between last connect and the RSS reading
BENCH_LAT_QUERIES=${BENCH_LAT_QUERIES:-20000}
BENCH_LAT_ROUNDS=${BENCH_LAT_ROUNDS:-3}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}         # 1: keep the temp dir (logs, configs)
BENCH_PHASES=${BENCH_PHASES:-"throughput latency idle"}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TIPROXY_BIN=${TIPROXY_BIN:-$ROOT/target/release/tiproxy}
# Another tiproxy build (say the previous commit's) measured in the same run,
# alternating with the others: the report then gives this build / baseline.
TIPROXY_BASELINE_BIN=${TIPROXY_BASELINE_BIN:-}
RESULTS_DIR=$BENCH_DIR/results
RESULTS=$RESULTS_DIR/latest.md
START_TS=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[bench %4ss] %s\n' "$(($(date +%s) - START_TS))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- install
need_pkgs=()
command -v sysbench >/dev/null || need_pkgs+=(sysbench)
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
command -v mariadbd >/dev/null || need_pkgs+=(mariadb-server)
command -v mariadb >/dev/null || need_pkgs+=(mariadb-client)
command -v mariadb_config >/dev/null || need_pkgs+=(libmariadb-dev)
command -v gcc >/dev/null || need_pkgs+=(gcc libc6-dev)
command -v getconf >/dev/null || need_pkgs+=(libc-bin)
if ((${#need_pkgs[@]})); then
    log "installing: ${need_pkgs[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if [ ! -x "$TIPROXY_BIN" ]; then
    command -v cargo >/dev/null || die "no $TIPROXY_BIN and no cargo to build it"
    log "building tiproxy (cargo build --release -p tiproxy-runtime)"
    (cd "$ROOT" && cargo build --release -p tiproxy-runtime) >&2
fi
[ -x "$TIPROXY_BIN" ] || die "no tiproxy binary at $TIPROXY_BIN"
[ -z "$TIPROXY_BASELINE_BIN" ] || [ -x "$TIPROXY_BASELINE_BIN" ] || die "no baseline tiproxy binary at $TIPROXY_BASELINE_BIN"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
CLK_TCK=$(getconf CLK_TCK)

TMP=$(mktemp -d /tmp/tiproxy-bench.XXXXXX)
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

# ---------------------------------------------------------------- helpers
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
NEXT_PORT=$((20000 + RANDOM % 9000))
free_port() { # varname
    while port_busy "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    printf -v "$1" '%s' "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT + 1))
}
wait_port() { # port seconds pid
    for _ in $(seq $(($2 * 10))); do
        port_busy "$1" && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
alive() { kill -0 "$1" 2>/dev/null; }

free_port DB_PORT; free_port HA_PORT; free_port TP_PORT; free_port TP_API; free_port BL_PORT; free_port BL_API
SOCK=$TMP/mariadb.sock
DB_USER=bench DB_PASS=benchpw DB_NAME=sbtest
declare -A PORT=([direct]=$DB_PORT [haproxy]=$HA_PORT [tiproxy]=$TP_PORT)
TARGETS=(direct haproxy tiproxy)
if [ -n "$TIPROXY_BASELINE_BIN" ]; then PORT[baseline]=$BL_PORT; TARGETS+=(baseline); fi

gcc -O2 -o "$TMP/myclient" "$BENCH_DIR/myclient.c" $(mariadb_config --cflags --libs)

# ---------------------------------------------------------------- MariaDB
log "starting MariaDB on 127.0.0.1:$DB_PORT"
mariadb-install-db --no-defaults --user=root --datadir="$TMP/data" \
    --auth-root-authentication-method=normal >"$TMP/install-db.log" 2>&1 ||
    { cat "$TMP/install-db.log" >&2; die "mariadb-install-db failed"; }
mariadbd --no-defaults --user=root --datadir="$TMP/data" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --socket="$SOCK" --pid-file="$TMP/mariadb.pid" \
    --max-connections=20000 --max-connect-errors=1000000 --skip-name-resolve \
    --open-files-limit="$FD_LIMIT" --table-open-cache=200 --table-definition-cache=400 \
    --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
    --innodb-flush-log-at-trx-commit=2 --skip-log-bin --performance-schema=OFF \
    --thread-cache-size=100 --back-log=4096 --log-error="$TMP/mariadb.err" >>"$TMP/mariadb.err" 2>&1 &
DB_PID=$!
PIDS+=("$DB_PID")
SQL=(mariadb --no-defaults -uroot --socket="$SOCK")
for _ in $(seq 300); do "${SQL[@]}" -e 'SELECT 1' >/dev/null 2>&1 && break; alive "$DB_PID" || break; sleep 0.1; done
"${SQL[@]}" -e 'SELECT 1' >/dev/null 2>&1 || { tail -20 "$TMP/mariadb.err" >&2; die "MariaDB did not start"; }
"${SQL[@]}" <<SQL
DELETE FROM mysql.global_priv WHERE User = '';
FLUSH PRIVILEGES;
CREATE DATABASE $DB_NAME;
CREATE USER '$DB_USER'@'%' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON *.* TO '$DB_USER'@'%';
SQL
DB_MAXCONN=$("${SQL[@]}" -N -e 'SELECT @@max_connections')
DB_VERSION=$("${SQL[@]}" -N -e 'SELECT VERSION()')
log "MariaDB $DB_VERSION, max_connections=$DB_MAXCONN"

SB_COMMON=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user="$DB_USER"
    --mysql-password="$DB_PASS" --mysql-db="$DB_NAME" --tables="$BENCH_TABLES"
    --table-size="$BENCH_TABLE_SIZE")
log "sysbench prepare: $BENCH_TABLES table(s) x $BENCH_TABLE_SIZE rows"
sysbench oltp_read_only "${SB_COMMON[@]}" --mysql-port="$DB_PORT" prepare >"$TMP/prepare.log" 2>&1 ||
    { tail -20 "$TMP/prepare.log" >&2; die "sysbench prepare failed"; }

# ---------------------------------------------------------------- proxies
cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 9950
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    maxconn 9950
frontend mysql
    bind 127.0.0.1:$HA_PORT
    default_backend mariadb
backend mariadb
    server db1 127.0.0.1:$DB_PORT
EOF
cat >"$TMP/tiproxy.toml" <<EOF
[proxy]
addr = "127.0.0.1:$TP_PORT"
pd-addrs = ""
backend-addrs = ["127.0.0.1:$DB_PORT"]
[api]
addr = "127.0.0.1:$TP_API"
[log]
level = "warn"
EOF

sed -e "s/:$TP_PORT\"/:$BL_PORT\"/" -e "s/:$TP_API\"/:$BL_API\"/" "$TMP/tiproxy.toml" >"$TMP/baseline.toml"

HA_PID= TP_PID= BL_PID=
check_sql() { # port
    mariadb --no-defaults -h127.0.0.1 -P"$1" -u"$DB_USER" -p"$DB_PASS" -N -e 'SELECT 1' 2>&1
}
start_haproxy() {
    haproxy -db -f "$TMP/haproxy.cfg" >>"$TMP/haproxy.log" 2>&1 &
    HA_PID=$!; PIDS+=("$HA_PID")
    wait_port "$HA_PORT" 10 "$HA_PID" || { cat "$TMP/haproxy.log" >&2; die "HAProxy did not start"; }
    check_sql "$HA_PORT" >/dev/null || die "query through HAProxy failed: $(check_sql "$HA_PORT")"
}
start_tiproxy() {
    "$TIPROXY_BIN" --config "$TMP/tiproxy.toml" >>"$TMP/tiproxy.log" 2>&1 &
    TP_PID=$!; PIDS+=("$TP_PID")
    wait_port "$TP_PORT" 20 "$TP_PID" || { tail -20 "$TMP/tiproxy.log" >&2; die "tiproxy did not start"; }
    local out ok=0
    for _ in $(seq 50); do # give it time to see the backend as healthy
        if out=$(check_sql "$TP_PORT"); then ok=1; break; fi
        sleep 0.2
    done
    [ $ok = 1 ] || die "query through tiproxy failed: $out"
}
start_baseline() {
    "$TIPROXY_BASELINE_BIN" --config "$TMP/baseline.toml" >>"$TMP/baseline.log" 2>&1 &
    BL_PID=$!; PIDS+=("$BL_PID")
    wait_port "$BL_PORT" 20 "$BL_PID" || { tail -20 "$TMP/baseline.log" >&2; die "baseline tiproxy did not start"; }
    local out ok=0
    for _ in $(seq 50); do
        if out=$(check_sql "$BL_PORT"); then ok=1; break; fi
        sleep 0.2
    done
    [ $ok = 1 ] || die "query through the baseline tiproxy failed: $out"
}
untrack() { local keep=() p; for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS=("${keep[@]}"); }
stop_pid() { # pid
    untrack "$1"
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do alive "$1" || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
start_haproxy
start_tiproxy
log "HAProxy on :$HA_PORT (pid $HA_PID), tiproxy on :$TP_PORT (pid $TP_PID)"
declare -A PROXY_PID=([haproxy]=$HA_PID [tiproxy]=$TP_PID)
if [ -n "$TIPROXY_BASELINE_BIN" ]; then
    start_baseline
    PROXY_PID[baseline]=$BL_PID
    log "baseline tiproxy ($TIPROXY_BASELINE_BIN) on :$BL_PORT (pid $BL_PID)"
fi
THREADS_INFO="haproxy $(awk '/^Threads:/ {print $2}' "/proc/$HA_PID/status") threads, tiproxy $(awk '/^Threads:/ {print $2}' "/proc/$TP_PID/status") threads"
NOTES=()
note() { NOTES+=("$*"); log "NOTE: $*"; }

# ---------------------------------------------------------------- throughput
RUNS=$TMP/runs.tsv # workload target round qps p95_ms queries cpu_s errors reconnects
: >"$RUNS"
if [[ " $BENCH_PHASES " == *" throughput "* ]]; then
    for wl in $BENCH_WORKLOADS; do
        for t in "${TARGETS[@]}"; do
            sysbench "$wl" "${SB_COMMON[@]}" --mysql-port="${PORT[$t]}" --threads="$BENCH_THREADS" \
                --time="$BENCH_WARMUP" run >"$TMP/warmup-$wl-$t.log" 2>&1 ||
                note "warm-up $wl via $t failed: $(grep -m1 -E 'FATAL|error' "$TMP/warmup-$wl-$t.log")"
        done
        for r in $(seq "$BENCH_ROUNDS"); do
            for t in "${TARGETS[@]}"; do
                out=$TMP/sb-$wl-$t-$r.log
                pid=${PROXY_PID[$t]:-}
                c0=0; [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
                rc=0
                sysbench "$wl" "${SB_COMMON[@]}" --mysql-port="${PORT[$t]}" --threads="$BENCH_THREADS" \
                    --time="$BENCH_SECONDS" --percentile=95 run >"$out" 2>&1 || rc=$?
                cpu=NA
                if [ -n "$pid" ]; then
                    if alive "$pid"; then
                        cpu=$(awk -v a="$c0" -v b="$(cpu_ticks "$pid")" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')
                    else
                        note "$t (pid $pid) died during $wl round $r"
                    fi
                fi
                qps=$(grep -m1 -E '^ *queries:' "$out" | sed -E 's/.*\(([0-9.]+) per sec.*/\1/' || true)
                queries=$(grep -m1 -E '^ *queries:' "$out" | awk '{print $2}' || true)
                p95=$(grep -m1 '95th percentile' "$out" | awk '{print $NF}' || true)
                errs=$(grep -m1 'ignored errors' "$out" | awk '{print $3}' || true)
                recon=$(grep -m1 'reconnects' "$out" | awk '{print $2}' || true)
                if [ $rc != 0 ] || [ -z "$qps" ]; then
                    note "sysbench $wl via $t round $r failed (rc=$rc): $(grep -m3 -E 'FATAL|ERROR|error' "$out" | tr '\n' ' ')"
                    qps=NA queries=NA p95=NA
                fi
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$t" "$r" "$qps" "${p95:-NA}" \
                    "${queries:-NA}" "$cpu" "${errs:-NA}" "${recon:-NA}" >>"$RUNS"
                log "$wl round $r $t: qps=$qps p95=${p95}ms cpu=${cpu}s errors=${errs:-?}"
            done
        done
    done
fi

# ---------------------------------------------------------------- latency
LAT=$TMP/latency.tsv # target round mean_us p50_us p99_us
: >"$LAT"
if [[ " $BENCH_PHASES " == *" latency "* ]]; then
    for r in $(seq "$BENCH_LAT_ROUNDS"); do
        for t in "${TARGETS[@]}"; do
            if out=$("$TMP/myclient" latency 127.0.0.1 "${PORT[$t]}" "$DB_USER" "$DB_PASS" \
                "$BENCH_LAT_QUERIES" 1000 2>"$TMP/lat-$t-$r.err"); then
                mean=$(sed -E 's/.*mean_us=([^ ]+).*/\1/' <<<"$out")
                p50=$(sed -E 's/.*p50_us=([^ ]+).*/\1/' <<<"$out")
                p99=$(sed -E 's/.*p99_us=([^ ]+).*/\1/' <<<"$out")
                printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$mean" "$p50" "$p99" >>"$LAT"
                log "latency round $r $t: $out"
            else
                note "latency client via $t round $r failed: $(head -3 "$TMP/lat-$t-$r.err" | tr '\n' ' ') $out"
            fi
        done
    done
fi

# ---------------------------------------------------------------- idle memory
# Two open/close cycles per proxy: the first gives the growth per connection,
# the second shows whether memory freed on close is reused (no further growth)
# or keeps growing (a leak).
IDLE=$TMP/idle.tsv # proxy opened failed open_secs rss_before rss_open1 rss_closed1 rss_open2 rss_closed2 (KiB)
: >"$IDLE"
idle_cycle() { # proxy cycle -> sets CYC_OPENED CYC_FAILED CYC_SECS CYC_OPEN_RSS CYC_CLOSED_RSS
    local t=$1 c=$2 pid=${PROXY_PID[$1]} out=$TMP/idle-$1-$2.out cpid
    CYC_OPENED=0 CYC_FAILED=NA CYC_SECS=NA CYC_OPEN_RSS=NA CYC_CLOSED_RSS=NA
    "$TMP/myclient" idle 127.0.0.1 "${PORT[$t]}" "$DB_USER" "$DB_PASS" \
        "$BENCH_IDLE_CONNS" "$BENCH_IDLE_PROCS" >"$out" 2>"$TMP/idle-$t-$c.err" &
    cpid=$!; PIDS+=("$cpid")
    for _ in $(seq 1200); do grep -qs READY "$out" && break; alive "$cpid" || break; sleep 0.1; done
    if ! grep -qs READY "$out"; then
        note "idle client via $t (cycle $c) did not finish opening connections in 120 s: $(head -c 300 "$TMP/idle-$t-$c.err")"
        stop_pid "$cpid"
        return 1
    fi
    sleep "$BENCH_IDLE_SETTLE"
    if alive "$pid"; then CYC_OPEN_RSS=$(rss_kb "$pid"); else note "$t died holding idle connections (cycle $c)"; fi
    CYC_OPENED=$(sed -nE 's/^READY opened=([0-9]+).*/\1/p' "$out")
    CYC_FAILED=$(sed -nE 's/^READY .*failed=([0-9]+).*/\1/p' "$out")
    CYC_SECS=$(sed -nE 's/^READY .*secs=([0-9.]+).*/\1/p' "$out")
    [ "$CYC_FAILED" = 0 ] || note "$CYC_FAILED of $BENCH_IDLE_CONNS idle connections via $t (cycle $c) failed: $(sed -n 's/^FIRST_ERROR //p' "$out")"
    # the proxy must still serve a new client while holding them
    check_sql "${PORT[$t]}" >/dev/null || note "query via $t failed while holding idle connections: $(check_sql "${PORT[$t]}")"
    stop_pid "$cpid"
    sleep 3
    alive "$pid" && CYC_CLOSED_RSS=$(rss_kb "$pid")
    log "idle $t cycle $c: opened=$CYC_OPENED failed=$CYC_FAILED in ${CYC_SECS}s, RSS with conns ${CYC_OPEN_RSS} kB, after close ${CYC_CLOSED_RSS} kB"
}
if [[ " $BENCH_PHASES " == *" idle "* ]]; then
    # fresh proxies, so that buffers kept from the throughput runs do not hide growth
    stop_pid "$HA_PID"; stop_pid "$TP_PID"
    sleep 1
    start_haproxy; start_tiproxy
    PROXY_PID=([haproxy]=$HA_PID [tiproxy]=$TP_PID)
    for t in haproxy tiproxy; do
        sleep 1
        before=$(rss_kb "${PROXY_PID[$t]}")
        idle_cycle "$t" 1 || continue
        row="$t\t$CYC_OPENED\t$CYC_FAILED\t$CYC_SECS\t$before\t$CYC_OPEN_RSS\t$CYC_CLOSED_RSS"
        if idle_cycle "$t" 2; then row="$row\t$CYC_OPEN_RSS\t$CYC_CLOSED_RSS"; else row="$row\tNA\tNA"; fi
        printf "$row\n" >>"$IDLE"
    done
fi

# ---------------------------------------------------------------- report
for t in haproxy tiproxy; do alive "${PROXY_PID[$t]}" || note "$t is not running at the end of the benchmark"; done
TP_LOG_PROBLEMS=$(grep -ciE 'panic|error' "$TMP/tiproxy.log" || true)
if [ "${TP_LOG_PROBLEMS:-0}" != 0 ]; then
    note "tiproxy log has $TP_LOG_PROBLEMS error/panic lines; first: $(grep -m3 -iE 'panic|error' "$TMP/tiproxy.log" | cut -c1-300 | tr '\n' ' ')"
fi
TP_LOG_WARN=$(grep -ciE 'warn' "$TMP/tiproxy.log" || true)
[ "${TP_LOG_WARN:-0}" = 0 ] || note "tiproxy log has $TP_LOG_WARN warning lines; first: $(grep -m2 -i 'warn' "$TMP/tiproxy.log" | cut -c1-300 | tr '\n' ' ')"

mkdir -p "$RESULTS_DIR"
{
    echo "# tiproxy benchmark: direct MariaDB vs HAProxy vs tiproxy"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(nproc) cores, $(uname -r), fd limit $FD_LIMIT"
    echo "- MariaDB $DB_VERSION (max_connections $DB_MAXCONN), $(haproxy -v | head -1 | awk '{print "HAProxy", $3}') (nbthread 2), $(sysbench --version)"
    echo "- tiproxy: $TIPROXY_BIN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ', dirty tree'))"
    [ -s "$RUNS" ] && echo "- sysbench: $BENCH_THREADS threads, $BENCH_TABLES table(s) x $BENCH_TABLE_SIZE rows, ${BENCH_SECONDS}s per run, $BENCH_ROUNDS rounds alternating direct/haproxy/tiproxy, ${BENCH_WARMUP}s warm-up per target"
    echo "- everything (MariaDB, proxies, clients) shares the same $(nproc) cores; at start: $THREADS_INFO"
    echo "- load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine adds noise)"
    echo
    if [ -s "$RUNS" ]; then
        echo "## Throughput (sysbench, $BENCH_THREADS threads)"
        echo
        echo "QPS = total queries / total time over the rounds; p95 = mean of the rounds' p95;"
        echo "CPU = proxy process utime+stime per 1,000 queries."
        echo
        awk -F'\t' -v wls="$BENCH_WORKLOADS" '
        { k = $1 SUBSEP $2
          if ($4 != "NA") { n[k]++; q[k] += $6; tm[k] += $6 / $4; p[k] += $5; if ($7 != "NA") { c[k] += $7; cq[k] += $6 } } }
        END {
          printf "| workload | metric | direct | haproxy | tiproxy | tiproxy/haproxy | target |\n"
          printf "| --- | --- | ---: | ---: | ---: | ---: | --- |\n"
          split(wls, W, " ")
          for (i = 1; i in W; i++) {
            w = W[i]
            for (j = 1; j <= 3; j++) {
              split("direct haproxy tiproxy", T, " ")
              t = T[j]; k = w SUBSEP t
              qps[t] = n[k] ? q[k] / tm[k] : -1
              p95[t] = n[k] ? p[k] / n[k] : -1
              cpu[t] = cq[k] ? c[k] / cq[k] * 1000 : -1
            }
            row(w, "QPS", qps, "%.0f", ">= 1.0x", 1)
            row(w, "p95 latency (ms)", p95, "%.2f", "", 0)
            row(w, "proxy CPU s / 1k queries", cpu, "%.4f", "<= 1.0x", -1)
          }
        }
        function fmt(v, f) { return v < 0 ? "-" : sprintf(f, v) }
        function row(w, m, a, f, target, dir,   r, s) {
          r = (a["haproxy"] > 0 && a["tiproxy"] >= 0) ? a["tiproxy"] / a["haproxy"] : -1
          s = ""
          if (target != "" && r >= 0) s = ((dir > 0 && r >= 1.0) || (dir < 0 && r <= 1.0)) ? target " met" : target " NOT met"
          else if (target != "") s = target " (no data)"
          printf "| %s | %s | %s | %s | %s | %s | %s |\n", w, m, fmt(a["direct"], f), fmt(a["haproxy"], f), fmt(a["tiproxy"], f), fmt(r, "%.2fx"), s
        }' "$RUNS"
        echo
    fi
    if [ -s "$RUNS" ] && [ -n "$TIPROXY_BASELINE_BIN" ]; then
        echo "## This build vs the baseline build ($TIPROXY_BASELINE_BIN)"
        echo
        echo "Same run, rounds alternating; ratio = this build / baseline over all rounds, with the range of the per-round ratios."
        echo
        awk -F'\t' -v wls="$BENCH_WORKLOADS" '
        $4 != "NA" && ($2 == "tiproxy" || $2 == "baseline") {
          k = $1 SUBSEP $2; q[k] += $6; tm[k] += $6 / $4
          if ($7 != "NA") { c[k] += $7; cq[k] += $6 }
          rq[$1 SUBSEP $3 SUBSEP $2] = $4; rc[$1 SUBSEP $3 SUBSEP $2] = ($7 != "NA" && $6 > 0) ? $7 / $6 : -1
          rounds[$3] = 1
        }
        END {
          printf "| workload | metric | this build | baseline | ratio | per-round range |\n| --- | --- | ---: | ---: | ---: | --- |\n"
          split(wls, W, " ")
          for (i = 1; i in W; i++) {
            w = W[i]; t = w SUBSEP "tiproxy"; b = w SUBSEP "baseline"
            if (!tm[t] || !tm[b]) continue
            lo = 1e9; hi = -1; clo = 1e9; chi = -1
            for (r in rounds) {
              x = rq[w SUBSEP r SUBSEP "tiproxy"]; y = rq[w SUBSEP r SUBSEP "baseline"]
              if (x > 0 && y > 0) { v = x / y; if (v < lo) lo = v; if (v > hi) hi = v }
              x = rc[w SUBSEP r SUBSEP "tiproxy"]; y = rc[w SUBSEP r SUBSEP "baseline"]
              if (x > 0 && y > 0) { v = x / y; if (v < clo) clo = v; if (v > chi) chi = v }
            }
            qt = q[t] / tm[t]; qb = q[b] / tm[b]
            printf "| %s | QPS | %.0f | %.0f | %.2fx | %.2f-%.2f |\n", w, qt, qb, qt / qb, lo, hi
            if (cq[t] && cq[b]) {
              ct = c[t] / cq[t] * 1e6; cb = c[b] / cq[b] * 1e6
              printf "| %s | proxy CPU µs / query | %.1f | %.1f | %.2fx | %.2f-%.2f |\n", w, ct, cb, ct / cb, clo, chi
            }
          }
        }' "$RUNS"
        echo
    fi
    if [ -s "$LAT" ]; then
        echo "## Latency (one connection, $BENCH_LAT_QUERIES sequential SELECT 1, $BENCH_LAT_ROUNDS rounds alternating)"
        echo
        awk -F'\t' '
        { n[$1]++; m[$1] += $3; p50[$1] += $4; p99[$1] += $5 }
        END {
          d = n["direct"] ? m["direct"] / n["direct"] : -1
          d50 = n["direct"] ? p50["direct"] / n["direct"] : -1
          printf "| target | mean (µs) | p50 (µs) | p99 (µs) | added vs direct, mean (µs) | added vs direct, p50 (µs) |\n| --- | ---: | ---: | ---: | ---: | ---: |\n"
          split("direct haproxy tiproxy", T, " ")
          for (j = 1; j <= 3; j++) { t = T[j]; if (!n[t]) continue
            a[t] = m[t] / n[t] - d
            printf "| %s | %.1f | %.1f | %.1f | %s | %s |\n", t, m[t] / n[t], p50[t] / n[t], p99[t] / n[t], (t == "direct" || d < 0) ? "-" : sprintf("%+.1f", a[t]), (t == "direct" || d50 < 0) ? "-" : sprintf("%+.1f", p50[t] / n[t] - d50) }
          if (n["haproxy"] && n["tiproxy"] && d >= 0)
            printf "\ntiproxy adds %+.1f µs per SELECT 1 over direct, HAProxy %+.1f µs (tiproxy - haproxy: %+.1f µs): target <= HAProxy %s\n", a["tiproxy"], a["haproxy"], a["tiproxy"] - a["haproxy"], (a["tiproxy"] <= a["haproxy"]) ? "met" : "NOT met"
        }' "$LAT"
        echo
    fi
    if [ -s "$IDLE" ]; then
        echo "## Idle memory ($BENCH_IDLE_CONNS authenticated idle client connections, fresh proxy processes, RSS in KiB)"
        echo
        echo "Growth per connection = (RSS with connections - RSS before) / opened, first cycle."
        echo "A second cycle re-opens as many after all were closed."
        echo
        echo "| proxy | opened | failed | open time (s) | RSS before | RSS with conns | after close | 2nd cycle with conns | 2nd cycle after close | KiB per conn | target |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        awk -F'\t' '{
          per = ($6 != "NA" && $2 > 0) ? ($6 - $5) / $2 : -1
          tgt = ($1 == "tiproxy") ? ((per >= 0 && per <= 4) ? "<= 4 KiB met" : "<= 4 KiB NOT met") : ""
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, per < 0 ? "-" : sprintf("%.2f", per), tgt
        }' "$IDLE"
        echo
    fi
    if ((${#NOTES[@]})); then
        echo "## Problems seen"
        echo
        for n in "${NOTES[@]}"; do echo "- $n"; done
        echo
    fi
    if [ -s "$RUNS" ]; then
        echo "## Raw sysbench runs"
        echo
        echo "| workload | target | round | QPS | p95 (ms) | queries | proxy CPU (s) | ignored errors | reconnects |"
        echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }' "$RUNS"
        echo
    fi
    if [ -s "$LAT" ]; then
        echo "## Raw latency runs"
        echo
        echo "| target | round | mean (µs) | p50 (µs) | p99 (µs) |"
        echo "| --- | ---: | ---: | ---: | ---: |"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$LAT"
        echo
    fi
    echo "Total benchmark time: $(($(date +%s) - START_TS)) s. Re-run: \`bench/run.sh\` (env: TIPROXY_BIN, TIPROXY_BASELINE_BIN, BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS, BENCH_IDLE_CONNS, BENCH_LAT_QUERIES, BENCH_PHASES, BENCH_KEEP_TMP=1)."
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
log "results written to $RESULTS"
