#!/usr/bin/env bash
# The long chaos run: 2,000 files dropped over 5 minutes while s3s-fs is killed and restarted
# every 1–5 s and `ferry run` is SIGKILLed every 2–8 s; then it drains and every file is
# checked in S3 and in the archive. Size it with CHAOS_FILES and CHAOS_SECS.
#   scripts/chaos.sh                       # 2000 files, 300 s
#   CHAOS_FILES=500 CHAOS_SECS=60 scripts/chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/local-s3.sh install
export PATH="$HOME/.cargo/bin:$PATH"
export CHAOS_FILES=${CHAOS_FILES:-2000} CHAOS_SECS=${CHAOS_SECS:-300}
exec cargo test --test chaos chaos_long -- --ignored --nocapture
