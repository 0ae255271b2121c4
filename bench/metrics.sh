#!/usr/bin/env bash
# Metrics overhead: does scraping GET /api/metrics while sysbench runs move
# tiproxy's CPU per query? Runs tiproxy in front of real MariaDB and
# alternates, in one invocation, sysbench runs without a scraper, with a
# Prometheus-like scraper once a second, and with one ten times a second.
# Reports proxy CPU seconds per 1,000 queries for each and the ratios to the
# unscraped runs (target: <= 1.02x at 1/s), and whether every scrape
# answered under load and how fast. A benchmark, not a test: it exits 0
# once it has measured something.
#
#   bench/metrics.sh                              # ~5 min
#   BENCH_SECONDS=30 BENCH_ROUNDS=5 bench/metrics.sh
#
# Results: printed and written to bench/results/metrics-overhead.md.
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-20}      # seconds per sysbench run
BENCH_ROUNDS=${BENCH_ROUNDS:-4}         # off, 1/s, 10/s repeated this many times
BENCH_WARMUP=${BENCH_WARMUP:-5}
BENCH_THREADS=${BENCH_THREADS:-16}
BENCH_WORKLOAD=${BENCH_WORKLOAD:-oltp_point_select}
BENCH_TABLE_SIZE=${BENCH_TABLE_SIZE:-100000}
BENCH_MODES=${BENCH_MODES:-"off 1 10"}  # scrapes per second; off = no scraper
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TIPROXY_BIN=${TIPROXY_BIN:-$ROOT/target/release/tiproxy}
RESULTS=$BENCH_DIR/results/metrics-overhead.md
START_TS=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[metrics-bench %4ss] %s\n' "$(($(date +%s) - START_TS))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

need_pkgs=()
command -v sysbench >/dev/null || need_pkgs+=(sysbench)
command -v mariadbd >/dev/null || need_pkgs+=(mariadb-server)
command -v mariadb >/dev/null || need_pkgs+=(mariadb-client)
command -v curl >/dev/null || need_pkgs+=(curl)
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
CLK_TCK=$(getconf CLK_TCK)

TMP=$(mktemp -d /tmp/tiproxy-metrics-bench.XXXXXX)
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

free_port DB_PORT; free_port TP_PORT; free_port TP_API
SOCK=$TMP/mariadb.sock
DB_USER=bench DB_PASS=benchpw DB_NAME=sbtest

log "starting MariaDB on 127.0.0.1:$DB_PORT"
mariadb-install-db --no-defaults --user=root --datadir="$TMP/data" \
    --auth-root-authentication-method=normal >"$TMP/install-db.log" 2>&1 ||
    { cat "$TMP/install-db.log" >&2; die "mariadb-install-db failed"; }
mariadbd --no-defaults --user=root --datadir="$TMP/data" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --socket="$SOCK" --pid-file="$TMP/mariadb.pid" \
    --max-connections=1000 --skip-name-resolve --innodb-buffer-pool-size=256M \
    --innodb-flush-log-at-trx-commit=2 --skip-log-bin --performance-schema=OFF \
    --thread-cache-size=100 --log-error="$TMP/mariadb.err" >>"$TMP/mariadb.err" 2>&1 &
DB_PID=$!; PIDS+=("$DB_PID")
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
SB=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user="$DB_USER" --mysql-password="$DB_PASS"
    --mysql-db="$DB_NAME" --tables=1 --table-size="$BENCH_TABLE_SIZE")
sysbench oltp_read_only "${SB[@]}" --mysql-port="$DB_PORT" prepare >"$TMP/prepare.log" 2>&1 ||
    { tail -20 "$TMP/prepare.log" >&2; die "sysbench prepare failed"; }

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
"$TIPROXY_BIN" --config "$TMP/tiproxy.toml" >>"$TMP/tiproxy.log" 2>&1 &
TP_PID=$!; PIDS+=("$TP_PID")
for _ in $(seq 100); do
    mariadb --no-defaults -h127.0.0.1 -P"$TP_PORT" -u"$DB_USER" -p"$DB_PASS" -N -e 'SELECT 1' >/dev/null 2>&1 && break
    alive "$TP_PID" || { cat "$TMP/tiproxy.log" >&2; die "tiproxy exited"; }
    sleep 0.2
