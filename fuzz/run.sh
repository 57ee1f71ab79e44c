#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain, without cargo-fuzz: builds fuzz/ with the
# same instrumentation `cargo fuzz build -s none` uses (SanitizerCoverage: inline 8-bit
# counters, PC table, compare tracing; --cfg fuzzing, debug assertions) and runs each target
# under libFuzzer, starting from its committed seed corpus.
#
#   fuzz/run.sh SECONDS [TARGET...]   each target (default: all) for SECONDS
#
# New inputs go to $CARGO_TARGET_DIR/fuzz/corpus/<target> (the committed corpus under
# fuzz/corpus is only read: add a finding there by hand, minimised, with the fix), crashes
# to $CARGO_TARGET_DIR/fuzz/artifacts/<target>/. Prints one line per target — runs, coverage
# (libFuzzer's `cov`, edges hit, and `ft`, features), corpus size, crashes — and exits 1 if
# any target crashed, leaked or timed out. CI runs a few seconds per target (.ci/run); an
# hour-long run is `nice -n 19 fuzz/run.sh 720` (five targets × 12 minutes).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(session_input hpack_decode tls_records config_load connect_request)
fi
work="${CARGO_TARGET_DIR:-$root/target}/fuzz"
triple="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$work/build"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the instrumentation off build scripts and proc macros.
cargo build --quiet --release --manifest-path "$root/fuzz/Cargo.toml" --target "$triple" \
    $(printf -- '--bin %s ' "${targets[@]}")
failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
    log="$work/$t.log"
    status=0
    "$CARGO_TARGET_DIR/$triple/release/$t" "$work/corpus/$t" "$root/fuzz/corpus/$t" \
        -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/$t/" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    crashes=$(find "$work/artifacts/$t" -type f | wc -l)
    line="fuzz $t: ${runs:-0} runs in ${seconds}s, cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}, crashes $crashes"
    if [ "$status" != 0 ] || [ "$crashes" != 0 ]; then
        failed=1
        line="$line — FAILED (exit $status; log $log)"
        tail -n 40 "$log" >&2
    fi
    echo "$line"
    summary+=("$line")
done
printf '%s\n' "${summary[@]}" >"$work/summary.txt"
exit "$failed"
