"""Bad input never gets a 5xx, a dropped connection or a panic (issue 14, "No 5xx, ever").

Every route the server has is probed with malformed requests: the client-server and
server-server routes of the Matrix spec (`$MATRIX_SPEC`, v1.16), Limbic's own API
(`spec/openapi.json`), and every route the server's source registers by path (admin, calls,
plugins, the join page). Each route gets:

- odd path parameters (`!`, `%00`, a 5,000-character id, non-UTF-8, huge numbers),
- odd query parameters (huge and negative numbers, non-UTF-8, bad JSON filters),
- bodies that are not JSON, wrong types, deep nesting, huge numbers, non-UTF-8 bytes,
  duplicate keys,
- no token, bad tokens, a valid user's token (and an admin's on admin routes), and bad
  X-Matrix headers on federation routes.

A request passes when the server answers below 500 and, for a 4xx, with a JSON body carrying
an `errcode` (a 401 user-interactive answer with `flows` counts as well). The server must keep
answering afterwards and must not have logged a panic.

`python tests/interop/test_bad_input.py URL --shared-secret SECRET` (or `URL USER_TOKEN
[ADMIN_TOKEN]`) runs the same probe against any server, e.g. a Synapse, and prints the share of
5xx answers; `scripts/bad-input` runs it against a Synapse and a Limbic (see docs/BAD_INPUT.md).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# With INTEROP_CLUSTER=1 (conftest), the two nodes' proxy passes each connection on byte for
# byte: the probe sends what an HTTP proxy would refuse or mend.
RAW_CLIENT = True

REPO = Path(__file__).resolve().parents[2]
SPEC = Path(os.environ.get("MATRIX_SPEC", "/work/shared/matrix-spec"))
METHODS = ("GET", "POST", "PUT", "DELETE")

# Values put into path parameters.
ODD_IDS = [
    "!",
    "%00",
    "x" * 5000,
    "%FF%FE%FD",
    "18446744073709551616",
    "@:",
    "$",
    "..%2F..%2Fetc%2Fpasswd",
]
# Query strings appended to every path (names used by many endpoints).
ODD_QUERIES = [
    "limit=18446744073709551616&since=%FF&from=-1&to=99999999999999999999999&timeout=-5",
    "dir=sideways&filter=%7B%22room%22%3A5%7D&access_token=%FF",
    "limit=-1&timeout=1e400&ts=abc&width=-1&height=99999999999&method=crop&allow_remote=maybe",
    "filter=" + "%5B" * 2000,
    "server_name=%00&via=&user_id=%FF&event_id=%00",
    "since=18446744073709551615&limit=5&from=18446744073709551615",
]
DEEP = b"[" * 100_000 + b"]" * 100_000
BODIES = [
    b"{",
    b"null",
    b"[]",
    b"5",
    b'"a string"',
    b"\xff\xfe{\xc3\x28}",
    b'{"a":1,"a":2}',
    DEEP,
    b'{"x":' + b"9" * 5000 + b"}",
    b'{"type":5,"content":[],"state_key":{},"user_id":5,"room_id":[],"limit":-1,'
    b'"timeout":18446744073709551616,"device_id":{},"identifier":"x","auth":7,'
    b'"filter":"x","body":null,"visibility":5,"invite":"x","one_time_keys":[1]}',
    b'{"content":{"body":{"deep":' + b"[" * 120 + b"]" * 120 + b'}},"ts":1e308}',
    b'{"\\ud800":"\\udfff"}',
]
# (Control characters are not valid in a header: hyper itself refuses them with a bare 400.)
BAD_TOKENS = [None, "Bearer", "Bearer x\ty", "Bearer \xe4\xff", "Bearer " + "a" * 5000, "Basic Zm9vOmJhcg=="]
BAD_XMATRIX = [
    None,
    "X-Matrix ,,,=",
    'X-Matrix origin=evil.example,key="ed25519:a",sig="!!!",destination="localhost"',
    'X-Matrix origin="\xff",key="ed25519:a",sig="abc"',
    "X-Matrix " + "a=" * 3000,
]


# The JSON APIs: their refusals carry an `errcode`. Pages, metrics and LiveKit's endpoints
# (/rtc, /twirp, which answer in LiveKit's own formats) are only held to "no 5xx".
API_PREFIXES = ("/_matrix/", "/_limbic/", "/_synapse/")


@dataclass
class Route:
    method: str
    template: str  # path with {name} parameters
    schema: dict | None = None  # the JSON request body's schema, `$ref`s resolved

    @property
    def admin(self) -> bool:
        return self.template.startswith(("/_synapse/admin", "/_limbic/admin"))

    @property
    def federation(self) -> bool:
        return self.template.startswith(("/_matrix/federation", "/_matrix/key"))


def spec_routes() -> list[Route]:
    """Routes of the Matrix spec's OpenAPI definitions (client-server and server-server)."""
    import yaml

    routes = []
    for area in ("client-server", "server-server"):
        for file in sorted((SPEC / "data" / "api" / area).glob("*.yaml")):
            doc = yaml.safe_load(file.read_text())
            if not isinstance(doc, dict) or "paths" not in doc:
                continue
            base = ""
            for server in doc.get("servers", []):
                base = server.get("variables", {}).get("basePath", {}).get("default", base)
            for path, operations in doc["paths"].items():
                for method, operation in operations.items():
                    if method.upper() in METHODS:
                        schema = body_schema(operation, file)
                        routes.append(Route(method.upper(), (base + path).strip(), schema))
    return routes


