#!/usr/bin/env bash
# Load test on loopback: the quickstart's trivial "pong" handler on an unauthenticated route
# (/public/ping) and behind PatAuthLayer (/ping, with the admin token the quickstart prints), in
# rounds of 50 connections: the public route without a header, the control (the public route
# with the same `Authorization` header, so that hyper parses the same bytes) and the protected
# route, the order rotated each round. Prints requests/s and p99 of each run, then the medians and
# the ratio authenticated / control (median of the rounds, with its spread). With two cores or
# more, the server runs on core 0 and the load generator on core 1 (`taskset`).
#
#   scripts/load.sh                      # 8 rounds of 5-second runs: about 2 min after the build
#   PAIRS=12 DURATION=8 scripts/load.sh  # other settings: CONNECTIONS, THREADS, PORT, WARMUP,
#                                        # LOAD_FEATURES (cargo feature flags for the build)
#   SMOKE=1 scripts/load.sh              # one round of 1-second runs on a debug build (CI)
#
# Needs wrk (installed with apt-get if missing) or oha (installed with `cargo install oha` if
# apt-get cannot install wrk). Only 127.0.0.1 is ever loaded; the server is always stopped.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -n "${SMOKE:-}" ]]; then PAIRS=1 DURATION=1 WARMUP=1; fi
PAIRS=${PAIRS:-8}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-2}

log() { printf '%s\n' "$*" >&2; }

# --- the load generator ------------------------------------------------------------------------
tool=""
if command -v wrk >/dev/null; then
    tool=wrk
elif command -v oha >/dev/null; then
    tool=oha
else
    log "installing wrk (apt-get)…"
    if { apt-get install -y wrk >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y wrk >/dev/null 2>&1; }; } &&
        command -v wrk >/dev/null; then
        tool=wrk
    else
        log "apt-get could not install wrk; installing oha (cargo install oha, a few minutes)…"
        cargo install --locked oha >/dev/null
        tool=oha
    fi
fi

# --- the server --------------------------------------------------------------------------------
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
features=$(cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if t["name"] == "quickstart" and "example" in t["kind"]:
            print(",".join(t.get("required-features", [])))')
# LOAD_FEATURES overrides them (scripts/bench.sh passes --all-features, to reuse its build).
feature_flags=${LOAD_FEATURES:-${features:+--features $features}}
profile=release profile_flag=--release
if [[ -n "${SMOKE:-}" ]]; then profile=debug profile_flag=; fi
log "building the quickstart ($profile${feature_flags:+, $feature_flags})…"
# shellcheck disable=SC2086 # the flags are words
cargo build $profile_flag --quiet --example quickstart $feature_flags

# Server and load generator on different cores, when there are two.
server_cpu=() load_cpu=()
if command -v taskset >/dev/null && (($(nproc) >= 2)); then
    server_cpu=(taskset -c 0) load_cpu=(taskset -c 1)
fi

port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
addr="127.0.0.1:$port"
workdir=$(mktemp -d)
server_log="$workdir/server.log"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT INT TERM

# The quickstart runs in a scratch directory, so that whatever files it makes go away with it.
(cd "$workdir" && exec ${server_cpu[@]+"${server_cpu[@]}"} env PAT_ADDR="$addr" "$target_dir/$profile/examples/quickstart") >"$server_log" 2>&1 &
server_pid=$!

token=""
for _ in $(seq 1 300); do
    token=$(sed -n 's/.*admin token: *\([^ ]*\).*/\1/p' "$server_log" | head -n 1)
    [[ -n "$token" ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$server_log" >&2; log "the quickstart exited"; exit 1; }
    sleep 0.1
done
[[ -n "$token" ]] || { cat "$server_log" >&2; log "no 'admin token:' line within 30 s"; exit 1; }
for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://$addr/healthz" && break
    sleep 0.1
done
# Both routes answer, and the protected one only with the token.
curl -fsS -o /dev/null "http://$addr/public/ping"
curl -fsS -o /dev/null -H "Authorization: Bearer $token" "http://$addr/ping"
status=$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/ping")
[[ "$status" == 401 ]] || { log "/ping without a token answered $status, not 401"; exit 1; }

# --- one run: prints "<requests/s> <p99 in ms>" ------------------------------------------------
run() { # route seconds [header]
    local url="http://$addr$1" seconds=$2 header=${3:-}
    if [[ $tool == wrk ]]; then
        ${load_cpu[@]+"${load_cpu[@]}"} wrk -t "$THREADS" -c "$CONNECTIONS" -d "${seconds}s" --latency ${header:+-H "$header"} "$url" |
            python3 -c '
import re, sys
out = sys.stdin.read()
rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))
m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
if errors:
    sys.exit(f"{errors.group(1)} failed responses:\n{out}")
print(f"{rps:.0f} {p99:.3f}")'
    else
        ${load_cpu[@]+"${load_cpu[@]}"} oha -z "${seconds}s" -c "$CONNECTIONS" --no-tui --output-format json ${header:+-H "$header"} "$url" |
            python3 -c '
import json, sys
r = json.load(sys.stdin)
codes = r.get("statusCodeDistribution", {})
if any(c != "200" for c in codes):
    sys.exit(f"failed responses: {codes}")
print(f"{r[\"summary\"][\"requestsPerSec\"]:.0f} {r[\"latencyPercentiles\"][\"p99\"] * 1e3:.3f}")'
    fi
}

log "loading $addr with $tool: $CONNECTIONS connections, $PAIRS rounds of ${DURATION}s runs${load_cpu[*]:+, server on core 0, load on core 1}"
run /public/ping "$WARMUP" >/dev/null
run /ping "$WARMUP" "Authorization: Bearer $token" >/dev/null

results="$workdir/results"
: >"$results"
orders=("public control auth" "control auth public" "auth public control")
for i in $(seq 1 "$PAIRS"); do
    # Rotate which route goes first, so that a drift in the machine's load hits all alike.
    for which in ${orders[$(((i - 1) % 3))]}; do
        case $which in
        public) r=$(run /public/ping "$DURATION") ;;
        control) r=$(run /public/ping "$DURATION" "Authorization: Bearer $token") ;;
        auth) r=$(run /ping "$DURATION" "Authorization: Bearer $token") ;;
        esac
        printf '%s %s %s\n' "$i" "$which" "$r" >>"$results"
        printf '  round %d  %-7s %9s req/s   p99 %s ms\n' "$i" "$which" ${r% *} ${r#* }
    done
done

python3 - "$results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    pair, which, rps, p99 = line.split()
    runs.setdefault(int(pair), {})[which] = (float(rps), float(p99))
med = statistics.median
print("== load: the same handler without and with PatAuthLayer ==")
for which, label in [("public", "/public/ping (no header)"), ("control", "/public/ping + header  "), ("auth", "/ping (tower-pat)       ")]:
    rs = [r[which] for r in runs.values()]
    print(f"  {label} {med(r for r, _ in rs):>9.0f} req/s   p99 {med(p for _, p in rs):.3f} ms   (medians)")
ratios = sorted(r["auth"][0] / r["control"][0] for r in runs.values())
plain = sorted(r["auth"][0] / r["public"][0] for r in runs.values())
print(f"  ratio auth / control     {med(ratios):>9.3f}   (spread {ratios[0]:.3f} to {ratios[-1]:.3f} over {len(ratios)} rounds; target >= 0.95)")
print(f"  ratio auth / no header   {med(plain):>9.3f}   (spread {plain[0]:.3f} to {plain[-1]:.3f})")
EOF
