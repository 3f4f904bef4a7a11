#!/usr/bin/env bash
# Serve benchmark: `ferry serve` against nginx (try_files -> @s3 302; Debian's tcp_nopush on,
# and off) and lighttpd + mod_magnet (the seed's s3.lua), on the same 1000 files cycled by
# wrk, for three cases:
#   redirect    every file has moved to S3: ferry's catalog says archived (a real
#               `ferry sync --once` ran first), the peers find nothing on disk; all answer 302
#   local-4k    1000 files of 4 KiB on disk; all answer 200
#   local-100k  1000 files of 100 KiB on disk; all answer 200
# and, against varnish instead, two hot-cache cases:
#   hot-4k      1000 files of 4 KiB uploaded by `ferry sync --once` (catalog: archived, objects
#   hot-100k    in s3s-fs); ferry serve with its hot cache on (cache.max_size 1GiB), varnish
#               (Debian's, -s malloc,1G) in front of an nginx origin serving copies of the same
#               files. Both warmed until every key is a cache hit (checked for every key
#               before measuring: X-Ferry-Source: cache, X-Varnish with two ids); all answer 200
# Prints markdown on stdout (medians over ROUNDS, ratios); progress on stderr.
#
# Env: ROUNDS (3), DURATION (wrk -d, 10s), CONNS ("64 256"), CASES (the five above),
# FILES (1000), FERRY_HTTP_WORKERS (ferry's http.workers; default 0: half the cores, at least one),
# HOT_HITS (ferry's cache.hot_hits for the hot cases; default: ferry's own, 10;
# the warm-up requests every key that many times; HOT_WARM_PASSES overrides that count, e.g.
# to see the case fail loudly with too few), FERRY_BIN, BENCH_TMP, BENCH_LOGS, KEEP_WORK=1.
#
# Why it is run this way:
# - All servers of a case run at once on their own loopback ports; each round visits them
#   in a rotated order, so none always goes first (cold) or last (after the others heated
#   the machine). One unrecorded 2 s warm-up per server fills page cache and ferry's
#   metadata cache.
# - Server CPU is the utime+stime delta of the server's processes (nginx: master and workers)
#   across the wrk run; wrk itself runs on the same 2 cores, which caps everyone alike.
# - Before each run one request is checked for the expected status, so a misconfigured
#   server (404s are fast) cannot post a good number. In the hot cases that request must also
#   be a cache hit, and the responses not answered from the cache during each run are counted
#   (ferry: its /metrics; varnish: varnishstat client_req - cache_hit) and reported.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-"64 256"}
CASES=${CASES:-"redirect local-4k local-100k hot-4k hot-100k"}
export BENCH_FILES=${FILES:-1000} # read by paths.lua
HOT_HITS=${HOT_HITS:-}
HZ=$(getconf CLK_TCK)
PEER_SERVERS=(ferry "nginx (tcp_nopush on)" "nginx (tcp_nopush off)" "lighttpd + mod_magnet")
HOT_SERVERS=(ferry varnish)
HOT_CASES=$(for c in $CASES; do [[ $c != hot-* ]] || echo "$c"; done | xargs)

[[ -x $FERRY ]] || die "no ferry binary at $FERRY (cargo build --release, or set FERRY_BIN)"
for c in nginx lighttpd wrk curl python3 "$S3S_FS"; do
  command -v "$c" >/dev/null || die "missing $c"
done
[[ -e /usr/lib/lighttpd/mod_magnet.so ]] || die "missing mod_magnet (lighttpd-modules-lua)"
if [[ -n $HOT_CASES ]]; then
  for c in varnishd varnishstat; do
    command -v "$c" >/dev/null || die "missing $c (Debian package varnish)"
  done
fi
# Object size of each case.
declare -A SIZE=([redirect]=4096 [local-4k]=4096 [local-100k]=102400 [hot-4k]=4096 [hot-100k]=102400)

bench_init
RESULTS=$WORK/serve.tsv
printf 'case\tconns\tserver\tround\trps\tp50_ms\tp99_ms\tcpu_pct\tcpu_us_per_req\trss_kib\terrors\trequests\tload1\tnot_cached\n' >"$RESULTS"
# Problems that void a case (a cache that does not answer); listed in the report, exit 1.
FAILURES=()
# Workers drop to www-data when started as root; as any other user there is nothing to drop.
if [[ $EUID == 0 ]]; then
  NGINX_USER="user www-data;"
  LIGHTTPD_USER='server.username = "www-data"'$'\n''server.groupname = "www-data"'
