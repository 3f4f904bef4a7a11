#!/usr/bin/env bash
# Upload benchmark: `ferry sync --once` against Debian's `rclone copy` (defaults, and
# --transfers 16), one local s3s-fs server, the same files, then ferry's drop->archived
# latency under the running `ferry sync` daemon. Prints markdown on stdout; logs on stderr.
#
#   scripts/bench/upload.sh                    # 1000 x 64 KiB and 4 x 256 MiB, 100 files/s x 10 s
#   SMALL=200 LARGE_MB=32 scripts/bench/upload.sh   # a quick run
#
# Env: ROUNDS (rounds of every upload, tool order rotated per round, default 3; the tables
# give medians), SMALL (files of SMALL_KB KiB, default 1000 x 64), LARGE / LARGE_MB (default 4 x 256),
# LAT_RATE / LAT_SECONDS (drop rate, default 100/s for 10 s), SETTLE (ferry's spool.settle for
# the latency run, default ferry's own 1s), FERRY_BIN, BENCH_TMP (scratch parent, default
# /tmp), BENCH_LOGS (keep logs there), KEEP_WORK=1 (keep the scratch dir).
#
# Why the setup looks like this:
# - Every tool gets its own fresh copy of the files (ferry moves its spool away) and its own
#   fresh bucket, so no tool can skip work because an earlier one left objects behind.
# - The files are dated 10 minutes back and copied with cp -a (mtime kept), as in a spool
#   filled earlier, so `ferry sync --once` does not wait spool.settle for files it would take
#   as "just written"; that wait belongs to the latency run below, which measures it.
# - `sync` before each run flushes the previous run's dirty pages, so one tool's writeback does
#   not land in the next tool's time. The files themselves stay in the page cache for every
#   tool alike; all are reading from memory.
# - ferry fsyncs its catalog and archive moves (its durability rule); rclone fsyncs nothing.
#   Both write through the same s3s-fs, which does not fsync either.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-3}
SMALL=${SMALL:-1000}
SMALL_KB=${SMALL_KB:-64}
LARGE=${LARGE:-4}
LARGE_MB=${LARGE_MB:-256}
LAT_RATE=${LAT_RATE:-100}
LAT_SECONDS=${LAT_SECONDS:-10}
SETTLE=${SETTLE:-}
TOOL_TIMEOUT=${TOOL_TIMEOUT:-1200} # seconds; a safety net, every run should be far shorter

[[ -x $FERRY ]] || die "no ferry binary at $FERRY (cargo build --release, or set FERRY_BIN)"
for c in rclone python3 "$S3S_FS"; do command -v "$c" >/dev/null || die "missing $c"; done
[[ -x /usr/bin/time ]] || die "missing /usr/bin/time (Debian package 'time')"

bench_init
RESULTS=$WORK/upload.tsv
printf 'dataset\ttool\tround\tfiles\tbytes\twall_s\trss_kib\tcpu_s\texit\tcheck\n' >"$RESULTS"

log "generating data in $WORK/src"
make_files "$WORK/src/small" "$SMALL" $((SMALL_KB * 1024))
make_files "$WORK/src/large" "$LARGE" $((LARGE_MB * 1024 * 1024))
start_s3 "$WORK/s3"
log "s3s-fs on 127.0.0.1:$S3_PORT (pid $S3_PID)"

# rclone's remote "s3:" lives only in the environment. s3s-fs checks SigV4, which rclone uses
# for provider Other; path style because s3s-fs has no virtual-host domain configured.
# An empty config file keeps rclone from reading or creating ~/.config/rclone.
: >"$WORK/rclone.conf"
rclone_env=(
  RCLONE_CONFIG="$WORK/rclone.conf"
  RCLONE_CONFIG_S3_TYPE=s3 RCLONE_CONFIG_S3_PROVIDER=Other
  RCLONE_CONFIG_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  RCLONE_CONFIG_S3_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID"
  RCLONE_CONFIG_S3_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"
  RCLONE_CONFIG_S3_FORCE_PATH_STYLE=true RCLONE_CONFIG_S3_REGION=us-east-1
)

now_s() { date +%s.%N; }

