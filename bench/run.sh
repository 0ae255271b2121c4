#!/usr/bin/env bash
# tiproxy vs HAProxy (nbthread 1 and 2) vs direct MariaDB, on one machine,
# in one invocation: throughput and proxy CPU per query (sysbench), added
# latency of one connection, syscalls per query, large-row streaming, idle
# memory per connection (plain and TLS) and, optionally, the drain of idle
# sessions off a TiDB double (bench/migration.sh). Every ratio is against
# the better of the two HAProxy configurations for that measure, from
# rounds that alternate the targets (the start rotates every round).
# A benchmark, not a test: it exits 0 once it has measured something, and
# prints whether each target (issue 15) was met.
#
#   bench/run.sh                                   # ~25 min on 2 cores
#   BENCH_ROUNDS=3 BENCH_SECONDS=10 bench/run.sh   # quicker, noisier
#   BENCH_PHASES="throughput syscalls" bench/run.sh
#
# Results: printed at the end and written to bench/results/latest.md
# (bench/report.py formats them).
# Everything runs on private ports under a temp dir, stopped on exit.
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-15}          # seconds per sysbench run
BENCH_ROUNDS=${BENCH_ROUNDS:-5}             # every target once per round
BENCH_WARMUP=${BENCH_WARMUP:-3}             # seconds of unmeasured sysbench per target and workload
# workload:threads pairs
BENCH_WORKLOADS=${BENCH_WORKLOADS:-"oltp_point_select:16 oltp_read_only:16 oltp_point_select:1"}
BENCH_TABLES=${BENCH_TABLES:-1}
BENCH_TABLE_SIZE=${BENCH_TABLE_SIZE:-100000}
BENCH_IDLE_CONNS=${BENCH_IDLE_CONNS:-9900}
BENCH_IDLE_PROCS=${BENCH_IDLE_PROCS:-4}     # client processes opening the idle connections
BENCH_IDLE_SETTLE=${BENCH_IDLE_SETTLE:-3}   # seconds between last connect and the RSS reading
BENCH_IDLE_OPEN_SECS=${BENCH_IDLE_OPEN_SECS:-180} # time allowed to open them (TLS handshakes are slow on a busy machine)
BENCH_LAT_QUERIES=${BENCH_LAT_QUERIES:-20000}
BENCH_LAT_ROUNDS=${BENCH_LAT_ROUNDS:-5}
BENCH_SYSCALL_EVENTS=${BENCH_SYSCALL_EVENTS:-20000} # point selects traced per proxy
BENCH_BIG_ROWS=${BENCH_BIG_ROWS:-128}       # 1 MiB rows per query
BENCH_BIG_QUERIES=${BENCH_BIG_QUERIES:-8}   # queries per round
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}         # 1: keep the temp dir (logs, configs)
BENCH_PHASES=${BENCH_PHASES:-"throughput latency syscalls bigrows idle"} # add "drain" for bench/migration.sh

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
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v strace >/dev/null || need_pkgs+=(strace)
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
# utime stime (ticks) and voluntary / involuntary context switches over all threads
cpu_split() { echo "$(sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12, $13}') $(cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v + 0, n + 0}')"; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
alive() { kill -0 "$1" 2>/dev/null; }
cpu_secs() { awk -v a="$1" -v b="$2" -v h="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/h}'; }
NOTES=$TMP/notes.txt
: >"$NOTES"
note() { echo "$*" >>"$NOTES"; log "NOTE: $*"; }

free_port DB_PORT; free_port HA1_PORT; free_port HA2_PORT; free_port TP_PORT; free_port TP_API
free_port TLS_PORT; free_port TLS_API; free_port BL_PORT; free_port BL_API
SOCK=$TMP/mariadb.sock
DB_USER=bench DB_PASS=benchpw DB_NAME=sbtest
declare -A PORT=([direct]=$DB_PORT [haproxy1]=$HA1_PORT [haproxy2]=$HA2_PORT [tiproxy]=$TP_PORT [tiproxy-tls]=$TLS_PORT)
TARGETS=(direct haproxy1 haproxy2 tiproxy)
PROXIES=(haproxy1 haproxy2 tiproxy)
if [ -n "$TIPROXY_BASELINE_BIN" ]; then PORT[baseline]=$BL_PORT; TARGETS+=(baseline); PROXIES+=(baseline); fi

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
    --innodb-buffer-pool-size=512M --innodb-log-file-size=64M --max-allowed-packet=64M \
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
CREATE TABLE $DB_NAME.big (id INT PRIMARY KEY, b LONGBLOB);
INSERT INTO $DB_NAME.big SELECT seq, REPEAT('x', 1048576) FROM mysql.seq_1_to_$BENCH_BIG_ROWS;
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
for nt in 1 2; do
    port=${PORT[haproxy$nt]}
    cat >"$TMP/haproxy$nt.cfg" <<CFG
global
    nbthread $nt
    maxconn 9950
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    maxconn 9950
frontend mysql
    bind 127.0.0.1:$port
    default_backend mariadb
backend mariadb
    server db1 127.0.0.1:$DB_PORT
CFG
done
tiproxy_toml() { # port api [extra toml]
    printf '[proxy]\naddr = "127.0.0.1:%s"\npd-addrs = ""\nbackend-addrs = ["127.0.0.1:%s"]\n[api]\naddr = "127.0.0.1:%s"\n[log]\nlevel = "warn"\n%s' \
        "$1" "$DB_PORT" "$2" "${3:-}"
}
tiproxy_toml "$TP_PORT" "$TP_API" >"$TMP/tiproxy.toml"
tiproxy_toml "$BL_PORT" "$BL_API" >"$TMP/baseline.toml"
tiproxy_toml "$TLS_PORT" "$TLS_API" "$(printf '[security.server-tls]\nauto-certs = true\n')" >"$TMP/tiproxy-tls.toml"
printf 'workdir = "%s"\n' "$TMP/tls-work" | cat - "$TMP/tiproxy-tls.toml" >"$TMP/t" && mv "$TMP/t" "$TMP/tiproxy-tls.toml"

declare -A PROXY_PID=()
check_sql() { # port
    mariadb --no-defaults -h127.0.0.1 -P"$1" -u"$DB_USER" -p"$DB_PASS" -N -e 'SELECT 1' 2>&1
}
start_proxy() { # name
    local t=$1 pid out ok=0
    case $t in
        haproxy1 | haproxy2) haproxy -db -f "$TMP/$t.cfg" >>"$TMP/$t.log" 2>&1 & ;;
        baseline) "$TIPROXY_BASELINE_BIN" --config "$TMP/baseline.toml" >>"$TMP/baseline.log" 2>&1 & ;;
        *) "$TIPROXY_BIN" --config "$TMP/$t.toml" >>"$TMP/$t.log" 2>&1 & ;;
    esac
    pid=$!; PIDS+=("$pid"); PROXY_PID[$t]=$pid
    wait_port "${PORT[$t]}" 20 "$pid" || { tail -20 "$TMP/$t.log" >&2; die "$t did not start"; }
    for _ in $(seq 50); do # tiproxy checks the backend's health first
        if out=$(check_sql "${PORT[$t]}"); then ok=1; break; fi
        sleep 0.2
    done
    [ $ok = 1 ] || die "query through $t failed: $out"
}
untrack() { local keep=() p; for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS=("${keep[@]}"); }
stop_pid() { # pid
    untrack "$1"
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do alive "$1" || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
for t in "${PROXIES[@]}"; do start_proxy "$t"; done
THREADS_INFO=""
for t in "${PROXIES[@]}"; do THREADS_INFO+="$t $(awk '/^Threads:/ {print $2}' "/proc/${PROXY_PID[$t]}/status") threads; "; done
# Round r visits the targets starting at the r-th: drift over the run
# (page cache, CPU frequency, other work) falls on every target alike.
rotated() { # round -> targets in this round's order
    local r=$1 n=${#TARGETS[@]} i
    for ((i = 0; i < n; i++)); do echo "${TARGETS[$(((r + i) % n))]}"; done
}
has_phase() { [[ " $BENCH_PHASES " == *" $1 "* ]]; }

# ---------------------------------------------------------------- throughput
RUNS=$TMP/runs.tsv # workload threads target round qps queries cpu_s p95_ms errors reconnects user_s sys_s vcsw ivcsw
: >"$RUNS"
if has_phase throughput; then
    for spec in $BENCH_WORKLOADS; do
        wl=${spec%%:*} th=${spec##*:}
        [ "$th" != "$spec" ] || th=16
        for t in "${TARGETS[@]}"; do
            sysbench "$wl" "${SB_COMMON[@]}" --mysql-port="${PORT[$t]}" --threads="$th" \
                --time="$BENCH_WARMUP" run >"$TMP/warmup-$wl-$th-$t.log" 2>&1 ||
                note "warm-up $wl/$th via $t failed: $(grep -m1 -E 'FATAL|error' "$TMP/warmup-$wl-$th-$t.log")"
        done
        for r in $(seq "$BENCH_ROUNDS"); do
            for t in $(rotated "$r"); do
                out=$TMP/sb-$wl-$th-$t-$r.log
                pid=${PROXY_PID[$t]:-}
                c0=0; [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
                split0="NA NA NA NA"; [ -n "$pid" ] && split0=$(cpu_split "$pid")
                rc=0
                sysbench "$wl" "${SB_COMMON[@]}" --mysql-port="${PORT[$t]}" --threads="$th" \
                    --time="$BENCH_SECONDS" --percentile=95 run >"$out" 2>&1 || rc=$?
                cpu=NA split="NA NA NA NA"
                if [ -n "$pid" ]; then
                    if alive "$pid"; then
                        cpu=$(cpu_secs "$c0" "$(cpu_ticks "$pid")")
                        split=$(awk -v h="$CLK_TCK" '{printf "%.3f %.3f %d %d", ($5 - $1) / h, ($6 - $2) / h, $7 - $3, $8 - $4}' \
                            <<<"$split0 $(cpu_split "$pid")")
                    else note "$t (pid $pid) died during $wl round $r"; fi
                fi
                qps=$(grep -m1 -E '^ *queries:' "$out" | sed -E 's/.*\(([0-9.]+) per sec.*/\1/' || true)
                queries=$(grep -m1 -E '^ *queries:' "$out" | awk '{print $2}' || true)
                p95=$(grep -m1 '95th percentile' "$out" | awk '{print $NF}' || true)
                errs=$(grep -m1 'ignored errors' "$out" | awk '{print $3}' || true)
                recon=$(grep -m1 'reconnects' "$out" | awk '{print $2}' || true)
                if [ $rc != 0 ] || [ -z "$qps" ]; then
                    note "sysbench $wl/$th via $t round $r failed (rc=$rc): $(grep -m3 -E 'FATAL|ERROR|error' "$out" | tr '\n' ' ')"
                    qps=NA queries=NA p95=NA
                fi
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$th" "$t" "$r" "$qps" "${queries:-NA}" \
                    "$cpu" "${p95:-NA}" "${errs:-NA}" "${recon:-NA}" "${split// /$'\t'}" >>"$RUNS"
                log "$wl/$th round $r $t: qps=$qps cpu=${cpu}s errors=${errs:-?}"
            done
        done
    done
fi

# ---------------------------------------------------------------- latency
LAT=$TMP/latency.tsv # target round mean_us p50_us p99_us
: >"$LAT"
if has_phase latency; then
    for r in $(seq "$BENCH_LAT_ROUNDS"); do
        for t in $(rotated "$r"); do
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

# ---------------------------------------------------------------- syscalls
# strace counts every syscall of the proxy process (all threads) while
# sysbench runs a fixed number of point selects through it. strace slows
# the proxy a lot, so only the counts are used, never the time.
SYS=$TMP/syscalls.tsv # target queries total writes reads reads_eagain epoll other
: >"$SYS"
if has_phase syscalls; then
    for t in "${PROXIES[@]}"; do
        pid=${PROXY_PID[$t]}
        strace -f -c -p "$pid" -o "$TMP/strace-$t.txt" 2>"$TMP/strace-$t.err" &
        spid=$!
        sleep 1
        sysbench oltp_point_select "${SB_COMMON[@]}" --mysql-port="${PORT[$t]}" --threads=16 \
            --time=0 --events="$BENCH_SYSCALL_EVENTS" run >"$TMP/sys-$t.log" 2>&1 || note "sysbench under strace via $t failed"
        kill -INT "$spid" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
        queries=$(grep -m1 -E '^ *queries:' "$TMP/sys-$t.log" | awk '{print $2}' || true)
        if [ -z "$queries" ] || [ ! -s "$TMP/strace-$t.txt" ]; then note "syscall count via $t failed: $(head -2 "$TMP/strace-$t.err")"; continue; fi
        awk -v t="$t" -v q="$queries" '
            $NF ~ /^(sendto|write|writev|sendmsg)$/ { w += $4 }
            $NF ~ /^(recvfrom|read|readv|recvmsg)$/ { r += $4; if (NF == 6) e += $5 }
            $NF ~ /^epoll_(wait|pwait|pwait2)$/ { p += $4 }
            $NF == "total" { tot = $4 }
            END { printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t, q, tot, w, r, e + 0, p, tot - w - r - p }
        ' "$TMP/strace-$t.txt" >>"$SYS"
        log "syscalls via $t: $(tail -1 "$SYS")"
    done
fi

# ---------------------------------------------------------------- big rows
BIG=$TMP/bigrows.tsv # target round bytes secs cpu_s
: >"$BIG"
if has_phase bigrows; then
    for r in $(seq "$BENCH_ROUNDS"); do
        for t in $(rotated "$r"); do
            pid=${PROXY_PID[$t]:-}
            c0=0; [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
            if out=$("$TMP/myclient" bigrows 127.0.0.1 "${PORT[$t]}" "$DB_USER" "$DB_PASS" \
                "$BENCH_BIG_ROWS" "$BENCH_BIG_QUERIES" 2>"$TMP/big-$t-$r.err"); then
                cpu=NA; [ -n "$pid" ] && cpu=$(cpu_secs "$c0" "$(cpu_ticks "$pid")")
                bytes=$(sed -E 's/.*bytes=([^ ]+).*/\1/' <<<"$out")
                secs=$(sed -E 's/.*secs=([^ ]+).*/\1/' <<<"$out")
                printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$bytes" "$secs" "$cpu" >>"$BIG"
                log "big rows round $r $t: $out cpu=${cpu}s"
            else
                note "big-row client via $t round $r failed: $(head -3 "$TMP/big-$t-$r.err" | tr '\n' ' ')"
            fi
        done
    done
fi

# ---------------------------------------------------------------- idle memory
# Two open/close cycles per proxy on a fresh process: the first gives the
# growth per connection, the second shows whether memory freed on close is
# reused (no further growth) or keeps growing (a leak).
IDLE=$TMP/idle.tsv # proxy opened failed open_secs rss_before rss_open1 rss_closed1 rss_open2 rss_closed2 (KiB)
: >"$IDLE"
idle_cycle() { # proxy cycle -> sets CYC_OPENED CYC_FAILED CYC_SECS CYC_OPEN_RSS CYC_CLOSED_RSS
    local t=$1 c=$2 pid=${PROXY_PID[$1]} out=$TMP/idle-$1-$2.out cpid tls=0
    [ "$t" = tiproxy-tls ] && tls=1
    CYC_OPENED=0 CYC_FAILED=NA CYC_SECS=NA CYC_OPEN_RSS=NA CYC_CLOSED_RSS=NA
    MYCLIENT_TLS=$tls "$TMP/myclient" idle 127.0.0.1 "${PORT[$t]}" "$DB_USER" "$DB_PASS" \
        "$BENCH_IDLE_CONNS" "$BENCH_IDLE_PROCS" >"$out" 2>"$TMP/idle-$t-$c.err" &
    cpid=$!; PIDS+=("$cpid")
    for _ in $(seq $((BENCH_IDLE_OPEN_SECS * 10))); do grep -qs READY "$out" && break; alive "$cpid" || break; sleep 0.1; done
    if ! grep -qs READY "$out"; then
        note "idle client via $t (cycle $c) did not finish opening connections in $BENCH_IDLE_OPEN_SECS s: $(head -c 300 "$TMP/idle-$t-$c.err")"
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
if has_phase idle; then
    for t in "${PROXIES[@]}"; do stop_pid "${PROXY_PID[$t]}"; done
    for t in haproxy1 haproxy2 tiproxy tiproxy-tls; do
        # one proxy at a time, freshly started, so no buffer kept from
        # earlier phases hides growth and the connections fit the fd limit
        start_proxy "$t"
        sleep 1
        before=$(rss_kb "${PROXY_PID[$t]}")
        if idle_cycle "$t" 1; then
            row="$t\t$CYC_OPENED\t$CYC_FAILED\t$CYC_SECS\t$before\t$CYC_OPEN_RSS\t$CYC_CLOSED_RSS"
            if idle_cycle "$t" 2; then row="$row\t$CYC_OPEN_RSS\t$CYC_CLOSED_RSS"; else row="$row\tNA\tNA"; fi
            printf "$row\n" >>"$IDLE"
        fi
        stop_pid "${PROXY_PID[$t]}"
    done
fi

# ---------------------------------------------------------------- drain
DRAIN=$TMP/drain.md
if has_phase drain; then
    log "drain: bench/migration.sh"
    if BENCH_SESSIONS=${BENCH_DRAIN_SESSIONS:-9000} "$BENCH_DIR/migration.sh" >"$TMP/drain.log" 2>&1; then
        sed -n '/^| measure/,$p' "$RESULTS_DIR/migration.md" >"$DRAIN"
    else
        note "bench/migration.sh failed: $(tail -3 "$TMP/drain.log" | tr '\n' ' ')"
    fi
fi

# ---------------------------------------------------------------- report
for f in "$TMP"/tiproxy*.log "$TMP"/baseline.log; do
    [ -f "$f" ] || continue
    n=$(grep -ciE 'panic|error' "$f" || true)
    [ "${n:-0}" = 0 ] || note "$(basename "$f") has $n error/panic lines; first: $(grep -m3 -iE 'panic|error' "$f" | cut -c1-300 | tr '\n' ' ')"
done

mkdir -p "$RESULTS_DIR"
{
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(nproc) cores, $(uname -r), fd limit $FD_LIMIT"
    echo "- MariaDB $DB_VERSION (max_connections $DB_MAXCONN), $(haproxy -v | head -1 | awk '{print "HAProxy", $3}'), $(sysbench --version)"
    echo "- tiproxy: $TIPROXY_BIN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ', dirty tree')), default configuration"
    [ -n "$TIPROXY_BASELINE_BIN" ] && echo "- baseline tiproxy: $TIPROXY_BASELINE_BIN"
    echo "- sysbench: ${BENCH_SECONDS}s per run, $BENCH_ROUNDS rounds; every round runs each target once, starting one target later than the round before; ${BENCH_WARMUP}s warm-up per target and workload"
    echo "- everything (MariaDB, proxies, clients) shares the same $(nproc) cores; $THREADS_INFO"
    echo "- load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine adds noise)"
} >"$TMP/header.md"
python3 "$BENCH_DIR/report.py" --dir "$TMP" --baseline "${TIPROXY_BASELINE_BIN:+1}" \
    --lat-queries "$BENCH_LAT_QUERIES" --idle-conns "$BENCH_IDLE_CONNS" \
    --elapsed "$(($(date +%s) - START_TS))" >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
log "results written to $RESULTS"
