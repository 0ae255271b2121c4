#!/usr/bin/env bash
# The core must stay sans-IO: no async runtime or socket crate in its normal
# dependency tree, and no clock or OS randomness in its source (clippy's
# disallowed-methods in core/clippy.toml enforces the same for resolved calls;
# this grep also catches paths clippy cannot see, like macros).
set -euo pipefail
cd "$(dirname "$0")/.."

tree=$(cargo tree -p tiproxy-core -e normal --prefix none)
if grep -E '^(tokio|mio|socket2|async-std|smol) ' <<<"$tree"; then
    echo "check-core-sans-io: tiproxy-core depends on an I/O crate (above)" >&2
    exit 1
fi

# Source files of the core, without tests (tests play the driver).
files=$(find core/src -name '*.rs')
if grep -nE 'Instant::now|SystemTime|thread_rng|OsRng|getrandom|rand::rng\(|std::net::(Tcp|Udp)|std::fs::|tokio::' $files; then
    echo "check-core-sans-io: the core reads a clock, OS randomness or does I/O (above)" >&2
    exit 1
fi
echo "check-core-sans-io: ok ($(wc -l <<<"$tree") crates in the core's tree, none does I/O)"
