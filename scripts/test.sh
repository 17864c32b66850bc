#!/usr/bin/env bash
# Install whatever is missing, then run every check and every test.
#
#   scripts/test.sh            everything: fmt, clippy, docs, all tests (real etcd included)
#   scripts/test.sh -- ARGS    pass ARGS to `cargo test` (e.g. a test name filter)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/prereqs.sh
. scripts/prereqs.sh

# --- system packages -------------------------------------------------------------------
mapfile -t need < <(build_packages)
command -v etcd >/dev/null         || need+=(etcd-server)
command -v etcdctl >/dev/null      || need+=(etcd-client)
command -v redis-server >/dev/null || need+=(redis-server)
command -v python3 >/dev/null      || need+=(python3)
# pip, for redis-py (below): cloud images often have python3 without it.
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v faketime >/dev/null     || need+=(faketime)   # wall-clock jumps in the fault suite
# Go and etcd 3.4's Go sources (GOPATH /usr/share/gocode): the interop tests with Go's
# clientv3/concurrency and contrib/recipes build a Go program against them.
command -v go >/dev/null           || need+=(golang-go)
[ -d /usr/share/gocode/src/go.etcd.io/etcd/contrib/recipes ] || need+=(golang-etcd-server-dev)
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi
# Installing etcd-server or redis-server may start system services on the default ports;
# the tests never use them: every test starts its own servers on free loopback ports.

# redis-py from PyPI, for the interop tests with Python's redis Lock (they skip, loudly,
# without it). Debian's Python refuses plain pip installs (PEP 668): then allow it.
if ! python3 -c 'import redis' >/dev/null 2>&1; then
  step "installing redis-py from PyPI"
  python3 -m pip install --quiet redis \
    || python3 -m pip install --quiet --break-system-packages redis \
    || echo "warning: redis-py could not be installed (no access to PyPI?): the interop tests with it will skip" >&2
fi

# --- Rust toolchain ---------------------------------------------------------------------
ensure_rust
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null; then
    step "installing rustfmt and clippy"
    rustup component add rustfmt clippy
  fi
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE=1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy: the library with one backend, and with none (its features)"
cargo clippy -p baton --no-default-features --all-targets --locked -- -D warnings
cargo clippy -p baton --no-default-features --features etcd --all-targets --locked -- -D warnings
cargo clippy -p baton --no-default-features --features redis --all-targets --locked -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (unit, doc, conformance on the embedded store and real etcd)"
if [ "${1:-}" = "--" ]; then shift; fi
# Every test binary runs even after one fails, so that one failure does not hide others.
cargo test --workspace --locked --no-fail-fast "$@"
