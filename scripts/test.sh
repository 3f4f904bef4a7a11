#!/usr/bin/env bash
# The test command: installs the local S3 server (s3s-fs) if missing, then runs every test
# (unit, proptests, and the integration tests that start s3s-fs and ferry on loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/local-s3.sh install
export PATH="$HOME/.cargo/bin:$PATH"
exec cargo test "$@"
