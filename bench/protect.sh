#!/usr/bin/env bash
# Crash protection's steady-state cost (`proxy.session-protection`): two
# tiproxy processes in front of one TiDB double (`tidb-double`), one with
# protection off and one with it on, and sysbench runs alternating between
# them in one invocation (so both arms see the same machine noise). The
# workload, bench/protect.lua, changes session state in every transaction
# (`SET @v = <random>`, then a prepared point select), back to back, so
# with the default proxy.session-protection-delay (200 ms) a session is
# copied only when it goes quiet. Measures:
#
# 1. extra commands the proxy sends to TiDB per state change (target <= 1):
#    (packets to the backends - client commands) / client SETs, from the
#    proxy's own counters (tiproxy_traffic_outbound_packets,
#    tiproxy_session_query_total); exact, not load-dependent;
# 2. proxy CPU per client command (utime+stime from /proc/<pid>/stat over a
#    run / commands), protection on vs off (target <= 1.03x);
# 3. memory per protected idle session: a fresh proxy per round, N idle
#    sessions that each ran one `SET @v = ...` (PyMySQL), VmRSS with them
#    minus VmRSS before them, per session; on minus off is what a state
#    copy costs (the proxy reports every session protected first).
#
# A benchmark, not a test: it exits 0 once it has measured something.
#
#   bench/protect.sh                                   # ~8 min
#   BENCH_SECONDS=30 BENCH_ROUNDS=7 BENCH_SESSIONS=4000 bench/protect.sh
#
# Results: printed and written to bench/results/protect.md.
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-20}     # seconds per sysbench run
BENCH_ROUNDS=${BENCH_ROUNDS:-5}        # sysbench runs per arm (off, on alternating)
BENCH_WARMUP=${BENCH_WARMUP:-5}
BENCH_THREADS=${BENCH_THREADS:-8}
BENCH_TABLE_SIZE=${BENCH_TABLE_SIZE:-10000}
BENCH_SESSIONS=${BENCH_SESSIONS:-2000} # idle sessions per memory round
BENCH_MEM_ROUNDS=${BENCH_MEM_ROUNDS:-5}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TIPROXY_BIN=${TIPROXY_BIN:-$ROOT/target/release/tiproxy}
TIDB_BIN=${TIDB_BIN:-$ROOT/target/release/tidb-double}
RESULTS=$BENCH_DIR/results/protect.md
PY=/usr/bin/python3 # Debian's, where python3-pymysql lives
START_TS=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[protect-bench %4ss] %s\n' "$(($(date +%s) - START_TS))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

"$ROOT/scripts/install-deps.sh" sysbench curl python3-pymysql libc-bin >&2
if [ ! -x "$TIPROXY_BIN" ] || [ ! -x "$TIDB_BIN" ]; then
    command -v cargo >/dev/null || die "no $TIPROXY_BIN or $TIDB_BIN and no cargo to build them"
    log "building tiproxy and tidb-double (release)"
    (cd "$ROOT" && cargo build --release -p tiproxy-runtime -p tiproxy-sim --bin tiproxy --bin tidb-double) >&2
fi
CLK_TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)"

TMP=$(mktemp -d /tmp/tiproxy-protect-bench.XXXXXX)
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
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
alive() { kill -0 "$1" 2>/dev/null; }
# metric API FAMILY [LABEL-MATCH]: the sum of a family's samples.
metric() {
    curl -s -m 5 "http://127.0.0.1:$1/api/metrics" |
        awk -v m="$2" -v l="${3:-}" '($1 == m || index($1, m "{") == 1) && index($1, l) {s += $2} END {printf "%.0f\n", s}'
}

