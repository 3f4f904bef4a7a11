#!/usr/bin/env bash
# Serve benchmark: `ferry serve` against nginx (try_files -> @s3 302; Debian's tcp_nopush on,
# and off) and lighttpd + mod_magnet (the seed's s3.lua), on the same 1000 files cycled by
# wrk, for three cases:
#   redirect    every file has moved to S3: ferry's catalog says archived (a real
#               `ferry sync --once` ran first), the peers find nothing on disk; all answer 302
#   local-4k    1000 files of 4 KiB on disk; all answer 200
#   local-100k  1000 files of 100 KiB on disk; all answer 200
# Prints markdown on stdout (medians over ROUNDS, ratios); progress on stderr.
#
# Env: ROUNDS (3), DURATION (wrk -d, 10s), CONNS ("64 256"), CASES (the three above),
# FILES (1000), FERRY_BIN, BENCH_TMP, BENCH_LOGS, KEEP_WORK=1.
#
# Why it is run this way:
# - All servers of a case run at once on their own loopback ports; each round visits them
#   in a rotated order, so none always goes first (cold) or last (after the others heated
#   the machine). One unrecorded 2 s warm-up per server fills page cache and ferry's
#   metadata cache.
# - Server CPU is the utime+stime delta of the server's processes (nginx: master and workers)
#   across the wrk run; wrk itself runs on the same 2 cores, which caps everyone alike.
# - Before each run one request is checked for the expected status, so a misconfigured
#   server (404s are fast) cannot post a good number.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-"64 256"}
CASES=${CASES:-"redirect local-4k local-100k"}
export BENCH_FILES=${FILES:-1000} # read by paths.lua
HZ=$(getconf CLK_TCK)
SERVERS=(ferry "nginx (tcp_nopush on)" "nginx (tcp_nopush off)" "lighttpd + mod_magnet")

[[ -x $FERRY ]] || die "no ferry binary at $FERRY (cargo build --release, or set FERRY_BIN)"
for c in nginx lighttpd wrk curl python3 "$S3S_FS"; do
  command -v "$c" >/dev/null || die "missing $c"
done
[[ -e /usr/lib/lighttpd/mod_magnet.so ]] || die "missing mod_magnet (lighttpd-modules-lua)"

bench_init
RESULTS=$WORK/serve.tsv
printf 'case\tconns\tserver\tround\trps\tp50_ms\tp99_ms\tcpu_pct\tcpu_us_per_req\trss_kib\terrors\trequests\tload1\n' >"$RESULTS"
# Workers drop to www-data when started as root; as any other user there is nothing to drop.
if [[ $EUID == 0 ]]; then
  NGINX_USER="user www-data;"
  LIGHTTPD_USER='server.username = "www-data"'$'\n''server.groupname = "www-data"'
else
  NGINX_USER="" LIGHTTPD_USER=""
fi

# ---- data: one docroot per case; the servers map /static/KEY to ROOT/static/KEY ----
log "generating data in $WORK"
make_files "$WORK/redirect/static" "$BENCH_FILES" 4096
make_files "$WORK/local-4k/static" "$BENCH_FILES" 4096
make_files "$WORK/local-100k/static" "$BENCH_FILES" $((100 * 1024))

# The redirect case starts from a real upload: ferry moves every file to S3 and its catalog
# records them archived, leaving the docroot empty for all servers alike.
if [[ " $CASES " == *" redirect "* ]]; then
  start_s3 "$WORK/s3" bench-serve
  ferry_env "$WORK/redirect/static" "$WORK/redirect/archive" "$WORK/redirect/catalog.db" bench-serve
  log "ferry sync --once on the redirect set (s3s-fs on port $S3_PORT)"
  timeout -k 10 600 "$FERRY" sync --once --timeout 5m \
    >"$LOGS/ferry-sync-once.out" 2>"$LOGS/ferry-sync-once.err" ||
    die "ferry sync --once failed; see $LOGS/ferry-sync-once.err"
  left=$(find "$WORK/redirect/static" -type f | wc -l)
  [[ $left == 0 ]] || die "$left files still in the spool after ferry sync --once"
  # ferry serve answers a redirect from its catalog alone; the S3 server is not needed.
  stop_pid "$S3_PID"
