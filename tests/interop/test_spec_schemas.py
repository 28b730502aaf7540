"""The clinic spec against the code and a real server.

- spec/schemas/*.json (JSON Schema 2020-12) cover every `org.limbic.*` event type the server
  defines, and are not vacuous: wrong contents fail them.
- spec/openapi.json (OpenAPI 3.1) lists every `/_limbic/{client,admin,service}/` route the server
  registers (parsed from server/src/client/*.rs), and nothing the server does not register.
- A real server (the conftest `server` fixture) creates a session with participants, a note, a
  passcode join and a breakout; every `org.limbic.*` state event of the session, notes and
  breakout rooms validates against its schema, and the JSON the sessions, notes, waiting-room,
  breakout, admin and appointment endpoints answer (successes and errors) validates against the
  response schema spec/openapi.json gives for that status.

Run: .venv/bin/pytest -q tests/interop/test_spec_schemas.py
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import quote, urlparse, parse_qs

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from conftest import dump_toml
from mx import raw, raw_bytes, register, register_with_shared_secret, run

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "spec"
SCHEMAS = SPEC / "schemas"
CLIENT_SRC = REPO / "server" / "src" / "client"
BASE = "https://limbic.invalid/spec/"
OPENAPI_URI = BASE + "openapi.json"
SESSIONS = "/_limbic/client/v1/sessions"
HOUR = 3_600_000
PASSCODE = "teal-heron-7"
APPOINTMENTS_SECRET = "spec-test-booking-secret"

# Every event type (and the membership field) the schemas must cover.
EVENT_TYPES = {
    "org.limbic.session",
    "org.limbic.session.role",
    "org.limbic.session.note",
    "org.limbic.session.notes_for",
    "org.limbic.breakout",
    "org.limbic.passcode",
    "org.limbic.followup",  # set by the followup plugin (spec/plugins.md)
    "org.limbic.recording",  # calls (spec/calls.md)
    "org.limbic.recording.consent",
    "org.limbic.hand",
}


def q(s: str) -> str:
    return quote(s, safe="")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the spec documents ------------------------------------------------------------------------


def load_json(path: Path):
    with open(path) as f:
        return json.load(f)


SCHEMA_DOCS = {p.name[: -len(".json")]: load_json(p) for p in sorted(SCHEMAS.glob("*.json"))}
OPENAPI = load_json(SPEC / "openapi.json")
REGISTRY = Registry().with_resources(
    [(doc["$id"], Resource.from_contents(doc, default_specification=DRAFT202012)) for doc in SCHEMA_DOCS.values()]
    + [(OPENAPI_URI, Resource(contents=OPENAPI, specification=DRAFT202012))]
)


def validator(schema: dict) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=REGISTRY)


def event_validator(event_type: str) -> Draft202012Validator:
    return validator({"$ref": SCHEMA_DOCS[event_type]["$id"]})


def component_validator(name: str) -> Draft202012Validator:
    return validator({"$ref": f"{OPENAPI_URI}#/components/schemas/{name}"})


def errors_of(v: Draft202012Validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in v.iter_errors(instance)]


def assert_valid(v: Draft202012Validator, instance, what: str) -> None:
    errors = errors_of(v, instance)
    assert not errors, f"{what} does not match its schema:\n  " + "\n  ".join(errors) + f"\ninstance: {json.dumps(instance)[:1500]}"


def assert_invalid(v: Draft202012Validator, instance, what: str) -> None:
    assert not v.is_valid(instance), f"the schema accepts {what}: {json.dumps(instance)}"


def node_ref_parts(ref: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/")]


def deref(node):
    while isinstance(node, dict) and "$ref" in node and node["$ref"].startswith("#/"):
        target = OPENAPI
        for part in node_ref_parts(node["$ref"]):
            target = target[part]
        node = target
    return node


def template_of(path: str) -> str:
    """The route template a concrete path matches: `{roomId}` style, as in spec/openapi.json."""
    for template in OPENAPI["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    raise AssertionError(f"spec/openapi.json has no path for {path}")


def check_response(method: str, path: str, status: int, body, content_type: str = "application/json") -> None:
    """`body` (a response to `method path`, with `status`) is documented for that status and
    matches the documented schema."""
    template = template_of(urlparse(path).path)
    operation = OPENAPI["paths"][template].get(method.lower())
    assert operation is not None, f"spec/openapi.json documents no {method} {template}"
    response = deref(operation["responses"].get(str(status)))
    assert response is not None, (
        f"{method} {template} answered HTTP {status}, which spec/openapi.json does not document "
        f"(documented: {sorted(operation['responses'])}); body: {body!r}"
    )
    schema = response.get("content", {}).get(content_type, {}).get("schema")
    assert schema is not None, f"{method} {template} {status}: no {content_type} schema in spec/openapi.json"
    if "$ref" in schema and schema["$ref"].startswith("#/"):
        schema = {"$ref": OPENAPI_URI + schema["$ref"]}
    assert_valid(validator(schema), body, f"{method} {template} -> {status}")


async def call(base: str, method: str, path: str, token: str | None = None, body=None,
               expect: int = 200, query: dict | None = None):
    """A request whose answer must have status `expect` and match spec/openapi.json."""
    status, answer = await raw(base, method, path, token, body, query)
    assert status == expect, f"{method} {path} -> HTTP {status} (expected {expect}): {answer!r}"
    check_response(method, path, status, answer)
    return answer


# --- the schemas themselves ----------------------------------------------------------------------


def clinic_constants() -> set[str]:
    """The `org.limbic.*` names the clinic model defines (event types, the passcode field)."""
    src = (REPO / "crates" / "clinic-model" / "src" / "lib.rs").read_text()
    names = set(re.findall(r'pub const \w+: &str = "(org\.limbic\.[^"]+)";', src))
    assert names, "no org.limbic.* constants found in crates/clinic-model/src/lib.rs"
    return names


def test_every_event_type_has_a_valid_schema():
    assert set(SCHEMA_DOCS) == EVENT_TYPES, f"spec/schemas/ has {sorted(SCHEMA_DOCS)}, expected {sorted(EVENT_TYPES)}"
    missing = clinic_constants() - set(SCHEMA_DOCS)
    assert not missing, f"crates/clinic-model/src/lib.rs defines {sorted(missing)} without a schema in spec/schemas/"
    for name, doc in SCHEMA_DOCS.items():
        Draft202012Validator.check_schema(doc)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert doc["$id"] == f"{BASE}schemas/{name}.json", name
        for field in ("title", "description", "x-state-key"):
            assert isinstance(doc.get(field), str) and doc[field], f"{name}.json lacks {field}"


VALID_SESSION = {
    "kind": "group", "title": "Tuesday group", "starts_at": 1_795_000_000_000, "ends_at": 1_795_003_600_000,
    "timezone": "Europe/Berlin", "status": "scheduled", "max_participants": 12,
}


def test_schemas_are_not_vacuous():
    session = event_validator("org.limbic.session")
    assert_valid(session, VALID_SESSION, "a minimal session")
    assert_valid(session, {**VALID_SESSION, "join_window_minutes": 0, "recording_policy": "with_consent"}, "a full session")
    bad_sessions = {
        "an unknown field": {**VALID_SESSION, "location": "room 4"},
        "an unknown status": {**VALID_SESSION, "status": "paused"},
        "an unknown kind": {**VALID_SESSION, "kind": "seminar"},
        "a missing title": {k: v for k, v in VALID_SESSION.items() if k != "title"},
        "a blank title": {**VALID_SESSION, "title": "   "},
        "zero max_participants": {**VALID_SESSION, "max_participants": 0},
        "a string time": {**VALID_SESSION, "starts_at": "tomorrow"},
        "a negative time": {**VALID_SESSION, "starts_at": -1},
        "a null join window": {**VALID_SESSION, "join_window_minutes": None},
        "an unknown recording policy": {**VALID_SESSION, "recording_policy": "always"},
        "not an object": [VALID_SESSION],
    }
    for what, content in bad_sessions.items():
        assert_invalid(session, content, f"a session with {what}")

    role = event_validator("org.limbic.session.role")
    for value in ("therapist", "co_therapist", "client", "observer", None):
        assert_valid(role, {"role": value}, f"role {value!r}")
    assert_invalid(role, {"role": "admin"}, "an unknown role")
    assert_invalid(role, {}, "a role without the role field")
    assert_invalid(role, {"role": 1}, "a numeric role")

    note = event_validator("org.limbic.session.note")
    assert_valid(note, {"body": "first impression"}, "a note")
    assert_invalid(note, {}, "a note without a body")
    assert_invalid(note, {"body": 5}, "a numeric note body")

    notes_for = event_validator("org.limbic.session.notes_for")
    assert_valid(notes_for, {"room_id": "!abc:clinic.example"}, "notes_for")
    assert_invalid(notes_for, {"room_id": "@alice:clinic.example"}, "notes_for naming a user")
    assert_invalid(notes_for, {}, "notes_for without a room")

    breakout = event_validator("org.limbic.breakout")
    assert_valid(breakout, {"session_room": "!abc:x", "name": "Pairs A", "closed": False}, "a breakout")
    assert_valid(breakout, {"session_room": "!abc:x", "name": "Pairs A"}, "a breakout without closed (defaults to false)")
    assert_invalid(breakout, {"session_room": "!abc:x", "name": "Pairs A", "closed": "yes"}, "a breakout with a string closed")
    assert_invalid(breakout, {"session_room": "!abc:x", "name": "Pairs A", "closed": False, "topic": "x"}, "a breakout with an unknown field")
    assert_invalid(breakout, {"name": "Pairs A", "closed": False}, "a breakout without its session")
    assert_invalid(breakout, {"session_room": "!abc:x", "name": " ", "closed": False}, "a breakout with a blank name")

    followup = event_validator("org.limbic.followup")
    assert_valid(followup, {"room_id": "!f:clinic.example"}, "a follow-up link")
    assert_invalid(followup, {}, "a follow-up link without a room")
    assert_invalid(followup, {"room_id": "#alias:clinic.example"}, "a follow-up link to an alias")

    passcode = event_validator("org.limbic.passcode")
    assert_valid(passcode, {"membership": "knock", "reason": "hi", "org.limbic.passcode": "x"}, "a knock with a passcode")
    assert_invalid(passcode, {"membership": "join", "org.limbic.passcode": 1234}, "a numeric passcode")

    # The OpenAPI request schemas are strict too.
    assert_invalid(component_validator("CreateSessionRequest"), {**VALID_SESSION, "status": "open"}, "a create request with a status")
    assert_invalid(component_validator("SessionView"), {"room_id": "!a:x", "session": {**VALID_SESSION, "x": 1}, "roles": {}, "join_window": {"opens_at": 0, "closes_at": 1, "open": False}}, "a view of an invalid session")
    assert_invalid(component_validator("SessionView"), {"room_id": "!a:x", "session": VALID_SESSION, "roles": {"@a:x": "boss"}, "join_window": {"opens_at": 0, "closes_at": 1, "open": False}}, "a view with an unknown role")
    assert_invalid(component_validator("Error"), {"error": "no errcode"}, "an error without errcode")


# --- the OpenAPI document ------------------------------------------------------------------------


def all_refs(node, where="$"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from all_refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from all_refs(value, f"{where}/{i}")


def test_openapi_document_is_consistent():
    assert OPENAPI["openapi"].startswith("3.1."), OPENAPI["openapi"]
    resolver = REGISTRY.resolver(base_uri=OPENAPI_URI)
    for where, ref in all_refs(OPENAPI):
        try:
            resolver.lookup(ref)
        except Exception as e:  # referencing raises its own Unresolvable subclasses
            raise AssertionError(f"spec/openapi.json {where}: $ref {ref!r} does not resolve: {e!r}") from e
    for name, schema in OPENAPI["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    schemes = set(OPENAPI["components"]["securitySchemes"])
    assert {"accessToken", "sharedSecret"} <= schemes
    for template, item in OPENAPI["paths"].items():
        params = set(re.findall(r"\{([^}]+)\}", template))
        declared = {deref(p)["name"] for p in item.get("parameters", []) if deref(p)["in"] == "path"}
        for method, operation in item.items():
            if method == "parameters":
                continue
            where = f"{method.upper()} {template}"
            own = {deref(p)["name"] for p in operation.get("parameters", []) if deref(p)["in"] == "path"}
            assert params == declared | own, f"{where}: path parameters {params} but declared {declared | own}"
            assert "200" in operation["responses"], where
            for requirement in operation.get("security", []):
                assert set(requirement) <= schemes, where
            for status, response in operation["responses"].items():
                if status != "200":
                    schema = deref(response)["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, f"{where} {status} is not a Matrix error"


def registered_routes() -> set[tuple[str, str]]:
    """(METHOD, path with `{}` for parameters) of every Limbic route in server/src/client/*.rs."""
    routes = set()
    for source in sorted(CLIENT_SRC.glob("*.rs")):
        text = source.read_text()
        consts = dict(re.findall(r'(?:const|let) (\w+)(?:: &str)? = "([^"]*)";', text))
        for match in re.finditer(r"\.route\(", text):
            # The call's arguments, up to the matching parenthesis.
            depth, i = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            args = text[match.end(): i - 1]
            first, _, handlers = args.partition(",")
            first = first.strip().lstrip("&")
            if first.startswith("format!("):
                literal = re.match(r'format!\(\s*"([^"]*)"', first).group(1)
                # Known constants are filled in; other variables (a loop's prefix) stay as {name}.
                literal = re.sub(r"(?<!\{)\{([A-Za-z_]\w*)\}(?!\})", lambda m: consts.get(m.group(1), m.group(0)), literal)
                path = literal.replace("{{", "{").replace("}}", "}")
            elif first.startswith('"'):
                path = first.strip('"')
            else:
                path = consts.get(first, "")  # a variable: the Matrix API's routes
            assert "_limbic" not in path or path.startswith("/_limbic/"), f"{source.name}: cannot read the path of .route({args})"
            if not re.match(r"^/_limbic/(client|admin|service)/", path):
                continue
            methods = re.findall(r"\b(get|post|put|delete|patch)\s*\(", handlers)
            assert methods, f"{source.name}: no method in .route({args})"
            for method in methods:
                routes.add((method.upper(), re.sub(r"\{[^}]+\}", "{}", path)))
    return routes


def documented_routes() -> set[tuple[str, str]]:
    return {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", template))
        for template, item in OPENAPI["paths"].items()
        if template.startswith("/_limbic/")
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }


def test_openapi_lists_every_route_and_only_those():
    code = registered_routes()
    assert ("POST", SESSIONS) in code and ("POST", "/_limbic/service/v1/appointments") in code, code
    spec = documented_routes()
    undocumented = sorted(code - spec)
    assert not undocumented, f"routes registered in server/src/client/*.rs without spec/openapi.json: {undocumented}"
    unbuilt = sorted(spec - code)
    assert not unbuilt, f"spec/openapi.json documents routes the server does not register: {unbuilt}"
    assert "/_matrix/client/v3/login" in OPENAPI["paths"], "the org.matrix.login.jwt login"


# --- against a real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def people(server):
    """An admin, two verified therapists (one per test area, so their bookings never clash), a
    client, an observer, a third participant, a stranger (who comes and goes) and an outsider
    (who never has anything to do with any session)."""
    async def go():
        secret = server.config["registration"]["shared_secret"]
        admin = await register_with_shared_secret(server.url, secret, "spec-admin", "spec-admin-password-1", admin=True)
        accounts = {"admin": admin}
        for name in ("therapist", "therapist2", "client", "observer", "member", "stranger", "outsider"):
            accounts[name] = await register(server.url, f"spec-{name}", f"spec-{name}-password-1")
        for name in ("therapist", "therapist2"):
            path = f"/_limbic/admin/v1/therapists/{q(accounts[name].user_id)}"
            await call(server.url, "PUT", path, admin.access_token, {"verified": True})
        return accounts

    return run(go())


@pytest.fixture(scope="module")
def group(server, people):
    """A group session (live now, with a passcode) with a client and an observer, created through
    the sessions API; its create response is checked against the spec."""
    async def go():
        start = now_ms() - 60_000
        request = {
            "kind": "group", "title": "Spec group", "starts_at": start, "ends_at": start + HOUR,
            "timezone": "Europe/Berlin", "passcode": PASSCODE,
            "participants": [
                {"user_id": people["client"].user_id, "role": "client"},
                {"user_id": people["observer"].user_id, "role": "observer"},
                {"user_id": people["member"].user_id, "role": "client"},
            ],
        }
        created = await call(server.url, "POST", SESSIONS, people["therapist"].access_token, request)
        return created["room_id"]

    return run(go())


async def room_state(server, token: str, room: str) -> list[dict]:
    status, state = await raw(server.url, "GET", f"/_matrix/client/v3/rooms/{q(room)}/state", token)
    assert status == 200, f"GET /rooms/{room}/state -> HTTP {status}: {state!r}"
    return state


def validate_limbic_state(state: list[dict], where: str) -> list[str]:
    """Validates every org.limbic.* state event (and every membership content) of a room;
    returns the org.limbic.* types seen."""
    seen = []
    for event in state:
        kind = event["type"]
        if kind.startswith("org.limbic."):
            assert kind in SCHEMA_DOCS, f"{where}: {kind} has no schema in spec/schemas/"
            assert_valid(event_validator(kind), event["content"], f"{kind} (state key {event['state_key']!r}) in {where}")
            seen.append(kind)
        if kind == "m.room.member":
            assert_valid(event_validator("org.limbic.passcode"), event["content"], f"m.room.member in {where}")
            assert "org.limbic.passcode" not in event["content"], f"a stored membership carries the passcode: {event}"
        if kind == "org.limbic.session.role":
            assert re.match(r"^_@[^:]+:.+$", event["state_key"]), f"role state key {event['state_key']!r}"
    return seen


def test_session_and_notes_state_match_the_schemas(server, people, group):
    async def go():
        therapist, client, observer = people["therapist"], people["client"], people["observer"]
        # The client joins with the passcode (the join body carries org.limbic.passcode).
        join = f"/_matrix/client/v3/join/{q(group)}"
        status, body = await raw(server.url, "POST", join, client.access_token, {})
        assert status == 403, f"a join without the passcode -> HTTP {status}: {body!r}"
        status, body = await raw(server.url, "POST", join, client.access_token, {"org.limbic.passcode": PASSCODE})
        assert status == 200, f"a join with the passcode -> HTTP {status}: {body!r}"
        # A role removed through the API is {"role": null}.
        participant = f"{SESSIONS}/{q(group)}/participants/{q(people['stranger'].user_id)}"
        await call(server.url, "PUT", participant, therapist.access_token, {"role": "observer"})
        await call(server.url, "DELETE", participant, therapist.access_token)
        # Two versions of a note.
        notes = f"{SESSIONS}/{q(group)}/notes"
        first = await call(server.url, "PUT", f"{notes}/intake", therapist.access_token, {"body": "first impression"})
        await call(server.url, "PUT", f"{notes}/intake", therapist.access_token, {"body": "revised impression"})

        state = await room_state(server, therapist.access_token, group)
        seen = validate_limbic_state(state, "the session room")
        assert seen.count("org.limbic.session") == 1 and seen.count("org.limbic.session.role") == 5, seen
        roles = {e["state_key"]: e["content"]["role"] for e in state if e["type"] == "org.limbic.session.role"}
        assert roles["_" + people["stranger"].user_id] is None and roles["_" + therapist.user_id] == "therapist", roles
        assert PASSCODE not in json.dumps(state)

        notes_state = await room_state(server, therapist.access_token, first["room_id"])
        seen = validate_limbic_state(notes_state, "the notes room")
        assert sorted(seen) == ["org.limbic.session.note", "org.limbic.session.notes_for"], seen
        assert [e["content"]["room_id"] for e in notes_state if e["type"] == "org.limbic.session.notes_for"] == [group]

    run(go())


def test_session_api_responses_match_openapi(server, people, group):
    async def go():
        therapist, client, stranger, admin = people["therapist"], people["client"], people["stranger"], people["admin"]
        path = f"{SESSIONS}/{q(group)}"
        view = await call(server.url, "GET", path, therapist.access_token)
        assert view["room_id"] == group and view["roles"][client.user_id] == "client"
        await call(server.url, "GET", path, client.access_token)
        listed = await call(server.url, "GET", SESSIONS, therapist.access_token)
        assert group in [s["room_id"] for s in listed["sessions"]]
        ranged = await call(server.url, "GET", SESSIONS, client.access_token,
                            query={"from": str(now_ms() - 30 * 24 * HOUR), "to": str(now_ms() + 30 * 24 * HOUR)})
        assert group in [s["room_id"] for s in ranged["sessions"]]
        await call(server.url, "GET", SESSIONS, client.access_token, query={"from": "5"}, expect=400)
        link = await call(server.url, "POST", f"{path}/links/{q(client.user_id)}", therapist.access_token)
        assert "?token=" in link["url"], link
        await call(server.url, "POST", f"{path}/links/{q(client.user_id)}", client.access_token, expect=403)
        await call(server.url, "POST", f"{path}/links/{q(stranger.user_id)}", therapist.access_token, expect=404)
        me = await call(server.url, "GET", "/_limbic/client/v1/me", therapist.access_token)
        assert me["verified_therapist"] is True and me["admin"] is False, me
        await call(server.url, "GET", "/_limbic/client/v1/me", None, expect=401)
        notes = await call(server.url, "GET", f"{path}/notes", therapist.access_token)
        assert notes["notes"] and all(n["versions"] for n in notes["notes"])
        await call(server.url, "GET", "/_limbic/client/v1/relationship", client.access_token,
                   query={"therapist": therapist.user_id, "client": client.user_id})
        await call(server.url, "GET", f"/_limbic/admin/v1/therapists/{q(therapist.user_id)}", admin.access_token)
        audit = await call(server.url, "GET", "/_limbic/admin/v1/audit", admin.access_token, query={"room_id": group})
        assert {"session_created", "note_write", "note_read"} <= {e["action"] for e in audit["entries"]}
        page = await call(server.url, "GET", "/_limbic/admin/v1/audit", admin.access_token, query={"limit": "1"})
        assert isinstance(page.get("next_token"), int), page
        verified = await call(server.url, "GET", "/_limbic/admin/v1/audit/verify", admin.access_token)
        assert verified["valid"] is True

        # The transcript is text, not JSON.
        status, headers, text = await raw_bytes(server.url, "GET", f"{path}/transcript", therapist.access_token, {"format": "text"})
        assert status == 200 and headers.get("Content-Type", "").startswith("text/plain"), (status, headers)
        assert "text/plain" in OPENAPI["paths"][SESSIONS + "/{roomId}/transcript"]["get"]["responses"]["200"]["content"]

        # Errors: documented statuses, Matrix error bodies.
        await call(server.url, "GET", path, people["outsider"].access_token, expect=404)
        await call(server.url, "GET", path, None, expect=401)
        await call(server.url, "GET", path, "not-a-token", expect=401)
        await call(server.url, "GET", f"{SESSIONS}/{q('not a room')}", therapist.access_token, expect=400)
        await call(server.url, "GET", f"{path}/notes", client.access_token, expect=403)
        await call(server.url, "PUT", f"{path}/notes/{q('@x')}", therapist.access_token, {"body": "x"}, expect=400)
        await call(server.url, "GET", f"{path}/transcript", therapist.access_token, query={"format": "pdf"}, expect=400)
        await call(server.url, "PUT", f"{path}/status", client.access_token, {"status": "open"}, expect=403)
        await call(server.url, "PUT", f"{path}/status", therapist.access_token, {"status": "paused"}, expect=400)
        await call(server.url, "POST", SESSIONS, stranger.access_token,
                   {"kind": "group", "title": "x", "starts_at": now_ms(), "ends_at": now_ms() + HOUR, "timezone": "UTC"}, expect=403)
        await call(server.url, "POST", SESSIONS, therapist.access_token,
                   {"kind": "group", "title": "x", "starts_at": now_ms(), "ends_at": now_ms() + HOUR, "timezone": "UTC", "colour": "red"}, expect=400)
        await call(server.url, "POST", SESSIONS, therapist.access_token,
                   {"kind": "group", "title": "overlap", "starts_at": now_ms(), "ends_at": now_ms() + HOUR, "timezone": "UTC"}, expect=409)
        await call(server.url, "GET", "/_limbic/admin/v1/audit", therapist.access_token, expect=403)
        await call(server.url, "PUT", f"/_limbic/admin/v1/therapists/{q('@nobody:' + server.server_name)}",
                   admin.access_token, {"verified": True}, expect=404)

        # A status change along the workflow (last: the session stays live for the other tests).
        changed = await call(server.url, "PUT", f"{path}/status", therapist.access_token, {"status": "open"})
        assert changed["session"]["status"] == "open"

    run(go())


def test_reschedule_join_window_and_waiting_room_match_openapi(server, people):
    async def go():
        therapist, client, stranger = people["therapist2"], people["client"], people["stranger"]
        start = now_ms() + 2 * HOUR
        created = await call(server.url, "POST", SESSIONS, therapist.access_token, {
            "kind": "support", "title": "Spec support", "starts_at": start, "ends_at": start + HOUR,
            "timezone": "UTC", "join_window_minutes": 10,
            "participants": [{"user_id": client.user_id, "role": "client"}],
        })
        room = created["room_id"]
        path = f"{SESSIONS}/{q(room)}"
        view = await call(server.url, "GET", path, client.access_token)
        window = view["join_window"]
        assert (window["opens_at"], window["closes_at"], window["open"]) == (start - 600_000, start + HOUR, False), window

        # Rescheduling to now opens the window.
        changed = await call(server.url, "PATCH", path, therapist.access_token,
                             {"starts_at": now_ms() - 60_000, "ends_at": now_ms() + HOUR, "title": "Spec support (moved)"})
        assert changed["session"]["title"] == "Spec support (moved)"
        assert_valid(event_validator("org.limbic.session"), changed["session"], "the rescheduled session")
        view = await call(server.url, "GET", path, client.access_token)
        assert view["join_window"]["open"] is True, view
        await call(server.url, "PATCH", path, client.access_token, {"title": "mine"}, expect=403)
        await call(server.url, "PATCH", path, therapist.access_token, {"starts_at": now_ms() + 2 * HOUR}, expect=400)
        await call(server.url, "PATCH", path, therapist.access_token, {"kind": "group"}, expect=400)

        # The waiting room: a stranger knocks, sees the session, is listed, then admitted.
        status, body = await raw(server.url, "POST", f"/_matrix/client/v3/knock/{q(room)}", stranger.access_token, {"reason": "referred by Dr. B"})
        assert status == 200, f"knock -> HTTP {status}: {body!r}"
        await call(server.url, "GET", path, stranger.access_token)
        waiting = await call(server.url, "GET", f"{path}/waiting", therapist.access_token)
        entry = next(w for w in waiting["waiting"] if w["user_id"] == stranger.user_id)
        assert entry.get("reason") == "referred by Dr. B", entry
        await call(server.url, "GET", f"{path}/waiting", client.access_token, expect=403)
        await call(server.url, "POST", f"{path}/waiting/{q(client.user_id)}/admit", therapist.access_token, expect=404)
        await call(server.url, "POST", f"{path}/waiting/{q(stranger.user_id)}/admit", therapist.access_token)
        # Another knock is declined.
        observer = people["observer"]
        status, body = await raw(server.url, "POST", f"/_matrix/client/v3/knock/{q(room)}", observer.access_token, {})
        assert status == 200, f"knock -> HTTP {status}: {body!r}"
        await call(server.url, "POST", f"{path}/waiting/{q(observer.user_id)}/decline", therapist.access_token, {"reason": "full today"})
        waiting = await call(server.url, "GET", f"{path}/waiting", therapist.access_token)
        assert waiting["waiting"] == [], waiting

        state = await room_state(server, therapist.access_token, room)
        validate_limbic_state(state, "the rescheduled session room")

    run(go())


def test_breakouts_match_the_schemas_and_openapi(server, people, group):
    async def go():
        therapist, client, member = people["therapist"], people["client"], people["member"]
        path = f"{SESSIONS}/{q(group)}/breakouts"
        created = await call(server.url, "POST", path, therapist.access_token, {"name": "Pairs A", "participants": [client.user_id]})
        breakout = created["room_id"]
        second = (await call(server.url, "POST", path, therapist.access_token, {"name": "Pairs B"}))["room_id"]
        await call(server.url, "PUT", f"{path}/{q(breakout)}/participants/{q(member.user_id)}", therapist.access_token)
        await call(server.url, "PUT", f"{path}/{q(second)}/participants/{q(member.user_id)}", therapist.access_token)
        listed = await call(server.url, "GET", path, client.access_token)
        by_room = {b["room_id"]: b for b in listed["breakouts"]}
        assert client.user_id in by_room[breakout]["members"] and member.user_id not in by_room[breakout]["members"], listed
        assert member.user_id in by_room[second]["members"], listed
        await call(server.url, "DELETE", f"{path}/{q(second)}/participants/{q(member.user_id)}", therapist.access_token)
        await call(server.url, "POST", path, client.access_token, {"name": "mine"}, expect=403)
        await call(server.url, "POST", path, therapist.access_token, {"name": "x", "colour": "red"}, expect=400)

        state = await room_state(server, therapist.access_token, breakout)
        assert validate_limbic_state(state, "the breakout room") == ["org.limbic.breakout"]
        parent = [e for e in state if e["type"] == "m.space.parent"]
        assert [(e["state_key"], e["content"].get("canonical")) for e in parent] == [(group, True)], parent
        assert parent[0]["content"]["via"] == [server.server_name], parent
        children = {e["state_key"]: e["content"] for e in await room_state(server, therapist.access_token, group) if e["type"] == "m.space.child"}
        assert children[breakout] == {"via": [server.server_name]}, children

        await call(server.url, "DELETE", f"{path}/{q(second)}", therapist.access_token)
        await call(server.url, "PUT", f"{path}/{q(second)}/participants/{q(member.user_id)}", therapist.access_token, expect=403)
        children = {e["state_key"]: e["content"] for e in await room_state(server, therapist.access_token, group) if e["type"] == "m.space.child"}
        assert children[second] == {}, children
        status, closed_state = await raw(server.url, "GET", f"/_matrix/client/v3/rooms/{q(second)}/state/org.limbic.breakout/", therapist.access_token)
        if status == 200:  # the therapist left the closed room; servers may refuse to show its state
            assert_valid(event_validator("org.limbic.breakout"), closed_state, "a closed breakout")
            assert closed_state["closed"] is True

        # Not for an individual session.
        individual = await call(server.url, "POST", SESSIONS, people["therapist2"].access_token, {
            "kind": "individual", "title": "One to one", "starts_at": now_ms() + 5 * HOUR, "ends_at": now_ms() + 6 * HOUR,
            "timezone": "UTC", "participants": [{"user_id": client.user_id, "role": "client"}],
        })
        await call(server.url, "POST", f"{SESSIONS}/{q(individual['room_id'])}/breakouts", people["therapist2"].access_token, {"name": "x"}, expect=403)

    run(go())


def test_appointments_and_jwt_login_match_openapi(server, people):
    """Enables appointment links (a shared secret in the config, then a restart on the same store)."""
    server.config.setdefault("appointments", {})["shared_secret"] = APPOINTMENTS_SECRET
    server.config_path.write_text(dump_toml(server.config))
    server.restart()

    async def go():
        therapist = people["therapist2"]
        appointments = "/_limbic/service/v1/appointments"
        start = now_ms() + 10 * HOUR
        request = {
            "appointment_id": "spec-1", "therapist": therapist.user_id, "client": f"@spec-linked:{server.server_name}",
            "title": "Intake", "starts_at": start, "ends_at": start + HOUR, "timezone": "Europe/Berlin",
        }
        booked = await call(server.url, "POST", appointments, APPOINTMENTS_SECRET, request)
        await call(server.url, "POST", appointments, None, request, expect=401)
        await call(server.url, "POST", appointments, "wrong", request, expect=401)
        await call(server.url, "POST", appointments, APPOINTMENTS_SECRET, {**request, "extra": 1}, expect=400)
        await call(server.url, "POST", appointments, APPOINTMENTS_SECRET,
                   {**request, "therapist": people["stranger"].user_id, "appointment_id": "spec-2"}, expect=403)
        await call(server.url, "POST", appointments, APPOINTMENTS_SECRET, {**request, "client": people["client"].user_id}, expect=409)

        link = booked["links"][request["client"]]
        token = parse_qs(urlparse(link).query)["token"][0]
        login = {"type": "org.matrix.login.jwt", "token": token}
        assert_valid(component_validator("JwtLoginRequest"), login, "the login body")
        answer = await call(server.url, "POST", "/_matrix/client/v3/login", None, login)
        assert answer["user_id"] == request["client"] and answer["org.limbic.room_id"] == booked["room_id"]
        await call(server.url, "POST", "/_matrix/client/v3/login", None, login, expect=403)
        await call(server.url, "POST", "/_matrix/client/v3/login", None, {"type": "org.matrix.login.jwt"}, expect=400)

    run(go())
