#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md in one run, with the machine described first:
#   criterion benches (floor, verify, peers), the in-process HTTP harness, the memory per cached
#   token, then the load script. About 5 minutes after the build on a 2-core machine.
#
#   scripts/bench.sh                 # PostgreSQL too when DATABASE_URL is set
#   SKIP_LOAD=1 scripts/bench.sh     # without the load script
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== machine =="
echo "  cores: $(nproc)"
echo "  cpu:   $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
echo "  flags: $(grep -m1 -o -w -E 'sha_ni|avx2|avx512f|aes|pclmulqdq' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "  load:  $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)"
echo "  rustc: $(rustc --version)"
echo "  when:  $(date -u +%Y-%m-%dT%H:%MZ)"

cargo bench --all-features --no-run --quiet 2>/dev/null || cargo bench --all-features --no-run
cargo bench --all-features --bench floor --bench verify --bench peers 2>&1 |
    grep -v -E '^(Benchmarking|Found|  [0-9]+ \(|\s+change:|\s+(No change|Performance|Change within))'
cargo bench --all-features --bench http_harness --bench memory 2>&1 | grep -v -E '^\s+(Finished|Running)'
if [[ -z "${SKIP_LOAD:-}" ]]; then
    LOAD_FEATURES=--all-features scripts/load.sh
fi
echo "  load after: $(cut -d' ' -f1-3 /proc/loadavg)"
