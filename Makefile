# tiproxy-rs: thin targets over cargo and scripts/ (see README).
#
#   make            release build: target/release/tiproxy and tiproxyctl
#   make test       every test of the workspace (scripts/test.sh)
#   make dist       release tarballs for glibc 2.17+ and tiup in dist/ (scripts/dist.sh)
#   make clean      removes every build output: target/, dist/, the fuzzers' target/
#
# Each installs what it needs (Debian packages; Zig from PyPI for dist).
# CARGO_TARGET_DIR is honoured.

CARGO ?= cargo

.PHONY: all build test dist clean

all: build

build:
	scripts/install-deps.sh protobuf-compiler
	$(CARGO) build --release -p tiproxy-runtime --bins
	@echo "built $${CARGO_TARGET_DIR:-target}/release/tiproxy and tiproxyctl"

test:
	scripts/test.sh

dist:
	scripts/dist.sh

clean:
	$(CARGO) clean
	rm -rf dist core/fuzz/target
