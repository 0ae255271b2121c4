#!/usr/bin/env bash
# Where the proxy CPU per query goes, user vs kernel: HAProxy nbthread 1, tiproxy
# (default) and tiproxy with one worker thread, sysbench oltp_point_select
# ($TH threads) in alternating rounds; utime and stime from /proc/PID/stat.
#   bench/cpu-split.sh            # ~2 min; BIN=path/to/tiproxy ROUNDS=5 SECS=10 TH=16
# A measurement, not a test. Private ports 23706-23715, temp dir removed on exit.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/tiproxy}
TH=${TH:-16}; SECS=${SECS:-10}; ROUNDS=${ROUNDS:-5}
TMP=$(mktemp -d /tmp/ksplit.XXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null||true; done; sleep 1; rm -rf $TMP' EXIT
DB=23706
mariadb-install-db --no-defaults --user=root --datadir=$TMP/data --auth-root-authentication-method=normal >/dev/null 2>&1
mariadbd --no-defaults --user=root --datadir=$TMP/data --port=$DB --bind-address=127.0.0.1 --socket=$TMP/s.sock --pid-file=$TMP/p.pid --skip-log-bin --performance-schema=OFF --max-connections=2000 --innodb-buffer-pool-size=512M --log-error=$TMP/err >/dev/null 2>&1 &
PIDS+=($!)
for i in $(seq 100); do mariadb --no-defaults -uroot --socket=$TMP/s.sock -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
mariadb --no-defaults -uroot --socket=$TMP/s.sock -e "DELETE FROM mysql.global_priv WHERE User=''; FLUSH PRIVILEGES; CREATE DATABASE sbtest; CREATE USER 'bench'@'%' IDENTIFIED BY 'benchpw'; GRANT ALL ON *.* TO 'bench'@'%';"
SB=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user=bench --mysql-password=benchpw --mysql-db=sbtest --tables=1 --table-size=100000)
sysbench oltp_point_select "${SB[@]}" --mysql-port=$DB prepare >/dev/null 2>&1
declare -A P
printf 'global\n nbthread 1\ndefaults\n mode tcp\n timeout connect 5s\n timeout client 1h\n timeout server 1h\nfrontend f\n bind 127.0.0.1:23710\n default_backend b\nbackend b\n server s 127.0.0.1:%s\n' $DB > $TMP/ha.cfg
haproxy -f $TMP/ha.cfg >/dev/null 2>&1 & PIDS+=($!); P[haproxy1]="$! 23710"
printf '[proxy]\naddr = "127.0.0.1:23712"\npd-addrs = ""\nbackend-addrs = ["127.0.0.1:%s"]\n[api]\naddr = "127.0.0.1:23713"\n[log]\nlevel = "warn"\n' $DB > $TMP/t.toml
$BIN --config $TMP/t.toml >$TMP/t.log 2>&1 & PIDS+=($!); P[tiproxy]="$! 23712"
printf '[proxy]\naddr = "127.0.0.1:23714"\npd-addrs = ""\nbackend-addrs = ["127.0.0.1:%s"]\n[api]\naddr = "127.0.0.1:23715"\n[log]\nlevel = "warn"\n' $DB > $TMP/t1.toml
TIPROXY_WORKER_THREADS=1 $BIN --config $TMP/t1.toml >$TMP/t1.log 2>&1 & PIDS+=($!); P[tiproxy-w1]="$! 23714"
sleep 2
tck=$(getconf CLK_TCK)
for r in $(seq $ROUNDS); do
  order="haproxy1 tiproxy tiproxy-w1"; [ $((r%2)) = 0 ] && order="tiproxy-w1 tiproxy haproxy1"
  for t in $order; do
    set -- ${P[$t]}; pid=$1; port=$2
    sysbench oltp_point_select "${SB[@]}" --mysql-port=$port --threads=$TH --time=2 run >/dev/null 2>&1
    read u0 s0 < <(sed 's/^.*) //' /proc/$pid/stat | awk '{print $12, $13}')
    q=$(sysbench oltp_point_select "${SB[@]}" --mysql-port=$port --threads=$TH --time=$SECS run 2>/dev/null | awk '/queries:/ {print $2; exit}')
    read u1 s1 < <(sed 's/^.*) //' /proc/$pid/stat | awk '{print $12, $13}')
    awk -v t=$t -v r=$r -v q=$q -v u=$((u1-u0)) -v s=$((s1-s0)) -v h=$tck -v secs=$SECS 'BEGIN{printf "r%d %-10s qps=%7.0f user=%.2f us/q sys=%.2f us/q total=%.2f us/q\n", r, t, q/secs, u/h*1e6/q, s/h*1e6/q, (u+s)/h*1e6/q}'
  done
done