def body_schema(operation: dict, file: Path) -> dict | None:
    try:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
    except (KeyError, TypeError):
        return None
    return resolve(schema, file, depth=0)


def resolve(node, file: Path, depth: int):
    """The schema with its relative-file `$ref`s (and `allOf`s) inlined, a few levels deep."""
    import yaml

    if depth > 6:
        return {}
    if isinstance(node, list):
        return [resolve(item, file, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target, _, pointer = node["$ref"].partition("#")
        path = (file.parent / target).resolve() if target else file
        try:
            loaded = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except OSError:
            return {}
        for part in filter(None, pointer.split("/")):
            loaded = loaded.get(part, {}) if isinstance(loaded, dict) else {}
        return resolve(loaded, path, depth + 1)
    merged = {key: resolve(value, file, depth + 1) for key, value in node.items() if key != "allOf"}
    for part in node.get("allOf", []):
        part = resolve(part, file, depth + 1)
        merged.setdefault("properties", {}).update(part.get("properties", {}))
        merged.setdefault("type", part.get("type"))
    return merged


WRONG_TYPE = {"string": 5, "integer": "12", "number": "1.5", "boolean": "yes", "object": [1], "array": {"a": 1}, "null": 1}
HUGE = {"string": "x" * 70_000, "integer": 2**64, "number": 1e308, "boolean": 2**70, "array": [[["x"]]] * 2000}


def typed_bodies(schema: dict | None) -> list[bytes]:
    """Bodies that fit the schema's shape but not its field types or sizes."""
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return []
    properties = schema["properties"]

    def wrong(field_schema) -> object:
        kind = field_schema.get("type") if isinstance(field_schema, dict) else None
        kind = kind[0] if isinstance(kind, list) and kind else kind
        return WRONG_TYPE.get(kind, None) if isinstance(kind, str) else None

    def nested_wrong(field_schema) -> object:
        inner = field_schema.get("properties") if isinstance(field_schema, dict) else None
        if isinstance(inner, dict) and inner:
            return {name: wrong(sub) for name, sub in inner.items()}
        return wrong(field_schema)

    def huge(field_schema) -> object:
        kind = field_schema.get("type") if isinstance(field_schema, dict) else None
        kind = kind[0] if isinstance(kind, list) and kind else kind
        return HUGE.get(kind, {"k" * 1000: "v" * 1000}) if isinstance(kind, str) else None

    bodies = [
        {name: wrong(sub) for name, sub in properties.items()},
        {name: nested_wrong(sub) for name, sub in properties.items()},
        {name: huge(sub) for name, sub in properties.items()},
    ]
    # One field wrong at a time, the others absent: each field's own check answers.
    bodies += [{name: wrong(sub)} for name, sub in properties.items()]
    return [json.dumps(body).encode() for body in bodies]


def limbic_routes() -> list[Route]:
    """Limbic's own API (spec/openapi.json) and every route the source registers by path."""
    routes = []
    openapi_file = REPO / "spec" / "openapi.json"
    openapi = json.loads(openapi_file.read_text())
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            if method.upper() in METHODS:
                routes.append(Route(method.upper(), path, body_schema(operation, openapi_file)))
    prefixes = {"{V1}": "/_synapse/admin/v1", "{V2}": "/_synapse/admin/v2", "{SERVICE_PATH}": "/_limbic/calls"}
    registration = re.compile(r'\.route\((?:&format!\()?"([^"]+)"\)?,\s*(.*)')
    sources = [*(REPO / "server" / "src").rglob("*.rs"), *(REPO / "crates").rglob("src/**/*.rs")]
    for source in sources:
        for line in source.read_text().splitlines():
            match = registration.search(line)
            if not match:
                continue
            path = match.group(1).replace("{{", "{").replace("}}", "}")
            for prefix, value in prefixes.items():
                path = path.replace(prefix, value)
            path = path.replace("{*", "{")
            methods = [m.upper() for m in re.findall(r"\b(get|post|put|delete)\(", match.group(2))]
            if "any(" in match.group(2):
                methods = list(METHODS)
            routes += [Route(m, path) for m in methods or ["GET"]]
    # Unstable endpoints the server answers that no spec file above lists.
    for method, path in [
        ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"),
        ("GET", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"),
        ("POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delayId}"),
        ("PUT", "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}?org.matrix.msc4140.delay=-1"),
        ("GET", "/_matrix/client/unstable/im.nheko.summary/rooms/{roomIdOrAlias}/summary"),
        ("GET", "/_matrix/client/v1/room_summary/{roomIdOrAlias}"),
    ]:
        routes.append(Route(method, path))
    return routes


@dataclass
class Identity:
    """Plausible values for path parameters and the tokens to use."""

    user_token: str
    admin_token: str
    values: dict[str, str]
    relogin: object = None  # callable returning a fresh user token

    def plausible(self, name: str) -> str:
        lowered = name.lower().replace("_", "")
        for key, value in self.values.items():
            if key in lowered:
                return value
        return "probe"


@dataclass
class Probe:
    base: str
    identity: Identity
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fill(self, template: str, value: str | None) -> str:
        def substitute(match: re.Match) -> str:
            if value is not None:
                return value
            return urllib.parse.quote(self.identity.plausible(match.group(1)), safe="")

        return re.sub(r"\{([^}]+)\}", substitute, template)

    def send(self, method: str, path: str, body: bytes | None, auth: str | None, label: str) -> None:
        url = urllib.parse.urlsplit(self.base)
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        self.sent += 1
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=40)
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value.encode("latin-1", "replace"))
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            self.statuses["dropped"] += 1
            self.failures.append(f"{label}: {method} {path[:160]} -> connection error {error!r}")
            return
        finally:
            connection.close()
        self.statuses[status] += 1
        if status >= 500:
            self.failures.append(f"{label}: {method} {path[:160]} -> {status} {data[:200]!r}")
        elif status >= 400 and path.startswith(API_PREFIXES) and not matrix_error(status, data):
            self.failures.append(f"{label}: {method} {path[:160]} -> {status} without errcode {data[:200]!r}")
        if status == 401 and auth == f"Bearer {self.identity.user_token}" and b"M_UNKNOWN_TOKEN" in data:
            # The probe logged itself out (POST /logout with a valid token succeeds).
            self.identity.user_token = self.identity.relogin()

    def probe(self, route: Route) -> None:
        user = self.identity.admin_token if route.admin else self.identity.user_token
        token = f"Bearer {user}"
        # A GET carries no body (a server may close the connection on an unread one).
        empty = None if route.method == "GET" else b"{}"
        plausible = self.fill(route.template, None)
        separator = "&" if "?" in plausible else "?"
        if route.federation:
            for header in BAD_XMATRIX:
                self.send(route.method, plausible, empty, header, "x-matrix")
        else:
            for bad in BAD_TOKENS:
                self.send(route.method, plausible, empty, bad, "token")
            self.send(route.method, plausible + separator + "access_token=%FF%00", None, None, "token")
        for value in ODD_IDS:
            if "{" in route.template:
                self.send(route.method, self.fill(route.template, value), empty, token, "path")
        for query in ODD_QUERIES:
            self.send(route.method, plausible + separator + query, None, token, "query")
        if route.method in ("POST", "PUT"):
            for body in BODIES + typed_bodies(route.schema):
                self.send(route.method, plausible, body, token, "body")


def matrix_error(status: int, data: bytes) -> bool:
    try:
        body = json.loads(data)
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    return isinstance(body.get("errcode"), str) or (status == 401 and isinstance(body.get("flows"), list))


def unique(routes: list[Route]) -> list[Route]:
    seen, result = set(), []
    for route in routes:
        key = (route.method, re.sub(r"\{[^}]+\}", "{}", route.template))
        if key not in seen:
            seen.add(key)
            result.append(route)
    return result


def ordered(routes: list[Route]) -> list[Route]:
    """Admin routes last (they delete the probe's room and accounts), logouts after the rest."""
    return sorted(routes, key=lambda r: (r.admin, "logout" in r.template or "deactivate" in r.template))


def run_probe(base: str, identity: Identity, routes: list[Route]) -> Probe:
    probe = Probe(base, identity)
    for route in routes:
        probe.probe(route)
    return probe


# --- against a running limbic (pytest) --------------------------------------------------


def request_json(base: str, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
    response = connection.getresponse()
    data = json.loads(response.read() or b"{}")
    assert response.status < 300, f"{method} {path} -> {response.status} {data}"
    return data


def make_identity(base: str, register_admin) -> Identity:
    def login(name: str) -> str:
        body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": "probe-password-1"}
        return request_json(base, "POST", "/_matrix/client/v3/login", body)["access_token"]

    for name in ("prober", "victim"):
        request_json(base, "POST", "/_matrix/client/v3/register",
                     {"username": name, "password": "probe-password-1", "auth": {"type": "m.login.dummy"}})
    user_token = login("prober")
    admin_token = register_admin()
    me = request_json(base, "GET", "/_matrix/client/v3/account/whoami", token=user_token)["user_id"]
    server_name = me.split(":", 1)[1]
    room = request_json(base, "POST", "/_matrix/client/v3/createRoom", {"name": "probe"}, user_token)["room_id"]
    event = request_json(base, "PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t1",
                         {"msgtype": "m.text", "body": "hello"}, user_token)["event_id"]
    return Identity(
        user_token=user_token,
        admin_token=admin_token,
        values={
            "roomidoralias": room,
            "roomid": room,
            "userid": f"@victim:{server_name}",
            "eventid": event,
            "servername": server_name,
            "origin": server_name,
            "eventtype": "m.room.message",
            "statekey": "",
            "txnid": "txn1",
            "type": "m.room.message",
        },
        relogin=lambda: login("prober"),
    )


def test_every_route_answers_bad_input_with_a_matrix_error(server):
    import asyncio

    import mx

    if not (SPEC / "data" / "api").is_dir():
        import pytest

        pytest.skip(f"the Matrix spec's data is not at {SPEC} (set MATRIX_SPEC)")

    def register_admin() -> str:
        secret = server.config["registration"]["shared_secret"]
        account = asyncio.run(mx.register_with_shared_secret(server.url, secret, "probeadmin", "probe-password-1", admin=True))
        return account.access_token

    routes = ordered(unique(spec_routes() + limbic_routes()))
    assert len(routes) > 250, f"only {len(routes)} routes found: the route sources moved?"
    probe = run_probe(server.url, make_identity(server.url, register_admin), routes)
    summary = f"{probe.sent} requests over {len(routes)} routes, statuses {dict(probe.statuses)}"
    (Path(__file__).parent / ".artifacts" / "bad_input_failures.txt").write_text("\n".join(probe.failures))
    assert not probe.failures, summary + "\n" + "\n".join(probe.failures[:60])
    # Still serving, and nothing panicked along the way.
    assert request_json(server.url, "GET", "/_matrix/client/versions")["versions"]
    for path in server.log_paths:
        log = path.read_text(errors="replace")
        assert "panicked at" not in log, f"a handler panicked ({path}):\n" + "\n".join(
            line for line in log.splitlines() if "panicked at" in line
        )
    print(summary)
    assert probe.sent > 5000, summary


def register_admin_with_shared_secret(base: str, secret: str, localpart: str = "probeadmin") -> str:
    """An admin's token from Synapse's shared-secret registration (HMAC-SHA1, as mx.py)."""
    import hashlib
    import hmac

    password = "probe-password-1"
    nonce = request_json(base, "GET", "/_synapse/admin/v1/register")["nonce"]
    mac = hmac.new(secret.encode(), b"\0".join([nonce.encode(), localpart.encode(), password.encode(), b"admin"]),
                   hashlib.sha1).hexdigest()
    body = {"nonce": nonce, "username": localpart, "password": password, "admin": True, "mac": mac}
    return request_json(base, "POST", "/_synapse/admin/v1/register", body)["access_token"]


if __name__ == "__main__":
    # python tests/interop/test_bad_input.py BASE_URL USER_TOKEN [ADMIN_TOKEN]
    # python tests/interop/test_bad_input.py BASE_URL --shared-secret SECRET
    #     registers the probe's users (open registration, m.login.dummy) and an admin
    #     (/_synapse/admin/v1/register), and creates a room with a message, as the pytest does
    # --json FILE writes the figures and every failure there as well.
    import argparse

    parser = argparse.ArgumentParser(description="Probe a Matrix server with bad input.")
    parser.add_argument("base")
    parser.add_argument("user_token", nargs="?")
    parser.add_argument("admin_token", nargs="?")
    parser.add_argument("--shared-secret")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = args.base
    if args.shared_secret:
        identity = make_identity(base, lambda: register_admin_with_shared_secret(base, args.shared_secret))
    elif args.user_token:
        user_token = args.user_token
        admin_token = args.admin_token or user_token
        whoami = request_json(base, "GET", "/_matrix/client/v3/account/whoami", token=user_token)["user_id"]
        server_name = whoami.split(":", 1)[1]
        identity = Identity(user_token, admin_token, {"userid": whoami, "servername": server_name}, relogin=lambda: user_token)
    else:
        parser.error("give USER_TOKEN or --shared-secret")
    routes = ordered(unique(spec_routes() + limbic_routes()))
    result = run_probe(base, identity, routes)
    server_errors = sum(n for s, n in result.statuses.items() if s == "dropped" or s >= 500)
    no_errcode = [failure for failure in result.failures if " without errcode " in failure]
    no_errcode_matrix = sum(1 for failure in no_errcode if failure.split(" ", 3)[2].startswith("/_matrix/"))
    statuses = dict(sorted(result.statuses.items(), key=str))
    print(f"{result.sent} requests over {len(routes)} routes; statuses {statuses}")
    print(f"5xx or dropped: {server_errors} ({100 * server_errors / result.sent:.1f} %)")
    print(f"4xx without errcode: {len(no_errcode)} ({no_errcode_matrix} on /_matrix/)")
    for failure in result.failures[:40]:
        print(failure)
    if args.json:
        args.json.write_text(json.dumps({
            "base": base, "routes": len(routes), "sent": result.sent,
            "statuses": {str(s): n for s, n in statuses.items()},
            "server_errors": server_errors,
            "dropped": result.statuses.get("dropped", 0),
            "no_errcode": len(no_errcode),
            "no_errcode_matrix": no_errcode_matrix,
            "failures": result.failures,
        }, indent=1))
