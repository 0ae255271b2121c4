#!/usr/bin/env bash
# Runs tiproxy.
#
#   scripts/run.sh                      demo: a private MariaDB on 127.0.0.1:4000
#                                       and tiproxy in front of it on 127.0.0.1:6000
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

scripts/install-deps.sh protobuf-compiler mariadb-server mariadb-client
cargo build --release -q -p tiproxy-runtime

demo=$(mktemp -d /tmp/tiproxy-demo.XXXXXX)
cleanup() {
    [[ -n "${proxy_pid:-}" ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null || true
    [[ -n "${db_pid:-}" ]] && kill "$db_pid" 2>/dev/null && wait "$db_pid" 2>/dev/null || true
    rm -rf "$demo"
}
trap cleanup EXIT INT TERM

echo "demo: starting a private MariaDB on 127.0.0.1:4000 (data in $demo)"
mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$demo/data" \
    --auth-root-authentication-method=normal >"$demo/install.log" 2>&1
mariadbd --no-defaults --user="$(id -un)" --datadir="$demo/data" --port=4000 \
    --bind-address=127.0.0.1 --socket="$demo/mysql.sock" --skip-name-resolve \
    --max-connect-errors=1000000 --local-infile=1 >"$demo/mariadb.log" 2>&1 &
db_pid=$!
for _ in $(seq 1 100); do
    mariadb --no-defaults -uroot -S "$demo/mysql.sock" -e 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
done
mariadb --no-defaults -uroot -S "$demo/mysql.sock" <<'SQL'
DELETE FROM mysql.global_priv WHERE User = '';
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
FLUSH PRIVILEGES;
SQL

cat >"$demo/proxy.toml" <<TOML
[proxy]
addr = "127.0.0.1:6000"
pd-addrs = ""
backend-addrs = ["127.0.0.1:4000"]
[api]
addr = "127.0.0.1:3080"
TOML

cat <<MSG

tiproxy is starting on 127.0.0.1:6000 in front of MariaDB on 127.0.0.1:4000.
  connect:  mariadb -h 127.0.0.1 -P 6000 -u root test
  health:   curl http://127.0.0.1:3080/api/debug/health
  metrics:  curl http://127.0.0.1:3080/api/metrics
Ctrl-C stops tiproxy and the demo MariaDB.

MSG
target/release/tiproxy --config "$demo/proxy.toml" &
proxy_pid=$!
wait "$proxy_pid"
