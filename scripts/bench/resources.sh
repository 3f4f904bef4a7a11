#!/usr/bin/env bash
# Resource figures (issue 6, item 7 and the load limits of item 6), printed as markdown:
#
#   rss        peak RSS of `ferry sync --once` uploading one file of BIG_MB (1024) MiB and
#              one of a tenth of that, at default settings: memory must not grow with size;
#              then BIG_MB again with QUEUED (10,000) small files in the spool beside it (all
#              queued at once): memory must not grow with the queue either.
#   queue      time from `ferry sync` starting to QUEUE_FILES (100,000) files already in the
#              spool being rows in the catalog (S3 unreachable, so nothing moves meanwhile).
#              Reported with and without spool.settle (1 s by default), which every file
#              found by a scan must wait out (DESIGN.md "Ready file").
#   idle       `ferry serve` with IDLE (10,000) idle connections open while wrk -c64 asks
#              for a 4 KiB local file: req/s and errors beside a run without them, RSS and
#              how many idle connections the server still holds at the end.
#
#   scripts/bench/resources.sh
#   BIG_MB=256 QUEUE_FILES=20000 IDLE=2000 scripts/bench/resources.sh     # quick
#   PARTS="queue idle" scripts/bench/resources.sh                          # some parts only
#
# Uses s3s-fs on loopback like the other benchmarks; FERRY_BIN names the binary.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BIG_MB=${BIG_MB:-1024}
QUEUE_FILES=${QUEUE_FILES:-100000}
IDLE=${IDLE:-10000}
QUEUED=${QUEUED:-10000}
DURATION=${DURATION:-10s}
PARTS=${PARTS:-rss queue idle}
[[ -x $FERRY ]] || die "no ferry binary at $FERRY (cargo build --release, or set FERRY_BIN)"
[[ -x /usr/bin/time ]] || die "needs GNU time (/usr/bin/time; Debian package time)"
command -v wrk >/dev/null || die "needs wrk"
bench_init
start_s3 "$WORK/s3" bench-rss

out() { printf '%s\n' "$*"; }
out "## Resources"
out
out "Produced by \`scripts/bench/resources.sh\` (BIG_MB=$BIG_MB QUEUED=$QUEUED QUEUE_FILES=$QUEUE_FILES IDLE=$IDLE DURATION=$DURATION) on $(nproc) cores; ferry $(ferry_desc)."
out

# --- rss ------------------------------------------------------------------------------------
rss_case() {
  local mb=$1 queued=${2:-0} dir=$WORK/rss-$1
  mkdir -p "$dir/spool"
  head -c "$((mb << 20))" /dev/urandom >"$dir/spool/big-$mb.bin"
  if ((queued > 0)); then
    # 1 KiB each, in folders of 1,000, dated back (make_files) so none waits spool.settle.
    local k left n
    for ((k = 0, left = queued; left > 0; k++, left -= n)); do
      n=$((left < 1000 ? left : 1000))
      make_files "$dir/spool/queued/d$k" "$n" 1024
    done
  fi
  ferry_env "$dir/spool" "$dir/archive" "$dir/catalog.db" bench-rss
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -v "$FERRY" sync --once >"$LOGS/rss-$mb.out" 2>"$LOGS/rss-$mb.err" ||
    die "ferry sync --once ($mb MiB) failed; see $LOGS/rss-$mb.err"
  t1=$(date +%s.%N)
  [[ -f $dir/archive/big-$mb.bin ]] || die "big-$mb.bin was not archived"
  local rss n_arch what="$mb MiB"
  n_arch=$(find "$dir/archive" -type f | wc -l)
  [[ $n_arch == $((queued + 1)) ]] || die "$n_arch of $((queued + 1)) files archived"
  ((queued == 0)) || what="$mb MiB + $queued files of 1 KiB queued"
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$LOGS/rss-$mb.err")
  awk -v what="$what" -v rss="$rss" -v t0="$t0" -v t1="$t1" -v mb="$mb" 'BEGIN {
    printf "| %s | %.1f MiB | %.1f s | %.0f MB/s |\n", what, rss / 1024, t1 - t0, mb * 1.048576 / (t1 - t0)
  }'
  rm -rf "$dir"
}
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part rss; then
log "rss: uploading ${BIG_MB} MiB and $((BIG_MB / 10)) MiB files"
out "### Peak RSS while uploading one large file, alone and with $QUEUED small files queued beside it (\`ferry sync --once\`, defaults)"
out
out "| file | peak RSS | wall | throughput |"
out "|---|---|---|---|"
rss_case "$((BIG_MB / 10))"
rss_case "$BIG_MB"
rss_case "$BIG_MB" "$QUEUED"
out
fi

