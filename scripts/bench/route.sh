#!/usr/bin/env bash
# Router benchmark: `ferry route` against HAProxy (Debian's; one thread, and two) in front of
# the same three backends, hashing on Host (100 Hosts × 1000 paths, hosts.lua). The backends
# are one light nginx worker on three ports answering 302, so the routers' own cost shows;
# a run straight at one backend ("direct") gives the added latency.
# Prints markdown on stdout (medians over ROUNDS, ratios); progress on stderr.
#
# Env: ROUNDS (3), DURATION (wrk -d, 10s), CONNS ("64 256"), FERRY_BIN, FERRY_BASE_BIN (a
# second build, measured in the same rounds as "ferry route (base)"), BENCH_TMP, BENCH_LOGS,
# KEEP_WORK=1.
#
# Router CPU is the utime+stime delta of the router process alone across the wrk run (the
# backend's is the same for every router and is left out). wrk shares the 2 cores.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-"64 256"}
export BENCH_FILES=1000 BENCH_HOSTS=100
HZ=$(getconf CLK_TCK)
ROUTERS=("ferry route" "haproxy (1 thread)" "haproxy (2 threads)")

[[ -x $FERRY ]] || die "no ferry binary at $FERRY (cargo build --release, or set FERRY_BIN)"
for c in nginx haproxy wrk curl python3; do
  command -v "$c" >/dev/null || die "missing $c"
done
bench_init
NGINX_USER=""
[[ $EUID == 0 ]] && NGINX_USER="user root;"
declare -A RPORT RPID

P1=$(free_port) P2=$(free_port) P3=$(free_port)
mkdir -p "$WORK/backend"
fill "$BENCH_DIR/route-backend.conf" "$WORK/backend/nginx.conf" "USER_LINE=$NGINX_USER" \
  "TMP=$WORK/backend" "P1=$P1" "P2=$P2" "P3=$P3"
spawn BPID backend-nginx nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -e "$WORK/backend/error.log"
for p in $P1 $P2 $P3; do wait_port "$p" "$BPID" || die "backend nginx did not start"; done
RPORT[direct]=$P1

# ferry route, at its defaults apart from the listen address and backends.
start_ferry_route() {
  local name=$1 bin=$2 tag=$3 addr=
  (
    unset FERRY_CONFIG
    export FERRY_ROUTER_LISTEN=127.0.0.1:0
    export FERRY_ROUTER_BACKENDS="http://127.0.0.1:$P1,http://127.0.0.1:$P2,http://127.0.0.1:$P3"
    exec "$bin" route
  ) >"$LOGS/$tag.out" 2>"$LOGS/$tag.err" &
  RPID[$name]=$!
  SPAWNED+=("${RPID[$name]}")
  for _ in $(seq 1 200); do
    addr=$(sed -n 's/^ferry: router listening on //p' "$LOGS/$tag.out")
    [[ -n $addr ]] && break
    sleep 0.05
  done
  [[ -n ${addr:-} ]] || die "$name did not report its address; see $LOGS/$tag.err"
  RPORT[$name]=${addr##*:}
}
start_ferry_route "ferry route" "$FERRY" ferry-route
# FERRY_BASE_BIN: another build measured in the same rounds, for before/after figures.
if [[ -n ${FERRY_BASE_BIN:-} ]]; then
  ROUTERS+=("ferry route (base)")
  start_ferry_route "ferry route (base)" "$FERRY_BASE_BIN" ferry-route-base
fi

for t in 1 2; do
  name="haproxy ($t thread$([[ $t == 1 ]] || echo s))"
  port=$(free_port)
  fill "$BENCH_DIR/route-haproxy.cfg" "$WORK/haproxy-$t.cfg" "THREADS=$t" "PORT=$port" \
    "P1=$P1" "P2=$P2" "P3=$P3"
  spawn pid "haproxy-$t" haproxy -db -f "$WORK/haproxy-$t.cfg"
  wait_port "$port" "$pid" || die "haproxy did not start; see $LOGS/haproxy-$t.err"
  RPORT[$name]=$port
  RPID[$name]=$pid
done
sleep 2 # first health checks pass everywhere

RESULTS=$WORK/route.tsv
printf 'router\tconns\tround\trps\tp50\tp99\tcpu_us\terrors\n' >"$RESULTS"
run() {
  local name=$1 conns=$2 round=$3 out c0=0 c1=0 pid=${RPID[$1]:-}
  out=$LOGS/wrk-$conns-$round-$(tr -c 'a-z0-9' '-' <<<"$name").txt
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: site1.example' \
    "http://127.0.0.1:${RPORT[$name]}/static/f0001.jpg" || true)
  [[ $got == 302 ]] || die "$name answered $got, expected 302"
  [[ -z $pid ]] || c0=$(cpu_ticks "$pid")
  timeout -k 5 300 wrk -t1 -c"$conns" -d"$DURATION" --latency -s "$BENCH_DIR/hosts.lua" \
    "http://127.0.0.1:${RPORT[$name]}" >"$out" 2>&1 || log "wrk exited non-zero for $name"
  [[ -z $pid ]] || c1=$(cpu_ticks "$pid")
  local rps p50 p99 errs reqs
  IFS=$'\t' read -r rps p50 p99 errs reqs < <(python3 "$BENCH_DIR/report.py" wrk "$out")
  awk -v n="$name" -v c="$conns" -v r="$round" -v rps="$rps" -v p50="$p50" -v p99="$p99" \
    -v dc=$((c1 - c0)) -v hz="$HZ" -v q="$reqs" -v e="$errs" 'BEGIN {
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%.2f\t%s\n", n, c, r, rps, p50, p99, (q > 0 ? 1e6 * dc / hz / q : 0), e
    }' >>"$RESULTS"
  log "route c=$conns round $round $name: $rps req/s, p99 $p99 ms, errors $errs"
}
ALL=(direct "${ROUTERS[@]}")
for name in "${ALL[@]}"; do # unrecorded warm-up
  timeout 30 wrk -t1 -c64 -d2s -s "$BENCH_DIR/hosts.lua" "http://127.0.0.1:${RPORT[$name]}" >/dev/null 2>&1 || true
