#!/usr/bin/env bash
# Cluster benchmark: what the shared catalog (catalog.shared, PostgreSQL) costs and saves.
# One real PostgreSQL (Debian's, initdb in the scratch dir), one s3s-fs, and:
#
# 1. Serving keys another node uploaded. Node A (`ferry sync --once`, then `ferry run` with the
#    shared catalog until it has published every row) uploads the files; the node measured,
#    B (`ferry serve`, its own empty SQLite catalog), never saw them, so its metadata comes
#    from PostgreSQL or an S3 HEAD. Two B's run side by side, "local" (no catalog.shared: S3
#    HEADs) and "shared" (catalog.shared set), each with S3 behind its own counting proxy
#    (s3count.py), through wrk -c64:
#      redirect       http.mode redirect, hot cache off, FILES keys cycled (paths.lua): 302
#      hot            hot cache on, cache.hot_hits 1, every key filled before measuring: 200
#                     from the cache
#      redirect-cold  as redirect and hot, over COLD_KEYS keys picked at random (random.lua)
#      hot-cold       with http.metadata_ttl = COLD_TTL (1s), so lookups happen during the run
#    Steady state (the first two) mostly measures ferry's metadata cache (metadata_ttl 5m).
#    Per case and catalog: req/s, latency, CPU µs per request (ferry; PostgreSQL, all its
#    processes; the S3 side = s3s-fs + the counting proxy) and S3 requests per 1,000 client
#    requests by method.
# 2. The 404 window: node A (`ferry run`) gets WINDOW_RATE files/s renamed into its spool for
#    WINDOW_SECONDS; node B (`ferry serve`, http.mode proxy, same s3s-fs) is polled for each new
#    key from its drop until it first answers 200 (window.py). Without the shared catalog B
#    can only learn from S3 once A has uploaded (and remembers a 404 for 2 s); with it B hears
#    of the file through PostgreSQL and proxies it from A's spool (X-Ferry-Source: peer).
#    Run once per WINDOW_DELAYS value: A's S3 requests held that many ms (0 = loopback s3s-fs).
# Prints markdown on stdout (medians over ROUNDS, ratios shared/local); progress on stderr.
#
# Env: ROUNDS (1), DURATION (wrk -d, 5s), CLUSTER_CONNS (wrk -c, 64), CLUSTER_CASES (the
# four above; "" = part 2 only), FILES (1000), COLD_KEYS (5000), COLD_TTL (1s), SIZE (object
# bytes, 4096), S3_PROXY (1; 0 points part 1's B's straight at s3s-fs: no S3 counts, but no
# Python proxy in the HEAD path either, to see what it costs), WINDOW (1; 0 skips part 2),
# WINDOW_RATE (100), WINDOW_SECONDS (5), POLL (window.py's min seconds between polls of a key,
# 0.02), WINDOW_DELAYS ("0 100": part 2 runs once per value, node A's S3 requests held that
# many ms each; loopback s3s-fs takes a 4 KiB upload in a few ms, sooner than A publishes to
# PostgreSQL, so only a slower S3 shows B serving from A's spool), PG_BIN (newest
# /usr/lib/postgresql/*/bin), PG_USER (who runs PostgreSQL under root: postgres), FERRY_BIN,
# BENCH_TMP, BENCH_LOGS, KEEP_WORK=1. (Names differ from serve.sh's CASES/CONNS and
# upload.sh's LAT_*, so all.sh can pass its settings to every part.)
#
# Why it is run this way:
# - Both B's of a case run at once; each round visits them in a rotated order, after one
#   unrecorded 2 s wrk warm-up each. Node A is stopped once it has published, so the only
#   ferry working during a run is the one measured.
# - CPU is the utime+stime delta across the wrk run: B's process; PostgreSQL's postmaster and
#   its children (backends that start during the run counted whole); s3s-fs and that B's
#   proxy. wrk, PostgreSQL, s3s-fs and the proxy share the 2 cores with B.
# - In part 1 the counting proxy sits between B and s3s-fs only (A uploads straight to
#   s3s-fs). It is Python: each S3 request B makes through it costs more latency and CPU than
#   s3s-fs alone, which weighs on the cases that make many (local, cold); its CPU is in the
#   S3 side column (S3_PROXY=0 measures without it). In part 2 A has its own proxy too.
# - PostgreSQL runs with pg_stat_statements, so the lookups (calls of the serving query) are
#   counted exactly.
# - Before each run one request is checked for the expected status (302; hot: 200 from the
#   cache), and the shared B must report a healthy shared catalog (/readyz says nothing of
#   "degraded"), so a B silently falling back to S3 cannot pass for the shared case.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-1}
DURATION=${DURATION:-5s}
CONNS=${CLUSTER_CONNS:-64}
CASES=${CLUSTER_CASES-"redirect hot redirect-cold hot-cold"}
FILES=${FILES:-1000}
COLD_KEYS=${COLD_KEYS:-5000}
COLD_TTL=${COLD_TTL:-1s}
SIZE=${SIZE:-4096}
WINDOW=${WINDOW:-1}
LAT_RATE=${WINDOW_RATE:-100}
LAT_SECONDS=${WINDOW_SECONDS:-5}
POLL=${POLL:-0.02}
WINDOW_DELAYS=${WINDOW_DELAYS:-"0 100"}
S3_PROXY=${S3_PROXY:-1}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
PG_USER=${PG_USER:-postgres}
HZ=$(getconf CLK_TCK)
VARIANTS=(local shared)
BUCKET=bench-cluster
COMMAND="ROUNDS=$ROUNDS DURATION=$DURATION CLUSTER_CONNS=$CONNS CLUSTER_CASES=\"$CASES\" FILES=$FILES COLD_KEYS=$COLD_KEYS COLD_TTL=$COLD_TTL SIZE=$SIZE WINDOW=$WINDOW WINDOW_RATE=$LAT_RATE WINDOW_SECONDS=$LAT_SECONDS POLL=$POLL WINDOW_DELAYS=\"$WINDOW_DELAYS\" S3_PROXY=$S3_PROXY scripts/bench/cluster.sh"

