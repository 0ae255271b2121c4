#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh mariadb-server mariadb-client etcd-server protobuf-compiler chromium chromium-driver iproute2 iptables systemd
cargo test --workspace --all-targets
cargo test --workspace --doc
