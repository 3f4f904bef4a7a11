# Shared helpers for scripts/bench/*.sh (sourced, not run).
#
# Every background process goes through `spawn`, so the EXIT trap can stop exactly the
# processes this script started, by PID, and nothing else on this shared machine.
# shellcheck shell=bash

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/../.." && pwd)
FERRY=${FERRY_BIN:-$REPO/target/release/ferry}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
# Credentials for the throwaway local S3 server only.
export AWS_ACCESS_KEY_ID=bench-ak AWS_SECRET_ACCESS_KEY=bench-secret-key
export AWS_REGION=us-east-1
# Plain logs, so warnings can be grepped.
export NO_COLOR=1

SPAWNED=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Stops one process: TERM first so ferry can drain and nginx can reap its workers, KILL
# after 10 s so the benchmark never hangs on a stuck server.
stop_pid() {
  local pid=$1 i keep=()
  # Forget it first: once reaped, its PID may be reused by someone else's process.
  for i in "${SPAWNED[@]}"; do [[ $i == "$pid" ]] || keep+=("$i"); done
  SPAWNED=("${keep[@]}")
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  # Newest first: servers started on top of others (ferry on s3s-fs) go down first.
  local pids=("${SPAWNED[@]}")
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
  if [[ -n ${WORK:-} && -d $WORK && ${KEEP_WORK:-0} != 1 ]]; then
    rm -rf "$WORK"
  elif [[ -n ${WORK:-} ]]; then
    log "work dir kept: $WORK"
  fi
  exit "$rc"
}

# Creates the scratch dir and installs the trap. World-readable (0755) on purpose: nginx and
# lighttpd drop to www-data when started as root and must read the docroots inside it.
bench_init() {
  WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/ferry-bench.XXXXXX")
  chmod 0755 "$WORK"
  trap cleanup EXIT
  # Turn signals into a normal exit so the EXIT trap stops everything.
  trap 'exit 130' INT TERM HUP
  LOGS=${BENCH_LOGS:-$WORK/logs}
  mkdir -p "$LOGS"
}

# spawn VAR LOGNAME CMD...: runs CMD in the background with stdout/stderr in $LOGS and
# stores its PID in VAR (the PID of CMD itself, not of a wrapper, so /proc/PID is the server).
spawn() {
  local _var=$1 _name=$2 _pid
  shift 2
  "$@" >"$LOGS/$_name.out" 2>"$LOGS/$_name.err" &
  _pid=$!
  SPAWNED+=("$_pid")
  printf -v "$_var" '%s' "$_pid"
}

# A free loopback port. There is a small race between closing and the server binding it;
# servers that can report their own port (ferry with port 0) are asked instead.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_port PORT PID: waits until something accepts on 127.0.0.1:PORT, failing early if PID died.
wait_port() {
  local port=$1 pid=$2 i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# start_s3 DATA_DIR BUCKET...: one s3s-fs for the whole run; sets S3_PORT, S3_PID, S3_DATA.
start_s3() {
  S3_DATA=$1
  shift
  local b
  mkdir -p "$S3_DATA"
  for b in "$@"; do mkdir -p "$S3_DATA/$b"; done # s3s-fs: a bucket is a directory
  S3_PORT=$(free_port)
  spawn S3_PID s3s-fs "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" \
    --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_DATA"
  wait_port "$S3_PORT" "$S3_PID" || die "s3s-fs did not start; see $LOGS/s3s-fs.err"
}

# ferry_env SPOOL ARCHIVE CATALOG BUCKET: the FERRY_* variables for one ferry instance. Every
# path is explicit so nothing lands in the repository's ./var.
ferry_env() {
  export FERRY_SPOOL_DIR=$1 FERRY_ARCHIVE_DIR=$2 FERRY_CATALOG_PATH=$3 FERRY_S3_BUCKET=$4
  # No S3 started (only local cases): port 9, where nobody listens.
  export FERRY_S3_ENDPOINT=http://127.0.0.1:${S3_PORT:-9} FERRY_S3_PATH_STYLE=true
  export FERRY_S3_REGION=us-east-1 FERRY_CACHE_DIR=$WORK/ferry-cache
  unset FERRY_CONFIG
}

# make_files DIR COUNT BYTES: COUNT random files f0000.jpg... (random so nothing compresses;
# .jpg so every server looks up a real MIME type, as for the photos ferry is meant for).
# Modification times are set 10 minutes back: a spool filled earlier, whose files
# `ferry sync --once` takes as settled at once instead of waiting spool.settle for them.
make_files() {
  local dir=$1 count=$2 bytes=$3
  mkdir -p "$dir"
  python3 - "$dir" "$count" "$bytes" <<'PY'
import os, sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    with open(os.path.join(d, f"f{i:04d}.jpg"), "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)
    t = os.path.getmtime(f.name) - 600
    os.utime(f.name, (t, t))
PY
}

# Sum of utime+stime (clock ticks) over PIDs. Fields counted after the last ')' because the
# command name may contain spaces.
cpu_ticks() {
  local pid total=0 rest
  for pid in "$@"; do
    rest=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
    # After "comm) ": state is field 1, utime field 12, stime field 13.
    total=$((total + $(awk '{print $12 + $13}' <<<"$rest")))
  done
  echo "$total"
}

# Sum of VmRSS (KiB) over PIDs.
rss_kib() {
  local pid total=0 v
  for pid in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# A PID and its direct children (nginx: master and workers).
pid_tree() {
  local root=$1 f
  echo "$root"
  for f in /proc/[0-9]*/stat; do
    # After "comm) ": field 1 is the state, field 2 the parent PID.
    sed 's/.*) //' "$f" 2>/dev/null | awk -v root="$root" -v f="$f" \
      '$2 == root { split(f, a, "/"); print a[3] }'
  done
}

# The warning and error lines of a ferry log (tracing's format, colour codes stripped).
log_problems() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E '^\S+\s+(WARN|ERROR) |^error' || true
}

# report_logs FILE...: markdown listing of the problems in each log, or "none".
report_logs() {
  local f n found=0
  for f in "$@"; do
    n=$(log_problems "$f" | wc -l)
    [[ $n -gt 0 ]] || continue
    found=1
    echo "- $(basename "$f"): $n line(s); first ones:"
    echo '```'
    log_problems "$f" | head -5 | cut -c1-400
    echo '```'
  done
  [[ $found == 1 ]] || echo "- none"
}

# The commit the working tree is on, and whether its sources differ from it.
ferry_desc() {
  local rev
  rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
    echo "$rev"
  else
    echo "$rev + uncommitted changes in src/ or Cargo.*"
  fi
}

# fill TEMPLATE OUT KEY=VALUE...: writes TEMPLATE to OUT with every @KEY@ replaced by VALUE
# (the server configs of serve.sh and route.sh).
fill() {
  local tpl=$1 out=$2 kv text
  text=$(<"$tpl")
  shift 2
  for kv in "$@"; do text=${text//@${kv%%=*}@/${kv#*=}}; done
  printf '%s\n' "$text" >"$out"
}

# Tool versions and machine state, so a results file says what it measured.
context_lines() {
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- ferry: ${FERRY_BUILD_DESC:-$(ferry_desc)}, binary $FERRY"
}