[[ -x $FERRY ]] || die "no ferry binary at $FERRY (cargo build --release, or set FERRY_BIN)"
for c in wrk curl python3 "$S3S_FS"; do
  command -v "$c" >/dev/null || die "missing $c"
done
[[ -n $PG_BIN && -x $PG_BIN/initdb && -x $PG_BIN/postgres && -x $PG_BIN/psql ]] ||
  die "no PostgreSQL in /usr/lib/postgresql/*/bin (apt-get install postgresql, or set PG_BIN)"
# The largest key index any case asks for (paths.lua and random.lua name f0000.jpg ...).
NKEYS=$FILES
for c in $CASES; do
  case $c in
    redirect | hot) ;;
    redirect-cold | hot-cold) if ((COLD_KEYS > NKEYS)); then NKEYS=$COLD_KEYS; fi ;;
    *) die "unknown case $c" ;;
  esac
done
((NKEYS <= 10000)) || die "at most 10000 keys (f0000.jpg .. f9999.jpg)"

bench_init
RESULTS=$WORK/cluster.tsv
WINDOWS=$WORK/window.txt
printf 'case\tcatalog\tround\trps\tp50_ms\tp99_ms\terrors\trequests\tferry_us\tpg_us\ts3_us\thead\tget\tother\tnot_cached\tpg_lookups\tload1\n' >"$RESULTS"
: >"$WINDOWS"
FAILURES=()

# ---- PostgreSQL: initdb, trust auth, superuser and database ferry, 127.0.0.1 only ----
# It refuses to run as root: under root it runs as PG_USER (setpriv execs it, so the PID
# spawn records is the postmaster's). None of our PG* variables reach it.
PG_ENV=(env -i PATH=/usr/bin:/bin LC_ALL=C TZ=UTC HOME="$WORK/pg")
PG_AS=()
if [[ $EUID == 0 ]]; then
  command -v setpriv >/dev/null || die "missing setpriv (util-linux), needed to run PostgreSQL as $PG_USER"
  PG_UID=$(id -u "$PG_USER") PG_GID=$(id -g "$PG_USER") || die "no user $PG_USER to run PostgreSQL as"
  PG_AS=(setpriv --reuid="$PG_UID" --regid="$PG_GID" --clear-groups --)
