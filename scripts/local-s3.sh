#!/usr/bin/env bash
# Starts a local S3 protocol server for development and tests, installing it first if it is
# missing, and creates a bucket: s3s-fs (quick to install) or Garage (a real self-hosted S3
# cluster, one node here).
#
#   scripts/local-s3.sh [start] [--port 9000] [--data var/s3] [--bucket ferry]     # s3s-fs
#   scripts/local-s3.sh garage  [--port 3900] [--data var/garage] [--bucket ferry] # Garage
#   scripts/local-s3.sh stop [--data DIR]
#   scripts/local-s3.sh install | install-garage
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY if set, else a development pair in
# Garage's key format (printed). The PID is kept in DATA/../s3s-fs.pid (garage.pid).
set -euo pipefail

cmd=start
if [[ $# -gt 0 && $1 != --* ]]; then cmd=$1; shift; fi
port=
data=
bucket=ferry
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --bucket) bucket=$2; shift 2 ;;
    *) echo "local-s3.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ $cmd == garage ]]; then
  port=${port:-3900}; data=${data:-var/garage}; name=garage
else
  port=${port:-9000}; data=${data:-var/s3}; name=s3s-fs
fi
ak=${AWS_ACCESS_KEY_ID:-GKfe44ede0000000000000000d}
sk=${AWS_SECRET_ACCESS_KEY:-fe44ede0fe44ede0fe44ede0fe44ede0fe44ede0fe44ede0fe44ede0fe44ede0}
pidfile="$(dirname "$data")/$name.pid"

install_s3s() {
  if command -v s3s-fs >/dev/null 2>&1; then return; fi
  export PATH="$HOME/.cargo/bin:$PATH"
  if command -v s3s-fs >/dev/null 2>&1; then return; fi
  echo "local-s3.sh: installing s3s-fs 0.14.1 (one time, a few minutes)..." >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked >&2
}

install_garage() {
  if command -v garage >/dev/null 2>&1; then return; fi
  export PATH="$HOME/.cargo/bin:$PATH"
  if command -v garage >/dev/null 2>&1; then return; fi
  echo "local-s3.sh: installing garage 2.5.0 (one time, ~15 min on 2 cores)..." >&2
  cargo install garage@2.5.0 --locked --no-default-features --features bundled-libs,sqlite >&2
}

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

start_garage() {
  install_garage
  export PATH="$HOME/.cargo/bin:$PATH"
  if [[ ! $ak =~ ^GK[0-9a-f]{24}$ || ! $sk =~ ^[0-9a-f]{64}$ ]]; then
    echo "local-s3.sh: Garage needs a key id GK + 24 hex digits and a 64-hex-digit secret" >&2
    exit 2
  fi
  mkdir -p "$data"
  local abs cfg rpc
  abs=$(cd "$data" && pwd)
  cfg="$abs/garage.toml"
  rpc=$((port + 1))
  if [[ ! -f $cfg ]]; then
    cat >"$cfg" <<EOF_CFG
metadata_dir = "$abs/meta"
data_dir = "$abs/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"
EOF_CFG
  fi
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "local-s3.sh: already running (pid $(cat "$pidfile"))" >&2
    exit 0
  fi
  RUST_LOG=${RUST_LOG:-warn} nohup garage -c "$cfg" server >"$(dirname "$data")/garage.log" 2>&1 &
  echo $! >"$pidfile"
  if ! wait_port "$port"; then
    echo "local-s3.sh: garage did not start; see $(dirname "$data")/garage.log" >&2
    exit 1
  fi
  local g="garage -c $cfg"
  if [[ ! -f $abs/.set-up ]]; then
    local id=""
    for _ in $(seq 1 100); do
      id=$($g node id -q 2>/dev/null | cut -d@ -f1) && [[ -n $id ]] && break
      sleep 0.2
    done
    $g layout assign -z dc1 -c 10G "$id" >/dev/null
    $g layout apply --version 1 >/dev/null
    $g key import --yes -n ferry "$ak" "$sk" >/dev/null
    $g key allow --create-bucket "$ak" >/dev/null
    $g bucket create "$bucket" >/dev/null
    $g bucket allow --read --write --owner "$bucket" --key "$ak" >/dev/null
    touch "$abs/.set-up"
  fi
  cat >&2 <<EOF_MSG
local S3 (Garage) on http://127.0.0.1:$port, bucket '$bucket', data in $data
  export AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk
  FERRY_S3_ENDPOINT=http://127.0.0.1:$port FERRY_S3_BUCKET=$bucket FERRY_S3_PATH_STYLE=true
EOF_MSG
}

case $cmd in
  install)
    install_s3s
    ;;
  install-garage)
    install_garage
    ;;
  garage)
    start_garage
    ;;
  stop)
    for f in "$(dirname "$data")/s3s-fs.pid" "$(dirname "$data")/garage.pid"; do
      if [[ -f $f ]]; then
        kill "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
      fi
    done
    ;;
  start)
    install_s3s
    export PATH="$HOME/.cargo/bin:$PATH"
    mkdir -p "$data/$bucket"   # s3s-fs keeps one directory per bucket
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "local-s3.sh: already running (pid $(cat "$pidfile"))" >&2
      exit 0
    fi
    nohup s3s-fs --host 127.0.0.1 --port "$port" --access-key "$ak" --secret-key "$sk" "$data" \
      >"$(dirname "$data")/s3s-fs.log" 2>&1 &
    echo $! >"$pidfile"
    if wait_port "$port"; then
      echo "local S3 (s3s-fs) on http://127.0.0.1:$port, bucket '$bucket', data in $data" >&2
      exit 0
    fi
    echo "local-s3.sh: s3s-fs did not start; see $(dirname "$data")/s3s-fs.log" >&2
    exit 1
    ;;
  *)
    echo "usage: local-s3.sh [start|garage|stop|install|install-garage] [--port N] [--data DIR] [--bucket NAME]" >&2
    exit 2
    ;;
esac
