#!/usr/bin/env bash
# Forward-auth under load: requests/s through nginx with `auth_request` to patd, against the same
# nginx serving the same upstream without it, rounds alternated in one run; and patd's `/auth`
# alone. Needs nginx and wrk (apt-get install nginx wrk) and a release build of patd.
#
#   scripts/gateway-load.sh            # 4 rounds of 10 s per variant
#   ROUNDS=2 SECS=5 scripts/gateway-load.sh
#   SMOKE=1 scripts/gateway-load.sh    # one 1-second round on a debug build (CI)
#   LOAD_FEATURES=--all-features …     # cargo feature flags for the build (as scripts/load.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
  ROUNDS=1 SECS=1 profile=debug build=()
else
  profile=release build=(--release)
fi
ROUNDS="${ROUNDS:-4}"
SECS="${SECS:-10}"
CONNS="${CONNS:-32}"
for tool in nginx wrk python3 taskset; do
  command -v "$tool" >/dev/null || { echo "skipped: $tool is not installed"; exit 0; }
done
if [ -n "${LOAD_FEATURES:-}" ]; then
  # With the quickstart in the same build, the dev-dependencies' features are resolved in, as in
  # `cargo test` and scripts/load.sh: the build reuses theirs instead of compiling a variant of
  # every dependency for patd alone.
  # shellcheck disable=SC2086 # the feature flags are words
  cargo build "${build[@]}" --quiet $LOAD_FEATURES --features gateway --bin patd --example quickstart
else
  cargo build "${build[@]}" --quiet --features gateway --bin patd
fi
PATD="$PWD/target/$profile/patd"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$work"' EXIT

# The upstream: a static 200 from a second nginx server block (the same for both variants).
cat >"$work/patd.toml" <<EOF
store = "sqlite:$work/patd.db"
listen = "127.0.0.1:18080"
log_format = "text"
[forward_auth]
original_headers = "original"
nginx_compat = true
[usage]
enabled = true
EOF
token="$("$PATD" --config "$work/patd.toml" token create --subject load --name load --never-expires | head -n1)"
RUST_LOG=warn taskset -c 0 "$PATD" --config "$work/patd.toml" serve >/dev/null 2>"$work/patd.log" &
mkdir -p "$work/logs"
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
error_log $work/logs/error.log;
pid $work/nginx.pid;
events {}
http {
  access_log off;
  client_body_temp_path $work/body; proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
  upstream patd { server 127.0.0.1:18080; keepalive 64; }
  server { listen 127.0.0.1:19000; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:18090;
    location /open { proxy_pass http://127.0.0.1:19000; }
    location / {
      auth_request /_patd;
      auth_request_set \$pat_subject \$upstream_http_x_auth_subject;
      proxy_set_header X-Auth-Subject \$pat_subject;
      proxy_pass http://127.0.0.1:19000;
    }
    location = /_patd {
      internal;
      proxy_pass http://patd/auth;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-Method \$request_method;
      proxy_set_header X-Original-URI \$request_uri;
    }
  }
}
EOF
taskset -c 0 nginx -p "$work" -c nginx.conf -g 'daemon off;' &
sleep 1
# Requests/s of one wrk run; every answer must be a 2xx (a refused request is cheap and would
# inflate the rate).
measure() {
  local out
  out="$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -H "Authorization: Bearer $token" "$@")"
  if grep -q "Non-2xx" <<<"$out"; then echo "not every answer was 2xx: $*" >&2; echo "$out" >&2; exit 1; fi
  awk '/Requests\/sec/ {print $2}' <<<"$out"
}
rps() { measure "$@"; }
auth_only() { measure -H "X-Original-Method: GET" -H "X-Original-URI: /x" http://127.0.0.1:18080/auth; }
echo "round,nginx_without_auth_rps,nginx_with_patd_rps,ratio,patd_auth_alone_rps"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    open=$(rps http://127.0.0.1:18090/open); authed=$(rps http://127.0.0.1:18090/x)
  else
    authed=$(rps http://127.0.0.1:18090/x); open=$(rps http://127.0.0.1:18090/open)
  fi
  alone=$(auth_only)
  [ -n "$open" ] && [ -n "$authed" ] && [ -n "$alone" ] || { echo "round $r: wrk printed no rate"; exit 1; }
  ratio=$(python3 -c "print(f'{$authed/$open:.3f}')")
  echo "$r,$open,$authed,$ratio,$alone"
done