done
log "tiproxy on :$TP_PORT (pid $TP_PID), API :$TP_API"

# The scraper: GET /api/metrics every 1/rate s, one line per scrape:
# http_code seconds bytes. Like Prometheus, a fixed interval from the start
# of each scrape.
scrape_loop() { # rate out
    local interval
    interval=$(awk -v r="$1" 'BEGIN{printf "%.3f", 1 / r}')
    while :; do
        local t0=$EPOCHREALTIME
        curl -s -o /dev/null -m 5 -w '%{http_code} %{time_total} %{size_download}\n' \
            "http://127.0.0.1:$TP_API/api/metrics" >>"$2" || echo "000 5 0" >>"$2"
        local left
        left=$(awk -v a="$t0" -v b="$EPOCHREALTIME" -v i="$interval" 'BEGIN{d = i - (b - a); if (d < 0) d = 0; printf "%.3f", d}')
        sleep "$left"
    done
}

sysbench "$BENCH_WORKLOAD" "${SB[@]}" --mysql-port="$TP_PORT" --threads="$BENCH_THREADS" \
    --time="$BENCH_WARMUP" run >"$TMP/warmup.log" 2>&1 || die "warm-up failed: $(tail -5 "$TMP/warmup.log")"

RUNS=$TMP/runs.tsv # mode round queries cpu_s scrapes failed mean_ms max_ms
: >"$RUNS"
for r in $(seq "$BENCH_ROUNDS"); do
    for mode in $BENCH_MODES; do
        scrapes=$TMP/scrapes-$mode-$r.txt; : >"$scrapes"
        spid=
        if [ "$mode" != off ]; then
            scrape_loop "$mode" "$scrapes" &
            spid=$!; PIDS+=("$spid")
        fi
        out=$TMP/sb-$mode-$r.log
        c0=$(cpu_ticks "$TP_PID")
        sysbench "$BENCH_WORKLOAD" "${SB[@]}" --mysql-port="$TP_PORT" --threads="$BENCH_THREADS" \
            --time="$BENCH_SECONDS" run >"$out" 2>&1 || log "sysbench failed: $(grep -m2 -E 'FATAL|error' "$out")"
        c1=$(cpu_ticks "$TP_PID")
        if [ -n "$spid" ]; then kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true; fi
        alive "$TP_PID" || die "tiproxy died during $mode round $r"
        queries=$(grep -m1 -E '^ *queries:' "$out" | awk '{print $2}' || echo NA)
        cpu=$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')
        read -r n failed mean max < <(awk '{n++; if ($1 != "200") f++; s += $2; if ($2 > m) m = $2}
            END {printf "%d %d %.2f %.2f\n", n, f, n ? s / n * 1000 : 0, m * 1000}' "$scrapes")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$r" "${queries:-NA}" "$cpu" "$n" "$failed" "$mean" "$max" >>"$RUNS"
        log "round $r scrapes/s=$mode: queries=$queries cpu=${cpu}s scrapes=$n failed=$failed mean=${mean}ms max=${max}ms"
    done
done
SAMPLE_BYTES=$(curl -s "http://127.0.0.1:$TP_API/api/metrics" | wc -c)
# The cost of one scrape on its own: proxy CPU over back-to-back scrapes of
# the idle proxy (independent of the sysbench noise above).
BENCH_SCRAPES=${BENCH_SCRAPES:-500}
sleep 1
c0=$(cpu_ticks "$TP_PID")
for _ in $(seq "$BENCH_SCRAPES"); do curl -s -o /dev/null "http://127.0.0.1:$TP_API/api/metrics"; done
c1=$(cpu_ticks "$TP_PID")
SCRAPE_MS=$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" -v n="$BENCH_SCRAPES" 'BEGIN{printf "%.3f", (b-a)/h/n*1000}')
log "one scrape costs the proxy ${SCRAPE_MS} ms CPU ($BENCH_SCRAPES back-to-back scrapes, idle proxy)"

mkdir -p "$(dirname "$RESULTS")"
{
    echo "# Metrics overhead: tiproxy CPU per query with and without a /api/metrics scraper"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(nproc) cores, $(uname -r)"
    echo "- tiproxy: $TIPROXY_BIN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ', dirty tree')), MariaDB $("${SQL[@]}" -N -e 'SELECT VERSION()'), $(sysbench --version)"
    echo "- sysbench $BENCH_WORKLOAD, $BENCH_THREADS threads, ${BENCH_SECONDS}s per run, $BENCH_ROUNDS rounds alternating scrapes/s = $BENCH_MODES"
    echo "- scraper: curl GET /api/metrics at a fixed interval (Prometheus-like); one response is $SAMPLE_BYTES bytes"
    echo "- CPU = tiproxy utime+stime over the run / queries sysbench completed, per 1,000 queries"
    echo "- load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) (everything shares the machine; other work adds noise)"
    echo
    echo "| scrapes/s | queries | proxy CPU (s) | CPU s / 1k queries | ratio to no scraper | scrapes (failed) | scrape mean / max (ms) | target |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    awk -F'\t' -v modes="$BENCH_MODES" '
    $3 != "NA" { q[$1] += $3; c[$1] += $4; n[$1] += $5; f[$1] += $6; ms[$1] += $7 * $5; if ($8 > mx[$1]) mx[$1] = $8 }
    END {
      base = q["off"] ? c["off"] / q["off"] * 1000 : -1
      split(modes, M, " ")
      for (i = 1; i in M; i++) { m = M[i]; if (!q[m]) continue
        per = c[m] / q[m] * 1000
        r = base > 0 ? per / base : -1
        tgt = (m == "off" || r < 0) ? "" : (r <= 1.02 ? "<= 1.02x met" : "<= 1.02x NOT met")
        printf "| %s | %d | %.2f | %.5f | %s | %s | %s | %s |\n", m, q[m], c[m], per, r < 0 ? "-" : sprintf("%.3fx", r),
          m == "off" ? "-" : sprintf("%d (%d)", n[m], f[m]), (m == "off" || !n[m]) ? "-" : sprintf("%.2f / %.2f", ms[m] / n[m], mx[m]), tgt }
    }' "$RUNS"
    echo
    echo "One scrape on its own costs the proxy $SCRAPE_MS ms of CPU ($BENCH_SCRAPES back-to-back scrapes of the idle proxy)."
    awk -F'\t' -v ms="$SCRAPE_MS" '$1 == "off" && $3 != "NA" { q += $3; c += $4; t += '"$BENCH_SECONDS"' }
      END { if (t > 0) printf "Under this load the proxy used %.2f CPU s per second, so one scrape a second adds %.3f%% and ten a second %.2f%% to its CPU per query.\n", c / t, ms / 1000 / (c / t) * 100, 10 * ms / 1000 / (c / t) * 100 }' "$RUNS"
    echo
    echo "## Raw runs"
    echo
    echo "| scrapes/s | round | queries | proxy CPU (s) | CPU s / 1k queries | scrapes | failed | mean (ms) | max (ms) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, ($3 != "NA" && $3 > 0) ? sprintf("%.5f", $4 / $3 * 1000) : "-", $5, $6, $7, $8 }' "$RUNS"
    echo
    echo "Total time: $(($(date +%s) - START_TS)) s. Re-run: \`bench/metrics.sh\` (env: BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS, BENCH_WORKLOAD, BENCH_MODES, BENCH_KEEP_TMP=1)."
} >"$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
echo
cat "$RESULTS"
log "results written to $RESULTS"
