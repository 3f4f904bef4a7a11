#!/usr/bin/env bash
# The README's first command: a local S3 server on 127.0.0.1:9000 (installed if missing),
# then `ferry run` on config/quickstart.toml. Drop a file into var/spool/ and browse
# http://127.0.0.1:8080/static/<name>: served from disk at first, then (once uploaded,
# verified and archived) by a presigned redirect to the local S3 server.
set -euo pipefail
cd "$(dirname "$0")/.."
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-ferry-dev}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-ferry-dev-secret}
scripts/local-s3.sh start --port 9000 --data var/s3 --bucket ferry
trap 'scripts/local-s3.sh stop --data var/s3' EXIT
cargo build --release --quiet
mkdir -p var/spool
cat >&2 <<MSG

ferry is starting. Try, in another terminal:
  cp some-photo.jpg var/spool/
  curl -i http://127.0.0.1:8080/static/some-photo.jpg     # 200 from disk, then 302 to S3
  target/release/ferry --config config/quickstart.toml status
Ctrl-C stops ferry and the local S3 server.

MSG
target/release/ferry --config config/quickstart.toml run
