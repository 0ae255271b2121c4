#!/usr/bin/env bash
# Builds the release tarballs (`make dist`):
#
#   dist/tiproxy-v<version>-linux-amd64.tar.gz   tiproxy-v<version>-linux-amd64/
#                                                bin/{tiproxy,tiproxyctl},
#                                                conf/proxy.toml, README.md, LICENSE
#   dist/tiproxy.tar.gz                          tiproxy alone at the archive root,
#                                                for `tiup mirror publish`
#
# each with a `.sha256` beside it (`sha256sum -c` in dist/ checks it).
#
# The binaries are linked against glibc 2.17, so they run on CentOS 7 and
# every newer glibc distribution: cargo-zigbuild links with Zig, whose glibc
# stubs of that version refuse any newer symbol at link time. Both come
# from PyPI (`ziglang`, `cargo-zigbuild`, pinned below) into a venv under
# $TIPROXY_TOOLS_DIR (default ~/.cache/tiproxy-rs), installed once; nothing
# else is downloaded but crates. CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.17
TRIPLE=x86_64-unknown-linux-gnu
ZIGLANG=0.15.2
ZIGBUILD=0.24.1

tools_root=${TIPROXY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tiproxy-rs}
tools=$tools_root/zig-$ZIGLANG-zigbuild-$ZIGBUILD

scripts/install-deps.sh protobuf-compiler
# Debian's python3 has no venv module without python3-venv.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    scripts/install-deps.sh python3-venv
fi
mkdir -p "$tools_root"
(
    # One installer at a time (a test and a developer may run this at once);
    # the marker is written only after a complete install.
    flock 9
    if [[ ! -e "$tools/.installed" ]]; then
        echo "dist: installing ziglang $ZIGLANG and cargo-zigbuild $ZIGBUILD from PyPI into $tools"
        rm -rf "$tools"
        python3 -m venv "$tools"
        "$tools/bin/python3" -m pip install --quiet --disable-pip-version-check \
            "ziglang==$ZIGLANG" "cargo-zigbuild==$ZIGBUILD"
        touch "$tools/.installed"
    fi
) 9>"$tools_root/install.lock"

# cargo-zigbuild finds `zig` as the venv's `python3 -m ziglang`; its own
# name must be on the PATH for `cargo zigbuild`.
export PATH="$tools/bin:$PATH"
# Recorded in the binaries' --version by runtime/build.rs.
export TIPROXY_GLIBC_BASELINE=$GLIBC
# A release tarball ships without debug info (the workspace's release
# profile keeps line tables for profiling); symbol names stay for backtraces.
export CARGO_PROFILE_RELEASE_DEBUG=false
export CARGO_PROFILE_RELEASE_STRIP=debuginfo

echo "dist: building tiproxy and tiproxyctl for $TRIPLE, glibc $GLIBC"
cargo zigbuild --release --locked -p tiproxy-runtime --bins --target "$TRIPLE.$GLIBC"
bin=${CARGO_TARGET_DIR:-target}/$TRIPLE/release

# "tiproxy 0.1.0 (git ...)": the version is what the binary says it is.
version=$("$bin/tiproxy" -V | awk '{print $2}')
name=tiproxy-v$version-linux-amd64
stage=dist/.stage
rm -rf "$stage" "dist/$name.tar.gz" "dist/$name.tar.gz.sha256" dist/tiproxy.tar.gz dist/tiproxy.tar.gz.sha256
mkdir -p "$stage/$name/bin" "$stage/$name/conf" "$stage/tiup"
install -m 755 "$bin/tiproxy" "$bin/tiproxyctl" "$stage/$name/bin/"
install -m 644 conf/proxy.toml "$stage/$name/conf/"
install -m 644 README.md LICENSE "$stage/$name/"
install -m 755 "$bin/tiproxy" "$stage/tiup/"

tarball() { # dir, output, entries...
    local dir=$1 out=$2
    shift 2
    tar -C "$dir" --owner=0 --group=0 --numeric-owner --sort=name -czf "$out" "$@"
    (cd dist && sha256sum "$(basename "$out")" >"$(basename "$out").sha256")
}
tarball "$stage" "dist/$name.tar.gz" "$name"
tarball "$stage/tiup" dist/tiproxy.tar.gz tiproxy
rm -rf "$stage"

echo "dist: wrote (tiproxy $version, glibc >= $GLIBC)"
(cd dist && ls -l "$name.tar.gz" tiproxy.tar.gz && cat "$name.tar.gz.sha256" tiproxy.tar.gz.sha256)