# The TiDB double: one instance with a session-token key (so it exports
# sessions, as TiDB with session-token-signing-cert does), a fixed seed.
"$TIDB_BIN" --instances 1 --seed 13 >"$TMP/tidb.json" 2>"$TMP/tidb.log" &
TIDB_PID=$!; PIDS+=("$TIDB_PID")
for _ in $(seq 100); do [ -s "$TMP/tidb.json" ] && break; alive "$TIDB_PID" || break; sleep 0.1; done
[ -s "$TMP/tidb.json" ] || { cat "$TMP/tidb.log" >&2; die "tidb-double did not start"; }
read -r TIDB_SQL TIDB_STATUS < <($PY -c 'import json,sys; i = json.load(open(sys.argv[1]))["instances"][0]; print(i["sql"], i["status"])' "$TMP/tidb.json")
TIDB_PORT=${TIDB_SQL##*:}
log "tidb-double: SQL $TIDB_SQL, status $TIDB_STATUS"

SB=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user=root --mysql-db=test
    --tables=1 --table-size="$BENCH_TABLE_SIZE" --rand-type=uniform)
sysbench oltp_point_select "${SB[@]}" --mysql-port="$TIDB_PORT" prepare >"$TMP/prepare.log" 2>&1 ||
    { tail -20 "$TMP/prepare.log" >&2; die "sysbench prepare failed"; }

# The size of one session's state copy as TiDB exports it (states JSON plus
# token) after one `SET @v`: what a protected session holds.
COPY_BYTES=$($PY - "$TIDB_PORT" <<'PY'
import sys, pymysql
c = pymysql.connect(host="127.0.0.1", port=int(sys.argv[1]), user="root", database="test")
cur = c.cursor()
cur.execute("SET @v = 1234567890")
cur.execute("SHOW SESSION_STATES")
row = cur.fetchone()
print(sum(len(str(x).encode()) for x in row))
PY
) || COPY_BYTES="?"

# start_proxy NAME PROTECTION: a tiproxy on free ports; sets
# <NAME>_PID, <NAME>_PORT, <NAME>_API.
start_proxy() {
    local name=$1 protect=$2 port api pid
    free_port port; free_port api
    cat >"$TMP/$name.toml" <<EOF
[proxy]
addr = "127.0.0.1:$port"
pd-addrs = ""
backend-addrs = [{ addr = "$TIDB_SQL", status-addr = "$TIDB_STATUS" }]
session-protection = $protect
[api]
addr = "127.0.0.1:$api"
[log]
level = "warn"
EOF
    "$TIPROXY_BIN" --config "$TMP/$name.toml" >>"$TMP/$name.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    for _ in $(seq 100); do
        $PY -c 'import sys, pymysql; pymysql.connect(host="127.0.0.1", port=int(sys.argv[1]), user="root", connect_timeout=2).close()' \
            "$port" 2>/dev/null && break
        alive "$pid" || { cat "$TMP/$name.log" >&2; die "tiproxy ($name) exited"; }
        sleep 0.2
    done
    printf -v "${name}_PID" '%s' "$pid"
    printf -v "${name}_PORT" '%s' "$port"
    printf -v "${name}_API" '%s' "$api"
}
stop_proxy() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# --- 1 and 2: sysbench through each proxy, alternating --------------------
start_proxy off false
start_proxy on true
log "tiproxy off :$off_PORT (pid $off_PID), on :$on_PORT (pid $on_PID)"
for arm in off on; do
    port_var=${arm}_PORT
    sysbench "$BENCH_DIR/protect.lua" "${SB[@]}" --mysql-port="${!port_var}" --threads="$BENCH_THREADS" \
        --time="$BENCH_WARMUP" run >"$TMP/warmup-$arm.log" 2>&1 || die "warm-up ($arm) failed: $(tail -5 "$TMP/warmup-$arm.log")"
done