else
  NGINX_USER="" LIGHTTPD_USER=""
fi

# ---- data: one docroot per case; the servers map /static/KEY to ROOT/static/KEY ----
log "generating data in $WORK"
for CASE in $CASES; do
  [[ -n ${SIZE[$CASE]:-} ]] || die "unknown case $CASE"
  make_files "$WORK/$CASE/static" "$BENCH_FILES" "${SIZE[$CASE]}"
  # varnish's origin serves a copy of the same files (ferry's upload moves the originals).
  [[ $CASE != hot-* ]] || { mkdir -p "$WORK/$CASE/origin" && cp -a "$WORK/$CASE/static" "$WORK/$CASE/origin/"; }
done

# The redirect and hot cases start from a real upload: ferry moves every file to S3 (one bucket
# per case) and its catalog records them archived, leaving the docroot empty.
UPLOAD_CASES=$(for c in $CASES; do [[ $c != redirect && $c != hot-* ]] || echo "$c"; done | xargs)
if [[ -n $UPLOAD_CASES ]]; then
  # shellcheck disable=SC2046 # one bucket per case, one word each
  start_s3 "$WORK/s3" $(for c in $UPLOAD_CASES; do echo "bench-$c"; done)
  for CASE in $UPLOAD_CASES; do
    ferry_env "$WORK/$CASE/static" "$WORK/$CASE/archive" "$WORK/$CASE/catalog.db" "bench-$CASE"
    log "ferry sync --once on the $CASE set (s3s-fs on port $S3_PORT)"
    timeout -k 10 600 "$FERRY" sync --once --timeout 5m \
      >"$LOGS/ferry-sync-once-$CASE.out" 2>"$LOGS/ferry-sync-once-$CASE.err" ||
      die "ferry sync --once failed; see $LOGS/ferry-sync-once-$CASE.err"
    left=$(find "$WORK/$CASE/static" -type f | wc -l)
    [[ $left == 0 ]] || die "$left files still in the spool after ferry sync --once ($CASE)"
  done
  # ferry serve answers a redirect from its catalog alone; only the hot cases fetch from S3.
  [[ -n $HOT_CASES ]] || stop_pid "$S3_PID"
fi

# ---- servers ----
# Each start_* sets PORT_<tag> and PIDS_<tag> (space-separated, all processes to account).
declare -A PORT PIDS

