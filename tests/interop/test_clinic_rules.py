"""The clinic rules of spec/sessions.md, each with an allowed and a refused case, driven by
matrix-nio clients against a real limbic server.

Every rule is exercised through both doors: the sessions API (`/_limbic/client/v1/sessions`,
plain HTTP with the nio client's access token, since nio has no API for it) and raw Matrix
events and membership changes sent with nio (`room_put_state`, `join`, `room_knock`,
`room_invite`, `room_kick`, `room_send`) — the server enforces the rules at the authorize
step, whatever API an event arrives through. Each refusal is checked for its HTTP status and
its errcode.

- verified therapists: only they create sessions (API, and a raw `org.limbic.session` in an
  ordinary room);
- only the session's therapists change the session, roles and other `org.limbic.*` state (a
  client refused even with a raised power level; a co-therapist allowed);
- the status workflow (API and raw state);
- no double-booking (creation, raw rescheduling, a co-therapist role), a cancelled session frees
  the slot;
- the join window (clients; therapists early; after the end);
- the waiting room: knocks, admission (invite) and declines (kick of the knock);
- participant limits (roles through the API and raw state; joined members);
- passcodes (raw `/join` and `/knock` bodies), never visible in state or timeline;
- the confidentiality of clinical notes;
- the message length limit (`[clinic] max_message_length`);
- appointment links (`org.matrix.login.jwt`): a valid link, replay, tampering, expiry, another
  user, another audience;
- the audit log of all that, and its hash chain.

The module starts its own server (conftest's `LimbicServer` with extra config: appointment links
enabled with a known JWT key, a small message length limit). Each test uses its own users and
sessions, so one failure does not cascade.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import time
from urllib.parse import quote

import pytest
from nio import (
    AsyncClient,
    JoinResponse,
    LoginInfoResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomGetStateEventResponse,
    RoomGetStateResponse,
    RoomInviteResponse,
    RoomKickResponse,
    RoomKnockResponse,
    RoomPreset,
    RoomPutStateResponse,
    RoomSendResponse,
)

from conftest import LimbicServer, dump_toml
from mx import (
    expect,
    expect_error,
    explain,
    full_history,
    new_client,
    raw,
    register,
    register_with_shared_secret,
    run,
)

SERVICE_SECRET = "interop-booking-service-secret"
JWT_SECRET = "interop-appointment-jwt-secret-0123456789"
MAX_MESSAGE_LENGTH = 1000

SESSION = "org.limbic.session"
ROLE = "org.limbic.session.role"
NOTE = "org.limbic.session.note"
PASSCODE_FIELD = "org.limbic.passcode"
JWT_LOGIN = "org.matrix.login.jwt"

SESSIONS = "/_limbic/client/v1/sessions"
MINUTE = 60_000
HOUR = 3_600_000

RUN = secrets.token_hex(3)  # localparts are unique even if a store were reused
_counter = itertools.count(1)


def q(s: str) -> str:
    return quote(s, safe="")


def now_ms() -> int:
    return int(time.time() * 1000)


def role_key(user_id: str) -> str:
    return "_" + user_id


# --- the server: conftest's, with appointment links on and a small message limit -------------


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """Overrides conftest's `server` for this module: the same server class and config, plus
    `[appointments]` secrets (the fixture passes no environment, so they go into the file)."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    srv = LimbicServer(name, tmp_path_factory.mktemp(name))
    srv.config.setdefault("appointments", {}).update({
        "shared_secret": SERVICE_SECRET,
        "jwt_secret": JWT_SECRET,
        "token_lifetime_seconds": 3600,
    })
    srv.config.setdefault("clinic", {})["max_message_length"] = MAX_MESSAGE_LENGTH
    srv.config_path.write_text(dump_toml(srv.config))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server):
    secret = server.config["registration"]["shared_secret"]
    return run(register_with_shared_secret(server.url, secret, f"clinic-admin-{RUN}",
                                           "clinic-admin-password-1", admin=True))


# --- helpers -----------------------------------------------------------------------------------


class Clinic:
    """One test's users (nio clients) and API calls; closes the clients at the end."""

    def __init__(self, server: LimbicServer, admin, prefix: str):
        self.server = server
        self.url = server.url
        self.admin = admin
        self.prefix = prefix
        self.clients: list[AsyncClient] = []

    async def __aenter__(self) -> "Clinic":
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.close()

    def track(self, client: AsyncClient) -> AsyncClient:
        self.clients.append(client)
        return client

    async def user(self, name: str) -> AsyncClient:
        localpart = f"{self.prefix}-{name}-{next(_counter)}-{RUN}"
        account = await register(self.url, localpart, f"pw-{localpart}-1")
        return self.track(new_client(self.url, account))

    async def verify(self, client: AsyncClient, verified: bool = True) -> None:
        status, body = await raw(self.url, "PUT", f"/_limbic/admin/v1/therapists/{q(client.user_id)}",
                                 self.admin.access_token, {"verified": verified})
        assert status == 200 and body.get("verified") is verified, \
            f"PUT /_limbic/admin/v1/therapists/{client.user_id} verified={verified} -> HTTP {status}: {body}"

    async def therapist(self, name: str) -> AsyncClient:
        client = await self.user(name)
        await self.verify(client)
        return client

    async def api(self, client: AsyncClient | None, method: str, path: str, body=None, query=None):
        return await raw(self.url, method, path, client.access_token if client else None, body, query)

    async def create(self, therapist: AsyncClient, *, kind: str = "group", starts_at: int | None = None,
                     minutes: int = 60, participants: dict | None = None, **extra) -> str:
        """A session through the API (asserting success); returns its room id."""
        status, body = await self.try_create(therapist, kind=kind, starts_at=starts_at, minutes=minutes,
                                             participants=participants, **extra)
        assert status == 200 and body.get("room_id"), f"POST {SESSIONS} by {therapist.user_id} -> HTTP {status}: {body}"
        return body["room_id"]

    async def try_create(self, therapist: AsyncClient, *, kind: str = "group", starts_at: int | None = None,
                         minutes: int = 60, participants: dict | None = None, **extra):
        starts = now_ms() - MINUTE if starts_at is None else starts_at
        request = {
            "kind": kind, "title": f"{self.prefix} session", "starts_at": starts,
            "ends_at": starts + minutes * MINUTE, "timezone": "Europe/Berlin",
            "participants": [{"user_id": c.user_id, "role": r} for c, r in (participants or {}).items()],
            **extra,
        }
        return await self.api(therapist, "POST", SESSIONS, request)

    async def session(self, client: AsyncClient, room_id: str) -> dict:
        status, body = await self.api(client, "GET", f"{SESSIONS}/{q(room_id)}")
        assert status == 200, f"GET {SESSIONS}/{room_id} as {client.user_id} -> HTTP {status}: {body}"
        return body

    async def set_status(self, client: AsyncClient, room_id: str, status: str):
        return await self.api(client, "PUT", f"{SESSIONS}/{q(room_id)}/status", {"status": status})

    async def set_role(self, client: AsyncClient, room_id: str, user: AsyncClient, role: str):
        return await self.api(client, "PUT", f"{SESSIONS}/{q(room_id)}/participants/{q(user.user_id)}",
                              {"role": role})

    async def audit(self, **query) -> list[dict]:
        status, body = await raw(self.url, "GET", "/_limbic/admin/v1/audit", self.admin.access_token,
                                 query={**query, "limit": "1000"})
        assert status == 200, f"GET /_limbic/admin/v1/audit?{query} -> HTTP {status}: {body}"
        return body["entries"]


def ok(result, what: str):
    status, body = result
    assert status == 200, f"{what}: expected HTTP 200, got HTTP {status}: {body}"
    return body