# check_bucket SRC BUCKET: same file count, same total bytes, and the first and last files
# byte-identical; a tool that is fast because it skipped or mangled files must not win.
check_bucket() {
  local src=$1 dir=$S3_DATA/$2 n want_n bytes want_bytes f
  want_n=$(find "$src" -type f | wc -l)
  n=$(find "$dir" -type f | wc -l)
  want_bytes=$(find "$src" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  bytes=$(find "$dir" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  [[ $n == "$want_n" && $bytes == "$want_bytes" ]] || { echo "BAD:$n/$want_n files"; return; }
  for f in $(find "$src" -type f -printf '%f\n' | sort | sed -n '1p;$p'); do
    cmp -s "$src/$f" "$dir/$f" || { echo "BAD:$f differs"; return; }
  done
  echo ok
}

# run_tool SET LABEL TOOL ROUND: one timed run on a fresh spool copy into a fresh bucket.
run_tool() {
  local src=$WORK/src/$1 ds=$2 tool=$3 round=$4 slug bucket run tf rc=0 t0 t1 check
  slug=$1-$(tr -c 'a-z0-9\n' '-' <<<"$tool" | tr -s '-')
  slug=${slug%-}-r$round
  bucket=bench-$slug
  run=$WORK/run/$slug
  tf=$LOGS/time-$slug.txt
  mkdir -p "$run/spool" "$S3_DATA/$bucket"
  cp -a "$src/." "$run/spool/"
  sync
  log "upload: $ds with $tool (round $round)"
  case $tool in
    ferry)
      ferry_env "$run/spool" "$run/archive" "$run/catalog.db" "$bucket"
      t0=$(now_s)
      # time outside timeout: GNU time reports the largest RSS among what it waited for,
      # and a TERM from timeout would otherwise orphan ferry.
      /usr/bin/time -v -o "$tf" timeout -k 10 "$TOOL_TIMEOUT" \
        "$FERRY" sync --once --timeout "${TOOL_TIMEOUT}s" \
        >"$LOGS/ferry-$slug.out" 2>"$LOGS/ferry-$slug.err" || rc=$?
      t1=$(now_s)
      ;;
    rclone* | "raw PUT"*)
      local extra=()
      [[ $tool == *16* ]] && extra=(--transfers 16)
      # The upload ceiling of this S3 server: nothing but PUTs, no checks before or after.
      [[ $tool == "raw PUT"* ]] && extra=(--transfers 32 --s3-no-head --no-check-dest --s3-no-check-bucket)
      t0=$(now_s)
      # AWS_CA_BUNDLE may point at a file rclone cannot load; plain HTTP needs none.
      env -u AWS_CA_BUNDLE "${rclone_env[@]}" /usr/bin/time -v -o "$tf" \
        timeout -k 10 "$TOOL_TIMEOUT" rclone copy "$run/spool" "s3:$bucket" "${extra[@]}" \
        >"$LOGS/rclone-$slug.out" 2>"$LOGS/rclone-$slug.err" || rc=$?
      t1=$(now_s)
      ;;
  esac
  check=$(check_bucket "$src" "$bucket")
  if [[ $tool == ferry ]]; then
    # ferry's own promise: everything archived, nothing left in the spool.
    local left
    left=$(find "$run/spool" -type f | wc -l)
    [[ $left == 0 ]] || check="$check; $left left in spool"
    [[ $(log_problems "$LOGS/ferry-$slug.err" | wc -l) == 0 ]] ||
      check="$check; warnings in log (ferry-$slug.err)"
  fi
  local rss cpu
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf")
  cpu=$(awk -F': ' '/User time/ {u = $2} /System time/ {s = $2} END {print u + s}' "$tf")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ds" "$tool" "$round" \
    "$(find "$src" -type f | wc -l)" \
    "$(find "$src" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" \
    "${rss:-0}" "${cpu:-0}" "$rc" "$check" >>"$RESULTS"
  # Free the disk for the next run (1 GiB per copy for the large set).
  rm -rf "$run" "${S3_DATA:?}/$bucket"
}

for set in small large; do
  if [[ $set == small ]]; then label="$SMALL × $SMALL_KB KiB"; else label="$LARGE × $LARGE_MB MiB"; fi
  tools=(ferry rclone "rclone --transfers 16")
  # The raw-PUT ceiling only where it means something: many small files.
  [[ $set == large ]] || tools+=("raw PUT (rclone, 32 transfers, no checks)")
  # Rotated per round, so no tool always runs first (cold) or right after another's
  # writeback.
  n=${#tools[@]}
  for ((round = 1; round <= ROUNDS; round++)); do
    for ((i = 0; i < n; i++)); do
      run_tool "$set" "$label" "${tools[$(((i + round - 1) % n))]}" "$round"
    done
  done
done

# Drop -> archived latency under the long-running daemon.
log "latency: ferry sync, $LAT_RATE files/s for $LAT_SECONDS s"
lat=$WORK/lat
mkdir -p "$lat/spool" "$S3_DATA/bench-latency"
ferry_env "$lat/spool" "$lat/archive" "$lat/catalog.db" bench-latency
[[ -n $SETTLE ]] && export FERRY_SPOOL_SETTLE=$SETTLE
mkdir -p "$lat/archive"
spawn FERRY_SYNC_PID ferry-sync-latency "$FERRY" sync
# Ready = a probe file made the whole trip; this also opens the S3 connection pool, so the
# first measured file does not pay for it.
echo probe >"$lat/spool/probe.txt"
for _ in $(seq 1 300); do
  [[ -e $lat/archive/probe.txt ]] && break
  kill -0 "$FERRY_SYNC_PID" 2>/dev/null || die "ferry sync exited; see $LOGS/ferry-sync-latency.err"
  sleep 0.1
done
[[ -e $lat/archive/probe.txt ]] || die "ferry sync did not archive a probe in 30 s"
latline=$(python3 "$BENCH_DIR/droplat.py" --spool "$lat/spool" --archive "$lat/archive" \
  --rate "$LAT_RATE" --seconds "$LAT_SECONDS" --size $((SMALL_KB * 1024)) --timeout 120)
# Files renamed into the spool (temp name, then rename): ready at once, no settle.
renline=$(python3 "$BENCH_DIR/droplat.py" --spool "$lat/spool" --archive "$lat/archive" \
  --rate "$LAT_RATE" --seconds "$LAT_SECONDS" --size $((SMALL_KB * 1024)) --timeout 120 --rename)
stop_pid "$FERRY_SYNC_PID"
declare -A L R
for kv in $latline; do L[${kv%%=*}]=${kv#*=}; done
for kv in $renline; do R[${kv%%=*}]=${kv#*=}; done

# ---- report ----
echo "## Upload: ferry sync --once vs rclone copy"
echo
context_lines
echo "- rclone: $(rclone version 2>/dev/null | head -1); s3s-fs: $("$S3S_FS" --version 2>/dev/null); all on one s3s-fs at 127.0.0.1, data under ${BENCH_TMP:-/tmp}"
echo "- $ROUNDS round(s), tool order rotated per round; medians, with the range of files/s; fresh spool copy and fresh bucket each run; MB = 10^6 bytes; peak RSS from /usr/bin/time -v; files read from page cache by every tool"
echo "- ferry defaults (s3.concurrency ${FERRY_S3_CONCURRENCY:-32}, multipart above 64 MiB in 16 MiB parts, verify auto); rclone defaults are --transfers 4, multipart above 200 MiB in 5 MiB chunks"
echo "- raw PUT: the upload ceiling of this S3 server on these files, \`rclone copy --transfers 32 --s3-no-head --no-check-dest --s3-no-check-bucket\` (nothing but PUTs)"
echo
python3 "$BENCH_DIR/report.py" upload "$RESULTS"
echo
echo "### Drop → archived latency (ferry sync daemon)"
echo
echo "spool.settle = ${SETTLE:-1s (default)}; ${L[dropped]} files of $SMALL_KB KiB at ${L[rate]} files/s, then ${R[dropped]} at ${R[rate]} files/s renamed in; latency from close() (or the rename) to the file appearing in the archive dir (polled every 5 ms)."
echo
echo "| how | files archived | p50 s | p90 s | p99 s | min s | max s | missing |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
echo "| finished by close (open, write, close; settle applies) | ${L[arrived]} | ${L[p50]} | ${L[p90]} | ${L[p99]} | ${L[min]} | ${L[max]} | ${L[missing]} |"
echo "| renamed in (.NAME.part, then rename; ready at once) | ${R[arrived]} | ${R[p50]} | ${R[p90]} | ${R[p99]} | ${R[min]} | ${R[max]} | ${R[missing]} |"
echo
echo "### ferry stderr (warnings and errors)"
echo
report_logs "$LOGS"/ferry-*.err