start_ferry() {
  local root=$1 tag=ferry
  ferry_env "$root/static" "$root/archive" "$root/catalog.db" "bench-$CASE"
  # Port 0: ferry reports the port it bound on stdout, so there is no race for a free port.
  export FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_HTTP_REDIRECT_BASE=http://s3.example/bucket/
  if [[ $CASE == hot-* ]]; then
    # Hot cache on, 1 GiB (the default size, set explicitly), its own directory per case; the
    # objects come from s3s-fs once, at the warm-up.
    export FERRY_CACHE_MAX_SIZE=1GiB FERRY_CACHE_DIR=$root/ferry-cache
    if [[ -n $HOT_HITS ]]; then export FERRY_CACHE_HOT_HITS=$HOT_HITS; else unset FERRY_CACHE_HOT_HITS; fi
  else
    # An endpoint nobody listens on: the serve path must not need S3 for these cases.
    export FERRY_S3_ENDPOINT=http://127.0.0.1:9
    # Hot cache off: with it, a key asked for cache.hot_hits (10) times within 5 minutes is
    # fetched from S3 and then answered 200 from ferry's cache, which is not the 302 the peers
    # send. Spool hits come before the cache, so the local cases do not change.
    export FERRY_CACHE_MAX_SIZE=0
    unset FERRY_CACHE_HOT_HITS
  fi
  mkdir -p "$root/archive"
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

# varnish for the hot cases: Debian's varnishd 7.1 in the foreground with its builtin VCL
# (-b, no -f), -s malloc,1G, in front of an nginx origin (the same nginx.conf) serving copies
# of the case's files. -t: the origin sends no Cache-Control, so varnish would keep objects
# only default_ttl (120 s) and refetch them mid-run; 7 days is ferry's cache.ttl. -T none: no
# management port (varnishstat reads the shared memory in the -n directory).
start_varnish() {
  local root=$1 tag=varnish tmp oport opid port pid n
  tmp=$WORK/run/varnish-$CASE
  mkdir -p "$tmp/origin"
  oport=$(free_port)
  fill "$BENCH_DIR/nginx.conf" "$tmp/origin/nginx.conf" "USER_LINE=$NGINX_USER" "TMP=$tmp/origin" \
    "NOPUSH=on" "PORT=$oport" "ROOT=$root/origin"
  spawn opid "varnish-origin-nginx-$CASE" nginx -p "$tmp/origin" -c "$tmp/origin/nginx.conf" \
    -e "$tmp/origin/error.log"
  wait_port "$oport" "$opid" || die "origin nginx did not start; see $tmp/origin/error.log"
  ORIGIN_PID=$opid
  port=$(free_port)
  VARNISH_DIR=$tmp/varnishd
  spawn pid "varnishd-$CASE" varnishd -F -a "127.0.0.1:$port" -b "127.0.0.1:$oport" \
    -s malloc,1G -t 604800 -T none -n "$VARNISH_DIR"
  wait_port "$port" "$pid" || die "varnishd did not start; see $LOGS/varnishd-$CASE.err"
  # The manager binds the port before its child (the cache process) runs: wait for an answer.
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$port/static/f0000.jpg" && break
    kill -0 "$pid" 2>/dev/null || die "varnishd exited; see $LOGS/varnishd-$CASE.err"
    sleep 0.1
  done
  PORT[$tag]=$port
  # Manager + child: both count for CPU and RSS.
  PIDS[$tag]=$(pid_tree "$pid" | tr '\n' ' ')
  n=$(wc -w <<<"${PIDS[$tag]}")
  [[ $n -ge 2 ]] || die "varnishd: expected a manager and a child process, found PIDs ${PIDS[$tag]}"
}

# not_cached SERVER: how many responses so far were not answered from the cache (hot cases
# only; empty otherwise). ferry: requests on the mount by X-Ferry-Source other than cache;
# varnish: client requests minus cache hits.
not_cached() {
  [[ $CASE == hot-* ]] || return 0
  case $1 in
    ferry) python3 "$BENCH_DIR/warm.py" ferry-misses "${PORT[ferry]}" ;;
    varnish) varnishstat -n "$VARNISH_DIR" -1 -f MAIN.client_req -f MAIN.cache_hit |
      awk '$1 == "MAIN.client_req" {r = $2} $1 == "MAIN.cache_hit" {h = $2} END {print r - h}' ;;
  esac
}

# check SERVER: one request must give what the case promises (status, body size, Location;
# in the hot cases, a cache hit).
check() {
  local port=${PORT[$1]} got want hdr
  hdr=$WORK/check-headers
  got=$(curl -s -D "$hdr" -o /dev/null --max-time 5 -w '%{http_code} %{size_download} %{redirect_url}' \
    "http://127.0.0.1:$port/static/f0001.jpg" || echo "curl failed")
  case $CASE in
    redirect) want="302 .* http://s3.example/bucket/.*f0001.jpg" ;;
    *) want="200 ${SIZE[$CASE]} " ;;
  esac
  [[ $got =~ ^$want ]] || { log "$1 on $CASE answered '$got', expected '$want'"; return 1; }
  if [[ $CASE == hot-* ]]; then
    case $1 in
      ferry) grep -qi '^X-Ferry-Source: cache' "$hdr" ;;
      varnish) grep -Eqi '^X-Varnish: [0-9]+ [0-9]+' "$hdr" ;;
    esac || {
      log "ERROR: $1 on $CASE did not answer from its cache: $(tr -d '\r' <"$hdr" | grep -Ei '^(X-Ferry-Source|X-Varnish|Age):' | tr '\n' ' ')"
      return 1
    }
  fi
}