def refused(result, what: str, status: int = 403, errcode: str = "M_FORBIDDEN", says: str | None = None):
    """A raw (status, body) answer must be an error with this status and errcode."""
    got, body = result
    errc = body.get("errcode") if isinstance(body, dict) else None
    assert (got, errc) == (status, errcode), f"{what}: expected HTTP {status} {errcode}, got HTTP {got}: {body}"
    if says is not None:
        assert says in body.get("error", ""), f"{what}: expected {says!r} in the error: {body}"
    return body


async def nio_ok(resp, cls, what: str):
    return await expect(resp, cls, what)


async def nio_refused(resp, what: str, status: int = 403, errcode: str = "M_FORBIDDEN", says: str | None = None):
    """A nio response must be an error with this HTTP status and errcode.

    nio 0.26 parses some error bodies into its success classes (an error answer to
    `room_get_state_event` becomes a RoomGetStateEventResponse whose content is the error), so
    the HTTP exchange behind the response is what is checked."""
    tr = getattr(resp, "transport_response", None)
    if tr is None:
        raise AssertionError(f"{what}: no HTTP exchange behind {resp!r}")
    try:
        body = json.loads(await tr.text())
    except ValueError:
        body = {}
    message = (body.get("error") if isinstance(body, dict) else None) or getattr(resp, "message", "") or ""
    got = (tr.status, body.get("errcode") if isinstance(body, dict) else None)
    if got != (status, errcode):
        raise AssertionError(f"{what}: expected HTTP {status} {errcode}: {await explain(resp)}")
    if says is not None and says not in message:
        raise AssertionError(f"{what}: expected {says!r} in the error: {await explain(resp)}")
    resp.message = message
    resp.error_body = body if isinstance(body, dict) else {}
    return resp


