#!/usr/bin/env bash
# The whole benchmark: installs the peers from Debian if missing, builds ferry (release), runs
# upload.sh and serve.sh, and writes their markdown to stdout and to
# scripts/bench/results-latest.md. Logs of every process (ferry's stderr included) are kept in
# scripts/bench/logs-latest/ for inspection; the scratch data is removed.
#
#   scripts/bench/all.sh
#   ROUNDS=3 DURATION=10s SMALL=1000 LARGE_MB=256 scripts/bench/all.sh   # the defaults
#   SKIP_BUILD=1 SMALL=200 LARGE_MB=32 DURATION=3s ROUNDS=1 scripts/bench/all.sh   # quick
#
# Every variable of upload.sh and serve.sh passes through.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH_DIR/../.." && pwd)
OUT=$BENCH_DIR/results-latest.md
LOGROOT=$BENCH_DIR/logs-latest

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Debian packages the peers come from; only what is missing is installed, after one
# `apt-get update`. (Debian's nginx/lighttpd packages may start system services on port 80
# where the init system allows it; the benchmark never uses those.)
install_missing() {
  local want=() sudo=()
  [[ $EUID == 0 ]] || sudo=(sudo)
  command -v nginx >/dev/null || want+=(nginx)
  command -v lighttpd >/dev/null || want+=(lighttpd)
  [[ -e /usr/lib/lighttpd/mod_magnet.so ]] || want+=(lighttpd-modules-lua)
  command -v wrk >/dev/null || want+=(wrk)
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
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building ferry (release); this may wait for another build's lock on target/"
  (cd "$REPO" && nice -n 10 cargo build --release)
fi

rm -rf "$LOGROOT"
mkdir -p "$LOGROOT"
tmp=$LOGROOT/results.md
FAILED=0
{
  echo "# ferry benchmarks"
  echo
  echo "Produced by \`scripts/bench/all.sh\` (upload.sh, then serve.sh). Logs of the run: scripts/bench/logs-latest/."
  echo "Settings: SMALL=${SMALL:-1000} SMALL_KB=${SMALL_KB:-64} LARGE=${LARGE:-4} LARGE_MB=${LARGE_MB:-256} LAT_RATE=${LAT_RATE:-100} LAT_SECONDS=${LAT_SECONDS:-10} SETTLE=${SETTLE:-default} ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNS=\"${CONNS:-64 256}\" FILES=${FILES:-1000}"
  echo
} >"$tmp"
part upload
part serve
cp "$tmp" "$OUT"
cat "$OUT"
log "written to $OUT"
exit "$FAILED"
