#!/usr/bin/env bash
# The main job, shown in a few seconds by `baton demo`: workers on separate sessions take
# turns on one lock, every grant carries a fencing token and a fenced log refuses stale
# ones; an election fails over after its leader is frozen and its lease revoked, and the
# old leader's late write is refused. Ends with a summary: grants, overlaps (0), leaders,
# failover time.
#
#   scripts/demo.sh                                          on the embedded store (mem://)
#   scripts/demo.sh --workers 8 --seconds 10                 options of `baton demo`
#   BATON_ENDPOINTS=http://127.0.0.1:2379 scripts/demo.sh    on a running etcd
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/prereqs.sh
. scripts/prereqs.sh
mapfile -t need < <(build_packages)
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi
ensure_rust
# Through cargo, so that the binary run is the one just built wherever the target directory
# is (CARGO_TARGET_DIR, a .cargo/config.toml); the first build takes a few minutes, and
# cargo shows its progress.
echo "demo.sh: building baton (release; the first build takes a few minutes)" >&2
exec cargo run --release --bin baton -- demo "$@"
