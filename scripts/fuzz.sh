#!/usr/bin/env bash
# Fuzzes the Key rules and the Range/conditional planner (fuzz/, a cargo-fuzz project).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Installs cargo-fuzz if missing, runs every target for that long, and exits non-zero if any
# target crashed (a panic is a crash: the targets assert the DESIGN.md invariants). Crashing
# inputs are left in fuzz/artifacts/<target>/; reproduce one with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>
# and shrink it with `cargo fuzz tmin <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

targets=(key_url key_path range_conditional)

# cargo-fuzz passes nightly-only flags (-Zsanitizer, sancov); this machine has only stable
# Rust, and RUSTC_BOOTSTRAP lets stable accept them. Scoped to this script's processes.
export RUSTC_BOOTSTRAP=1

# The build and the fuzzers share 2 cores with other builds and tests: stay out of their way.
run() { nice -n 10 "$@"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (a few minutes)" >&2
    run cargo install cargo-fuzz --locked
fi

cd fuzz
# One build for all targets up front, so a compile error fails fast and the time budget below
# is spent fuzzing, not compiling. It goes to fuzz/target, never the main target/.
run cargo fuzz build

dict_for() {
    case "$1" in
        key_url | key_path) echo dict/key.dict ;;
        *) echo "dict/$1.dict" ;;
    esac
}

mkdir -p logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    # corpus/<t> (ignored by git) grows across runs; seeds/<t> (committed) is read only.
    seeds=()
    if [[ -d "seeds/$t" ]]; then seeds=("seeds/$t"); fi
    log="logs/$t.log"
    echo "== $t: ${secs}s" >&2
    # Not under `set -e`: one crashing target must not stop the others from running.
    if run cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -dict="$(dict_for "$t")" -print_final_stats=1 \
        >"$log" 2>&1; then
        :
    else
        failed+=("$t")
        # The panic message and the artifact path, without libFuzzer's progress noise.
        grep -E -A2 "panicked at" "$log" | head -n 12 >&2 || true
        grep -E "ERROR:|Test unit written|Base64:" "$log" | head -n 6 >&2 || true
    fi
    # libFuzzer's last status line (execs, coverage, corpus size) and its exec count.
    { grep -E "^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse|INITED)" "$log" | tail -n 1
      grep -E "stat::number_of_executed_units" "$log"; } | sed "s/^/   $t: /" >&2 || true
done

if ((${#failed[@]})); then
    echo "fuzz.sh: crashes in: ${failed[*]} (logs in fuzz/logs/, inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: no crashes in ${targets[*]} (${secs}s each)" >&2
