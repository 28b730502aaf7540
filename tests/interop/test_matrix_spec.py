"""Limbic's answers against the Matrix specification's own OpenAPI schemas.

The schemas are the `data/` folder of the Matrix spec at v1.16 (`$MATRIX_SPEC`, by default
/work/shared/matrix-spec; see its README): YAML files whose `$ref`s are relative file paths,
resolved here through a `referencing` registry that loads them. PyYAML comes with
matrix-synapse (requirements.txt).

- `GET /_matrix/client/versions` matches its schema.
- `GET /_matrix/client/v3/voip/turnServer` with config.example.toml (TURN on, coturn REST
  credentials) matches its 200 schema; without a token: 401 `M_MISSING_TOKEN`.
- `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}` (MSC3266) matches its 200 schema for a
  member, a stranger and an anonymous caller of a public room, and for an outsider of a session
  room (who sees the waiting room's view); the 404 of a hidden room matches the error schema.
  The schemas reject summaries missing a required field, so the checks can fail.
- `GET /_matrix/client/v3/notifications` matches its 200 schema: an invite, a plain message and
  a mention in a room of two, each listed with its room, its event (found from the stored notification's
  position) and the event's own time; without a token: 401 `M_MISSING_TOKEN`.

Run: .venv/bin/pytest -q tests/interop/test_matrix_spec.py
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlparse, unquote

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from mx import raw, register, register_with_shared_secret, run

SPEC = Path(os.environ.get("MATRIX_SPEC", "/work/shared/matrix-spec"))
CLIENT_SERVER = SPEC / "data" / "api" / "client-server"
SUMMARY_PATH = "/_matrix/client/v1/room_summary/"

if not CLIENT_SERVER.is_dir():
    pytest.skip(f"the Matrix spec's data is not at {SPEC} (set MATRIX_SPEC)", allow_module_level=True)


def q(s: str) -> str:
    return quote(s, safe="")


@lru_cache(maxsize=None)
def _load(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def _retrieve(uri: str) -> Resource:
    return Resource.from_contents(_load(unquote(urlparse(uri).path)), default_specification=DRAFT202012)


REGISTRY = Registry(retrieve=_retrieve)


def response_validator(api: str, path: str, method: str, status: int) -> Draft202012Validator:
    """The schema of `status` for `method path` in `client-server/<api>.yaml`."""
    pointer = "/".join(
        part.replace("~", "~0").replace("/", "~1")
        for part in ("paths", path, method, "responses", str(status), "content", "application/json", "schema")
    )
    uri = (CLIENT_SERVER / f"{api}.yaml").resolve().as_uri()
    return Draft202012Validator({"$ref": f"{uri}#/{quote(pointer)}"}, registry=REGISTRY)


def assert_valid(v: Draft202012Validator, instance, what: str) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in v.iter_errors(instance)]
    assert not errors, f"{what} does not match the Matrix spec:\n  " + "\n  ".join(errors) + f"\n{json.dumps(instance)}"


def summary_validator(status: int) -> Draft202012Validator:
    return response_validator("room_summary", "/room_summary/{roomIdOrAlias}", "get", status)


def test_the_schemas_are_not_vacuous():
    ok = {"room_id": "!a:example.org", "num_joined_members": 0, "world_readable": False, "guest_can_join": False,
          "join_rule": "knock", "membership": "leave"}
    v = summary_validator(200)
    assert_valid(v, ok, "a minimal summary")
    for missing in ("room_id", "num_joined_members", "world_readable", "guest_can_join"):
        assert not v.is_valid({k: x for k, x in ok.items() if k != missing}), f"accepts a summary without {missing}"
    assert not v.is_valid({**ok, "membership": "waiting"}), "accepts an unknown membership"
    assert not v.is_valid({**ok, "num_joined_members": None}), "accepts a null member count"
    assert not summary_validator(404).is_valid({"error": "no errcode"}), "accepts an error without errcode"


async def get_checked(server, path: str, token: str | None, status: int, validator: Draft202012Validator):
    got, body = await raw(server.url, "GET", path, token)
    assert got == status, f"GET {path} -> HTTP {got} (expected {status}): {body!r}"
    assert_valid(validator, body, f"GET {path} -> {status}")
    return body


def test_versions_matches_the_spec(server):
    async def go():
        v = response_validator("versions", "/versions", "get", 200)
        await get_checked(server, "/_matrix/client/versions", None, 200, v)

    run(go())


def test_turn_server_matches_the_spec(server):
    async def scenario():
        user = await register(server.url, "turnuser", "turn-user-password")
        status, body = await raw(server.url, "GET", "/_matrix/client/v3/voip/turnServer", token=user.access_token)
        assert status == 200, body
        assert body["uris"] and body["username"].endswith(f":{user.user_id}"), body
        assert_valid(response_validator("voip", "/voip/turnServer", "get", 200), body, "GET /voip/turnServer")
        status, body = await raw(server.url, "GET", "/_matrix/client/v3/voip/turnServer")
        assert (status, body.get("errcode")) == (401, "M_MISSING_TOKEN"), body
    run(scenario())


def test_room_summaries_match_the_spec(server):
    async def go():
        secret = server.config["registration"]["shared_secret"]
        admin = await register_with_shared_secret(server.url, secret, "ms-admin", "ms-admin-password-1", admin=True)
        therapist = await register(server.url, "ms-therapist", "ms-therapist-password-1")
        member = await register(server.url, "ms-member", "ms-member-password-1")
        stranger = await register(server.url, "ms-stranger", "ms-stranger-password-1")
        ok, not_found = summary_validator(200), summary_validator(404)

        status, created = await raw(server.url, "POST", "/_matrix/client/v3/createRoom", member.access_token,
                                    {"preset": "public_chat", "name": "Spec lobby", "topic": "t", "room_alias_name": "ms-lobby"})
        assert status == 200, created
        room = created["room_id"]
        for token in (member.access_token, stranger.access_token, None):
            seen = await get_checked(server, SUMMARY_PATH + q(room), token, 200, ok)
            assert seen["room_id"] == room and ("membership" in seen) == (token is not None), seen
        await get_checked(server, SUMMARY_PATH + q(f"#ms-lobby:{server.server_name}"), stranger.access_token, 200, ok)

        # A private room: the 404 an unknown room gets.
        status, created = await raw(server.url, "POST", "/_matrix/client/v3/createRoom", member.access_token, {"preset": "private_chat"})
        assert status == 200, created
        await get_checked(server, SUMMARY_PATH + q(created["room_id"]), stranger.access_token, 404, not_found)
        await get_checked(server, SUMMARY_PATH + q(f"!unknown:{server.server_name}"), stranger.access_token, 404, not_found)

        # A session room: an outsider gets the waiting room's view, which is a valid summary.
        status, body = await raw(server.url, "PUT", f"/_limbic/admin/v1/therapists/{q(therapist.user_id)}",
                                 admin.access_token, {"verified": True})
        assert status == 200, body
        start = int(time.time() * 1000) + 3_600_000
        status, session = await raw(server.url, "POST", "/_limbic/client/v1/sessions", therapist.access_token, {
            "kind": "individual", "title": "Spec session", "starts_at": start, "ends_at": start + 3_600_000,
            "timezone": "UTC", "participants": [{"user_id": member.user_id, "role": "client"}],
        })
        assert status == 200, session
        seen = await get_checked(server, SUMMARY_PATH + q(session["room_id"]), stranger.access_token, 200, ok)
        assert (seen["join_rule"], seen["num_joined_members"], seen["membership"]) == ("knock", 0, "leave"), seen
        await get_checked(server, SUMMARY_PATH + q(session["room_id"]), None, 404, not_found)

    run(go())


def test_notifications_match_the_spec(server):
    async def go():
        alice = await register(server.url, "ms-notes-alice", "ms-notes-alice-password-1")
        bob = await register(server.url, "ms-notes-bob", "ms-notes-bob-password-1")
        status, created = await raw(server.url, "POST", "/_matrix/client/v3/createRoom", alice.access_token,
                                    {"preset": "private_chat", "invite": [bob.user_id]})
        assert status == 200, created
        room = created["room_id"]
        status, body = await raw(server.url, "POST", f"/_matrix/client/v3/join/{q(room)}", bob.access_token, {})
        assert status == 200, body
        sent = []
        for n, content in enumerate([{"msgtype": "m.text", "body": "plain"},
                                     {"msgtype": "m.text", "body": "hi bob", "m.mentions": {"user_ids": [bob.user_id]}}]):
            status, body = await raw(server.url, "PUT", f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/ms-notes-{n}",
                                     alice.access_token, content)
            assert status == 200, body
            sent.append(body["event_id"])
        listed = await get_checked(server, "/_matrix/client/v3/notifications", bob.access_token, 200,
                                   response_validator("notifications", "/notifications", "get", 200))
        # Newest first: the mention, the message, then Bob's invite.
        notes = listed["notifications"]
        assert [n["event"]["event_id"] for n in notes[:2]] == sent[::-1], listed
        assert notes[2]["event"]["type"] == "m.room.member" and len(notes) == 3, listed
        for note in notes:
            assert note["room_id"] == room and note["ts"] == note["event"]["origin_server_ts"], note
        assert {"set_tweak": "highlight"} in notes[0]["actions"] and {"set_tweak": "highlight"} not in notes[1]["actions"], notes
        status, body = await raw(server.url, "GET", "/_matrix/client/v3/notifications")
        assert (status, body.get("errcode")) == (401, "M_MISSING_TOKEN"), body

    run(go())