# warm SERVER: hot cases only. Requests every key until it should be cached (ferry:
# cache.hot_hits times; varnish: once), then proves that every key is now a cache hit. A
# server that fails is recorded in FAILURES and not measured (its rows say nan, 1 error).
warm() {
  local srv=$1 repeat=1 out
  [[ $CASE == hot-* ]] || return 0
  [[ $srv != ferry ]] || repeat=${HOT_WARM_PASSES:-${HOT_HITS:-10}}
  log "$CASE: warming $srv ($repeat pass(es) over $BENCH_FILES keys)"
  out=$LOGS/warm-$CASE-$srv.txt
  if timeout -k 5 600 python3 "$BENCH_DIR/warm.py" warm "$srv" "${PORT[$srv]}" "$BENCH_FILES" \
    "${SIZE[$CASE]}" "$repeat" >"$out" 2>&1; then
    log "$(head -1 "$out")"
  else
    log "ERROR: $CASE: $srv does not answer every key from its cache after the warm-up:"
    sed 's/^/    /' "$out" >&2
    FAILURES+=("$CASE: $srv did not answer every key from its cache after the warm-up: $(head -2 "$out" | tr "\n" " ")")
    UNWARM[$srv]=1
  fi
}

# measure SERVER CONNS ROUND: one wrk run; appends one row to $RESULTS.
measure() {
  local srv=$1 conns=$2 round=$3 port=${PORT[$1]} out c0 c1 t0 t1 load
  read -r -a pids <<<"${PIDS[$srv]}"
  out=$LOGS/wrk-$CASE-$conns-$round-$(tr -c 'a-z0-9' '-' <<<"$srv").txt
  if [[ -n ${UNWARM[$srv]:-} ]] || ! check "$srv"; then
    printf '%s\t%s\t%s\t%s\tnan\tnan\tnan\tnan\tnan\tnan\t1\t0\t\t\n' "$CASE" "$conns" "$srv" "$round" >>"$RESULTS"
    return
  fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  local nc0 nc1 nc=
  nc0=$(not_cached "$srv" || true)
  c0=$(cpu_ticks "${pids[@]}")
  t0=$(date +%s.%N)
  timeout -k 5 300 wrk -t1 -c"$conns" -d"$DURATION" --latency -s "$BENCH_DIR/paths.lua" \
    "http://127.0.0.1:$port" >"$out" 2>&1 || log "wrk exited non-zero for $srv (see $out)"
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "${pids[@]}")
  nc1=$(not_cached "$srv" || true)
  [[ -z $nc0 || -z $nc1 ]] || nc=$((nc1 - nc0))
  local rss rps p50 p99 errs reqs
  rss=$(rss_kib "${pids[@]}")
  IFS=$'\t' read -r rps p50 p99 errs reqs < <(python3 "$BENCH_DIR/report.py" wrk "$out")
  awk -v c="$CASE" -v n="$conns" -v s="$srv" -v r="$round" -v rps="$rps" -v p50="$p50" \
    -v p99="$p99" -v dc=$((c1 - c0)) -v hz="$HZ" -v t0="$t0" -v t1="$t1" -v rss="$rss" \
    -v e="$errs" -v q="$reqs" -v l="$load" -v nc="$nc" 'BEGIN {
      cpu = dc / hz
      per_req = (q > 0) ? 1e6 * cpu / q : 0
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%.2f\t%s\t%s\t%s\t%s\t%s\n", c, n, s, r, rps, p50, p99,
        100 * cpu / (t1 - t0), per_req, rss, e, q, l, nc
    }' >>"$RESULTS"
  log "$CASE c=$conns round $round $srv: $rps req/s, p99 $p99 ms, errors $errs${nc:+, not from the cache $nc}"
  if [[ -n $nc && $nc != 0 ]]; then
    log "WARNING: $CASE c=$conns round $round: $srv answered $nc request(s) not from its cache"
  fi
}

