#!/usr/bin/env bash
# The main job: workers on several "machines" contend for one lock, each grant carries a
# fencing token, a fenced resource refuses a stale holder, and a revoked holder hears of it.
#
#   scripts/demo.sh                          on the embedded store (mem://)
#   BATON_ENDPOINTS=http://127.0.0.1:2379 scripts/demo.sh    on a running etcd
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null; then
  echo "demo.sh: installing protobuf-compiler (needed to build the etcd client)" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq protobuf-compiler
fi
cargo build --release --quiet -p baton --example demo
exec target/release/examples/demo "$@"