# --- queue ----------------------------------------------------------------------------------
queue_case() {
  local settle=$1 dir=$WORK/queue
  rm -f "$dir/catalog.db" "$dir/catalog.db-wal" "$dir/catalog.db-shm"
  ferry_env "$dir/spool" "$dir/archive" "$dir/catalog.db" bench-queue
  # Nothing listens there: every upload fails fast and the files stay put.
  export FERRY_S3_ENDPOINT=http://127.0.0.1:9 FERRY_SPOOL_SETTLE=$settle
  local pid t0
  t0=$(date +%s.%N)
  spawn pid "queue-$settle" "$FERRY" sync
  python3 - "$dir/catalog.db" "$QUEUE_FILES" "$pid" "$t0" <<'PY'
import os, sqlite3, sys, time
db, want, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Measured from the moment ferry was started (wall clock, as the shell recorded it).
start = float(sys.argv[4])
while time.time() - start < 120:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("ferry sync exited")
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        n = c.execute("SELECT count(*) FROM files").fetchone()[0]
        c.close()
    except sqlite3.Error:
        n = 0
    if n >= want:
        break
    time.sleep(0.02)
print(f"{time.time() - start:.2f} {n}")
PY
  stop_pid "$pid"
}
if part queue; then
log "queue: creating $QUEUE_FILES files"
mkdir -p "$WORK/queue/spool"
python3 - "$WORK/queue/spool" "$QUEUE_FILES" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    sub = os.path.join(d, f"{i % 100:02d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"{i}.jpg"), "wb") as f:
        f.write(b"x" * (i % 512))
PY
out "### Time to queue $QUEUE_FILES files already in the spool at start-up"
out
out "| spool.settle | time until all are catalog rows | rows |"
out "|---|---|---|"
for settle in 1s 0s; do
  log "queue: settle $settle"
  # Not in a subshell: spawn must record the PID where the EXIT trap can see it.
  queue_case "$settle" >"$WORK/queue.result"
  read -r secs rows <"$WORK/queue.result"
  out "| $settle | $secs s | $rows |"
done
unset FERRY_SPOOL_SETTLE
out
rm -rf "$WORK/queue"
fi

# --- idle -----------------------------------------------------------------------------------
part idle || exit 0
log "idle: ferry serve with $IDLE idle connections"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
dir=$WORK/idle
make_files "$dir/static" 1 4096
ferry_env "$dir/static" "$dir/archive" "$dir/catalog.db" bench-idle
export FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_CACHE_MAX_SIZE=0
spawn fpid ferry-serve-idle "$FERRY" serve
addr=
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^ferry: http listening on //p' "$LOGS/ferry-serve-idle.out")
  [[ -n $addr ]] && break
  sleep 0.1
done
[[ -n $addr ]] || die "ferry serve did not report its address"
url=http://$addr/static/f0000.jpg
curl -fsS -o /dev/null "$url" || die "ferry serve does not answer $url"
wrk_line() { # prints "req/s errors"
  wrk -t2 -c64 -d"$DURATION" --latency "$url" >"$LOGS/wrk-$1.txt" 2>&1 || true
  awk '/Requests\/sec/ {r=$2} /Non-2xx|Socket errors/ {e=e" "$0} END {print r, (e == "" ? "none" : e)}' \
    "$LOGS/wrk-$1.txt"
}
rss0=$(rss_kib "$fpid")
read -r base_rps base_err < <(wrk_line base)
hold=$(( ${DURATION%s} + 8 ))
python3 "$BENCH_DIR/idle.py" "$addr" "$IDLE" "$hold" >"$LOGS/idle-holder.out" 2>&1 &
hpid=$!
SPAWNED+=("$hpid")
for _ in $(seq 1 600); do
  grep -q '^open' "$LOGS/idle-holder.out" 2>/dev/null && break
  kill -0 "$hpid" 2>/dev/null || die "idle.py failed: $(cat "$LOGS/idle-holder.out")"
  sleep 0.1
done
opened=$(awk '/^open/ {print $2}' "$LOGS/idle-holder.out")
rss1=$(rss_kib "$fpid")
read -r idle_rps idle_err < <(wrk_line idle)
rss2=$(rss_kib "$fpid")
wait "$hpid" || true
still=$(awk '/^still/ {print $2}' "$LOGS/idle-holder.out")
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$fpid/status")
out "### ferry serve with $IDLE idle connections (4 KiB local file, wrk -t2 -c64 -d$DURATION)"
out
out "| | req/s | wrk errors | ferry RSS |"
out "|---|---|---|---|"
out "| no idle connections | $base_rps | $base_err | $((rss0 / 1024)) MiB |"
out "| $opened idle connections open | $idle_rps | $idle_err | $((rss1 / 1024)) MiB before wrk, $((rss2 / 1024)) MiB after |"
out
out "- idle connections the server still held after $hold s: ${still:-?} of $opened (a client must finish its request head within http.header_read_timeout, 30 s); ferry's peak RSS (VmHWM) $((hwm / 1024)) MiB"
out "- open-files limit of the ferry process: $(awk '/Max open files/ {print $4}' "/proc/$fpid/limits")"