fi

# ---- servers ----
# Each start_* sets PORT_<tag> and PIDS_<tag> (space-separated, all processes to account).
declare -A PORT PIDS

start_ferry() {
  local root=$1 tag=ferry
  ferry_env "$root/static" "$root/archive" "$root/catalog.db" bench-serve
  # Port 0: ferry reports the port it bound on stdout, so there is no race for a free port.
  export FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_HTTP_REDIRECT_BASE=http://s3.example/bucket/
  # An endpoint nobody listens on: the serve path must not need S3 for these cases.
  export FERRY_S3_ENDPOINT=http://127.0.0.1:9
  local pid i addr=
  spawn pid "ferry-serve-$CASE" "$FERRY" serve
  for i in $(seq 1 200); do
    addr=$(sed -n 's/^ferry: http listening on //p' "$LOGS/ferry-serve-$CASE.out")
    [[ -n $addr ]] && break
    kill -0 "$pid" 2>/dev/null || die "ferry serve exited; see $LOGS/ferry-serve-$CASE.err"
    sleep 0.05
  done
  [[ -n $addr ]] || die "ferry serve did not report its address"
  PORT[$tag]=${addr##*:}
  PIDS[$tag]=$pid
}

# fill TEMPLATE OUT KEY=VALUE...: replaces @KEY@ with VALUE.
fill() {
  local tpl=$1 out=$2 kv text
  text=$(<"$tpl")
  shift 2
  for kv in "$@"; do text=${text//@${kv%%=*}@/${kv#*=}}; done
  printf '%s\n' "$text" >"$out"
}

start_nginx() {
  local root=$1 nopush=$2 tag="nginx (tcp_nopush $2)" tmp port pid
  tmp=$WORK/run/nginx-$nopush-$CASE
  mkdir -p "$tmp"
  port=$(free_port)
  fill "$BENCH_DIR/nginx.conf" "$tmp/nginx.conf" "USER_LINE=$NGINX_USER" "TMP=$tmp" \
    "NOPUSH=$nopush" "PORT=$port" "ROOT=$root"
  # -e: the error log before the config is read, else nginx tries /var/log/nginx.
  spawn pid "nginx-$nopush-$CASE" nginx -p "$tmp" -c "$tmp/nginx.conf" -e "$tmp/error.log"
  wait_port "$port" "$pid" || die "nginx did not start; see $tmp/error.log"
  sleep 0.2 # let the workers fork before their PIDs are listed
  PORT[$tag]=$port
  PIDS[$tag]=$(pid_tree "$pid" | tr '\n' ' ')
}

start_lighttpd() {
  local root=$1 tag="lighttpd + mod_magnet" tmp port pid
  tmp=$WORK/run/lighttpd-$CASE
  mkdir -p "$tmp"
  port=$(free_port)
  fill "$BENCH_DIR/lighttpd.conf" "$tmp/lighttpd.conf" "USER_LINE=$LIGHTTPD_USER" \
    "PORT=$port" "ROOT=$root" "BENCH_DIR=$BENCH_DIR"
  spawn pid "lighttpd-$CASE" lighttpd -D -f "$tmp/lighttpd.conf"
  wait_port "$port" "$pid" || die "lighttpd did not start; see $LOGS/lighttpd-$CASE.err"
  PORT[$tag]=$port
  PIDS[$tag]=$pid
}

# check SERVER: one request must give what the case promises (status, body size, Location).
check() {
  local port=${PORT[$1]} got want
  got=$(curl -s -o /dev/null --max-time 5 -w '%{http_code} %{size_download} %{redirect_url}' \
    "http://127.0.0.1:$port/static/f0001.jpg" || echo "curl failed")
  case $CASE in
    redirect) want="302 .* http://s3.example/bucket/.*f0001.jpg" ;;
    local-4k) want="200 4096 " ;;
    local-100k) want="200 102400 " ;;
  esac
  [[ $got =~ ^$want ]] || { log "$1 on $CASE answered '$got', expected '$want'"; return 1; }
}