RUNS=$TMP/runs.tsv # arm round client_cmds sets backend_pkts cpu_s tps logins prepares
: >"$RUNS"
for r in $(seq "$BENCH_ROUNDS"); do
    for arm in off on; do
        pid_var=${arm}_PID port_var=${arm}_PORT api_var=${arm}_API
        pid=${!pid_var} api=${!api_var}
        q0=$(metric "$api" tiproxy_session_query_total)
        s0=$(metric "$api" tiproxy_session_query_total 'cmd_type="Query"')
        sp0=$(metric "$api" tiproxy_session_query_total 'cmd_type="StmtPrepare"')
        p0=$(metric "$api" tiproxy_traffic_outbound_packets)
        n0=$(metric "$api" tiproxy_server_create_connection_total)
        c0=$(cpu_ticks "$pid")
        out=$TMP/sb-$arm-$r.log
        sysbench "$BENCH_DIR/protect.lua" "${SB[@]}" --mysql-port="${!port_var}" --threads="$BENCH_THREADS" \
            --time="$BENCH_SECONDS" run >"$out" 2>&1 || log "sysbench failed: $(grep -m2 -E 'FATAL|error' "$out")"
        c1=$(cpu_ticks "$pid")
        alive "$pid" || die "tiproxy ($arm) died in round $r"
        sleep 0.5 # sessions' last commands and COM_QUIT counted
        q1=$(metric "$api" tiproxy_session_query_total)
        s1=$(metric "$api" tiproxy_session_query_total 'cmd_type="Query"')
        sp1=$(metric "$api" tiproxy_session_query_total 'cmd_type="StmtPrepare"')
        p1=$(metric "$api" tiproxy_traffic_outbound_packets)
        n1=$(metric "$api" tiproxy_server_create_connection_total)
        tps=$(grep -m1 -E '^ *transactions:' "$out" | sed -E 's/.*\(([0-9.]+) per sec.*/\1/' || echo NA)
        cpu=$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$arm" "$r" "$((q1 - q0))" "$((s1 - s0))" "$((p1 - p0))" "$cpu" "${tps:-NA}" \
            "$((n1 - n0))" "$((sp1 - sp0))" >>"$RUNS"
        log "round $r protection=$arm: client commands=$((q1 - q0)) SETs=$((s1 - s0)) packets to TiDB=$((p1 - p0)) logins=$((n1 - n0)) cpu=${cpu}s tps=$tps"
    done
done
stop_proxy "$off_PID"; stop_proxy "$on_PID"

# --- 3: memory per idle session ------------------------------------------
# The client: BENCH_SESSIONS connections, each runs one SET, then all stay
# open until stdin closes. Prints READY once every SET answered.
cat >"$TMP/idle.py" <<'PY'
import sys, pymysql
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(n):
    c = pymysql.connect(host="127.0.0.1", port=port, user="root", database="test", autocommit=True, connect_timeout=20)
    c.cursor().execute("SET @v = %d" % (1000000 + i))
    conns.append(c)
print("READY", len(conns), flush=True)
sys.stdin.read()
PY
MEM=$TMP/mem.tsv # arm round rss0_kb rssN_kb protected
: >"$MEM"
for r in $(seq "$BENCH_MEM_ROUNDS"); do
    for arm in off on; do
        protect=false; [ "$arm" = on ] && protect=true
        start_proxy mem "$protect"
        sleep 1
        rss0=$(rss_kb "$mem_PID")
        mkfifo "$TMP/idle-in"
        $PY "$TMP/idle.py" "$mem_PORT" "$BENCH_SESSIONS" <"$TMP/idle-in" >"$TMP/idle.out" 2>"$TMP/idle.err" &
        cpid=$!; PIDS+=("$cpid")
        exec 7>"$TMP/idle-in"
        for _ in $(seq 1500); do grep -q READY "$TMP/idle.out" && break; alive "$cpid" || break; sleep 0.2; done
        grep -q READY "$TMP/idle.out" || { cat "$TMP/idle.err" >&2; die "idle client ($arm) did not get ready"; }
        prot=0
        if [ "$arm" = on ]; then
            for _ in $(seq 300); do
                prot=$(metric "$mem_API" tiproxy_session_protected)
                [ "$prot" -ge "$BENCH_SESSIONS" ] && break
                sleep 0.2
            done
        else
            sleep 1
        fi
        rss1=$(rss_kb "$mem_PID")
        printf '%s\t%s\t%s\t%s\t%s\n' "$arm" "$r" "$rss0" "$rss1" "$prot" >>"$MEM"
        log "memory round $r protection=$arm: VmRSS ${rss0} kB -> ${rss1} kB with $BENCH_SESSIONS sessions ($prot protected)"
        exec 7>&-
        wait "$cpid" 2>/dev/null || true
        rm -f "$TMP/idle-in" "$TMP/idle.out"
        stop_proxy "$mem_PID"
    done
