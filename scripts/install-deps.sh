#!/usr/bin/env bash
# Installs the system packages the build and tests need, if missing.
# Debian 12; needs root (CI runs as root) or sudo.
set -euo pipefail
need=()
# (The runtime's tests add mariadb-server, etcd-server and friends here.)
for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