for CASE in $CASES; do
  root=$WORK/$CASE
  [[ -d $root ]] || die "unknown case $CASE"
  log "case $CASE: starting servers"
  declare -A UNWARM=()
  ORIGIN_PID=
  start_ferry "$root"
  if [[ $CASE == hot-* ]]; then
    SERVERS=("${HOT_SERVERS[@]}")
    start_varnish "$root"
  else
    SERVERS=("${PEER_SERVERS[@]}")
    start_nginx "$root" on
    start_nginx "$root" off
    start_lighttpd "$root"
  fi
  for srv in "${SERVERS[@]}"; do
    warm "$srv"
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
  [[ -z $ORIGIN_PID ]] || stop_pid "$ORIGIN_PID"
  # Record where the hot cache stood, for the report.
  if [[ $CASE == hot-* ]]; then
    log "$CASE: ferry cache dir holds $(du -sk "$root/ferry-cache" 2>/dev/null | cut -f1) KiB"
  fi
done

# ---- report ----
# The raw rows (one per wrk run, with the load average at its start) stay with the logs.
cp "$RESULTS" "$LOGS/serve.tsv"
echo "## Serve: ferry serve vs nginx vs lighttpd + mod_magnet; hot cache: ferry vs varnish"
echo
context_lines
echo "- $(nginx -v 2>&1 | sed 's/.*: //'), $(lighttpd -v | cut -d' ' -f1), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)${HOT_CASES:+, $(varnishd -V 2>&1 | head -1 | cut -d' ' -f2 | tr -d '(')}"
echo "- wrk -t1 -c{$CONNS} -d$DURATION --latency over $BENCH_FILES paths (paths.lua), $ROUNDS rounds, server order rotated per round; wrk shares the 2 cores with the server"
if [[ ${FERRY_HTTP_WORKERS:-0} != 0 ]]; then ferry_threads="$FERRY_HTTP_WORKERS front thread(s) (FERRY_HTTP_WORKERS, http.workers)"; else ferry_threads="$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 )) front thread(s), half the cores (http.workers 0)"; fi
echo "- processes: ferry = $ferry_threads, each a single-threaded tokio runtime; nginx = worker_processes auto ($(nproc)) + master; lighttpd = one single-threaded process"
echo "- ferry runs with cache.max_size = 0 (hot cache off) in the redirect and local cases, so the redirect case measures ferry's 302 and not its S3 cache; everything else at ferry's defaults"
if [[ -n $HOT_CASES ]]; then
  echo "- hot cases ($HOT_CASES): the files were uploaded by \`ferry sync --once\` to s3s-fs (catalog: archived); \`ferry serve\` with cache.max_size = 1GiB, cache.hot_hits = ${HOT_HITS:-10 (default)}, http.mode redirect (default), warmed with ${HOT_WARM_PASSES:-${HOT_HITS:-10}} passes over all keys (warm.py, 4 keep-alive connections); varnish: \`varnishd -F -a 127.0.0.1:PORT -b 127.0.0.1:ORIGIN -s malloc,1G -t 604800 -T none -n DIR\` (builtin VCL; -t because the origin sends no Cache-Control and the default TTL, 120 s, would expire objects mid-run) in front of an nginx (nginx.conf) serving copies of the files, warmed with one pass; then both get the 2 s wrk warm-up every server gets. Before measuring, every key was checked to be a hit (X-Ferry-Source: cache; X-Varnish with two ids), and one request before each run"
  echo "- hot cases, CPU and RSS: ferry = its one process; varnish = varnishd manager + child (cache process); the origins (s3s-fs, nginx) are not counted (idle once warm; see the not-from-cache column). ferry's cache entries are files (page cache, outside its RSS); varnish's malloc storage is inside its RSS"
fi
echo "- 302 Location: ferry http://s3.example/bucket/KEY (redirect_base), nginx and lighttpd http://s3.example/bucket/static/KEY (\$uri); nginx sends a small HTML body with its 302, ferry none"
echo "- load average (1 min) at the start of runs: $(awk -F'\t' 'NR > 1 && $13 != "" {print $13}' "$RESULTS" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {print "min " lo ", max " hi}') (the machine is shared; other work competes for the 2 cores)"
echo
python3 "$BENCH_DIR/report.py" serve "$RESULTS"
if [[ ${#FAILURES[@]} -gt 0 ]]; then
  echo
  echo "### FAILED cases"
  echo
  for f in "${FAILURES[@]}"; do echo "- **$f**"; done
fi
echo
echo "### ferry serve stderr (warnings and errors)"
echo
report_logs "$LOGS"/ferry-*.err
[[ ${#FAILURES[@]} == 0 ]]
