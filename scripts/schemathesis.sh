#!/usr/bin/env bash
# The management API checked by a client nobody here wrote: Schemathesis (a property-based API
# fuzzer) generates requests from /personal-access-tokens/openapi.json of the running quickstart and
# runs all of its checks (server errors, status codes, headers and bodies against the schema,
# schema-valid requests accepted, schema-invalid ones refused, authentication, use after delete).
# Any finding fails the run. scripts/schemathesis_hooks.py keeps the fuzzer's token working (it
# mints a new one with the bootstrap token, which the fuzzer never holds).
#
#   scripts/schemathesis.sh             # 120 s
#   ST_SECONDS=600 ST_SEED=7 scripts/schemathesis.sh
#   ST_FEATURES=--all-features scripts/schemathesis.sh   # the quickstart built so (CI: its one build)
#
# Needs python3 with venv; Schemathesis is installed into target/schemathesis (pinned version).
#
# An expected warning: "Authentication failed: POST /{id}/rotate returned only 401/403". It is
# counted per phase, and a phase may send this operation one case with the token. Traced in a HAR
# report (`--report har`) of a 180 s run: the coverage phase's one case names the keeper's id (the
# fuzzer's tokens share its subject, so a list shows it), and a read/write token may not rotate a
# `personalAccessToken:*` one: 403 `insufficient_scope`, as it must be. The stateful phase's one
# case follows its scenario's `DELETE /self`: 401, revoked. The fuzzing phase gets 201, 400, 404 and
# 410 as well.
set -euo pipefail
cd "$(dirname "$0")/.."
ST_VERSION=4.32.5
ST_SECONDS="${ST_SECONDS:-120}"
ST_SEED="${ST_SEED:-1}"
command -v python3 >/dev/null || { echo "skipped: python3 is not installed"; exit 0; }
venv="target/schemathesis"
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  if ! { python3 -m venv "$venv" &&
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"; }; then
    echo "SKIPPED: Schemathesis $ST_VERSION could not be installed (is PyPI reachable?)"
    exit 0
  fi
fi
# shellcheck disable=SC2086 # the feature flags are words
cargo build --quiet --example quickstart ${ST_FEATURES:-}
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$work"' EXIT
PAT_DB="$work/st.db" PAT_ADDR=127.0.0.1:0 RUST_LOG=warn target/debug/examples/quickstart \
  >"$work/quickstart.out" 2>"$work/quickstart.err" &
for _ in $(seq 1 100); do
  grep -q '^admin token: ' "$work/quickstart.out" 2>/dev/null && break
  sleep 0.1
done
addr="$(sed -n 's/^listening on //p' "$work/quickstart.out")"
keeper="$(sed -n 's/^admin token: //p' "$work/quickstart.out")"
if [ -z "$addr" ] || [ -z "$keeper" ]; then
  echo "the quickstart did not start:"; cat "$work/quickstart.out" "$work/quickstart.err"; exit 1
fi
base="http://$addr/personal-access-tokens"
echo "Schemathesis $ST_VERSION against $base for ${ST_SECONDS} s (seed $ST_SEED)"
status=0
PAT_FUZZ_BASE="$base" PAT_FUZZ_KEEPER="$keeper" SCHEMATHESIS_HOOKS=scripts/schemathesis_hooks.py \
  "$venv/bin/st" --config-file scripts/schemathesis.toml run "$base/openapi.json" \
  --checks all --max-time "$ST_SECONDS" --seed "$ST_SEED" --workers 1 \
  --output-truncate false --output-sanitize false >"$work/st.log" 2>&1 || status=$?
# The fuzzer's output quotes requests, and a request may carry a secret the fuzzer was handed:
# print it only through the filter that masks every token of this format.
sed -E 's/pat_[A-Za-z0-9]{20,}/pat_[redacted]/g' "$work/st.log" | tail -n 150
if grep -q 'panicked' "$work/quickstart.err"; then
  echo "the quickstart panicked:"; cat "$work/quickstart.err"; status=1
fi
exit "$status"
