#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser with cargo-fuzz (libFuzzer, nightly).
#
#   scripts/fuzz.sh [--runs N] [--max-time SECONDS] [target...]
#
# Runs each target (all of fuzz/Cargo.toml's when none is named) for N inputs (default
# 1,000,000), or until SECONDS of fuzzing have passed when --max-time is given (0: no limit),
# starting from fuzz/seeds/<target>/ and every past crash in fuzz/regressions/<target>/. Prints,
# per target, the inputs libFuzzer ran and the crashes it found; a crash input is kept under
# fuzz/artifacts/<target>/ (copy it to fuzz/regressions/<target>/ once it is fixed). Exits
# non-zero when any target crashed. Needs `rustup toolchain install nightly` and
# `cargo install cargo-fuzz`.
set -euo pipefail

runs=1000000
max_time=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --max-time) max_time="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# No sanitizer (Rust is memory-safe; panics, overflow checks and timeouts are what we look
# for), debug assertions on (arithmetic overflow panics), release optimizations.
flags=(-s none --debug-assertions)
cargo +nightly fuzz build "${flags[@]}"

mkdir -p logs
failed=0
printf '%-20s %12s %8s %8s\n' target inputs crashes seconds
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dirs=("corpus/$t" "seeds/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    start=$(date +%s)
    touch "logs/$t.start"
    set +e
    cargo +nightly fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
        -runs="$runs" -max_total_time="$max_time" -timeout=10 -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"logs/$t.log" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    inputs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    [ -n "$inputs" ] || inputs=$(grep -o 'Done [0-9]* runs' "logs/$t.log" | grep -o '[0-9]*' | tail -1)
    [ -n "$inputs" ] || inputs=$(grep -o '^#[0-9]*' "logs/$t.log" | tr -d '#' | tail -1)
    crashes=$(find "artifacts/$t" -type f -newer "logs/$t.start" | wc -l)
    if [ "$rc" -ne 0 ]; then
        crashes=$(( crashes > 0 ? crashes : 1 ))
        failed=1
    fi
    printf '%-20s %12s %8s %8s\n' "$t" "${inputs:-?}" "$crashes" "$secs"
    if [ "$rc" -ne 0 ]; then
        grep -m1 -E 'panicked at|ERROR: libFuzzer' "logs/$t.log" | sed 's/^/    /' || true
        ls -t "artifacts/$t" | head -1 | sed "s|^|    input: fuzz/artifacts/$t/|" || true
    fi
done
exit "$failed"
