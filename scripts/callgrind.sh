#!/usr/bin/env bash
# Instructions per call of variants of benches/interleaved.rs, counted by callgrind (instruction
# counts do not move with the machine's load). Each variant runs twice, for CALLS and 2 × CALLS
# calls; the difference divided by CALLS leaves out the setup (filling the cache, building the
# requests is per call and stays in: the same in every variant, so subtract `no_layer`).
#
#   scripts/callgrind.sh                        # layer_hit_1k and no_layer of the `hit` set
#   scripts/callgrind.sh hit step_prf_sip24     # any variants of one set
#   SMOKE=1 scripts/callgrind.sh                # on a debug build, 50 calls (CI)
#
# Under valgrind `sha2` runs its software path (valgrind does not emulate SHA-NI): a miss costs
# more instructions here than on the hardware; a hit computes no SHA-256.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "callgrind skipped: valgrind is not installed"; exit 0; }
set_name="${1:-hit}"
shift || true
variants=("$@")
[[ ${#variants[@]} -gt 0 ]] || variants=(layer_hit_1k layer_hit_one_token no_layer)
calls="${CALLS:-20000}"
build=(cargo bench --all-features --bench interleaved --no-run)
if [[ -n "${SMOKE:-}" ]]; then # a debug build and few calls: the script works, the count is not one
    calls=50 build=(cargo test --all-features --bench interleaved --no-run)
fi
bin=$("${build[@]}" 2>&1 |
    sed -n 's/.*Executable benches\/interleaved.rs (\(.*\))/\1/p' | tail -n 1)
[[ -x "$bin" ]] || { echo "no bench binary found"; exit 1; }
# Only what runs inside the runner's rounds is counted (`--toggle-collect`): the setup and the
# work of background threads (Tokio, moka's housekeeping) move the whole program's count by
# thousands of instructions per call between runs, and the difference of two runs with it.
# glibc's thread cache holds 7 chunks of a size by default; the runner keeps 128 requests alive at
# once, so their allocations take malloc's slower paths, by an amount that depends on the heap's
# state (the same binary counted 9 324 and 10 959 per call in two runs). A larger cache makes
# every allocation a cache hit and the count repeatable; MALLOC_DEFAULT=1 counts with glibc as it
# comes.
[[ -n "${MALLOC_DEFAULT:-}" ]] || export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.tcache_count=4096}"
count() {
    ONLY="$1" CALLS="$2" valgrind --tool=callgrind --collect-atstart=no \
        --toggle-collect='interleaved::rounds' --callgrind-out-file=/dev/null \
        "$bin" --bench "$set_name" 2>&1 >/dev/null |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
echo "callgrind: instructions per call ($calls and $((2 * calls)) calls, set '$set_name')"
for v in "${variants[@]}"; do
    a=$(count "$v" "$calls")
    b=$(count "$v" $((2 * calls)))
    [[ -n "$a" && -n "$b" && "$b" -gt 0 ]] || { echo "callgrind counted nothing for $v"; exit 1; }
    printf '  %-24s %8d\n' "$v" $(((b - a) / calls))
done
