#!/usr/bin/env bash
# The playground under load: sysbench oltp_read_write through tiproxy while
# the TiDB cluster scales out, scales in and restarts a TiDB, then what it
# looked like.
#
#   scripts/demo.sh [out.png]       (default bench/results/demo.png)
#
# Starts the playground (scripts/run.sh) with 2 TiDB doubles, prepares
# sysbench's table through tiproxy and runs DEMO_THREADS (32) threads for
# DEMO_SECS (180) seconds with these events (seconds into the run):
#   30  scale-out   tiproxyctl tidb add          a third TiDB joins
#   70  scale-in    tiproxyctl tidb shutdown 0   graceful: sessions move off it
#   110 restart     tiproxyctl tidb restart 0    the first TiDB comes back
#   140 restart     tidb shutdown 1, then restart 1 once it stopped (rolling)
# No kill: with 32 busy threads nearly every session has a statement in
# flight on the killed TiDB, which is closed as the crash closed it (crash
# protection saves idle sessions only), and Debian's sysbench 1.0.20 crashes
# (SIGSEGV) when it reconnects after a lost connection, with prepared
# statements or without (tried with --mysql-ignore-errors=2013,2006,1158 and
# --db-ps-mode=disable). Kills are shown by tests/tests/crash_survival.rs
# and `tiproxyctl tidb kill` in the playground.
#
# Prints (and writes next to the PNG as .txt), per event, sysbench's errors and reconnects until the next event
# and its lowest QPS, and writes a PNG (gnuplot) of QPS and sessions per TiDB
# over time with the events marked. The playground's ports and binaries
# follow scripts/run.sh's variables (TIPROXY_BIN_DIR=target/debug skips the
# release build).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/demo.png}
THREADS=${DEMO_THREADS:-32}
SECS=${DEMO_SECS:-180}
EVENTS=${DEMO_EVENTS:-"30 scale-out;70 scale-in;110 restart-0;140 restart-1"}
SQL_PORT=${PLAYGROUND_SQL_PORT:-6000}
API_PORT=${PLAYGROUND_API_PORT:-3080}
CONTROL_PORT=${PLAYGROUND_CONTROL_PORT:-4080}
export PLAYGROUND_SQL_PORT=$SQL_PORT PLAYGROUND_API_PORT=$API_PORT PLAYGROUND_CONTROL_PORT=$CONTROL_PORT
export PLAYGROUND_TIDBS=${PLAYGROUND_TIDBS:-2}
bin=${TIPROXY_BIN_DIR:-target/release}

scripts/install-deps.sh sysbench gnuplot-nox jq bc

work=$(mktemp -d /tmp/tiproxy-demo.XXXXXX)
playground=
cleanup() {
    [[ -n "$playground" ]] && kill -TERM -- "-$playground" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "demo: starting the playground (log: scripts/run.sh's output below)"
setsid scripts/run.sh >"$work/playground.log" 2>&1 &
playground=$!
for _ in $(seq 1 6000); do
    grep -q "Ctrl-C stops everything" "$work/playground.log" 2>/dev/null && break
    kill -0 "$playground" 2>/dev/null || { cat "$work/playground.log" >&2; exit 1; }
    sleep 0.1
done
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SQL_PORT") 2>/dev/null && break; sleep 0.1; done
# The banner's own sysbench command, without its last word (`prepare`).
read -r -a sb < <(grep -m1 "sysbench: " "$work/playground.log" | sed 's/^ *sysbench: *//; s/ prepare$//')
ctl="$bin/tiproxyctl --port $API_PORT"
tidb="$ctl tidb --control 127.0.0.1:$CONTROL_PORT"

sessions() {
    $ctl backends | jq -r '(if type == "array" then . else .backends end) | .[] | "\(.addr) \(.connections)"'
}
for _ in $(seq 1 100); do [[ $(sessions | wc -l) -ge $PLAYGROUND_TIDBS ]] && break; sleep 0.1; done

echo "demo: sysbench prepare through tiproxy (127.0.0.1:$SQL_PORT)"
"${sb[@]}" prepare >"$work/prepare.log" 2>&1 || { cat "$work/prepare.log" >&2; exit 1; }

echo "demo: sysbench oltp_read_write, $THREADS threads, $SECS s"
"${sb[@]}" --threads="$THREADS" --time="$SECS" --report-interval=1 run >"$work/sysbench.log" 2>&1 &
sysbench=$!
start=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) - $start" | bc; }

# Sessions per TiDB, once a second: "t addr sessions".
(
    while kill -0 "$sysbench" 2>/dev/null; do
        t=$(elapsed)
        sessions | while read -r addr n; do echo "$t $addr $n"; done
        sleep 1
    done
) >"$work/sessions.dat" &
sampler=$!