fi
psql_q() { "${PG_ENV[@]}" "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U ferry "$@"; }

start_pg() {
  local d=$WORK/pg i
  mkdir -p "$d/data" "$d/sock"
  chmod 0755 "$d"
  chmod 0700 "$d/data" "$d/sock"
  [[ $EUID != 0 ]] || chown "$PG_UID:$PG_GID" "$d/data" "$d/sock"
  # The server's user must be able to stand in its working directory (ours may be /root).
  cd "$d"
  "${PG_AS[@]}" "${PG_ENV[@]}" "$PG_BIN/initdb" -D "$d/data" -U ferry -A trust -E UTF8 \
    --locale=C --no-sync --no-instructions >"$LOGS/initdb.out" 2>"$LOGS/initdb.err" ||
    die "initdb failed; see $LOGS/initdb.err"
  PG_PORT=$(free_port)
  # Throwaway data: fsync off, as tests/common/pg.rs does.
  spawn PG_PID postgres "${PG_AS[@]}" "${PG_ENV[@]}" "$PG_BIN/postgres" -D "$d/data" \
    -p "$PG_PORT" -c listen_addresses=127.0.0.1 -c unix_socket_directories="$d/sock" \
    -c fsync=off -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements
  cd "$REPO"
  for i in $(seq 1 300); do
    "${PG_ENV[@]}" "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    kill -0 "$PG_PID" 2>/dev/null || die "PostgreSQL exited; see $LOGS/postgres.err"
    sleep 0.1
  done
  psql_q -d postgres -c "create database ferry" || die "PostgreSQL is not answering; see $LOGS/postgres.err"
  # Counts the lookups (the serving query) exactly, as they finish.
  psql_q -d ferry -c "create extension pg_stat_statements" >/dev/null 2>&1 || log "no pg_stat_statements: lookups are not counted"
  PG_URL=postgres://ferry@127.0.0.1:$PG_PORT/ferry
}

# ---- counting proxies (one per B) in front of s3s-fs ----
declare -A PROXY_PORT PROXY_CTL PROXY_PID
start_proxy() {
  local name=$1 pid line= i
  spawn pid "s3count-$name" python3 "$BENCH_DIR/s3count.py" "$S3_PORT" "${2:-0}"
  for i in $(seq 1 200); do
    line=$(head -1 "$LOGS/s3count-$name.out" 2>/dev/null || true)
    [[ -n $line ]] && break
    kill -0 "$pid" 2>/dev/null || die "s3count.py exited; see $LOGS/s3count-$name.err"
    sleep 0.05
  done
  [[ $line == proxy* ]] || die "s3count.py did not report its ports"
  read -r _ PROXY_PORT[$name] _ PROXY_CTL[$name] <<<"$line"
  PROXY_PID[$name]=$pid
}
# s3_counts NAME: "HEAD GET other" requests that passed NAME's proxy so far.
s3_counts() {
  python3 - "${PROXY_CTL[$1]}" <<'PY'
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
c = json.loads(data)
head, get = c.pop("HEAD", 0), c.pop("GET", 0)
print(head, get, sum(c.values()))
PY
}

# pg_lookups: how many times any node has run the serving query (shared.rs LOOKUP_SQL), or
# "" without pg_stat_statements.
pg_lookups() {
  psql_q -d ferry -c "select coalesce(sum(calls), 0) from pg_stat_statements where query like 'SELECT f.node, n.url, %'" 2>/dev/null || echo ""
}

# ---- ferry nodes ----
declare -A NODE_PORT NODE_PID
# start_node TAG CMD DIR S3_PORT KEY=VALUE...: `ferry CMD` (run or serve) on its own spool,
# archive, catalog and cache under DIR, node name TAG, S3 at 127.0.0.1:S3_PORT, plus the
# FERRY_* settings given; no other FERRY_* variable reaches it. Sets NODE_PORT and NODE_PID.
start_node() {
  local tag=$1 cmd=$2 dir=$3 s3=$4 pid addr= i
  shift 4
  mkdir -p "$dir/spool" "$dir/archive"
  : >"$LOGS/ferry-$tag.out" # exists before the child opens it, for the sed below
  (
    for v in $(compgen -e); do [[ $v != FERRY_* || $v == FERRY_LOG ]] || unset "$v"; done
    export FERRY_SPOOL_DIR=$dir/spool FERRY_ARCHIVE_DIR=$dir/archive
    export FERRY_CATALOG_PATH=$dir/catalog.db FERRY_CACHE_DIR=$dir/cache
    export FERRY_S3_BUCKET=$BUCKET FERRY_S3_ENDPOINT=http://127.0.0.1:$s3
    export FERRY_S3_PATH_STYLE=true FERRY_S3_REGION=us-east-1
    # Port 0: ferry reports the port it bound, and advertises it to the other nodes.
    export FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_HTTP_NODE_NAME=$tag
    export FERRY_HTTP_REDIRECT_BASE=http://s3.example/bucket/
    for kv in "$@"; do export "${kv?}"; done
    exec "$FERRY" "$cmd"
  ) >"$LOGS/ferry-$tag.out" 2>"$LOGS/ferry-$tag.err" &
  pid=$!
  SPAWNED+=("$pid")
  for i in $(seq 1 300); do
    addr=$(sed -n 's/^ferry: http listening on //p' "$LOGS/ferry-$tag.out")
    [[ -n $addr ]] && break
    kill -0 "$pid" 2>/dev/null || die "ferry $cmd ($tag) exited; see $LOGS/ferry-$tag.err"
    sleep 0.05
  done
  [[ -n $addr ]] || die "ferry $cmd ($tag) did not report its address"
  NODE_PORT[$tag]=${addr##*:}
  NODE_PID[$tag]=$pid
}

# wait_shared TAG: until the node's /readyz names no degraded shared catalog (it has
# migrated, LISTENs and its lookups work).
wait_shared() {
  local tag=$1 body= i
  for i in $(seq 1 150); do
    body=$(curl -s "http://127.0.0.1:${NODE_PORT[$tag]}/readyz" || true)
    [[ $body == ready* && $body != *degraded* ]] && return 0
    sleep 0.2
  done
  die "$tag: the shared catalog is not healthy after 30 s: $body"
}

# wait_log TAG TEXT: until TEXT appears in the node's stderr.
wait_log() {
  local i
  for i in $(seq 1 300); do
    grep -q "$2" "$LOGS/ferry-$1.err" 2>/dev/null && return 0
    kill -0 "${NODE_PID[$1]}" 2>/dev/null || die "$1 exited; see $LOGS/ferry-$1.err"
    sleep 0.1
  done
  die "$1: no \"$2\" in its log after 30 s"
}

start_pg
log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on port $PG_PORT (data in $WORK/pg)"
start_s3 "$WORK/s3" "$BUCKET"
for v in "${VARIANTS[@]}"; do start_proxy "$v"; done
if [[ $WINDOW == 1 ]]; then
  for ms in $WINDOW_DELAYS; do start_proxy "a-win-$ms" "$ms"; done # node A's S3 in part 2
fi
log "s3s-fs on port $S3_PORT; counting proxies: local ${PROXY_PORT[local]}, shared ${PROXY_PORT[shared]}"

# ---- node A uploads the keys and publishes them ----
UP=$WORK/a
if [[ -n $CASES ]]; then
  log "generating $NKEYS files of $SIZE bytes; ferry sync --once as node a"
  make_files "$UP/spool" "$NKEYS" "$SIZE"
  mkdir -p "$UP/archive"
  (
    ferry_env "$UP/spool" "$UP/archive" "$UP/catalog.db" "$BUCKET"
    export FERRY_HTTP_NODE_NAME=a FERRY_CACHE_DIR=$UP/cache
    exec timeout -k 10 600 "$FERRY" sync --once --timeout 5m
  ) >"$LOGS/ferry-a-sync-once.out" 2>"$LOGS/ferry-a-sync-once.err" ||
    die "ferry sync --once failed; see $LOGS/ferry-a-sync-once.err"
  left=$(find "$UP/spool" -type f | wc -l)
  [[ $left == 0 ]] || die "$left files still in node a's spool after ferry sync --once"
  # `ferry run` with the shared catalog turns the outbox on, which publishes every row.
  start_node a run "$UP" "$S3_PORT" FERRY_CATALOG_SHARED="$PG_URL" FERRY_CACHE_MAX_SIZE=0
  for i in $(seq 1 600); do
    n=$(psql_q -d ferry -c "select count(*) from ferry_files where node = 'a' and state = 'archived'" 2>/dev/null || echo 0)
    [[ $n == "$NKEYS" ]] && break
    sleep 0.1
  done
  [[ $n == "$NKEYS" ]] || die "node a published $n of $NKEYS rows in 60 s; see $LOGS/ferry-a.err"
  log "node a published $n archived rows to PostgreSQL; stopping it"
  stop_pid "${NODE_PID[a]}"
fi

# ---- part 1: serving ----
run() {
  local case=$1 v=$2 round=$3 tag="b-$2-$1" out port pid want got src
  port=${NODE_PORT[$tag]} pid=${NODE_PID[$tag]}
  out=$LOGS/wrk-$case-$v-$round.txt
  # One request first: a misconfigured node (404s are fast) must not post a number.
  read -r got src < <(curl -s -o /dev/null -D - "http://127.0.0.1:$port/static/f0001.jpg" |
    awk 'NR == 1 {s = $2} tolower($1) == "x-ferry-source:" {x = $2} END {gsub(/\r/, "", x); print s, x}')
  want=302
  [[ $case != hot* ]] || want="200 cache"
  if [[ $got != "${want% *}" || ($case == hot* && $src != cache) ]]; then
    FAILURES+=("$case/$v round $round: answered $got ${src:-} before the run, expected $want")
    log "FAILED: ${FAILURES[-1]}"
  fi
  [[ $v != shared ]] || wait_shared "$tag"
  local -a pg0 pg1
  local c0 c1 p0 p1 s0 s1 h0 g0 o0 h1 g1 o1 m0=0 m1=0 load
  mapfile -t pg0 < <(pid_tree "$PG_PID")
  local l0 l1
  h0=0 g0=0 o0=0
  [[ $S3_PROXY != 1 ]] || read -r h0 g0 o0 < <(s3_counts "$v")
  l0=$(pg_lookups)
  [[ $case != hot* ]] || m0=$(python3 "$BENCH_DIR/warm.py" ferry-misses "$port")
  load=$(cut -d' ' -f1 /proc/loadavg)
  c0=$(cpu_ticks "$pid") p0=$(cpu_ticks "${pg0[@]}") s0=$(cpu_ticks "$S3_PID" "${PROXY_PID[$v]}")
  timeout -k 5 300 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$LUA" \
    "http://127.0.0.1:$port" >"$out" 2>&1 || log "wrk exited non-zero for $case/$v"
  c1=$(cpu_ticks "$pid") s1=$(cpu_ticks "$S3_PID" "${PROXY_PID[$v]}")
  mapfile -t pg1 < <(pid_tree "$PG_PID")
  p1=$(cpu_ticks $(printf '%s\n' "${pg0[@]}" "${pg1[@]}" | sort -u))
  h1=0 g1=0 o1=0
  [[ $S3_PROXY != 1 ]] || read -r h1 g1 o1 < <(s3_counts "$v")
  l1=$(pg_lookups)
  [[ $case != hot* ]] || m1=$(python3 "$BENCH_DIR/warm.py" ferry-misses "$port")
  local rps p50 p99 errs reqs
  IFS=$'\t' read -r rps p50 p99 errs reqs < <(python3 "$BENCH_DIR/report.py" wrk "$out")
  awk -v OFS='\t' -v c="$case" -v v="$v" -v r="$round" -v rps="$rps" -v p50="$p50" \
    -v p99="$p99" -v e="$errs" -v q="$reqs" -v hz="$HZ" -v dc=$((c1 - c0)) \
    -v dp=$((p1 - p0)) -v ds=$((s1 - s0)) -v h=$((h1 - h0)) -v g=$((g1 - g0)) \
    -v o=$((o1 - o0)) -v m=$((m1 - m0)) -v hot="${case%%-*}" -v l="$load" -v px="$S3_PROXY" \
    -v lk="$([[ -n $l0 && -n $l1 ]] && echo $((l1 - l0)))" 'BEGIN {
      us = (q > 0 ? 1e6 / hz / q : 0)
      if (px != 1) { h = ""; g = ""; o = "" }
      print c, v, r, rps, p50, p99, e, q, dc * us, dp * us, ds * us, h, g, o, (hot == "hot" ? m : ""), lk, l
    }' >>"$RESULTS"
  log "$case/$v round $round: $rps req/s, p99 $p99 ms, errors $errs; ferry $(((c1 - c0) * 1000000 / HZ / (reqs > 0 ? reqs : 1))) µs/req; S3 HEAD $((h1 - h0)) GET $((g1 - g0)) other $((o1 - o0)) in $reqs requests"
}

for CASE in $CASES; do
  if [[ $CASE == *-cold ]]; then
    export BENCH_FILES=$COLD_KEYS
    LUA=$BENCH_DIR/random.lua
  else
    export BENCH_FILES=$FILES
    LUA=$BENCH_DIR/paths.lua
  fi
  extra=()
  if [[ $CASE == hot* ]]; then
    extra+=(FERRY_CACHE_MAX_SIZE=1GiB FERRY_CACHE_HOT_HITS=1)
  else
    extra+=(FERRY_CACHE_MAX_SIZE=0)
  fi
  [[ $CASE != *-cold ]] || extra+=(FERRY_HTTP_METADATA_TTL="$COLD_TTL")
  for v in "${VARIANTS[@]}"; do
    shared=()
    [[ $v != shared ]] || shared=(FERRY_CATALOG_SHARED="$PG_URL")
    s3=${PROXY_PORT[$v]}
    [[ $S3_PROXY == 1 ]] || s3=$S3_PORT
    start_node "b-$v-$CASE" serve "$WORK/$CASE/$v" "$s3" "${extra[@]}" "${shared[@]}"
  done
  wait_shared "b-shared-$CASE"
  log "$CASE: b-local on ${NODE_PORT[b-local-$CASE]}, b-shared on ${NODE_PORT[b-shared-$CASE]}"
  for v in "${VARIANTS[@]}"; do
    tag=b-$v-$CASE
    if [[ $CASE == hot* ]]; then
      # hot_hits 1: the first request of a key fetches it from S3 and fills the cache. wrk
      # cycles through all keys with 64 connections (one at a time would take 40 ms per key:
      # see "s3s-fs and Nagle" in the report), then warm.py checks every key is a cache hit.
      ok=0
      for attempt in 1 2 3 4 5; do
        timeout 60 wrk -t1 -c"$CONNS" -d3s -s "$BENCH_DIR/paths.lua" "http://127.0.0.1:${NODE_PORT[$tag]}" \
          >"$LOGS/fill-$tag-$attempt.txt" 2>&1 || true
        if python3 "$BENCH_DIR/warm.py" warm ferry "${NODE_PORT[$tag]}" "$BENCH_FILES" "$SIZE" 0 \
          >"$LOGS/warm-$tag.txt" 2>&1; then
          ok=1
          break
        fi
      done
      if [[ $ok != 1 ]]; then
        FAILURES+=("$CASE/$v: not every key is a cache hit after the warm-up: $(head -3 "$LOGS/warm-$tag.txt" | tr '\n' ' ')")
        log "FAILED: ${FAILURES[-1]}"
      fi
    fi
    timeout 30 wrk -t1 -c"$CONNS" -d2s -s "$LUA" "http://127.0.0.1:${NODE_PORT[$tag]}" >/dev/null 2>&1 || true
  done
  for round in $(seq 1 "$ROUNDS"); do
    for ((k = 0; k < ${#VARIANTS[@]}; k++)); do
      run "$CASE" "${VARIANTS[(k + round - 1) % ${#VARIANTS[@]}]}" "$round"
    done
  done
  for v in "${VARIANTS[@]}"; do stop_pid "${NODE_PID[b-$v-$CASE]}"; done
done

# ---- part 2: the 404 window ----
if [[ $WINDOW == 1 ]]; then
  for ms in $WINDOW_DELAYS; do
    for v in "${VARIANTS[@]}"; do
      shared=()
      [[ $v != shared ]] || shared=(FERRY_CATALOG_SHARED="$PG_URL")
      w=$v-$ms
      d=$WORK/window-$w
      # A drops, uploads (through its own proxy: counted, each request held $ms ms) and
      # serves its spool to its peers.
      start_node "a-win-$w" run "$d/a" "${PROXY_PORT[a-win-$ms]}" FERRY_CACHE_MAX_SIZE=0 "${shared[@]}"
      # B answers 200 itself: proxy mode (from S3, or from A's spool), hot cache off.
      start_node "b-win-$w" serve "$d/b" "${PROXY_PORT[$v]}" FERRY_HTTP_MODE=proxy \
        FERRY_CACHE_MAX_SIZE=0 "${shared[@]}"
      wait_log "a-win-$w" "sync running"
      if [[ $v == shared ]]; then
        wait_shared "b-win-$w"
        for i in $(seq 1 100); do
          n=$(psql_q -d ferry -c "select count(*) from ferry_nodes where node = 'a-win-$w'" 2>/dev/null || echo 0)
          [[ $n == 1 ]] && break
          sleep 0.1
        done
      fi
      sleep 1
      read -r h0 g0 o0 < <(s3_counts "$v")
      read -r _ _ ao0 < <(s3_counts "a-win-$ms")
      log "404 window, $v, A's S3 +$ms ms: $LAT_RATE files/s for $LAT_SECONDS s into a-win-$w's spool, polling b-win-$w"
      line=$(python3 "$BENCH_DIR/window.py" --spool "$d/a/spool" --port "${NODE_PORT[b-win-$w]}" \
        --prefix "w$w-" --rate "$LAT_RATE" --seconds "$LAT_SECONDS" --size "$SIZE" --poll "$POLL") ||
        die "window.py failed"
      read -r h1 g1 o1 < <(s3_counts "$v")
      read -r _ _ ao1 < <(s3_counts "a-win-$ms")
      echo "catalog=$v delay=$ms $line s3_head=$((h1 - h0)) s3_get=$((g1 - g0)) s3_other=$((o1 - o0)) a_other=$((ao1 - ao0))" >>"$WINDOWS"
      log "404 window, $v, +$ms ms: $line; B's S3 requests: HEAD $((h1 - h0)) GET $((g1 - g0)) other $((o1 - o0))"
      stop_pid "${NODE_PID[b-win-$w]}"
      stop_pid "${NODE_PID[a-win-$w]}"
    done
  done
fi

# ---- report ----
cp "$RESULTS" "$LOGS/cluster.tsv"
cp "$WINDOWS" "$LOGS/window.txt"
echo "## Cluster: the shared catalog (PostgreSQL) on the serve path, and the 404 window"
echo
context_lines
echo "- command: \`$COMMAND\`"
echo "- PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') (initdb in the scratch dir, trust auth, fsync off); s3s-fs $("$S3S_FS" --version 2>/dev/null | awk '{print $NF}'); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "- node B = \`ferry serve\` with an empty SQLite catalog: the keys ($SIZE-byte objects) were uploaded by node a (\`ferry sync --once\`, then \`ferry run\` with catalog.shared until all $NKEYS rows were published, then stopped). local = no catalog.shared (metadata from S3 HEADs); shared = catalog.shared set (metadata from PostgreSQL)"
echo "- wrk -t1 -c$CONNS -d$DURATION --latency, $ROUNDS round(s), order rotated per round, one 2 s warm-up per node; redirect/hot: $FILES keys cycled (paths.lua), http.metadata_ttl 5m (default); *-cold: $COLD_KEYS keys at random (random.lua), http.metadata_ttl $COLD_TTL. redirect: hot cache off; hot: cache.hot_hits 1, cache.max_size 1GiB, every key filled and checked before measuring"
echo "- s3s-fs and Nagle: s3s-fs sets no TCP_NODELAY and writes a GET's headers and body separately, so on a kept-alive connection the body waits for ferry's delayed ACK: a GET from s3s-fs takes ~40 ms however small (a HEAD does not). It weighs on every 200 that B fetches from S3 here (hot-cache fills, the window's proxy-mode 200s), not on a redirect, a cache hit or a peer fetch, and is s3s-fs's, not S3's"
if [[ $S3_PROXY == 1 ]]; then
  echo "- CPU µs/req: ferry = B's process; PostgreSQL = postmaster and children; S3 side = s3s-fs + the Python counting proxy between B and s3s-fs (s3count.py). S3 requests: what passed B's proxy during the run, per 1,000 wrk requests. PG lookups: calls of the serving query (pg_stat_statements), per 1,000 wrk requests"
else
  echo "- S3_PROXY=0: B talks to s3s-fs directly (no S3 counts). CPU µs/req: ferry = B's process; PostgreSQL = postmaster and children; S3 side = s3s-fs. PG lookups: calls of the serving query (pg_stat_statements), per 1,000 wrk requests"
fi
echo
python3 - "$RESULTS" "$WINDOWS" "$LAT_RATE" "$LAT_SECONDS" "$POLL" <<'PY'
import statistics, sys
rows = []
with open(sys.argv[1]) as f:
    head = f.readline().rstrip("\n").split("\t")
    rows = [dict(zip(head, l.rstrip("\n").split("\t"))) for l in f if l.strip()]

def med(case, cat, field):
    v = [float(r[field]) for r in rows if r["case"] == case and r["catalog"] == cat and r[field] != ""]
    return statistics.median(v) if v else float("nan")

def per1k(case, cat, field):
    v = [1000.0 * float(r[field]) / float(r["requests"]) for r in rows
         if r["case"] == case and r["catalog"] == cat and float(r["requests"]) > 0 and r[field] != ""]
    return statistics.median(v) if v else float("nan")

def fmt(x, d=1):
    return "–" if x != x else f"{x:.{d}f}"

def ratio(a, b):
    return "–" if a != a or b != b or b == 0 else f"{a / b:.2f}x"

cases = list(dict.fromkeys(r["case"] for r in rows))
if cases:
    print("| case | catalog | req/s | p50 ms | p99 ms | ferry CPU µs/req | PostgreSQL µs/req | S3 side µs/req | PG lookups /1k req | S3 HEAD /1k req | S3 GET /1k | other S3 /1k | not from cache /1k | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        for cat in ("local", "shared"):
            errs = sum(int(r["errors"]) for r in rows if r["case"] == c and r["catalog"] == cat)
            nc = fmt(per1k(c, cat, "not_cached"), 1) if c.startswith("hot") else "–"
            print(f"| {c} | {cat} | {med(c, cat, 'rps'):.0f} | {fmt(med(c, cat, 'p50_ms'), 2)} | "
                  f"{fmt(med(c, cat, 'p99_ms'), 2)} | {fmt(med(c, cat, 'ferry_us'))} | "
                  f"{fmt(med(c, cat, 'pg_us'))} | {fmt(med(c, cat, 's3_us'))} | "
                  f"{fmt(per1k(c, cat, 'pg_lookups'))} | {fmt(per1k(c, cat, 'head'))} | {fmt(per1k(c, cat, 'get'))} | "
                  f"{fmt(per1k(c, cat, 'other'))} | {nc} | {errs} |")
    print()
    print("Ratios, shared ÷ local (req/s above 1 = the shared catalog serves faster; CPU below 1 = cheaper). "
          "All CPU = ferry + PostgreSQL + S3 side.")
    print()
    print("| case | req/s | p99 | ferry CPU/req | all CPU/req | S3 requests /1k: local → shared |")
    print("|---|---:|---:|---:|---:|---|")
    for c in cases:
        tot = {cat: med(c, cat, "ferry_us") + med(c, cat, "pg_us") + med(c, cat, "s3_us") for cat in ("local", "shared")}
        s3 = {cat: per1k(c, cat, "head") + per1k(c, cat, "get") + per1k(c, cat, "other") for cat in ("local", "shared")}
        print(f"| {c} | {ratio(med(c, 'shared', 'rps'), med(c, 'local', 'rps'))} | "
              f"{ratio(med(c, 'shared', 'p99_ms'), med(c, 'local', 'p99_ms'))} | "
              f"{ratio(med(c, 'shared', 'ferry_us'), med(c, 'local', 'ferry_us'))} | "
              f"{ratio(tot['shared'], tot['local'])} | {fmt(s3['local'])} → {fmt(s3['shared'])} |")
    print()

# The cost of one lookup, from a cold case and its steady twin (same mode, lookups ~0): ferry's
# extra CPU per lookup, and the backend's CPU per lookup (PostgreSQL for shared; s3s-fs and
# the proxy for local). Lookups: PG calls for shared, S3 HEADs for local.
pairs = [(c, c[:-5]) for c in cases if c.endswith("-cold") and c[:-5] in cases]
if pairs:
    print("Cost of one metadata lookup (cold case minus its steady twin, per lookup). "
          "local: one lookup = one S3 HEAD (S3 side = s3s-fs + counting proxy); "
          "shared: one lookup = one PostgreSQL query (backend = PostgreSQL).")
    print()
    print("| case | catalog | lookups /1k req | ferry extra CPU µs per lookup | backend CPU µs per lookup | p50 ms added |")
    print("|---|---|---:|---:|---:|---:|")
    for cold, steady in pairs:
        for cat in ("local", "shared"):
            lk = per1k(cold, cat, "head" if cat == "local" else "pg_lookups") / 1000.0
            back = med(cold, cat, "s3_us" if cat == "local" else "pg_us")
            extra = med(cold, cat, "ferry_us") - med(steady, cat, "ferry_us")
            ok = lk == lk and lk > 0
            print(f"| {cold} | {cat} | {fmt(lk * 1000)} | {fmt(extra / lk) if ok else '–'} | "
                  f"{fmt(back / lk) if ok else '–'} | {fmt(med(cold, cat, 'p50_ms') - med(steady, cat, 'p50_ms'), 2)} |")
    print()

wins = []
for line in open(sys.argv[2]):
    if line.strip():
        wins.append(dict(kv.split("=", 1) for kv in line.split()))
if wins:
    rate, secs, poll = sys.argv[3], sys.argv[4], sys.argv[5]
    print(f"404 window: node A gets {rate} files/s renamed into its spool for {secs} s; node B "
          f"(http.mode proxy, hot cache off) is polled for each new key from its rename (at once, then at most every {poll} s; "
          "16 connections for first polls, 16 for re-polls) until its first 200. "
          "A's S3 +ms = each of node A's S3 requests held that long (0: loopback s3s-fs). "
          "first poll = rename to the first request; 200 at once = keys whose first answer was the 200; "
          "poll gap = last non-200 answer to the arrival of the first 200 (the poll interval plus the 200's own response time). "
          "S3 requests: what B sent through its counting proxy, per dropped key; A's PUTs = A's other S3 requests "
          "during the run, per dropped key (below 1: A's uploads fell behind the drops).")
    print()
    print("| catalog | A's S3 +ms | dropped | served | p50 s | p90 s | p99 s | max s | first poll p50 s | 200 at once | poll gap p50 s | first 200 from | answers (status:count) | B's S3 HEAD per key | B's S3 GET per key | A's PUTs per key |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for w in wins:
        n = int(w["dropped"])
        print(f"| {w['catalog']} | {w['delay']} | {n} | {w['served']} | {w['p50']} | {w['p90']} | {w['p99']} | {w['max']} | "
              f"{w['first_poll_p50']} | {w['first_try']} | {w['gap_p50']} | {w['sources']} | {w['statuses']} | "
              f"{int(w['s3_head']) / n:.2f} | {int(w['s3_get']) / n:.2f} | {int(w['a_other']) / n:.2f} |")
    print()
    print("Ratios, shared ÷ local, drop → first 200 at B:")
    print()
    print("| A's S3 +ms | p50 | p99 |")
    print("|---:|---:|---:|")
    for d in dict.fromkeys(w["delay"] for w in wins):
        l = next((w for w in wins if w["delay"] == d and w["catalog"] == "local"), None)
        s_ = next((w for w in wins if w["delay"] == d and w["catalog"] == "shared"), None)
        if l and s_:
            print(f"| {d} | {ratio(float(s_['p50']), float(l['p50']))} | {ratio(float(s_['p99']), float(l['p99']))} |")
PY
if [[ ${#FAILURES[@]} -gt 0 ]]; then
  echo
  echo "### FAILED checks"
  echo
  for f in "${FAILURES[@]}"; do echo "- **$f**"; done
fi
echo
echo "### ferry stderr (warnings and errors)"
echo
report_logs "$LOGS"/ferry-*.err
[[ ${#FAILURES[@]} == 0 ]]