done
for conns in $CONNS; do
  for round in $(seq 1 "$ROUNDS"); do
    for ((k = 0; k < ${#ALL[@]}; k++)); do
      run "${ALL[(k + round - 1) % ${#ALL[@]}]}" "$conns" "$round"
    done
  done
done

echo "## Router: ferry route vs HAProxy, Host hashing over three backends"
echo
context_lines
echo "- $(haproxy -v | head -1); $(nginx -v 2>&1); wrk -t1 -c{$CONNS} -d$DURATION --latency, $ROUNDS round(s), order rotated per round"
echo "- backends: one nginx worker on three ports answering 302 (route-backend.conf); HAProxy: route-haproxy.cfg (balance hdr(host), hash-type consistent, http-reuse always); ferry route at its defaults"
echo "- CPU µs/req: the router process only; added p99 = router p99 − direct p99 (wrk straight at one backend)"
echo
python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def med(name, conns, field):
    v = [float(r[field]) for r in rows if r["router"] == name and r["conns"] == conns]
    return statistics.median(v) if v else float("nan")
conns = sorted({r["conns"] for r in rows}, key=int)
names = ["direct", "ferry route", "haproxy (1 thread)", "haproxy (2 threads)"]
if any(r["router"] == "ferry route (base)" for r in rows):
    names.append("ferry route (base)")
print("| conns | router | req/s | p50 ms | p99 ms | added p99 ms | CPU µs/req | errors |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for c in conns:
    d99 = med("direct", c, "p99")
    for n in names:
        cpu = "–" if n == "direct" else f"{med(n, c, 'cpu_us'):.1f}"
        added = "–" if n == "direct" else f"{med(n, c, 'p99') - d99:.2f}"
        errs = sum(int(r["errors"]) for r in rows if r["router"] == n and r["conns"] == c)
        print(f"| {c} | {n} | {med(n, c, 'rps'):.0f} | {med(n, c, 'p50'):.2f} | {med(n, c, 'p99'):.2f} | {added} | {cpu} | {errs} |")
print()
print("Ratios, ferry route ÷ HAProxy (req/s above 1 = ferry faster; CPU below 1 = ferry cheaper):")
print()
print("| conns | vs | req/s | CPU/req | added p99 |")
print("|---:|---|---:|---:|---:|")
for c in conns:
    d99 = med("direct", c, "p99")
    for n in names[2:]:
        r = med("ferry route", c, "rps") / med(n, c, "rps")
        cpu = med("ferry route", c, "cpu_us") / med(n, c, "cpu_us")
        fa, ha = med("ferry route", c, "p99") - d99, med(n, c, "p99") - d99
        print(f"| {c} | {n} | {r:.2f}x | {cpu:.2f}x | {fa:.2f} vs {ha:.2f} ms |")
PY