: >"$work/events.dat"
IFS=';' read -r -a events <<<"$EVENTS"
for ev in "${events[@]}"; do
    read -r at name <<<"$ev"
    while (($(echo "$(elapsed) < $at" | bc))); do sleep 0.2; done
    kill -0 "$sysbench" 2>/dev/null || break
    echo "$(elapsed) $name" >>"$work/events.dat"
    echo "demo: t=${at}s $name"
    case $name in
    scale-out) $tidb add >/dev/null ;;
    scale-in) $tidb shutdown 0 >/dev/null ;;
    restart-*)
        i=${name#restart-}
        state=$($tidb list | jq -r ".[] | select(.index == $i) | .state")
        if [[ "$state" == "serving" ]]; then
            $tidb shutdown "$i" >/dev/null
            for _ in $(seq 1 600); do
                [[ $($tidb list | jq -r ".[] | select(.index == $i) | .state") == "serving" ]] || break
                sleep 0.1
            done
            # Wait for the instance to stop before starting it again.
            for _ in $(seq 1 600); do $tidb restart "$i" >/dev/null 2>&1 && break; sleep 0.1; done
        else
            $tidb restart "$i" >/dev/null
        fi
        ;;
    *) echo "demo: unknown event $name" >&2 ;;
    esac
done
status=0
wait "$sysbench" || status=$?
wait "$sampler" 2>/dev/null || true

# sysbench's per-second reports: "t qps errors reconnects".
sed -n 's/^\[ *\([0-9]*\)s \].* qps: \([0-9.]*\) .* err\/s: \([0-9.]*\) reconn\/s: \([0-9.]*\).*/\1 \2 \3 \4/p' \
    "$work/sysbench.log" >"$work/qps.dat"

mkdir -p "$(dirname "$out")"
{
echo "demo: sysbench $(grep -m1 'transactions:' "$work/sysbench.log" | xargs), $(grep -m1 'ignored errors:' "$work/sysbench.log" | xargs)"
if ((status != 0)); then
    echo "demo: sysbench FAILED (exit $status):"
    grep -m5 FATAL "$work/sysbench.log" || tail -5 "$work/sysbench.log"
fi
# sysbench's errors per event: those it ignores by default and retries the
# transaction after (deadlock 1213, lock wait timeout 1205); any other error
# stops it and is printed above. The doubles' transactions are pessimistic,
# as TiDB's: conflicting writers wait for the row lock, so there are none.
printf '%-12s %8s %8s %11s %8s\n' event "at (s)" errors reconnects "min qps"
{
    echo "0 start"
    cat "$work/events.dat"
    echo "$SECS end"
} | awk -v q="$work/qps.dat" '
    BEGIN { while ((getline l < q) > 0) { split(l, f, " "); n++; T[n] = f[1]; Q[n] = f[2]; E[n] = f[3]; R[n] = f[4] } }
    { at[NR] = $1; name[NR] = $2 }
    END {
        for (i = 1; i < NR; i++) {
            err = 0; rec = 0; min = -1
            for (j = 1; j <= n; j++) if (T[j] > at[i] && T[j] <= at[i + 1] + 0.999) {
                err += E[j]; rec += R[j]; if (min < 0 || Q[j] < min) min = Q[j]
            }
            printf "%-12s %8.1f %8d %11d %8.0f\n", name[i], at[i], err, rec, min
        }
    }'
} | tee "${out%.png}.txt"

# One data file per TiDB for the plot.
plot="plot '$work/qps.dat' using 1:2 axes x1y1 with lines lw 1 lc rgb '#555555' title 'QPS (sysbench)'"
k=0
styles=("lw 5 lc rgb '#1b9e77'" "lw 3 lc rgb '#d95f02'" "lw 1.5 lc rgb '#7570b3'" "lw 1 lc rgb '#e7298a'")
for addr in $(awk '{print $2}' "$work/sessions.dat" | sort -u); do
    k=$((k + 1))
    awk -v a="$addr" '$2 == a {print $1, $3}' "$work/sessions.dat" >"$work/tidb$k.dat"
    # Thick to thin, so equal counts (lines on top of each other) stay visible.
    plot+=", '$work/tidb$k.dat' using 1:2 axes x1y2 with steps ${styles[(k - 1) % 4]} title 'sessions on $addr'"
done
arrows=""
while read -r t name; do
    arrows+="set arrow from $t, graph 0 to $t, graph 1 nohead dt 2 lc rgb 'red'
set label '$name' at $t, graph 0.97 rotate by 90 right offset -1,0 tc rgb 'red'
"
done <"$work/events.dat"
gnuplot <<GP
set terminal pngcairo size 1200,600 font ',11'
set output '$out'
set title 'sysbench oltp\_read\_write, $THREADS threads, through tiproxy: scale-out, scale-in, restarts'
set xlabel 'seconds'
set ylabel 'queries per second'
set y2label 'sessions per TiDB'
set xrange [0:$SECS]
set yrange [0:*]
set y2range [0:$((THREADS + 2))]
set ytics nomirror
set y2tics
set key outside bottom center horizontal
set grid
$arrows
$plot
GP
echo "demo: wrote $out"
exit "$status"
