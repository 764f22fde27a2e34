"""Schemathesis hooks for scripts/schemathesis.sh: a credential that keeps working.

The fuzzer calls every operation, `DELETE /self` and `POST /self/rotate` among them, so the token it
holds is soon revoked, rotated away, disabled or narrowed, and every later request would test only
the 401. This provider hands it a token that works:

- after a rotation of its own token it takes the new secret from the 201 (the old one, in its grace
  period, manages no tokens);
- after any other 401 or 403 it asks `GET /self` whether its token still works, and if not it takes
  a new one, minted with the keeper token;
- the expiries it generates lie in the future (the rule is in each `expiresAt`'s description; a
  schema cannot state it).

The keeper is the quickstart's bootstrap token (`personalAccessToken:*`). The fuzzer never sends
it, and the tokens it mints hold only `read` and `write`: acting on a token needs every scope the
token holds, so no fuzzed request can revoke, rotate or delete the keeper. Minting goes through the
public API, so it obeys the creation rate limit and the per-subject token limit like any client:
on a 429 it waits for `Retry-After`, and at the token limit it deletes the tokens the fuzzer made.
"""

import datetime
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid

import schemathesis
from hypothesis import strategies as st

BASE = os.environ["PAT_FUZZ_BASE"].rstrip("/")
KEEPER = os.environ["PAT_FUZZ_KEEPER"]
SCOPES = ["personalAccessToken:read", "personalAccessToken:write"]

# An expiry must lie in the future, which a schema cannot say: date-times are drawn from the next
# year (the description of every expiresAt says so; the list filters take any date-time).
_now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
schemathesis.openapi.format(
    "date-time",
    st.datetimes(
        min_value=_now + datetime.timedelta(hours=1),
        max_value=_now + datetime.timedelta(days=365),
        timezones=st.just(datetime.timezone.utc),
    ).map(lambda t: t.isoformat()),
)

_lock = threading.Lock()
_state = {"token": None, "id": None, "minted": 0}


def _call(method, path, token, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        BASE + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, response.headers
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return error.code, parsed, error.headers


def _tidy():
    """Deletes the subject's tokens other than the keeper and the current one."""
    status, keeper, _ = _call("GET", "/self", KEEPER)
    if status != 200:
        raise RuntimeError(f"the keeper token no longer works: {status} {keeper}")
    status, tokens, _ = _call("GET", "?limit=100", KEEPER)
    if status != 200:
        raise RuntimeError(f"could not list tokens: {status} {tokens}")
    for token in tokens:
        if token["id"] not in (keeper["id"], _state["id"]):
            _call("DELETE", f"/{token['id']}", KEEPER)


def _mint():
    # Never expiring (as the keeper), so that any expiry the fuzzer asks for is within its own.
    body = {
        "name": f"schemathesis {uuid.uuid4()}",
        "scopes": SCOPES,
        "userAwareTokenNeverExpires": True,
    }
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, created, headers = _call("POST", "", KEEPER, body)
        if status == 201:
            _state.update(token=created["token"], id=created["id"])
            _state["minted"] += 1
            return
        if status == 429:
            time.sleep(min(float(headers.get("Retry-After", "1")), 10.0))
        elif status == 403 and (created or {}).get("code") == "token_limit_reached":
            _tidy()
        else:
            raise RuntimeError(f"could not mint a token for the fuzzer: {status} {created}")
    raise RuntimeError("could not mint a token for the fuzzer within 120 s")


def _still_works(token):
    status, _, _ = _call("GET", "/self", token)
    return status == 200


@schemathesis.auth(refresh_interval=None)
class FreshToken:
    """The fuzzer's bearer token: the current one, or a new one when it stopped working."""

    def get(self, case, ctx):
        with _lock:
            if _state["token"] is None:
                _mint()
            return _state["token"]

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.hook
def after_call(context, case, response):
    """Follows a rotation of the fuzzer's own token; drops a token that stopped working."""
    sent = (case.headers or {}).get("Authorization", "")
    with _lock:
        current = _state["token"]
        if current is None or sent != f"Bearer {current}":
            return
        if response.status_code == 201 and case.path.endswith("/rotate"):
            try:
                rotated = json.loads(response.content)
            except ValueError:
                return
            if rotated.get("id") == _state["id"] and rotated.get("token"):
                _state["token"] = rotated["token"]
            return
        if response.status_code in (401, 403) and not _still_works(current):
            _state["token"] = None
