#!/usr/bin/env bash
# Runs every command of BENCHMARKS.md's command table once, in its smoke mode, so that each
# documented command is known to do what it says (CI runs this):
#   `cargo bench …`  → the same arguments under `cargo test` (each bench once, small sizes; a
#                      filter after `--` still selects);
#   `scripts/….sh`   → with SMOKE=1 (debug builds, one short round).
# A command that fails, or a table without commands, fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t commands < <(sed -n 's/^| `\(cargo bench[^`]*\|scripts\/[^`]*\)` |.*/\1/p' BENCHMARKS.md)
((${#commands[@]} > 0)) || { echo "no commands found in BENCHMARKS.md"; exit 1; }
export LOAD_FEATURES=--all-features SMOKE=1
for c in "${commands[@]}"; do
    case $c in
    "cargo bench"*)
        smoke="cargo test${c#cargo bench}"
        [[ $smoke == *--all-features* ]] || smoke="${smoke/cargo test/cargo test --all-features}"
        ;;
    *) smoke=$c ;;
    esac
    printf '\n--- %s\n    (smoke: %s)\n' "$c" "$smoke"
    # shellcheck disable=SC2086 # the documented command's words
    eval "$smoke"
done
printf '\n%d documented bench commands ran\n' "${#commands[@]}"
