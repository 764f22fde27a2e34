#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md in one run, with the machine described first: the interleaved
# runner in three processes (the source of the ratios), callgrind's instruction counts, the
# criterion benches (per-step detail), the in-process HTTP harness, the memory per cached token,
# then the load script. About 15 minutes after the build on a 2-core machine.
#
#   scripts/bench.sh                 # PostgreSQL too when DATABASE_URL is set
#   SKIP_LOAD=1 scripts/bench.sh     # without the load script
#   SMOKE=1 scripts/bench.sh         # every part once, small, on debug builds (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== machine =="
echo "  cores: $(nproc)"
echo "  cpu:   $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
echo "  flags: $(grep -o -w -E 'sha_ni|avx2|avx512f|aes|pclmulqdq' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "  load:  $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)"
echo "  rustc: $(rustc --version)"
echo "  when:  $(date -u +%Y-%m-%dT%H:%MZ)"

if [[ -n "${SMOKE:-}" ]]; then
    cargo test --all-features --benches
    scripts/callgrind.sh
    [[ -n "${SKIP_LOAD:-}" ]] || LOAD_FEATURES=--all-features scripts/load.sh
    exit 0
fi
cargo bench --all-features --no-run --quiet 2>/dev/null || cargo bench --all-features --no-run
for process in 1 2 3; do
    echo "== interleaved runner, process $process of 3 =="
    SPREAD_1M=1 cargo bench --all-features --bench interleaved 2>&1 | grep -v -E '^\s+(Finished|Running)'
done
scripts/callgrind.sh
cargo bench --all-features --bench floor --bench verify --bench peers 2>&1 |
    grep -v -E '^(Benchmarking|Found|  [0-9]+ \(|\s+change:|\s+(No change|Performance|Change within))'
cargo bench --all-features --bench http_harness --bench memory 2>&1 | grep -v -E '^\s+(Finished|Running)'
if [[ -z "${SKIP_LOAD:-}" ]]; then
    LOAD_FEATURES=--all-features scripts/load.sh
fi
echo "  load after: $(cut -d' ' -f1-3 /proc/loadavg)"
