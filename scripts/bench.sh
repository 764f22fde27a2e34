#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md in one run, with the machine described first: the interleaved
# runner in three processes (the source of the ratios), callgrind's instruction counts, the
# criterion benches (per-step detail), the in-process HTTP harness, the memory per cached token,
# then the load script. About 15 minutes after the build on a 2-core machine.
#
#   scripts/bench.sh                 # PostgreSQL too when DATABASE_URL is set
#   SKIP_LOAD=1 scripts/bench.sh     # without the load script
#   PROCESSES=7 scripts/bench.sh     # the interleaved runner in 7 processes (3 by default)
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

runs="$(mktemp)"
trap 'rm -f "$runs"' EXIT
# A ratio within a round holds to a few percent, but its median moves between processes (the
# binary's layout, the heap): the targets are judged on the median of the processes' medians.
summary() {
    echo "== across the $1 processes: the median of their medians (lowest to highest) =="
    perl -ne '
        if (/^  (.+?)\s{2,}([\d.]+) (ns|×|M\/s)  \(/) {
            push @{ $v{$1} }, $2; $u{$1} = $3; push @order, $1 unless $seen{$1}++;
        }
        END {
            my @shown = grep { /÷|own work|over / } @order;
            die "no ratios in the runner output\n" unless @shown;
            for my $k (@shown) {
                my @s = sort { $a <=> $b } @{ $v{$k} };
                my $n = @s;
                my $m = $n % 2 ? $s[$n / 2] : ($s[$n / 2 - 1] + $s[$n / 2]) / 2;
                my $d = $u{$k} eq "×" ? 2 : 1;
                printf "  %-48s %8.*f %s  (%s to %s)\n", $k, $d, $m, $u{$k}, $s[0], $s[-1];
            }
        }' "$runs"
}

if [[ -n "${SMOKE:-}" ]]; then
    cargo test --all-features --benches 2>&1 | tee -a "$runs"
    summary 1
    scripts/callgrind.sh
    [[ -n "${SKIP_LOAD:-}" ]] || LOAD_FEATURES=--all-features scripts/load.sh
    exit 0
fi
cargo bench --all-features --no-run --quiet 2>/dev/null || cargo bench --all-features --no-run
processes="${PROCESSES:-3}"
for process in $(seq 1 "$processes"); do
    echo "== interleaved runner, process $process of $processes =="
    SPREAD_1M=1 cargo bench --all-features --bench interleaved 2>&1 |
        grep -v -E '^\s+(Finished|Running)' | tee -a "$runs"
done
summary "$processes"
scripts/callgrind.sh
cargo bench --all-features --bench floor --bench verify --bench peers 2>&1 |
    grep -v -E '^(Benchmarking|Found|  [0-9]+ \(|\s+change:|\s+(No change|Performance|Change within))'
cargo bench --all-features --bench http_harness --bench memory 2>&1 | grep -v -E '^\s+(Finished|Running)'
if [[ -z "${SKIP_LOAD:-}" ]]; then
    LOAD_FEATURES=--all-features scripts/load.sh
fi
echo "  load after: $(cut -d' ' -f1-3 /proc/loadavg)"
