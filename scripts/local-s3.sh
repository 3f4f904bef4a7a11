#!/usr/bin/env bash
# Starts a local S3 protocol server (s3s-fs) for development and tests, installing it first
# if it is missing, and creates a bucket.
#
#   scripts/local-s3.sh [start] [--port 9000] [--data var/s3] [--bucket ferry]
#   scripts/local-s3.sh stop [--data var/s3]
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY if set, else the development pair
# ferry-dev / ferry-dev-secret. The PID is kept in DATA/../s3s-fs.pid.
set -euo pipefail

cmd=start
if [[ $# -gt 0 && $1 != --* ]]; then cmd=$1; shift; fi
port=9000
data=var/s3
bucket=ferry
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --bucket) bucket=$2; shift 2 ;;
    *) echo "local-s3.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
ak=${AWS_ACCESS_KEY_ID:-ferry-dev}
sk=${AWS_SECRET_ACCESS_KEY:-ferry-dev-secret}
pidfile="$(dirname "$data")/s3s-fs.pid"

install_s3s() {
  if command -v s3s-fs >/dev/null 2>&1; then return; fi
  export PATH="$HOME/.cargo/bin:$PATH"
  if command -v s3s-fs >/dev/null 2>&1; then return; fi
  echo "local-s3.sh: installing s3s-fs 0.14.1 (one time, a few minutes)..." >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked >&2
}

case $cmd in
  install)
    install_s3s
    ;;
  stop)
    if [[ -f $pidfile ]]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
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
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "local S3 (s3s-fs) on http://127.0.0.1:$port, bucket '$bucket', data in $data" >&2
        exit 0
      fi
      sleep 0.1
    done
    echo "local-s3.sh: s3s-fs did not start; see $(dirname "$data")/s3s-fs.log" >&2
    exit 1
    ;;
  *)
    echo "usage: local-s3.sh [start|stop|install] [--port N] [--data DIR] [--bucket NAME]" >&2
    exit 2
    ;;
esac