def assert_names_opening(resp, opens: int, what: str) -> None:
    """A join-window refusal names when the session opens: in its message (as ms since the epoch
    or as a UTC time), and in `org.limbic.opens_at` when the server adds that field."""
    utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(opens // 1000))
    assert str(opens) in resp.message or utc in resp.message, \
        f"{what}: the message should name the opening time {opens} ({utc}): {resp.error_body}"
    if "org.limbic.opens_at" in resp.error_body:
        assert resp.error_body["org.limbic.opens_at"] == opens, f"{what}: {resp.error_body}"



async def put_state(client: AsyncClient, room_id: str, kind: str, content: dict, state_key: str = ""):
    return await client.room_put_state(room_id, kind, content, state_key=state_key)


async def member(client: AsyncClient, room_id: str, user_id: str) -> dict:
    resp = await client.room_get_state_event(room_id, "m.room.member", user_id)
    await expect(resp, RoomGetStateEventResponse, f"GET m.room.member/{user_id} in {room_id} as {client.user_id}")
    return resp.content


async def raw_join(clinic: Clinic, client: AsyncClient, room_id: str, body: dict, via_rooms: bool = False):
    path = f"/_matrix/client/v3/rooms/{q(room_id)}/join" if via_rooms else f"/_matrix/client/v3/join/{q(room_id)}"
    return await clinic.api(client, "POST", path, body)


async def raw_knock(clinic: Clinic, client: AsyncClient, room_id: str, body: dict):
    return await clinic.api(client, "POST", f"/_matrix/client/v3/knock/{q(room_id)}", body)


def session_content(view: dict, **changes) -> dict:
    """The session's `org.limbic.session` content (from GET /sessions/{room}) with changes."""
    return {**view["session"], **changes}


# --- 1. only verified therapists create sessions ------------------------------------------------


def test_only_verified_therapists_create_sessions(server, admin):
    async def go():
        async with Clinic(server, admin, "verify") as c:
            unverified = await c.user("unverified")
            doctor = await c.user("doctor")
            client = await c.user("client")

            # Sessions API: an unverified user is refused.
            refused(await c.try_create(unverified, participants={client: "client"}),
                    "POST /sessions by an unverified user", 403, "M_FORBIDDEN")

            # Only admins verify therapists.
            refused(await c.api(unverified, "PUT", f"/_limbic/admin/v1/therapists/{q(unverified.user_id)}",
                                {"verified": True}),
                    "PUT /_limbic/admin/v1/therapists/{self} by a non-admin", 403, "M_FORBIDDEN")
            await c.verify(doctor)
            status, body = await raw(c.url, "GET", f"/_limbic/admin/v1/therapists/{q(doctor.user_id)}",
                                     admin.access_token)
            assert (status, body.get("verified")) == (200, True), f"GET therapist -> HTTP {status}: {body}"

            # A verified therapist creates one; they are its therapist, the client is invited.
            room = await c.create(doctor, kind="individual", participants={client: "client"},
                                  starts_at=now_ms() + 3 * HOUR)
            view = await c.session(doctor, room)
            assert view["roles"] == {doctor.user_id: "therapist", client.user_id: "client"}, view
            assert view["session"]["status"] == "scheduled", view
            assert (await member(doctor, room, client.user_id))["membership"] == "invite"

            # Raw state: an unverified user's ordinary room cannot become a session.
            session = {"kind": "individual", "title": "Raw session", "starts_at": now_ms() + 5 * HOUR,
                       "ends_at": now_ms() + 6 * HOUR, "timezone": "Europe/Berlin", "status": "scheduled",
                       "max_participants": 2}
            plain = await unverified.room_create(name="just a room", preset=RoomPreset.private_chat)
            await nio_ok(plain, RoomCreateResponse, "createRoom by the unverified user")
            await nio_refused(await put_state(unverified, plain.room_id, SESSION, session),
                              f"raw {SESSION} by an unverified user in their own room", 403, "M_FORBIDDEN",
                              says="verified therapists")
            # ... nor carry roles.
            await nio_refused(await put_state(unverified, plain.room_id, ROLE, {"role": "therapist"},
                                              role_key(unverified.user_id)),
                              f"raw {ROLE} in a room that is no session", 403, "M_FORBIDDEN")

            # A verified therapist's ordinary room can: the raw session state, then their own role.
            own = await doctor.room_create(name="raw session", preset=RoomPreset.private_chat)
            await nio_ok(own, RoomCreateResponse, "createRoom by the verified therapist")
            await nio_ok(await put_state(doctor, own.room_id, SESSION, session), RoomPutStateResponse,
                         f"raw {SESSION} by a verified therapist")
            await nio_ok(await put_state(doctor, own.room_id, ROLE, {"role": "therapist"}, role_key(doctor.user_id)),
                         RoomPutStateResponse, f"raw {ROLE} (own therapist role) by the session's creator")
            assert (await c.session(doctor, own.room_id))["roles"] == {doctor.user_id: "therapist"}

            # Revoked: refused again.
            await c.verify(doctor, False)
            refused(await c.try_create(doctor, starts_at=now_ms() + 10 * HOUR),
                    "POST /sessions by a revoked therapist", 403, "M_FORBIDDEN")

    run(go())


# --- 2. only the session's therapists change session state ------------------------------------


def test_only_session_therapists_change_session_state(server, admin):
    async def go():
        async with Clinic(server, admin, "change") as c:
            doctor = await c.therapist("doctor")
            cotherapist = await c.user("co")
            client = await c.user("client")
            extra = await c.user("extra")
            outsider = await c.user("outsider")
            room = await c.create(doctor, participants={cotherapist: "co_therapist", client: "client"})
            for who in (cotherapist, client):
                await nio_ok(await who.join(room), JoinResponse, f"join of {who.user_id}")
            view = await c.session(doctor, room)

            # A client: not through the API ...
            refused(await c.set_status(client, room, "open"), "PUT /status by a client", 403, "M_FORBIDDEN")
            refused(await c.set_role(client, room, extra, "observer"), "PUT /participants by a client",
                    403, "M_FORBIDDEN")
            # ... nor with raw state events.
            await nio_refused(await put_state(client, room, SESSION, session_content(view, status="open")),
                              f"raw {SESSION} by a client", 403, "M_FORBIDDEN")
            await nio_refused(await put_state(client, room, ROLE, {"role": "therapist"}, role_key(client.user_id)),
                              f"raw {ROLE} (making themselves therapist) by a client", 403, "M_FORBIDDEN")
            await nio_refused(await put_state(client, room, "org.limbic.interop", {"x": 1}),
                              "raw org.limbic.* state by a client", 403, "M_FORBIDDEN")

            # Even with a therapist's power level, a client is no therapist: the clinic policy
            # refuses after the room's auth rules let the event through.
            levels = await doctor.room_get_state_event(room, "m.room.power_levels", "")
            await nio_ok(levels, RoomGetStateEventResponse, "GET power levels")
            power = levels.content
            power.setdefault("users", {})[client.user_id] = 100
            await nio_ok(await put_state(doctor, room, "m.room.power_levels", power), RoomPutStateResponse,
                         "raw power levels by the therapist (client to 100)")
            await nio_refused(await put_state(client, room, SESSION, session_content(view, status="open")),
                              f"raw {SESSION} by a client with power level 100", 403, "M_FORBIDDEN",
                              says="therapists")
            await nio_refused(await put_state(client, room, ROLE, {"role": "observer"}, role_key(extra.user_id)),
                              f"raw {ROLE} by a client with power level 100", 403, "M_FORBIDDEN", says="therapists")
            await nio_refused(await put_state(client, room, "org.limbic.interop", {"x": 1}),
                              "raw org.limbic.* state by a client with power level 100", 403, "M_FORBIDDEN",
                              says="therapists")
            # A stranger to the room: refused too.
            await nio_refused(await put_state(outsider, room, SESSION, session_content(view, status="open")),
                              f"raw {SESSION} by a non-member", 403, "M_FORBIDDEN")

            # A co-therapist: allowed, raw and through the API.
            await nio_ok(await put_state(cotherapist, room, SESSION, session_content(view, status="open")),
                         RoomPutStateResponse, f"raw {SESSION} (scheduled -> open) by the co-therapist")
            await nio_ok(await put_state(cotherapist, room, ROLE, {"role": "observer"}, role_key(extra.user_id)),
                         RoomPutStateResponse, f"raw {ROLE} (an observer) by the co-therapist")
            await nio_ok(await put_state(cotherapist, room, "org.limbic.interop", {"x": 2}), RoomPutStateResponse,
                         "raw org.limbic.* state by the co-therapist")
            ok(await c.set_status(cotherapist, room, "in_progress"), "PUT /status in_progress by the co-therapist")
            view = await c.session(client, room)
            assert view["session"]["status"] == "in_progress", view
            assert view["roles"].get(extra.user_id) == "observer", view

    run(go())


# --- 3. the status workflow --------------------------------------------------------------------


def test_status_workflow(server, admin):
    async def go():
        async with Clinic(server, admin, "status") as c:
            doctor = await c.therapist("doctor")
            client = await c.user("client")
            knocker = await c.user("knocker")
            base = now_ms() + 2 * HOUR

            # API: scheduled -> open -> in_progress -> completed, and nothing skips a step.
            room = await c.create(doctor, kind="individual", participants={client: "client"}, starts_at=base)
            refused(await c.set_status(doctor, room, "completed"), "PUT /status scheduled -> completed",
                    403, "M_FORBIDDEN")
            refused(await c.set_status(doctor, room, "in_progress"), "PUT /status scheduled -> in_progress",
                    403, "M_FORBIDDEN")
            for status in ("open", "in_progress"):
                ok(await c.set_status(doctor, room, status), f"PUT /status -> {status}")
            refused(await c.set_status(doctor, room, "cancelled"), "PUT /status in_progress -> cancelled",
                    403, "M_FORBIDDEN")
            refused(await c.set_status(doctor, room, "open"), "PUT /status in_progress -> open", 403, "M_FORBIDDEN")
            body = ok(await c.set_status(doctor, room, "completed"), "PUT /status in_progress -> completed")
            assert body["session"]["status"] == "completed", body
            # Completed is final: API and raw state.
            for status in ("scheduled", "open", "in_progress", "cancelled", "no_show"):
                refused(await c.set_status(doctor, room, status), f"PUT /status completed -> {status}",
                        403, "M_FORBIDDEN")
            view = await c.session(doctor, room)
            await nio_refused(await put_state(doctor, room, SESSION, session_content(view, status="open")),
                              f"raw {SESSION} completed -> open", 403, "M_FORBIDDEN")
            await nio_refused(await put_state(doctor, room, SESSION, session_content(view, title="renamed")),
                              f"raw {SESSION} title change of a completed session", 403, "M_FORBIDDEN")

            # Raw state: scheduled -> cancelled, then nothing; a cancelled session takes no joins or knocks.
            room2 = await c.create(doctor, kind="individual", participants={client: "client"},
                                   starts_at=now_ms() - MINUTE)
            view = await c.session(doctor, room2)
            await nio_refused(await put_state(doctor, room2, SESSION, session_content(view, status="completed")),
                              f"raw {SESSION} scheduled -> completed", 403, "M_FORBIDDEN")
            await nio_ok(await put_state(doctor, room2, SESSION, session_content(view, status="cancelled")),
                         RoomPutStateResponse, f"raw {SESSION} scheduled -> cancelled")
            await nio_refused(await put_state(doctor, room2, SESSION, session_content(view, status="scheduled")),
                              f"raw {SESSION} cancelled -> scheduled", 403, "M_FORBIDDEN")
            refused(await c.set_status(doctor, room2, "open"), "PUT /status cancelled -> open", 403, "M_FORBIDDEN")
            await nio_refused(await client.join(room2), "join of a cancelled session by its client",
                              403, "M_FORBIDDEN")
            await nio_refused(await knocker.room_knock(room2, reason="hello?"), "knock on a cancelled session",
                              403, "M_FORBIDDEN")

            # Raw state: scheduled -> open -> no_show.
            room3 = await c.create(doctor, kind="individual", starts_at=base + 2 * HOUR)
            view = await c.session(doctor, room3)
            await nio_ok(await put_state(doctor, room3, SESSION, session_content(view, status="open")),
                         RoomPutStateResponse, f"raw {SESSION} scheduled -> open")
            await nio_ok(await put_state(doctor, room3, SESSION, session_content(view, status="no_show")),
                         RoomPutStateResponse, f"raw {SESSION} open -> no_show")
            refused(await c.set_status(doctor, room3, "open"), "PUT /status no_show -> open", 403, "M_FORBIDDEN")

            # The API's cancelled and no_show from scheduled.
            room4 = await c.create(doctor, kind="individual", starts_at=base + 4 * HOUR)
            ok(await c.set_status(doctor, room4, "no_show"), "PUT /status scheduled -> no_show")
            room5 = await c.create(doctor, kind="individual", starts_at=base + 6 * HOUR)
            ok(await c.set_status(doctor, room5, "cancelled"), "PUT /status scheduled -> cancelled")

            # Invalid content: unknown fields, or an end before the start.
            room7 = await c.create(doctor, kind="individual", starts_at=base + 10 * HOUR)
            view = await c.session(doctor, room7)
            await nio_refused(await put_state(doctor, room7, SESSION, session_content(view, colour="blue")),
                              f"raw {SESSION} with an unknown field", 400, "M_BAD_JSON")
            await nio_refused(await put_state(doctor, room7, SESSION,
                                              session_content(view, ends_at=view["session"]["starts_at"] - 1)),
                              f"raw {SESSION} ending before it starts", 400, "M_BAD_JSON")

            # The kind never changes.
            room6 = await c.create(doctor, kind="individual", starts_at=base + 8 * HOUR)
            view = await c.session(doctor, room6)
            await nio_refused(await put_state(doctor, room6, SESSION, session_content(view, kind="couples")),
                              f"raw {SESSION} changing the kind", 403, "M_FORBIDDEN")

    run(go())


# --- 4. no double-booking -----------------------------------------------------------------------


def test_no_double_booking(server, admin):
    async def go():
        async with Clinic(server, admin, "booking") as c:
            alice = await c.therapist("alice")
            bob = await c.therapist("bob")
            client = await c.user("client")
            t0 = now_ms() + 24 * HOUR

            first = await c.create(alice, kind="individual", starts_at=t0, minutes=60)
            # Overlapping: refused with 409.
            refused(await c.try_create(alice, kind="individual", starts_at=t0 + 30 * MINUTE, minutes=60),
                    "POST /sessions overlapping the therapist's other session", 409, "M_FORBIDDEN",
                    says="already booked")
            refused(await c.try_create(alice, kind="individual", starts_at=t0 - 30 * MINUTE, minutes=120),
                    "POST /sessions enclosing the therapist's other session", 409, "M_FORBIDDEN")
            # Back to back: allowed.
            second = await c.create(alice, kind="individual", starts_at=t0 + 60 * MINUTE, minutes=60)
            # Another therapist at the same time: allowed.
            bobs = await c.create(bob, kind="group", starts_at=t0, minutes=60, participants={client: "client"})

            # Raw rescheduling onto the first session: refused with 409; elsewhere: allowed.
            view = await c.session(alice, second)
            await nio_refused(
                await put_state(alice, second, SESSION,
                                session_content(view, starts_at=t0 + 30 * MINUTE, ends_at=t0 + 90 * MINUTE)),
                f"raw {SESSION} rescheduled onto the therapist's other session", 409, "M_FORBIDDEN")
            await nio_ok(
                await put_state(alice, second, SESSION,
                                session_content(view, starts_at=t0 + 2 * HOUR, ends_at=t0 + 3 * HOUR)),
                RoomPutStateResponse, f"raw {SESSION} rescheduled to a free slot")

            # Making a double-booked therapist co-therapist: at creation, through the participants
            # API and with a raw role, all 409.
            refused(await c.try_create(bob, kind="group", starts_at=t0 + 30 * MINUTE, minutes=60,
                                       participants={alice: "co_therapist"}),
                    "POST /sessions naming a double-booked therapist as co-therapist", 409, "M_FORBIDDEN")
            refused(await c.set_role(bob, bobs, alice, "co_therapist"),
                    "PUT /participants co_therapist for a therapist booked at that time", 409, "M_FORBIDDEN")
            await nio_refused(await put_state(bob, bobs, ROLE, {"role": "co_therapist"}, role_key(alice.user_id)),
                              f"raw {ROLE} co_therapist for a therapist booked at that time", 409, "M_FORBIDDEN")
            await nio_refused(await put_state(bob, bobs, ROLE, {"role": "therapist"}, role_key(alice.user_id)),
                              f"raw {ROLE} therapist for a therapist booked at that time", 409, "M_FORBIDDEN")

            # A cancelled session frees the slot: the co-therapist role is given now ...
            ok(await c.set_status(alice, first, "cancelled"), "PUT /status cancelled")
            ok(await c.set_role(bob, bobs, alice, "co_therapist"),
               "PUT /participants co_therapist once the overlapping session is cancelled")
            # ... and that co-therapy counts as a booking of hers.
            refused(await c.try_create(alice, kind="individual", starts_at=t0 + 15 * MINUTE, minutes=30),
                    "POST /sessions overlapping a session where she is co-therapist", 409, "M_FORBIDDEN")
            # The hour after bob's session and before her rescheduled one is free.
            await c.create(alice, kind="individual", starts_at=t0 + 60 * MINUTE, minutes=60)

    run(go())


# --- 5. the join window -------------------------------------------------------------------------


def test_join_window(server, admin):
    async def go():
        async with Clinic(server, admin, "window") as c:
            doctor = await c.therapist("doctor")
            cotherapist = await c.user("co")
            client = await c.user("client")
            guest = await c.user("guest")
            now = now_ms()

            # Starting in 2 hours: the client is refused with the opening time in the message.
            later = now + 2 * HOUR
            room = await c.create(doctor, participants={client: "client", cotherapist: "co_therapist"},
                                  starts_at=later)
            opens = later - 15 * MINUTE
            resp = await nio_refused(await client.join(room), "client joining 2 hours before the start",
                                     403, "M_FORBIDDEN")
            assert_names_opening(resp, opens, "client joining 2 hours early")
            # The same through the state endpoint, and for a guest admitted from the waiting room.
            resp = await nio_refused(await put_state(client, room, "m.room.member", {"membership": "join"},
                                                     client.user_id),
                                     "raw m.room.member join 2 hours before the start", 403, "M_FORBIDDEN")
            assert_names_opening(resp, opens, "raw m.room.member join 2 hours early")
            await nio_ok(await guest.room_knock(room, reason="early"), RoomKnockResponse, "knock 2 hours early")
            await nio_ok(await doctor.room_invite(room, guest.user_id), RoomInviteResponse, "admitting it")
            resp = await nio_refused(await guest.join(room), "admitted guest joining 2 hours early", 403, "M_FORBIDDEN")
            assert_names_opening(resp, opens, "admitted guest joining 2 hours early")
            # Therapists may join early.
            await nio_ok(await cotherapist.join(room), JoinResponse, "co-therapist joining 2 hours early")

            # Starting now: the client joins.
            current = await c.create(doctor, participants={client: "client"}, starts_at=now - MINUTE, minutes=50)
            await nio_ok(await client.join(current), JoinResponse, "client joining a session that has started")

            # A longer join window (3 hours) opens a session 2 hours ahead (raw /join, no passcode).
            wide = await c.create(doctor, participants={client: "client"}, starts_at=now + 4 * HOUR,
                                  join_window_minutes=300)
            ok(await raw_join(c, client, wide, {}), "client joining inside a 300-minute join window")

            # Ended: refused, for clients; a therapist still may.
            ended = await c.create(doctor, participants={client: "client", cotherapist: "co_therapist"},
                                   starts_at=now - 3 * HOUR, minutes=60)
            await nio_refused(await client.join(ended), "client joining after the end", 403, "M_FORBIDDEN",
                              says="ended")
            await nio_ok(await cotherapist.join(ended), JoinResponse, "co-therapist joining after the end")

    run(go())


# --- 6. the waiting room ------------------------------------------------------------------------


def test_waiting_room_knock_admit_decline(server, admin):
    async def go():
        async with Clinic(server, admin, "waiting") as c:
            doctor = await c.therapist("doctor")
            client = await c.user("client")
            guest = await c.user("guest")
            declined = await c.user("declined")
            room = await c.create(doctor, participants={client: "client"})
            await nio_ok(await client.join(room), JoinResponse, "scheduled client joining")

            # Not scheduled: no direct join.
            await nio_refused(await guest.join(room), "join by a user without a role (no knock)", 403, "M_FORBIDDEN")
            # Knock with a reason: the waiting room.
            await nio_ok(await guest.room_knock(room, reason="here for the group"), RoomKnockResponse,
                         "knock with a reason")
            seen = await member(doctor, room, guest.user_id)
            assert (seen.get("membership"), seen.get("reason")) == ("knock", "here for the group"), seen
            # A client cannot admit anyone.
            await nio_refused(await client.room_invite(room, guest.user_id), "a client admitting a knock",
                              403, "M_FORBIDDEN")
            # The therapist admits (invite); the guest then joins.
            await nio_ok(await doctor.room_invite(room, guest.user_id), RoomInviteResponse, "therapist admits")
            await nio_ok(await guest.join(room), JoinResponse, "admitted guest joining")
            assert (await member(doctor, room, guest.user_id))["membership"] == "join"

            # Declined: the knock is kicked with a reason; no join afterwards.
            await nio_ok(await declined.room_knock(room, reason="may I?"), RoomKnockResponse, "second knock")
            await nio_ok(await doctor.room_kick(room, declined.user_id, reason="please book a session"),
                         RoomKickResponse, "therapist declines the knock")
            seen = await member(doctor, room, declined.user_id)
            assert (seen.get("membership"), seen.get("reason")) == ("leave", "please book a session"), seen
            await nio_refused(await declined.join(room), "join after a declined knock", 403, "M_FORBIDDEN")
            refused(await raw_join(c, declined, room, {}, via_rooms=True), "/rooms/{room}/join after a declined knock",
                    403, "M_FORBIDDEN")
            await nio_refused(await put_state(declined, room, "m.room.member", {"membership": "join"}, declined.user_id),
                              "raw m.room.member join after a declined knock", 403, "M_FORBIDDEN")

            # The waiting room is audited: the knocks, the admission, the decline (with its reason).
            entries = await c.audit(room_id=room)
            seen = {(e["action"], e["actor"], e.get("target")) for e in entries}
            for expected in (("knock", guest.user_id, guest.user_id), ("admit", doctor.user_id, guest.user_id),
                             ("join", guest.user_id, guest.user_id), ("knock", declined.user_id, declined.user_id),
                             ("decline", doctor.user_id, declined.user_id)):
                assert expected in seen, f"{expected} missing from the audit of {room}: {sorted(seen)}"
            decline = [e for e in entries if e["action"] == "decline"]
            assert decline[0]["details"].get("reason") == "please book a session", decline
            assert not [e for e in entries if e["action"] == "join" and e["actor"] == declined.user_id], entries

    run(go())


# --- 7. participant limits ---------------------------------------------------------------------


def test_participant_limits(server, admin):
    async def go():
        async with Clinic(server, admin, "limits") as c:
            doctor = await c.therapist("doctor")
            client = await c.user("client")
            third = await c.user("third")
            knocker = await c.user("knocker")

            # More than the kind allows: refused at creation.
            refused(await c.try_create(doctor, kind="individual", max_participants=3,
                                       starts_at=now_ms() + 30 * HOUR),
                    "POST /sessions individual with max_participants 3", 400, "M_BAD_JSON")
            refused(await c.try_create(doctor, kind="individual", participants={client: "client", third: "observer"},
                                       starts_at=now_ms() + 30 * HOUR),
                    "POST /sessions individual with three participants", 403, "M_FORBIDDEN")

            room = await c.create(doctor, kind="individual", participants={client: "client"})
            view = await c.session(doctor, room)
            assert view["session"]["max_participants"] == 2, view

            # A third role: API and raw state, refused.
            refused(await c.set_role(doctor, room, third, "observer"), "PUT /participants: a third role",
                    403, "M_FORBIDDEN", says="full")
            await nio_refused(await put_state(doctor, room, ROLE, {"role": "client"}, role_key(third.user_id)),
                              f"raw {ROLE}: a third role", 403, "M_FORBIDDEN", says="full")
            # Changing an existing participant's role keeps the count: allowed.
            ok(await c.set_role(doctor, room, client, "observer"), "PUT /participants: changing the client's role")
            await nio_ok(await put_state(doctor, room, ROLE, {"role": "client"}, role_key(client.user_id)),
                         RoomPutStateResponse, f"raw {ROLE}: the role back to client")

            # A couples session takes a third role.
            couples = await c.create(doctor, kind="couples", participants={client: "client"},
                                     starts_at=now_ms() + 32 * HOUR)
            ok(await c.set_role(doctor, couples, third, "client"), "PUT /participants: third role of a couples session")

            # A third joined member: therapist and client joined; an admitted knocker cannot join.
            await nio_ok(await client.join(room), JoinResponse, "client joining (second member)")
            await nio_ok(await knocker.room_knock(room, reason="one more?"), RoomKnockResponse, "knock on a full session")
            await nio_ok(await doctor.room_invite(room, knocker.user_id), RoomInviteResponse, "admitting the knock")
            await nio_refused(await knocker.join(room), "a third member joining an individual session",
                              403, "M_FORBIDDEN", says="full")

    run(go())


# --- 8. passcodes -------------------------------------------------------------------------------


def test_passcodes(server, admin):
    passcode = f"open-sesame-{secrets.token_hex(4)}"

    async def go():
        async with Clinic(server, admin, "passcode") as c:
            doctor = await c.therapist("doctor")
            cotherapist = await c.user("co")
            client = await c.user("client")
            client2 = await c.user("client2")
            guest = await c.user("guest")
            room = await c.create(doctor, participants={client: "client", client2: "client",
                                                        cotherapist: "co_therapist"},
                                  passcode=passcode)

            # The scheduled client: no or a wrong passcode refused (raw /join body, and nio's join).
            refused(await raw_join(c, client, room, {}), "client /join without the passcode", 403, "M_FORBIDDEN",
                    says="passcode")
            refused(await raw_join(c, client, room, {PASSCODE_FIELD: "wrong"}), "client /join with a wrong passcode",
                    403, "M_FORBIDDEN", says="passcode")
            await nio_refused(await client.join(room), "client nio join (no passcode)", 403, "M_FORBIDDEN")
            ok(await raw_join(c, client, room, {PASSCODE_FIELD: passcode, "reason": "hello"}),
               "client /join with the passcode")

            # Through the state endpoint (PUT /rooms/{room}/state/m.room.member/{self}): the same.
            await nio_refused(await put_state(client2, room, "m.room.member", {"membership": "join"}, client2.user_id),
                              "raw m.room.member join without the passcode", 403, "M_FORBIDDEN")
            await nio_refused(await put_state(client2, room, "m.room.member",
                                              {"membership": "join", PASSCODE_FIELD: "wrong"}, client2.user_id),
                              "raw m.room.member join with a wrong passcode", 403, "M_FORBIDDEN")
            await nio_ok(await put_state(client2, room, "m.room.member",
                                         {"membership": "join", PASSCODE_FIELD: passcode}, client2.user_id),
                         RoomPutStateResponse, "raw m.room.member join with the passcode")
            assert await member(doctor, room, client2.user_id) == {"membership": "join"}, \
                "the stored member event should be exactly {membership: join}"

            # A knock: no or a wrong passcode refused; the right one allowed.
            await nio_refused(await guest.room_knock(room, reason="let me in"), "nio knock without the passcode",
                              403, "M_FORBIDDEN")
            refused(await raw_knock(c, guest, room, {"reason": "let me in"}), "/knock without the passcode",
                    403, "M_FORBIDDEN", says="passcode")
            refused(await raw_knock(c, guest, room, {"reason": "let me in", PASSCODE_FIELD: "nope"}),
                    "/knock with a wrong passcode", 403, "M_FORBIDDEN")
            ok(await raw_knock(c, guest, room, {"reason": "let me in", PASSCODE_FIELD: passcode}),
               "/knock with the passcode")
            await nio_ok(await doctor.room_invite(room, guest.user_id), RoomInviteResponse, "admitting the guest")
            # Admitted, the guest still needs the passcode to join.
            refused(await raw_join(c, guest, room, {}, via_rooms=True), "admitted guest /rooms/{room}/join without it",
                    403, "M_FORBIDDEN")
            ok(await raw_join(c, guest, room, {PASSCODE_FIELD: passcode}, via_rooms=True),
               "admitted guest /rooms/{room}/join with the passcode")

            # Therapists need none.
            await nio_ok(await cotherapist.join(room), JoinResponse, "co-therapist joining without a passcode")

            # The passcode is nowhere in the room: state, timeline, the session view, a therapist's sync.
            for who in (doctor, client):
                state = await who.room_get_state(room)
                await nio_ok(state, RoomGetStateResponse, f"GET state as {who.user_id}")
                history = await full_history(who, room)
                for where, blob in (("state", state.events), ("/messages", history)):
                    text = json.dumps(blob)
                    assert PASSCODE_FIELD not in text and passcode not in text, \
                        f"the passcode appears in the {where} seen by {who.user_id}: {text[:2000]}"
                members = [e for e in history if e.get("type") == "m.room.member"]
                assert {e["state_key"] for e in members} >= {client.user_id, client2.user_id, guest.user_id}, members
            view = await c.session(doctor, room)
            assert passcode not in json.dumps(view), view
            status, sync = await c.api(doctor, "GET", "/_matrix/client/v3/sync", query={"full_state": "true"})
            assert status == 200 and passcode not in json.dumps(sync) and PASSCODE_FIELD not in json.dumps(sync), \
                "the passcode appears in the therapist's /sync"
            # Nor in the audit log, which records the knock and the joins.
            entries = await c.audit(room_id=room)
            assert {"knock", "admit", "join"} <= {e["action"] for e in entries}, entries
            assert passcode not in json.dumps(entries), f"the passcode appears in the audit log: {entries}"

    run(go())


# --- 9. notes confidentiality ------------------------------------------------------------------


def test_notes_confidentiality(server, admin):
    body_text = f"confidential note {secrets.token_hex(8)}: client reports improvement"

    async def go():
        async with Clinic(server, admin, "notes") as c:
            doctor = await c.therapist("doctor")
            cotherapist = await c.user("co")
            client = await c.user("client")
            observer = await c.user("observer")
            room = await c.create(doctor, participants={cotherapist: "co_therapist", client: "client",
                                                        observer: "observer"})
            for who in (cotherapist, client, observer):
                await nio_ok(await who.join(room), JoinResponse, f"join of {who.user_id}")

            written = ok(await c.api(doctor, "PUT", f"{SESSIONS}/{q(room)}/notes/intake", {"body": body_text}),
                         "PUT /notes/intake by the therapist")
            notes_room, note_event = written["room_id"], written["event_id"]
            assert notes_room != room, written

            # A note goes only into the notes room, never into the session room or any other.
            await nio_refused(await put_state(doctor, room, NOTE, {"body": "leak"}, "raw"),
                              f"raw {NOTE} in the session room", 403, "M_FORBIDDEN")
            own = await client.room_create(name="my diary", preset=RoomPreset.private_chat)
            await nio_ok(own, RoomCreateResponse, "createRoom by the client")
            await nio_refused(await put_state(client, own.room_id, NOTE, {"body": "diary"}, "d1"),
                              f"raw {NOTE} in an ordinary room", 403, "M_FORBIDDEN")

            for who, label in ((client, "client"), (observer, "observer")):
                refused(await c.api(who, "GET", f"{SESSIONS}/{q(room)}/notes"), f"GET /notes by the {label}",
                        403, "M_FORBIDDEN")
                refused(await c.api(who, "PUT", f"{SESSIONS}/{q(room)}/notes/mine", {"body": "x"}),
                        f"PUT /notes by the {label}", 403, "M_FORBIDDEN")
                await nio_refused(await who.join(notes_room), f"{label} joining the notes room", 403, "M_FORBIDDEN")
                await nio_refused(await who.room_knock(notes_room, reason="curious"),
                                  f"{label} knocking on the notes room", 403, "M_FORBIDDEN")
                await nio_refused(await doctor.room_invite(notes_room, who.user_id),
                                  f"therapist inviting the {label} to the notes room", 403, "M_FORBIDDEN")
                await nio_refused(await put_state(doctor, notes_room, "m.room.member", {"membership": "invite"},
                                                  who.user_id),
                                  f"therapist inviting the {label} to the notes room (raw member state)",
                                  403, "M_FORBIDDEN")
                await nio_refused(await who.room_get_state(notes_room), f"{label} GET /rooms/{{notes}}/state",
                                  403, "M_FORBIDDEN")
                await nio_refused(await who.room_get_state_event(notes_room, NOTE, "intake"),
                                  f"{label} GET /rooms/{{notes}}/state/{NOTE}/intake", 403, "M_FORBIDDEN")
                await nio_refused(await who.room_messages(notes_room, start=None), f"{label} GET /rooms/{{notes}}/messages",
                                  403, "M_FORBIDDEN")
                await nio_refused(await who.joined_members(notes_room), f"{label} GET /rooms/{{notes}}/joined_members",
                                  403, "M_FORBIDDEN")
                refused(await c.api(who, "GET", f"/_matrix/client/v3/rooms/{q(notes_room)}/members"),
                        f"{label} GET /rooms/{{notes}}/members", 403, "M_FORBIDDEN")
                status, context = await c.api(who, "GET",
                                              f"/_matrix/client/v3/rooms/{q(notes_room)}/context/{q(note_event)}")
                assert status in (403, 404) and body_text not in json.dumps(context), \
                    f"{label} GET /rooms/{{notes}}/context/{{note}} -> HTTP {status}: {context}"
                status, found = await c.api(who, "POST", "/_matrix/client/v3/search", {
                    "search_categories": {"room_events": {"search_term": body_text.split()[2].rstrip(":")}}})
                assert status == 200 and body_text not in json.dumps(found), \
                    f"{label} POST /search for the note's words -> HTTP {status}: {found}"
                resp = await who.room_get_event(notes_room, note_event)
                await expect_error(resp, f"{label} GET /rooms/{{notes}}/event/{{note}}")
                assert resp.transport_response.status in (403, 404) and body_text not in await resp.transport_response.text(), \
                    await explain(resp)
                status, sync = await c.api(who, "GET", "/_matrix/client/v3/sync", query={"full_state": "true"})
                assert status == 200, f"/sync of the {label} -> HTTP {status}: {sync}"
                dump = json.dumps(sync)
                assert body_text not in dump, f"the note's body appears in the {label}'s /sync"
                assert notes_room not in dump, f"the notes room appears in the {label}'s /sync"

            # A co-therapist reads the notes, with every version, newest first.
            ok(await c.api(doctor, "PUT", f"{SESSIONS}/{q(room)}/notes/intake", {"body": body_text + " (edited)"}),
               "PUT /notes/intake again (an edit)")
            notes = ok(await c.api(cotherapist, "GET", f"{SESSIONS}/{q(room)}/notes"), "GET /notes by the co-therapist")
            assert notes["room_id"] == notes_room, notes
            intake = [n for n in notes["notes"] if n["note_id"] == "intake"]
            assert intake and [v["content"]["body"] for v in intake[0]["versions"]] == \
                [body_text + " (edited)", body_text], notes
            # ... and may enter the notes room.
            await nio_ok(await doctor.room_invite(notes_room, cotherapist.user_id), RoomInviteResponse,
                         "therapist inviting the co-therapist to the notes room")
            await nio_ok(await cotherapist.join(notes_room), JoinResponse, "co-therapist joining the notes room")
            note = await cotherapist.room_get_state_event(notes_room, NOTE, "intake")
            await nio_ok(note, RoomGetStateEventResponse, "co-therapist reading the note's state")
            assert note.content == {"body": body_text + " (edited)"}, note.content

            # The audit: both writes and the co-therapist's read; no read by those refused.
            entries = await c.audit(room_id=room)
            writes = [e for e in entries if e["action"] == "note_write"]
            assert [(e["actor"], e["details"].get("note_id")) for e in writes] == [(doctor.user_id, "intake")] * 2, writes
            reads = [e["actor"] for e in entries if e["action"] == "note_read"]
            assert reads == [cotherapist.user_id], entries
            assert body_text not in json.dumps(entries), "the note's body appears in the audit log"

    run(go())


# --- 10. message length ------------------------------------------------------------------------


def test_message_length_limit(server, admin):
    assert server.config["clinic"]["max_message_length"] == MAX_MESSAGE_LENGTH

    async def go():
        async with Clinic(server, admin, "length") as c:
            doctor = await c.therapist("doctor")
            client = await c.user("client")
            room = await c.create(doctor, participants={client: "client"})
            await nio_ok(await client.join(room), JoinResponse, "client joining")
            plain = await client.room_create(name="plain", preset=RoomPreset.private_chat)
            await nio_ok(plain, RoomCreateResponse, "createRoom")

            for where in (room, plain.room_id):
                # The limit counts characters, not bytes.
                fits = await client.room_send(where, "m.room.message",
                                              {"msgtype": "m.text", "body": "é" * MAX_MESSAGE_LENGTH})
                await nio_ok(fits, RoomSendResponse, f"a message of exactly {MAX_MESSAGE_LENGTH} characters")
                await nio_refused(
                    await client.room_send(where, "m.room.message",
                                           {"msgtype": "m.text", "body": "x" * (MAX_MESSAGE_LENGTH + 1)}),
                    f"a message of {MAX_MESSAGE_LENGTH + 1} characters", 413, "M_TOO_LARGE")
                await nio_refused(
                    await client.room_send(where, "m.room.message", {
                        "msgtype": "m.text", "body": "* short",
                        "m.new_content": {"msgtype": "m.text", "body": "y" * (MAX_MESSAGE_LENGTH + 1)},
                        "m.relates_to": {"rel_type": "m.replace", "event_id": fits.event_id},
                    }),
                    "an edit whose new body is too long", 413, "M_TOO_LARGE")

    run(go())


# --- 11. appointment links ---------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(header_and_payload: str, secret: str) -> str:
    return b64url(hmac.new(secret.encode(), header_and_payload.encode(), hashlib.sha256).digest())


def forge(claims: dict, secret: str = JWT_SECRET) -> str:
    """An HS256 JWT (RFC 7519), signed with `secret`."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{sign(header + '.' + payload, secret)}"


def claims_of(token: str) -> dict:
    return json.loads(unb64url(token.split(".")[1]))


def token_of(link: str) -> str:
    assert "?token=" in link, link
    return link.rsplit("?token=", 1)[1]


async def jwt_login(c: Clinic, token: str, **extra):
    return await raw(c.url, "POST", "/_matrix/client/v3/login", body={"type": JWT_LOGIN, "token": token, **extra})


async def whoami(c: Clinic, token: str) -> str:
    status, body = await raw(c.url, "GET", "/_matrix/client/v3/account/whoami", token)
    assert status == 200, f"whoami -> HTTP {status}: {body}"
    return body["user_id"]


def test_appointment_links(server, admin):
    async def go():
        async with Clinic(server, admin, "appt") as c:
            doctor = await c.therapist("doctor")
            other_doctor = await c.therapist("doctor2")
            client_id = f"@appt-client-{next(_counter)}-{RUN}:{server.server_name}"
            waiting_id = f"@appt-waiting-{next(_counter)}-{RUN}:{server.server_name}"
            now = now_ms()
            booking = {"appointment_id": f"booking-{RUN}-1", "therapist": doctor.user_id, "client": client_id,
                       "title": "Intake", "starts_at": now - 5 * MINUTE, "ends_at": now + 55 * MINUTE,
                       "timezone": "Europe/Berlin"}
            service = "/_limbic/service/v1/appointments"

            # The service endpoint wants the shared secret.
            refused(await raw(c.url, "POST", service, None, booking), "appointment without a secret",
                    401, "M_MISSING_TOKEN")
            refused(await raw(c.url, "POST", service, "wrong-secret", booking), "appointment with a wrong secret",
                    401, "M_UNKNOWN_TOKEN")
            booked = ok(await raw(c.url, "POST", service, SERVICE_SECRET, booking), "POST appointment")
            room = booked["room_id"]
            token = token_of(booked["links"][client_id])
            claims = claims_of(token)
            assert (claims["sub"], claims["aud"], claims["iss"]) == \
                (client_id, f"limbic-join:{room}", server.server_name), claims
            assert claims["exp"] - claims["iat"] == 3600 and claims["jti"], claims

            # The login type is advertised.
            probe = c.track(new_client(c.url))
            flows = await probe.login_info()
            await nio_ok(flows, LoginInfoResponse, "GET /login")
            assert JWT_LOGIN in flows.flows, flows.flows

            # A valid link logs its user in (nio login_raw); a user with a role then joins.
            nio_client = c.track(new_client(c.url))
            login = await nio_client.login_raw({"type": JWT_LOGIN, "token": token,
                                                "initial_device_display_name": "appointment link"})
            await nio_ok(login, LoginResponse, "org.matrix.login.jwt with a valid link")
            assert login.user_id == client_id, login
            assert (await member(doctor, room, client_id))["membership"] == "invite"
            await nio_ok(await nio_client.join(room), JoinResponse, "the linked client joining their session")

            # Replayed: refused.
            refused(await jwt_login(c, token), "the same link token a second time", 403, "M_FORBIDDEN",
                    says="used already")

            # Tampered: another user's name in the payload, or a signature by another key.
            fresh = token_of(ok(await raw(c.url, "POST", service, SERVICE_SECRET, booking),
                                "POST appointment again (fresh links)")["links"][client_id])
            header, payload, signature = fresh.split(".")
            as_doctor = b64url(json.dumps({**claims_of(fresh), "sub": doctor.user_id}).encode())
            refused(await jwt_login(c, f"{header}.{as_doctor}.{signature}"),
                    "a link token whose sub was changed to another user", 403, "M_FORBIDDEN", says="signature")
            refused(await jwt_login(c, f"{header}.{payload}.{sign(header + '.' + payload, 'another-key')}"),
                    "a link token signed with another key", 403, "M_FORBIDDEN", says="signature")
            flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
            refused(await jwt_login(c, f"{header}.{payload}.{flipped}"), "a link token with a flipped signature byte",
                    403, "M_FORBIDDEN", says="signature")

            # Naming another user in the login request logs in the token's user, never the other one.
            status, body = await jwt_login(c, fresh, identifier={"type": "m.id.user", "user": doctor.user_id},
                                           user=doctor.user_id)
            link_logins = 2 + (status == 200)
            if status == 200:
                assert body["user_id"] == client_id and await whoami(c, body["access_token"]) == client_id, \
                    f"a link for {client_id} naming {doctor.user_id} logged in {body}"
            else:
                refused((status, body), "a link naming another user in the request", 403, "M_FORBIDDEN")

            # Forged with the configured key: a correct token is accepted (so the refusals below are
            # about their claims, not the forging) ...
            t = int(time.time())
            good = {"sub": client_id, "aud": f"limbic-join:{room}", "iss": server.server_name,
                    "iat": t, "exp": t + 600, "jti": secrets.token_hex(8)}
            body = ok(await jwt_login(c, forge(good)), "a well-formed token signed with the configured key")
            assert body["user_id"] == client_id and body.get("org.limbic.room_id") == room, body
            # ... expired: refused (no leeway);
            refused(await jwt_login(c, forge({**good, "iat": t - 7200, "exp": t - 5, "jti": secrets.token_hex(8)})),
                    "an expired link token", 403, "M_FORBIDDEN", says="expired")
            # ... another audience: refused, also when naming another user;
            refused(await jwt_login(c, forge({**good, "aud": "some-other-service", "jti": secrets.token_hex(8)})),
                    "a token with another audience", 403, "M_FORBIDDEN", says="not an appointment link")
            refused(await jwt_login(c, forge({**good, "sub": doctor.user_id, "aud": "matrix",
                                               "jti": secrets.token_hex(8)})),
                    "a token for another user with a wrong audience", 403, "M_FORBIDDEN")
            # ... another issuer, or a user of another server: refused.
            refused(await jwt_login(c, forge({**good, "iss": "evil.example", "jti": secrets.token_hex(8)})),
                    "a token from another issuer", 403, "M_FORBIDDEN")
            refused(await jwt_login(c, forge({**good, "sub": "@mallory:evil.example", "jti": secrets.token_hex(8)})),
                    "a token for a user of another server", 403, "M_FORBIDDEN")

            # The booking service is subject to double-booking too.
            overlapping = {**booking, "appointment_id": f"booking-{RUN}-overlap",
                           "client": f"@appt-other-{next(_counter)}-{RUN}:{server.server_name}",
                           "starts_at": now + 10 * MINUTE, "ends_at": now + 70 * MINUTE}
            refused(await raw(c.url, "POST", service, SERVICE_SECRET, overlapping),
                    "an appointment overlapping the therapist's other one", 409, "M_FORBIDDEN")

            # The waiting room: a linked user whose role was removed is knocked in on login.
            waiting = {**booking, "appointment_id": f"booking-{RUN}-2", "therapist": other_doctor.user_id,
                       "client": waiting_id}
            booked2 = ok(await raw(c.url, "POST", service, SERVICE_SECRET, waiting), "POST second appointment")
            room2 = booked2["room_id"]
            ok(await raw(c.url, "DELETE", f"{SESSIONS}/{q(room2)}/participants/{q(waiting_id)}",
                         other_doctor.access_token), "DELETE the client's role")
            waiting_client = c.track(new_client(c.url))
            login = await waiting_client.login_raw({"type": JWT_LOGIN, "token": token_of(booked2["links"][waiting_id])})
            await nio_ok(login, LoginResponse, "org.matrix.login.jwt of a user without a role")
            seen = await member(other_doctor, room2, waiting_id)
            assert (seen.get("membership"), seen.get("reason")) == ("knock", "appointment link"), seen
            # Without a role and not admitted: no join; admitted: joins.
            await nio_refused(await waiting_client.join(room2), "the waiting user joining before admission",
                              403, "M_FORBIDDEN")
            await nio_ok(await other_doctor.room_invite(room2, waiting_id), RoomInviteResponse, "admission")
            await nio_ok(await waiting_client.join(room2), JoinResponse, "the admitted user joining")

            # Audited: the link logins, with the session as room.
            logins = [e for e in await c.audit(user=client_id) if e["action"] == "login"]
            assert len(logins) == link_logins and all(e["room_id"] == room and e["details"].get("type") == JWT_LOGIN
                                            for e in logins), logins

    run(go())


# --- 12. the audit log -------------------------------------------------------------------------


def test_audit_log(server, admin):
    async def go():
        async with Clinic(server, admin, "audit") as c:
            doctor = await c.therapist("doctor")
            client = await c.user("client")
            guest = await c.user("guest")
            declined = await c.user("declined")
            observer = await c.user("observer")
            room = await c.create(doctor, participants={client: "client"})

            await nio_ok(await client.join(room), JoinResponse, "client joins")
            await nio_ok(await guest.room_knock(room, reason="audit me"), RoomKnockResponse, "knock")
            await nio_ok(await doctor.room_invite(room, guest.user_id), RoomInviteResponse, "admit")
            await nio_ok(await guest.join(room), JoinResponse, "admitted join")
            await nio_ok(await declined.room_knock(room, reason="me too"), RoomKnockResponse, "knock 2")
            await nio_ok(await doctor.room_kick(room, declined.user_id, reason="not today"), RoomKickResponse, "decline")
            ok(await c.set_role(doctor, room, observer, "observer"), "PUT /participants observer")
            await nio_ok(await put_state(doctor, room, ROLE, {"role": "client"}, role_key(observer.user_id)),
                         RoomPutStateResponse, "raw role change observer -> client")
            ok(await c.set_status(doctor, room, "open"), "PUT /status open")
            note = ok(await c.api(doctor, "PUT", f"{SESSIONS}/{q(room)}/notes/n1", {"body": "audited note"}),
                      "PUT /notes/n1")
            ok(await c.api(doctor, "GET", f"{SESSIONS}/{q(room)}/notes"), "GET /notes")
            # Refused actions leave no entry.
            refused(await c.set_status(doctor, room, "completed"), "PUT /status open -> completed", 403, "M_FORBIDDEN")

            # Non-admins cannot read the log.
            refused(await c.api(doctor, "GET", "/_limbic/admin/v1/audit", query={"room_id": room}),
                    "GET /audit by a non-admin", 403, "M_FORBIDDEN")
            refused(await c.api(doctor, "GET", "/_limbic/admin/v1/audit/verify"), "GET /audit/verify by a non-admin",
                    403, "M_FORBIDDEN")

            entries = await c.audit(room_id=room)
            assert all(e["room_id"] == room for e in entries), entries
            actions = [e["action"] for e in entries]

            def find(action, **fields):
                hits = [e for e in entries if e["action"] == action
                        and all(e.get(k) == v for k, v in fields.items() if k != "details")
                        and all(e["details"].get(k) == v for k, v in fields.get("details", {}).items())]
                assert hits, f"no {action} {fields} in the audit of {room}: {json.dumps(entries, indent=1)}"
                return hits

            find("session_created", actor=doctor.user_id)
            find("join", actor=client.user_id, target=client.user_id)
            find("knock", actor=guest.user_id, target=guest.user_id, details={"reason": "audit me"})
            find("admit", actor=doctor.user_id, target=guest.user_id)
            find("join", actor=guest.user_id, target=guest.user_id)
            find("knock", actor=declined.user_id, target=declined.user_id, details={"reason": "me too"})
            find("decline", actor=doctor.user_id, target=declined.user_id, details={"reason": "not today"})
            find("role_change", actor=doctor.user_id, target=observer.user_id, details={"from": None, "to": "observer"})
            find("role_change", actor=doctor.user_id, target=observer.user_id,
                 details={"from": "observer", "to": "client"})
            find("session_status", actor=doctor.user_id, details={"from": "scheduled", "to": "open"})
            find("note_write", actor=doctor.user_id, details={"note_id": "n1", "event_id": note["event_id"]})
            find("note_read", actor=doctor.user_id)
            assert not [e for e in entries if e["action"] == "session_status" and e["details"].get("to") == "completed"], \
                "a refused status change was audited"
            assert actions.index("knock") < actions.index("admit"), actions
            seqs = [e["seq"] for e in entries]
            assert seqs == sorted(seqs), seqs

            status, verify = await raw(c.url, "GET", "/_limbic/admin/v1/audit/verify", admin.access_token)
            assert status == 200 and verify.get("valid") is True and verify.get("entries", 0) >= len(entries), \
                f"GET /_limbic/admin/v1/audit/verify -> HTTP {status}: {verify}"

    run(go())