done

# --- results ---------------------------------------------------------------
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "NA"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
range() { sort -g | awk 'NR == 1 {a = $1} {b = $1} END {printf "%s..%s", a, b}'; }
col() { awk -F'\t' -v a="$1" "\$1 == a $3 {print $2}" "$4"; }
# Packets a login sends the backend beyond the commands counted (the
# handshake response, COM_QUIT): from the unprotected runs, per login.
HS=$(col off '$8 ? ($5 - $3) / $8 : 0' '' "$RUNS" | median)
# Per run: commands to TiDB the client did not send (packets - client
# commands - logins' packets), per state change (SETs, prepares and
# logins: each is one, and the proxy copies the state after each).
EXTRA='($5 - $3 - '"$HS"' * $8) / ($4 + $9 + $8 ? $4 + $9 + $8 : 1)'
EXTRA_OFF=$(col off "$EXTRA" '' "$RUNS" | median)
EXTRA_ON=$(col on "$EXTRA" '' "$RUNS" | median)
EXTRA_OFF_RANGE=$(col off "$EXTRA" '' "$RUNS" | range)
EXTRA_ON_RANGE=$(col on "$EXTRA" '' "$RUNS" | range)
CPU_OFF=$(col off '$6 / $3 * 1e6' '&& $3 > 0' "$RUNS" | median)
CPU_ON=$(col on '$6 / $3 * 1e6' '&& $3 > 0' "$RUNS" | median)
CPU_OFF_RANGE=$(col off '$6 / $3 * 1e6' '&& $3 > 0' "$RUNS" | range)
CPU_ON_RANGE=$(col on '$6 / $3 * 1e6' '&& $3 > 0' "$RUNS" | range)
CPU_RATIO=$(awk -v a="$CPU_ON" -v b="$CPU_OFF" 'BEGIN{printf "%.3f", a / b}')
# Ratio per round pair (on / off of the same round), for the spread.
RATIO_RANGE=$(awk -F'\t' '$3 > 0 {c[$1, $2] = $6 / $3} END {for (k in c) {split(k, p, SUBSEP); if (p[1] == "on" && c["off", p[2]] > 0) print c[k] / c["off", p[2]]}}' "$RUNS" | range)
# CPU per command the proxy sent to TiDB: does a copy cost more than its
# round trip?
BCPU_OFF=$(col off '$6 / $5 * 1e6' '&& $5 > 0' "$RUNS" | median)
BCPU_ON=$(col on '$6 / $5 * 1e6' '&& $5 > 0' "$RUNS" | median)
BCPU_OFF_RANGE=$(col off '$6 / $5 * 1e6' '&& $5 > 0' "$RUNS" | range)
BCPU_ON_RANGE=$(col on '$6 / $5 * 1e6' '&& $5 > 0' "$RUNS" | range)
BCPU_RATIO=$(awk -v a="$BCPU_ON" -v b="$BCPU_OFF" 'BEGIN{printf "%.3f", a / b}')
TPS_OFF=$(col off '$7' '&& $7 != "NA"' "$RUNS" | median)
TPS_ON=$(col on '$7' '&& $7 != "NA"' "$RUNS" | median)
TPS_OFF_RANGE=$(col off '$7' '&& $7 != "NA"' "$RUNS" | range)
TPS_ON_RANGE=$(col on '$7' '&& $7 != "NA"' "$RUNS" | range)
MEM_OFF=$(col off '($4 - $3) * 1024 / '"$BENCH_SESSIONS" '' "$MEM" | median)
MEM_ON=$(col on '($4 - $3) * 1024 / '"$BENCH_SESSIONS" '' "$MEM" | median)
MEM_OFF_RANGE=$(col off '($4 - $3) * 1024 / '"$BENCH_SESSIONS" '' "$MEM" | range)
MEM_ON_RANGE=$(col on '($4 - $3) * 1024 / '"$BENCH_SESSIONS" '' "$MEM" | range)
MEM_EXTRA=$(awk -v a="$MEM_ON" -v b="$MEM_OFF" 'BEGIN{printf "%.0f", a - b}')
met() { awk -v v="$1" -v t="$2" 'BEGIN{print (v <= t) ? "met" : "NOT met"}'; }
# Numbers at d decimals (no "-0.0000"); ranges "a..b" as "a-b".
fmt() { awk -v v="$1" -v d="$2" 'BEGIN{x = sprintf("%." d "f", v); if (x + 0 == 0) x = sprintf("%." d "f", 0); printf "%s", x}'; }
fmtr() { awk -v s="$1" -v d="$2" 'function f(v,  x) {x = sprintf("%." d "f", v); if (x + 0 == 0) x = sprintf("%." d "f", 0); return x}
    BEGIN{split(s, p, "\\.\\."); printf "%s-%s", f(p[1]), f(p[2])}'; }

mkdir -p "$(dirname "$RESULTS")"
{
    echo "# Crash protection's cost: protection off vs on"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(nproc) cores, $(uname -r)"
    echo "- tiproxy: $TIPROXY_BIN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain -- core runtime sim 2>/dev/null)" ] && echo ', dirty tree')), backend: one tidb-double instance (\`--seed 13\`), $(sysbench --version)"
    echo "- workload: bench/protect.lua (\`SET @v = <random>\` then a prepared point select, per transaction), $BENCH_THREADS threads, ${BENCH_SECONDS}s per run, $BENCH_ROUNDS rounds per arm alternating off/on between two proxies that share the TiDB double"
    echo "- extra commands per state change = (packets the proxy sent to TiDB - client commands - $HS packets per login) / (SETs + COM_STMT_PREPAREs + logins), from the proxy's counters (tiproxy_traffic_outbound_packets, tiproxy_session_query_total, tiproxy_server_create_connection_total); $HS packets per login is what the unprotected runs send beyond client commands (handshake response, COM_QUIT)"
    echo "- CPU = tiproxy utime+stime over the run / client commands (tiproxy_session_query_total), in microseconds"
    echo "- memory: a fresh proxy per round, $BENCH_SESSIONS idle sessions (PyMySQL) that each ran one \`SET @v\`; (VmRSS with them - VmRSS before) / sessions; with protection on, measured once tiproxy_session_protected = $BENCH_SESSIONS; $BENCH_MEM_ROUNDS rounds per arm"
    echo "- one session's state copy as TiDB (the double) exports it after one \`SET @v\`: $COPY_BYTES bytes (states JSON plus token)"
    echo "- load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg). The benchmark itself loads the machine by about 2-3; a higher load means other work ran meanwhile and CPU and TPS are noisier. The arms alternate so both see the same noise. The command counts are exact."
    echo
    echo "| measure | protection off: median (range) | protection on: median (range) | on vs off | target |"
    echo "| --- | ---: | ---: | ---: | --- |"
    echo "| extra commands to TiDB per state change | $(fmt "$EXTRA_OFF" 4) ($(fmtr "$EXTRA_OFF_RANGE" 4)) | $(fmt "$EXTRA_ON" 4) ($(fmtr "$EXTRA_ON_RANGE" 4)) | $(awk -v a="$EXTRA_ON" -v b="$EXTRA_OFF" 'BEGIN{x = sprintf("%+.4f", a - b); if (x + 0 == 0) x = "+0.0000"; printf "%s", x}') | <= 1: $(met "$(awk -v a="$EXTRA_ON" -v b="$EXTRA_OFF" 'BEGIN{printf "%.3f", a - b}')" 1) (at 3 decimals) |"
    echo "| proxy CPU per client command (us) | $(fmt "$CPU_OFF" 2) ($(fmtr "$CPU_OFF_RANGE" 2)) | $(fmt "$CPU_ON" 2) ($(fmtr "$CPU_ON_RANGE" 2)) | ${CPU_RATIO}x (same-round pairs: $(fmtr "$RATIO_RANGE" 3)) | <= 1.03x: $(met "$CPU_RATIO" 1.03) |"
    echo "| proxy CPU per command sent to TiDB (us) | $(fmt "$BCPU_OFF" 2) ($(fmtr "$BCPU_OFF_RANGE" 2)) | $(fmt "$BCPU_ON" 2) ($(fmtr "$BCPU_ON_RANGE" 2)) | ${BCPU_RATIO}x | - |"
    echo "| sysbench transactions/s | $(fmt "$TPS_OFF" 0) ($(fmtr "$TPS_OFF_RANGE" 0)) | $(fmt "$TPS_ON" 0) ($(fmtr "$TPS_ON_RANGE" 0)) | $(awk -v a="$TPS_ON" -v b="$TPS_OFF" 'BEGIN{printf "%.3f", a / b}')x | - |"
    echo "| proxy memory per idle session (bytes) | $(fmt "$MEM_OFF" 0) ($(fmtr "$MEM_OFF_RANGE" 0)) | $(fmt "$MEM_ON" 0) ($(fmtr "$MEM_ON_RANGE" 0)) | +$MEM_EXTRA per protected session | - |"
    echo
    awk -v e="$EXTRA_ON" -v b="$BCPU_RATIO" -v c="$CPU_RATIO" -v t="$(awk -v a="$TPS_ON" -v b="$TPS_OFF" 'BEGIN{printf "%.2f", a / b}')" 'BEGIN{
      if (e + 0 < 0.00005 && e + 0 > -0.00005) e = 0; printf "Reading: each state change costs %.4f extra command to TiDB (`SHOW SESSION_STATES`). ", e
      printf "The copy is taken only once a session has been idle for proxy.session-protection-delay (200 ms) after a change; "
      printf "sysbench sends its statements back to back, so its sessions export only when they go quiet (at login and at the end of a run). "
      printf "CPU per command sent to TiDB is %sx of unprotected and CPU per client command %sx: ", b, c
      if (c + 0 <= 1.03) printf "the 1.03x target is met. "
      else printf "the 1.03x target is NOT met. "
      printf "Transactions/s: %sx. A session that goes idle after a change costs one export per idle period (at most one per state change), its client then idle too.\n", t }'
    echo
    echo "## Raw sysbench runs"
    echo
    echo "| protection | round | client commands | SETs | prepares | logins | packets to TiDB | extra per state change | proxy CPU (s) | CPU us / command | TPS |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' -v hs="$HS" '{ sc = $4 + $9 + $8; x = sc ? ($5 - $3 - hs * $8) / sc : 0; if (x < 5e-5 && x > -5e-5) x = 0; printf "| %s | %s | %s | %s | %s | %s | %s | %.4f | %s | %s | %s |\n", $1, $2, $3, $4, $9, $8, $5, x, $6, $3 ? sprintf("%.2f", $6 / $3 * 1e6) : "-", $7 }' "$RUNS"
    echo
    echo "## Raw memory rounds"
    echo
    echo "| protection | round | VmRSS before (kB) | VmRSS with $BENCH_SESSIONS sessions (kB) | protected | bytes per session |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' -v n="$BENCH_SESSIONS" '{ printf "| %s | %s | %s | %s | %s | %.0f |\n", $1, $2, $3, $4, $5, ($4 - $3) * 1024 / n }' "$MEM"
    echo
    echo "Total time: $(($(date +%s) - START_TS)) s. Re-run: \`bench/protect.sh\` (env: BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS, BENCH_SESSIONS, BENCH_MEM_ROUNDS, BENCH_KEEP_TMP=1)."
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
log "results written to $RESULTS"
