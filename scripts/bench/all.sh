#!/usr/bin/env bash
# The whole benchmark: installs the peers from Debian if missing, builds ferry (release), runs
# upload.sh, serve.sh, route.sh, resources.sh and cluster.sh, and writes their markdown to stdout and to
# scripts/bench/results-latest.md. Logs of every process (ferry's stderr included) are kept in
# scripts/bench/logs-latest/ for inspection; the scratch data is removed.
#
#   scripts/bench/all.sh
#   ROUNDS=3 DURATION=10s SMALL=1000 LARGE_MB=256 scripts/bench/all.sh   # the defaults
#   SMALL=200 LARGE_MB=32 DURATION=3s ROUNDS=1 scripts/bench/all.sh      # quick
#   FERRY_REV=HEAD scripts/bench/all.sh      # a committed revision, not the working tree
#   FERRY_BIN=/path/to/ferry scripts/bench/all.sh       # no build
#
# Every variable of upload.sh, serve.sh, resources.sh and cluster.sh passes through (ROUNDS and
# DURATION too: cluster.sh's own defaults are 1 and 5s, all.sh passes what is set).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH_DIR/../.." && pwd)
OUT=$BENCH_DIR/results-latest.md
LOGROOT=$BENCH_DIR/logs-latest

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Debian packages the peers come from; only what is missing is installed, after one
# `apt-get update`. (Debian's nginx/lighttpd/varnish packages may start system services on
# ports 80/6081 where the init system allows it; the benchmark never uses those.)
install_missing() {
  local want=() sudo=()
  [[ $EUID == 0 ]] || sudo=(sudo)
  command -v nginx >/dev/null || want+=(nginx)
  command -v lighttpd >/dev/null || want+=(lighttpd)
  command -v varnishd >/dev/null || want+=(varnish) # serve.sh's hot-cache peer
  [[ -e /usr/lib/lighttpd/mod_magnet.so ]] || want+=(lighttpd-modules-lua)
  command -v wrk >/dev/null || want+=(wrk)
  command -v haproxy >/dev/null || want+=(haproxy) # route.sh's peer
  # cluster.sh's shared catalog (Debian's package may also start its own cluster on 5432;
  # the benchmark runs its own server on a free port).
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || want+=(postgresql)
  command -v rclone >/dev/null || want+=(rclone)
  [[ -x /usr/bin/time ]] || want+=(time)
  command -v curl >/dev/null || want+=(curl)
  command -v python3 >/dev/null || want+=(python3)
  if [[ ${#want[@]} -gt 0 ]]; then
    log "installing from Debian: ${want[*]}"
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${want[@]}"
  fi
  # The local S3 server, the same one the tests use (cargo install if missing).
  "$REPO/scripts/local-s3.sh" install
}

CHILD=
BIN_DIR=$(mktemp -d /tmp/ferry-bench-bin.XXXXXX)
trap 'rm -rf "$BIN_DIR"' EXIT
# A signal to all.sh reaches the running part, whose own trap stops its servers.
trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; wait 2>/dev/null; exit 130' INT TERM HUP

# part NAME: runs scripts/bench/NAME.sh, its markdown appended to $tmp; failure is noted
# in the results instead of stopping the other part.
part() {
  local name=$1 rc=0
  mkdir -p "$LOGROOT/$name"
  log "running $name.sh (logs: $LOGROOT/$name)"
  BENCH_LOGS=$LOGROOT/$name bash "$BENCH_DIR/$name.sh" >"$LOGROOT/$name.md" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=
  cat "$LOGROOT/$name.md" >>"$tmp"
  if [[ $rc != 0 ]]; then
    printf '\n**%s.sh failed (exit %s); see %s/%s/**\n' "$name" "$rc" "$LOGROOT" "$name" >>"$tmp"
    FAILED=1
  fi
  echo >>"$tmp"
}

install_missing
export PATH="$HOME/.cargo/bin:$PATH"
# The binary under test is copied aside, so another build of target/release during the run
# (the working tree is shared) cannot swap it between cases.
# FERRY_BIN: use that binary. FERRY_REV: build that commit from a `git archive` copy, for a
# result that names exactly what it measured (its own target dir, so the shared one is left
# alone). Default: build the working tree as it is.
if [[ -n ${FERRY_BIN:-} ]]; then
  desc="given binary"
elif [[ -n ${FERRY_REV:-} ]]; then
  rev=$(git -C "$REPO" rev-parse --short "$FERRY_REV")
  log "building ferry $rev (release) from git archive"
  mkdir -p "$BIN_DIR/src"
  git -C "$REPO" archive "$FERRY_REV" | tar -x -C "$BIN_DIR/src"
  target=${BENCH_TARGET_DIR:-$REPO/target/bench-rev}
  (cd "$BIN_DIR/src" && CARGO_TARGET_DIR=$target nice -n 10 cargo build --release --locked)
  cp "$target/release/ferry" "$BIN_DIR/ferry"
  desc="$rev (built from git archive of $FERRY_REV)"
else
  source "$BENCH_DIR/lib.sh" # for ferry_desc only
  desc=$(ferry_desc)
  log "building ferry (release); this may wait for another build's lock on target/"
  (cd "$REPO" && nice -n 10 cargo build --release)
  cp "$REPO/target/release/ferry" "$BIN_DIR/ferry"
fi
export FERRY_BIN=${FERRY_BIN:-$BIN_DIR/ferry} FERRY_BUILD_DESC=$desc

rm -rf "$LOGROOT"
mkdir -p "$LOGROOT"
tmp=$LOGROOT/results.md
FAILED=0
{
  echo "# ferry benchmarks"
  echo
  echo "Produced by \`scripts/bench/all.sh\` (upload.sh, serve.sh, route.sh, resources.sh, then cluster.sh). Logs of the run: scripts/bench/logs-latest/."
  echo "Settings: SMALL=${SMALL:-1000} SMALL_KB=${SMALL_KB:-64} LARGE=${LARGE:-4} LARGE_MB=${LARGE_MB:-256} LAT_RATE=${LAT_RATE:-100} LAT_SECONDS=${LAT_SECONDS:-10} SETTLE=${SETTLE:-default} ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNS=\"${CONNS:-64 256}\" FILES=${FILES:-1000} CASES=\"${CASES:-redirect local-4k local-100k hot-4k hot-100k}\" HOT_HITS=${HOT_HITS:-default}"
  echo
} >"$tmp"
part upload
part serve
part route
part resources
part cluster
cp "$tmp" "$OUT"
cat "$OUT"
log "written to $OUT"
exit "$FAILED"
