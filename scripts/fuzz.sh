#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (cargo-fuzz, nightly) and runs each for SECONDS (default 60),
# then prints a summary. Exits non-zero if any target crashed, timed out or ran out of memory;
# the failing input is in fuzz/artifacts/<target>/ (reproduce it with
# `cargo +nightly fuzz run --sanitizer none <target> <file>`).
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="scopes request" scripts/fuzz.sh 30   # some targets only
#   FUZZ_SANITIZER=address scripts/fuzz.sh             # with AddressSanitizer (slower build)
#
# Each target starts from its committed seeds (fuzz/seeds/<target>) and its local corpus
# (fuzz/corpus/<target>, not committed), and adds what it finds to the local corpus.
#
# The sanitizer is off by default: tower-pat is `#![forbid(unsafe_code)]`, so the targets look
# for logic bugs (panics, overflows, wrong answers: debug assertions and overflow checks are on),
# not memory errors; AddressSanitizer would only instrument the dependencies' unsafe code, and
# roughly double the build and halve the executions per second.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [[ "$seconds" -eq 0 ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS]  (a positive number of seconds per target)" >&2
    exit 2
fi
# FUZZ_TOOLCHAIN="" uses the default toolchain (with RUSTC_BOOTSTRAP=1 on stable).
toolchain="${FUZZ_TOOLCHAIN-+nightly}"
sanitizer="${FUZZ_SANITIZER:-none}"
# Not the main crate's target directory: different flags and compiler would rebuild it.
target_dir="${FUZZ_TARGET_DIR:-$PWD/target}"
fuzz=(cargo ${toolchain:+"$toolchain"} fuzz)
opts=(--sanitizer "$sanitizer" --target-dir "$target_dir")

targets="${FUZZ_TARGETS:-$("${fuzz[@]}" list)}"
if [[ -z "$targets" ]]; then
    echo "no fuzz targets found" >&2
    exit 2
fi

start=$SECONDS
echo "== building fuzz targets (sanitizer: $sanitizer)"
if ! "${fuzz[@]}" build "${opts[@]}"; then
    echo "fuzz build failed" >&2
    exit 1
fi
build_secs=$((SECONDS - start))

failed=0
summary=()
for target in $targets; do
    mkdir -p "corpus/$target" "seeds/$target" "artifacts/$target"
    # Not in artifacts/<target>/: cargo-fuzz lists every file there as a failing input.
    log="artifacts/$target.log"
    echo "== $target: ${seconds}s"
    t0=$SECONDS
    "${fuzz[@]}" run "${opts[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    secs=$((SECONDS - t0))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
    corpus=$(find "corpus/$target" -type f | wc -l)
    if [[ $rc -eq 0 ]]; then
        result=ok
    else
        result="FAILED (exit $rc)"
        failed=1
        # The panic message and the reproducer, from libFuzzer's report.
        grep -E -m 20 -A 1 "panicked at|Test unit written to|ERROR: libFuzzer" "$log" | sed 's/^/    /'
        echo "    full log: fuzz/$log"
    fi
    summary+=("$(printf '%-12s %-18s %10s runs %8s/s  cov %-6s corpus %-5s %4ss' \
        "$target" "$result" "${runs:-?}" "$(( ${runs:-0} / (secs > 0 ? secs : 1) ))" \
        "${cov:-?}" "$corpus" "$secs")")
done

echo
echo "== fuzz summary (build ${build_secs}s, total $((SECONDS - start))s, ${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [[ $failed -ne 0 ]]; then
    echo "fuzzing found a failure: see the inputs in fuzz/artifacts/" >&2
    exit 1
fi