# measure SERVER CONNS ROUND: one wrk run; appends one row to $RESULTS.
measure() {
  local srv=$1 conns=$2 round=$3 port=${PORT[$1]} out c0 c1 t0 t1 load
  read -r -a pids <<<"${PIDS[$srv]}"
  out=$LOGS/wrk-$CASE-$conns-$round-$(tr -c 'a-z0-9' '-' <<<"$srv").txt
  if ! check "$srv"; then
    printf '%s\t%s\t%s\t%s\tnan\tnan\tnan\tnan\tnan\tnan\t1\t0\t\n' "$CASE" "$conns" "$srv" "$round" >>"$RESULTS"
    return
  fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  c0=$(cpu_ticks "${pids[@]}")
  t0=$(date +%s.%N)
  timeout -k 5 300 wrk -t1 -c"$conns" -d"$DURATION" --latency -s "$BENCH_DIR/paths.lua" \
    "http://127.0.0.1:$port" >"$out" 2>&1 || log "wrk exited non-zero for $srv (see $out)"
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "${pids[@]}")
  local rss rps p50 p99 errs reqs
  rss=$(rss_kib "${pids[@]}")
  IFS=$'\t' read -r rps p50 p99 errs reqs < <(python3 "$BENCH_DIR/report.py" wrk "$out")
  awk -v c="$CASE" -v n="$conns" -v s="$srv" -v r="$round" -v rps="$rps" -v p50="$p50" \
    -v p99="$p99" -v dc=$((c1 - c0)) -v hz="$HZ" -v t0="$t0" -v t1="$t1" -v rss="$rss" \
    -v e="$errs" -v q="$reqs" -v l="$load" 'BEGIN {
      cpu = dc / hz
      per_req = (q > 0) ? 1e6 * cpu / q : 0
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%.2f\t%s\t%s\t%s\t%s\n", c, n, s, r, rps, p50, p99,
        100 * cpu / (t1 - t0), per_req, rss, e, q, l
    }' >>"$RESULTS"
  log "$CASE c=$conns round $round $srv: $rps req/s, p99 $p99 ms, errors $errs"
}

for CASE in $CASES; do
  root=$WORK/$CASE
  [[ -d $root ]] || die "unknown case $CASE"
  log "case $CASE: starting servers"
  start_ferry "$root"
  start_nginx "$root" on
  start_nginx "$root" off
  start_lighttpd "$root"
  for srv in "${SERVERS[@]}"; do
    check "$srv" || true # reported again, and recorded, by measure
    timeout -k 5 60 wrk -t1 -c64 -d2s -s "$BENCH_DIR/paths.lua" "http://127.0.0.1:${PORT[$srv]}" \
      >/dev/null 2>&1 || true
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    for conns in $CONNS; do
      for ((k = 0; k < ${#SERVERS[@]}; k++)); do
        measure "${SERVERS[(k + round - 1) % ${#SERVERS[@]}]}" "$conns" "$round"
      done
    done
  done
  # This case's servers go; the next case starts its own on its own docroot.
  for srv in "${SERVERS[@]}"; do
    read -r -a pids <<<"${PIDS[$srv]}"
    stop_pid "${pids[0]}"
  done
done

# ---- report ----
echo "## Serve: ferry serve vs nginx vs lighttpd + mod_magnet"
echo
context_lines
echo "- $(nginx -v 2>&1 | sed 's/.*: //'), $(lighttpd -v | cut -d' ' -f1), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "- wrk -t1 -c{$CONNS} -d$DURATION --latency over $BENCH_FILES paths (paths.lua), $ROUNDS rounds, server order rotated per round; wrk shares the 2 cores with the server"
echo "- processes: ferry = tokio, one worker thread per core; nginx = worker_processes auto ($(nproc)) + master; lighttpd = one single-threaded process"
echo "- 302 Location: ferry http://s3.example/bucket/KEY (redirect_base), nginx and lighttpd http://s3.example/bucket/static/KEY (\$uri); nginx sends a small HTML body with its 302, ferry none"
echo "- load average (1 min) at the start of runs: $(awk -F'\t' 'NR > 1 && $13 != "" {print $13}' "$RESULTS" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {print "min " lo ", max " hi}') (the machine is shared; other work competes for the 2 cores)"
echo
python3 "$BENCH_DIR/report.py" serve "$RESULTS"
echo
echo "### ferry serve stderr (warnings and errors)"
echo
report_logs "$LOGS"/ferry-*.err
