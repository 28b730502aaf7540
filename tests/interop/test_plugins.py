"""The first-party plugins (billing, followup, calendar; spec/plugins.md) end to end against a
running limbic server that loads them as config.example.toml does.

The Matrix side (sync, invites, join, leave, room state, messages) is driven by matrix-nio
clients; the `/_limbic/...` APIs and the plugins' routes (`/_limbic/plugins/<name>/...`) by plain
HTTP with the nio clients' access tokens. Plugins act after the event is persisted (`on-event`,
off the request path), so every plugin effect is polled for with a deadline.

1. billing: an individual session (per-session rate) and a group session (per-minute rate) run
   by a verified therapist: clients join through nio, one never joins, one leaves and comes back;
   `GET /invoices` (JSON and CSV) and `GET /invoices/{roomId}` with their lines, currency and
   amounts, and who may read them (therapist, admin, client, another therapist, no token); call
   minutes from `org.matrix.msc3401.call.member` state sent by a client (and none from call
   membership sent on someone else's behalf).
2. followup: a completed group session gives its participants (in their nio /sync) an invite to
   "<title> — follow-up", with the welcome message and `org.limbic.followup` in the session room.
3. calendar feeds: the secret feed URL, one VEVENT per session with a stable UID, UTC times,
   SUMMARY, SEQUENCE bumped by a reschedule and a cancellation (STATUS:CANCELLED), unknown and
   reset tokens, an empty calendar for a user without sessions; plugin responses carry the
   plugin's Content-Type and no other.
4. CalDAV against Radicale (a subprocess on loopback, htpasswd auth, owner-only rights): the
   sessions PUT into the user's collection, a reschedule updates the stored event, a cancellation
   deletes it, `GET /caldav` never shows the password, `DELETE /caldav` stops the pushes; and a
   server whose calendar plugin is not granted the host (the plain example config) never reaches
   Radicale.
5. exactly once: after a restart (and the on-event cursor replay), still exactly one invoice per
   session with the same content, one follow-up room, unchanged calendar SEQUENCEs.

The module starts its own server: config.example.toml (conftest's LimbicServer) with the calendar
plugin granted `127.0.0.1` for Radicale.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import itertools
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote

import aiohttp
import pytest
from nio import (
    AsyncClient,
    JoinResponse,
    RoomGetStateEventResponse,
    RoomInviteResponse,
    RoomLeaveResponse,
    RoomPutStateResponse,
    RoomSendResponse,
    SyncResponse,
)

from conftest import LimbicServer, _die_with_parent, dump_toml, free_port
from mx import (
    Account,
    expect,
    explain,
    full_history,
    new_client,
    raw,
    raw_bytes,
    register,
    register_with_shared_secret,
    run,
    sync_until,
)

SESSIONS = "/_limbic/client/v1/sessions"
BILLING = "/_limbic/plugins/billing"
FOLLOWUP = "/_limbic/plugins/followup"
CALENDAR = "/_limbic/plugins/calendar"
CALL_MEMBER = "org.matrix.msc3401.call.member"
MINUTE = 60_000
HOUR = 3_600_000
DEADLINE = 20.0  # seconds a plugin effect may take

RUN = secrets.token_hex(3)
_counter = itertools.count(1)

# What the tests saw, for the restart test at the end of the module.
SEEN: dict[str, Any] = {}


def q(s: str) -> str:
    return quote(s, safe="")


def now_ms() -> int:
    return int(time.time() * 1000)


def ical_utc(ms: int) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ms // 1000))


def plugin_config(server: LimbicServer, name: str) -> dict:
    return next(p for p in server.config["plugins"] if p["name"] == name)


# --- the server: the example config, calendar granted loopback ---------------------------------


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """conftest's server class with config.example.toml, plus `http_hosts = ["127.0.0.1"]` for the
    calendar plugin (Radicale listens on loopback) and a short hot-reload interval."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    srv = LimbicServer(name, tmp_path_factory.mktemp(name))
    names = [p["name"] for p in srv.config.get("plugins", [])]
    assert {"billing", "followup", "calendar"} <= set(names), \
        f"config.example.toml should load billing, followup and calendar; it loads {names}"
    plugin_config(srv, "calendar")["http_hosts"] = ["127.0.0.1"]
    srv.config.setdefault("plugin_host", {})["reload_interval_seconds"] = 1
    srv.config_path.write_text(dump_toml(srv.config))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server) -> Account:
    secret = server.config["registration"]["shared_secret"]
    return run(register_with_shared_secret(server.url, secret, f"plugins-admin-{RUN}",
                                           "plugins-admin-password-1", admin=True))


# --- Radicale ------------------------------------------------------------------------------------


class Radicale:
    """A Radicale CalDAV server on a free loopback port, with htpasswd (plain) users and
    owner-only rights, storing into a temporary folder."""

    def __init__(self, workdir: Path, users: dict[str, str]):
        self.workdir = workdir
        self.port = free_port()
        self.users = users
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "radicale.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        htpasswd = self.workdir / "users"
        htpasswd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
        config = self.workdir / "config"
        config.write_text(
            "[server]\n"
            f"hosts = 127.0.0.1:{self.port}\n"
            "[auth]\n"
            "type = htpasswd\n"
            f"htpasswd_filename = {htpasswd}\n"
            "htpasswd_encryption = plain\n"
            "delay = 0\n"
            "[rights]\n"
            "type = owner_only\n"
            "[storage]\n"
            f"filesystem_folder = {self.workdir / 'collections'}\n"
            "[web]\n"
            "type = none\n"
            "[logging]\n"
            "level = info\n"
        )
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radicale", "--config", str(config)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"radicale exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"radicale did not listen on {self.port} within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: it and anything it started
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def request(self, method: str, path_or_url: str, user: str | None, body: bytes | str | None = None,
                      headers: dict | None = None) -> tuple[int, dict, str]:
        url = path_or_url if path_or_url.startswith("http") else self.url + path_or_url
        headers = dict(headers or {})
        if user is not None:
            token = base64.b64encode(f"{user}:{self.users[user]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        async with aiohttp.ClientSession() as http:
            async with http.request(method, url, data=body, headers=headers) as r:
                return r.status, dict(r.headers), await r.text()


@pytest.fixture(scope="module")
def radicale(tmp_path_factory):
    rad = Radicale(tmp_path_factory.mktemp("radicale"), {
        "kim": f"kim-caldav-{RUN}",
        "noah": f"noah-caldav-{RUN}",
    })
    try:
        rad.start()
        yield rad
    finally:
        rad.stop()


# --- helpers -------------------------------------------------------------------------------------


class Clinic:
    """One test's users (nio clients) and API calls; closes the clients at the end."""

    def __init__(self, server: LimbicServer, admin: Account, prefix: str):
        self.server = server
        self.url = server.url
        self.admin = admin
        self.prefix = prefix
        self.clients: list[AsyncClient] = []
        self.accounts: dict[str, Account] = {}

    async def __aenter__(self) -> "Clinic":
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.close()

    async def user(self, name: str) -> AsyncClient:
        localpart = f"{self.prefix}-{name}-{next(_counter)}-{RUN}"
        account = await register(self.url, localpart, f"pw-{localpart}-1")
        client = new_client(self.url, account)
        self.accounts[client.user_id] = account
        self.clients.append(client)
        return client

    async def therapist(self, name: str) -> AsyncClient:
        client = await self.user(name)
        status, body = await raw(self.url, "PUT", f"/_limbic/admin/v1/therapists/{q(client.user_id)}",
                                 self.admin.access_token, {"verified": True})
        assert status == 200 and body.get("verified") is True, \
            f"PUT /_limbic/admin/v1/therapists/{client.user_id} {{verified: true}} -> HTTP {status}: {body}"
        return client

    async def api(self, who: AsyncClient | Account | str | None, method: str, path: str, body=None, query=None):
        token = who if isinstance(who, str) or who is None else who.access_token
        return await raw(self.url, method, path, token, body, query)

    async def create(self, therapist: AsyncClient, kind: str, title: str, participants: dict,
                     starts_at: int | None = None, minutes: int = 50) -> tuple[str, dict]:
        starts = now_ms() if starts_at is None else starts_at
        request = {
            "kind": kind, "title": title, "starts_at": starts, "ends_at": starts + minutes * MINUTE,
            "timezone": "Europe/Berlin",
            "participants": [{"user_id": c.user_id, "role": r} for c, r in participants.items()],
        }
        status, body = await self.api(therapist, "POST", SESSIONS, request)
        assert status == 200 and body.get("room_id"), \
            f"POST {SESSIONS} ({kind} {title!r}) by {therapist.user_id} -> HTTP {status}: {body}"
        return body["room_id"], body["session"]

    async def status(self, therapist: AsyncClient, room_id: str, status: str) -> dict:
        got, body = await self.api(therapist, "PUT", f"{SESSIONS}/{q(room_id)}/status", {"status": status})
        assert got == 200 and body.get("session", {}).get("status") == status, \
            f"PUT {SESSIONS}/{room_id}/status {{status: {status}}} -> HTTP {got}: {body}"
        return body["session"]

    async def patch(self, therapist: AsyncClient, room_id: str, changes: dict) -> dict:
        got, body = await self.api(therapist, "PATCH", f"{SESSIONS}/{q(room_id)}", changes)
        assert got == 200, f"PATCH {SESSIONS}/{room_id} {changes} -> HTTP {got}: {body}"
        return body["session"]

    async def join(self, client: AsyncClient, room_id: str) -> None:
        """As a client does: /sync until the invite shows, then join."""
        await sync_until(client, lambda r: room_id in r.rooms.invite or room_id in r.rooms.join,
                         f"the invite to {room_id}")
        await expect(await client.join(room_id), JoinResponse, f"{client.user_id} joining {room_id}")


def ok(result, what: str):
    status, body = result
    assert status == 200, f"{what}: expected HTTP 200, got HTTP {status}: {body}"
    return body


def refused(result, what: str, status: int, errcode: str):
    got, body = result
    errc = body.get("errcode") if isinstance(body, dict) else None
    assert (got, errc) == (status, errcode), f"{what}: expected HTTP {status} {errcode}, got HTTP {got}: {body}"
    return body


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = DEADLINE,
                     interval: float = 0.2):
    """Calls `probe` until it returns something truthy without failing an assertion; at the
    deadline fails with the last assertion (or value) seen."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        try:
            value = await probe()
            last = f"last value {value!r}"
            if value:
                return value
        except AssertionError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s ({tries} tries): {last}")
        await asyncio.sleep(interval)


async def get_raw(base_url: str, path: str, token: str | None = None, query: dict | None = None):
    """GET answered with (status, every Content-Type header value, body bytes): a response may
    (wrongly) carry more than one Content-Type, which a dict of headers would hide."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + path, params=query, headers=headers) as r:
            return r.status, r.headers.getall("Content-Type", []), await r.read()


def media_types(content_types: list[str]) -> list[str]:
    return [c.split(";")[0].strip().lower() for c in content_types]


def server_log(server: LimbicServer) -> str:
    return server.log_path.read_text(errors="replace")


# --- iCalendar, minimally ------------------------------------------------------------------------


def unfold(text: str) -> list[str]:
    """RFC 5545 §3.1: CRLF line ends; a line starting with a space or tab continues the previous."""
    assert text.endswith("\r\n"), f"iCalendar text must end with CRLF: {text[-40:]!r}"
    physical = text[:-2].split("\r\n")
    assert all("\n" not in line and "\r" not in line for line in physical), "bare LF or CR in iCalendar text"
    too_long = [line for line in physical if len(line.encode()) > 75]
    assert not too_long, f"lines longer than 75 octets (not folded): {too_long}"
    lines: list[str] = []
    for line in physical:
        if line[:1] in (" ", "\t"):
            assert lines, "a continuation line first"
            lines[-1] += line[1:]
        else:
            lines.append(line)
    return lines


def unescape(value: str) -> str:
    return re.sub(r"\\([\\;,nN])", lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)


def parse_ics(text: str) -> dict:
    """{"calendar": {NAME: value}, "events": [{NAME: value}]} (parameters dropped, TEXT unescaped,
    the first value of each name kept). Checks the nesting of BEGIN/END."""
    calendar: dict[str, str] = {}
    events: list[dict[str, str]] = []
    stack: list[str] = []
    for line in unfold(text):
        name_params, sep, value = line.partition(":")
        assert sep, f"content line without ':': {line!r}"
        name = name_params.split(";", 1)[0].upper()
        if name == "BEGIN":
            stack.append(value)
            if value == "VEVENT":
                events.append({})
            continue
        if name == "END":
            assert stack and stack[-1] == value, f"END:{value} does not close {stack}"
            stack.pop()
            continue
        target = events[-1] if stack and stack[-1] == "VEVENT" else calendar
        if stack and stack[-1] not in ("VCALENDAR", "VEVENT"):
            continue
        if name in ("SUMMARY", "DESCRIPTION", "LOCATION", "X-WR-CALNAME"):
            value = unescape(value)
        target.setdefault(name, value)
    assert not stack, f"unclosed components: {stack}"
    return {"calendar": calendar, "events": events}


def expected_uid(server: LimbicServer, room_id: str) -> str:
    return f"{room_id.lstrip('!')}@{server.server_name}"


def resource_name(uid: str) -> str:
    """The calendar plugin's CalDAV resource name: the UID with each byte other than ASCII letters,
    digits, '-', '.' and '@' written _XX."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "-.@") else f"_{b:02X}"
                   for b in uid.encode())


async def feed(clinic: Clinic, url_path: str) -> tuple[int, list[str], str]:
    """GET of a feed URL without access token: (status, Content-Type values, text)."""
    status, ctypes, body = await get_raw(clinic.url, url_path)
    return status, ctypes, body.decode("utf-8", errors="replace")


async def feed_events(clinic: Clinic, url_path: str) -> dict[str, dict]:
    """The feed's VEVENTs by UID (asserting a 200 text/calendar VCALENDAR)."""
    status, ctypes, text = await feed(clinic, url_path)
    assert status == 200, f"GET {url_path} -> HTTP {status}: {text[:300]}"
    # (that it is the only Content-Type: test_plugin_responses_have_one_content_type)
    assert "text/calendar" in media_types(ctypes), f"GET {url_path}: Content-Type {ctypes}"
    parsed = parse_ics(text)
    assert parsed["calendar"].get("VERSION") == "2.0" and parsed["calendar"].get("PRODID"), parsed["calendar"]
    by_uid = {}
    for event in parsed["events"]:
        assert event.get("UID"), f"a VEVENT without UID: {event}"
        assert event["UID"] not in by_uid, f"two VEVENTs with UID {event['UID']}"
        by_uid[event["UID"]] = event
    return by_uid


async def feed_url(clinic: Clinic, who: AsyncClient) -> str:
    body = ok(await clinic.api(who, "GET", f"{CALENDAR}/feed-url"), f"GET {CALENDAR}/feed-url as {who.user_id}")
    url = body.get("url")
    assert isinstance(url, str) and re.fullmatch(rf"{re.escape(CALENDAR)}/feed/[0-9a-f]{{64}}\.ics", url), \
        f"GET {CALENDAR}/feed-url: the URL is {url!r}"
    return url


# --- 1. billing ----------------------------------------------------------------------------------


def invoice_lines(invoice: dict) -> dict[str, dict]:
    return {line["user_id"]: line for line in invoice["lines"]}


def test_billing_invoices_individual_and_group_sessions(server, admin):
    async def main():
        async with Clinic(server, admin, "bill") as clinic:
            doctor = await clinic.therapist("doctor")
            other_doctor = await clinic.therapist("otherdoctor")
            ivy = await clinic.user("ivy")        # the individual session's client
            ann = await clinic.user("ann")        # group: joins and stays
            ben = await clinic.user("ben")        # group: joins, leaves, is invited back, rejoins
            cal = await clinic.user("cal")        # group: never joins

            # The individual session, per-session rate.
            ind_title = f"Individual {RUN}"
            ind, _ = await clinic.create(doctor, "individual", ind_title, {ivy: "client"})
            await clinic.join(ivy, ind)
            await clinic.status(doctor, ind, "open")
            await clinic.status(doctor, ind, "in_progress")
            await expect(await ivy.room_send(ind, "m.room.message", {"msgtype": "m.text", "body": "hello"}),
                         RoomSendResponse, "ivy's message in the individual session")
            await clinic.status(doctor, ind, "completed")

            # The group session, per-minute rate (after the first is over: no double-booking).
            grp_title = f"Group {RUN}"
            grp, _ = await clinic.create(doctor, "group", grp_title, {ann: "client", ben: "client", cal: "client"})
            await clinic.join(ann, grp)
            await clinic.join(ben, grp)
            await clinic.status(doctor, grp, "open")
            await clinic.status(doctor, grp, "in_progress")
            await expect(await ben.room_leave(grp), RoomLeaveResponse, "ben leaving the group session")
            # A knock room: coming back takes an invitation (Matrix auth rules), then a join.
            await expect(await doctor.room_invite(grp, ben.user_id), RoomInviteResponse, "inviting ben back")
            await clinic.join(ben, grp)
            await sync_until(ben, lambda r: grp in r.rooms.join, "the group session among ben's joined rooms")
            await clinic.status(doctor, grp, "completed")

            # Both invoices, once the plugin has seen the completions.
            async def both():
                body = ok(await clinic.api(doctor, "GET", f"{BILLING}/invoices"), "GET /invoices as the therapist")
                rooms = [i["room_id"] for i in body["invoices"]]
                assert rooms == [ind, grp], f"invoices of {rooms}, expected [individual {ind}, group {grp}]"
                return body["invoices"]
            invoices = await eventually(both, "the therapist's two invoices")
            by_room = {i["room_id"]: i for i in invoices}

            individual = by_room[ind]
            assert (individual["kind"], individual["title"], individual["currency"]) == \
                ("individual", ind_title, "EUR"), individual
            assert individual["therapists"] == [doctor.user_id], individual
            assert 0 < individual["started_at"] <= individual["ended_at"], individual
            assert individual["duration_minutes"] >= 1, individual
            lines = invoice_lines(individual)
            assert list(lines) == [ivy.user_id], f"individual invoice lines: {individual['lines']}"
            line = lines[ivy.user_id]
            assert (line["role"], line["attended"], line["quantity"], line["unit"], line["unit_price_cents"],
                    line["amount_cents"]) == ("client", True, 1, "session", 9000, 9000), line
            assert line["room_minutes"] >= 1, line
            assert individual["total_cents"] == 9000, individual
            attendance = {a["user_id"]: a for a in individual["attendance"]}
            assert attendance.get(doctor.user_id, {}).get("role") == "therapist", individual["attendance"]

            group = by_room[grp]
            assert (group["kind"], group["title"], group["currency"]) == ("group", grp_title, "EUR"), group
            assert group["therapists"] == [doctor.user_id], group
            lines = invoice_lines(group)
            assert sorted(lines) == sorted([ann.user_id, ben.user_id, cal.user_id]), \
                f"group invoice lines (one per client): {group['lines']}"
            assert [l["user_id"] for l in group["lines"]] == sorted(lines), "lines sorted by user id"
            for who in (ann, ben):
                line = lines[who.user_id]
                assert (line["attended"], line["unit"], line["unit_price_cents"]) == (True, "minute", 60), line
                assert line["quantity"] >= 1 and line["room_minutes"] >= 1, line
                assert line["amount_cents"] == line["quantity"] * 60, line
            never = lines[cal.user_id]
            assert (never["attended"], never["quantity"], never["amount_cents"], never["room_minutes"],
                    never["call_minutes"]) == (False, 0, 0, 0, 0), f"the client who never joined: {never}"
            assert group["total_cents"] == sum(l["amount_cents"] for l in group["lines"]), group

            # CSV: the header and one row per line.
            status, ctypes, data = await get_raw(clinic.url, f"{BILLING}/invoices", doctor.access_token,
                                                 {"format": "csv"})
            text = data.decode()
            assert status == 200, f"GET /invoices?format=csv -> HTTP {status}: {text[:300]}"
            # (that it is the only Content-Type: test_plugin_responses_have_one_content_type)
            assert "text/csv" in media_types(ctypes), f"GET /invoices?format=csv: Content-Type {ctypes}"
            assert text.endswith("\r\n"), f"CSV rows end in CRLF: {text[-20:]!r}"
            rows = list(csv.reader(io.StringIO(text, newline="")))
            assert rows[0] == ["room_id", "title", "kind", "ended_at", "user_id", "role", "quantity", "unit",
                               "unit_price_cents", "amount_cents", "currency"], rows[0]
            expected = [[i["room_id"], i["title"], i["kind"], l["user_id"], l["role"], str(l["quantity"]), l["unit"],
                         str(l["unit_price_cents"]), str(l["amount_cents"]), i["currency"]]
                        for i in invoices for l in i["lines"]]
            got = [r[:3] + r[4:] for r in rows[1:]]
            assert got == expected, f"CSV rows {rows[1:]} for the invoices {invoices}"
            for row, invoice in zip(rows[1:], [i for i in invoices for _ in i["lines"]]):
                assert row[3] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(invoice["ended_at"] // 1000)), row
            refused(await clinic.api(doctor, "GET", f"{BILLING}/invoices", query={"format": "xml"}),
                    "GET /invoices?format=xml", 400, "M_INVALID_PARAM")

            # One invoice: all of it for its therapists and admins; for a client it bills, their
            # own line and attendance only; nothing for anyone else.
            for room in (ind, grp):
                path = f"{BILLING}/invoices/{q(room)}"
                assert ok(await clinic.api(doctor, "GET", path), f"GET {path} as the therapist") == by_room[room]
                assert ok(await clinic.api(admin, "GET", path), f"GET {path} as an admin") == by_room[room]
                client, outsider = (ivy, ann) if room == ind else (ann, ivy)
                theirs = ok(await clinic.api(client, "GET", path), f"GET {path} as its client")
                assert [l["user_id"] for l in theirs["lines"]] == [client.user_id], theirs
                assert {a["user_id"] for a in theirs["attendance"]} == {client.user_id}, theirs
                assert theirs["total_cents"] == theirs["lines"][0]["amount_cents"], theirs
                refused(await clinic.api(outsider, "GET", path), f"GET {path} as a client it does not bill",
                        403, "M_FORBIDDEN")
                refused(await clinic.api(other_doctor, "GET", path), f"GET {path} as another therapist",
                        403, "M_FORBIDDEN")
                refused(await clinic.api(None, "GET", path), f"GET {path} without a token", 401, "M_MISSING_TOKEN")
                refused(await clinic.api("not-a-valid-token", "GET", path), f"GET {path} with a bad token",
                        401, "M_UNKNOWN_TOKEN")
            refused(await clinic.api(doctor, "GET", f"{BILLING}/invoices/{q('!nothing:' + server.server_name)}"),
                    "the invoice of an unknown room", 404, "M_NOT_FOUND")

            # The lists: another therapist sees none of them, a client the one that bills them;
            # admins see them among all.
            body = ok(await clinic.api(other_doctor, "GET", f"{BILLING}/invoices"), "GET /invoices as another therapist")
            assert body == {"invoices": []}, f"GET /invoices as another therapist: {body}"
            body = ok(await clinic.api(ivy, "GET", f"{BILLING}/invoices"), "GET /invoices as a client")
            assert [i["room_id"] for i in body["invoices"]] == [ind], f"GET /invoices as a client: {body}"
            body = ok(await clinic.api(admin, "GET", f"{BILLING}/invoices"), "GET /invoices as an admin")
            assert [i for i in body["invoices"] if i["room_id"] in (ind, grp)] == invoices, body
            refused(await clinic.api(None, "GET", f"{BILLING}/invoices"), "GET /invoices without a token",
                    401, "M_MISSING_TOKEN")

            SEEN["billing"] = {"doctor": clinic.accounts[doctor.user_id], "invoices": invoices}

    run(main())


def test_billing_counts_call_minutes(server, admin):
    """Clients in the session's call: `org.matrix.msc3401.call.member` state with the state key
    `_@user:server_DEVICE` and non-empty content, then `{}` — billing's accepted shape (its crate
    docs and spec/plugins.md) — give the client's invoice line call minutes; call membership sent
    by someone else than the user it names counts for nobody.

    A client must be able to send its own call membership in a session room with the room's
    default power levels (MatrixRTC; nothing else brings call minutes to billing). If the server
    refuses it, that is recorded and the therapist lowers the event's power level, so that the
    plugin's side is still exercised; the test fails at the end with what went wrong."""
    async def main():
        problems: list[str] = []
        async with Clinic(server, admin, "call") as clinic:
            doctor = await clinic.therapist("doctor")
            zoe = await clinic.user("zoe")   # in the call
            ann = await clinic.user("ann")   # in the room only; zoe tries to put her in the call
            room, _ = await clinic.create(doctor, "group", f"Video group {RUN}", {zoe: "client", ann: "client"})
            await clinic.join(zoe, room)
            await clinic.join(ann, room)
            await clinic.status(doctor, room, "open")
            await clinic.status(doctor, room, "in_progress")

            def membership(device: str) -> dict:
                return {
                    "application": "m.call", "call_id": "", "scope": "m.room", "device_id": device,
                    "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
                    "foci_preferred": [], "expires": 3_600_000,
                }
            key = f"_{zoe.user_id}_{zoe.device_id}"
            resp = await zoe.room_put_state(room, CALL_MEMBER, membership(zoe.device_id), state_key=key)
            if not isinstance(resp, RoomPutStateResponse):
                problems.append(f"a client joining the session's call with the default power levels was refused: "
                                f"{await explain(resp)}")
                pl = await doctor.room_get_state_event(room, "m.room.power_levels", "")
                await expect(pl, RoomGetStateEventResponse, "the session room's power levels")
                content = dict(pl.content)
                content["events"] = {**content.get("events", {}), CALL_MEMBER: 0}
                await expect(await doctor.room_put_state(room, "m.room.power_levels", content), RoomPutStateResponse,
                             f"the therapist letting clients send {CALL_MEMBER}")
                resp = await zoe.room_put_state(room, CALL_MEMBER, membership(zoe.device_id), state_key=key)
            await expect(resp, RoomPutStateResponse, f"the client joining the session's call ({CALL_MEMBER}/{key})")
            got = await zoe.room_get_state_event(room, CALL_MEMBER, key)
            await expect(got, RoomGetStateEventResponse, "reading the call membership back")
            assert got.content.get("application") == "m.call", got.content
            # Call membership naming ann, sent by zoe: the server may refuse it; billing must ignore it.
            forged_key = f"_{ann.user_id}_FORGED"
            forged = await zoe.room_put_state(room, CALL_MEMBER, membership("FORGED"), state_key=forged_key)
            await asyncio.sleep(0.3)  # time in the call (any part of a minute bills a minute)
            await expect(await zoe.room_put_state(room, CALL_MEMBER, {}, state_key=key), RoomPutStateResponse,
                         "the client leaving the call (empty content)")
            if isinstance(forged, RoomPutStateResponse):
                await zoe.room_put_state(room, CALL_MEMBER, {}, state_key=forged_key)
            await clinic.status(doctor, room, "completed")

            async def invoice():
                return ok(await clinic.api(doctor, "GET", f"{BILLING}/invoices/{q(room)}"), "the invoice")
            inv = await eventually(invoice, "the video session's invoice")
            lines = invoice_lines(inv)
            assert lines[zoe.user_id]["call_minutes"] >= 1 and lines[zoe.user_id]["attended"], lines[zoe.user_id]
            assert lines[zoe.user_id]["quantity"] >= 1, lines[zoe.user_id]
            assert lines[ann.user_id]["call_minutes"] == 0, \
                f"call membership sent by zoe for ann counted for ann: {lines[ann.user_id]}"
            attendance = {a["user_id"]: a for a in inv["attendance"]}
            assert attendance[zoe.user_id]["call_minutes"] >= 1, inv["attendance"]
        assert not problems, "\n".join(problems)

    run(main())


# --- 2. followup ---------------------------------------------------------------------------------


def followup_rooms(resp: SyncResponse, name: str) -> set[str]:
    """Rooms (invited or joined) named `name` in a full /sync."""
    found = set()
    for room_id, info in resp.rooms.invite.items():
        if any(ev.source.get("type") == "m.room.name" and ev.source.get("content", {}).get("name") == name
               for ev in info.invite_state):
            found.add(room_id)
    for room_id, info in resp.rooms.join.items():
        if any(ev.source.get("type") == "m.room.name" and ev.source.get("content", {}).get("name") == name
               for ev in list(info.state) + list(info.timeline.events)):
            found.add(room_id)
    return found


def test_followup_room_for_a_completed_group_session(server, admin):
    async def main():
        async with Clinic(server, admin, "fu") as clinic:
            doctor = await clinic.therapist("doctor")
            mia = await clinic.user("mia")
            leo = await clinic.user("leo")
            stranger = await clinic.user("stranger")
            title = f"Anxiety group {RUN}"
            room, _ = await clinic.create(doctor, "group", title, {mia: "client", leo: "client"})
            for c in (mia, leo):
                await clinic.join(c, room)
            await clinic.status(doctor, room, "open")
            await clinic.status(doctor, room, "in_progress")
            await expect(await mia.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "thanks all"}),
                         RoomSendResponse, "a message in the session")
            refused(await clinic.api(mia, "GET", f"{FOLLOWUP}/rooms/{q(room)}"),
                    "the follow-up room before the session completes", 404, "M_NOT_FOUND")
            await clinic.status(doctor, room, "completed")

            name = f"{title} — follow-up"
            welcome = plugin_config(server, "followup")["config"]["welcome"].replace("{title}", title)
            plugin_user = f"@plugin.followup:{server.server_name}"

            followup = None
            for c in (mia, leo, doctor):
                def invited(resp, c=c):
                    for room_id, info in resp.rooms.invite.items():
                        names = [ev.source.get("content", {}).get("name") for ev in info.invite_state
                                 if ev.source.get("type") == "m.room.name"]
                        if name in names:
                            return room_id
                    return None
                rid = await sync_until(c, invited, f"an invite to {name!r}", deadline_s=DEADLINE)
                assert followup in (None, rid), f"{c.user_id} was invited to {rid}, another user to {followup}"
                followup = rid
                await expect(await c.join(rid), JoinResponse, f"{c.user_id} joining the follow-up room")

            # The welcome message, as the plugin's user, in each client's view of the room.
            for c in (mia, leo):
                def welcomed(resp):
                    info = resp.rooms.join.get(followup)
                    return info and any(
                        ev.source.get("sender") == plugin_user and ev.source.get("type") == "m.room.message"
                        and ev.source.get("content", {}).get("body") == welcome for ev in info.timeline.events)
                try:
                    await sync_until(c, welcomed, "the welcome message", deadline_s=3)
                except AssertionError:
                    history = await full_history(c, followup)
                    bodies = [(e.get("sender"), e.get("content", {}).get("body")) for e in history
                              if e.get("type") == "m.room.message"]
                    assert (plugin_user, welcome) in bodies, \
                        f"{c.user_id}: the follow-up room's messages are {bodies}, expected the welcome {welcome!r}"

            # The room's name and the therapist's power.
            got = await mia.room_get_state_event(followup, "m.room.name", "")
            await expect(got, RoomGetStateEventResponse, "the follow-up room's name")
            assert got.content.get("name") == name, got.content
            got = await mia.room_get_state_event(followup, "m.room.power_levels", "")
            await expect(got, RoomGetStateEventResponse, "the follow-up room's power levels")
            users = got.content.get("users", {})
            assert users.get(doctor.user_id) == 100, f"the therapist's power level in the follow-up room: {users}"
            assert users.get(mia.user_id, 0) == 0, users

            # The session room links it.
            async def linked():
                got = await mia.room_get_state_event(room, "org.limbic.followup", "")
                if not isinstance(got, RoomGetStateEventResponse) or "room_id" not in got.content:
                    raise AssertionError(f"no org.limbic.followup yet: {await explain(got)}")
                return got
            link = await eventually(linked, "org.limbic.followup in the session room")
            assert link.content == {"room_id": followup}, link.content

            # The plugin's route.
            path = f"{FOLLOWUP}/rooms/{q(room)}"
            for who, what in ((mia, "a client"), (doctor, "the therapist"), (admin, "an admin")):
                assert ok(await clinic.api(who, "GET", path), f"GET {path} as {what}") == {"room_id": followup}
            refused(await clinic.api(stranger, "GET", path), f"GET {path} as a stranger", 403, "M_FORBIDDEN")
            refused(await clinic.api(None, "GET", path), f"GET {path} without a token", 401, "M_MISSING_TOKEN")

            # Exactly one such room for each participant.
            for c in (mia, leo, doctor):
                fresh = new_client(clinic.url, clinic.accounts[c.user_id])
                try:
                    resp = await expect(await fresh.sync(timeout=0, full_state=True), SyncResponse, "a full sync")
                    assert followup_rooms(resp, name) == {followup}, \
                        f"{c.user_id}: rooms named {name!r}: {followup_rooms(resp, name)}"
                finally:
                    await fresh.close()

            SEEN["followup"] = {"room": room, "followup": followup, "name": name,
                                "accounts": [clinic.accounts[c.user_id] for c in (mia, leo)]}

    run(main())


# --- 3. calendar feeds ---------------------------------------------------------------------------


def test_calendar_feed(server, admin):
    async def main():
        async with Clinic(server, admin, "cal") as clinic:
            doctor = await clinic.therapist("doctor")
            doctor2 = await clinic.therapist("doctortwo")
            kai = await clinic.user("kai")
            nobody = await clinic.user("nobody")

            # A user without sessions: a valid, empty calendar.
            empty_url = await feed_url(clinic, nobody)
            assert await feed_url(clinic, nobody) == empty_url, "GET /feed-url is stable"
            status, _, text = await feed(clinic, empty_url)
            assert status == 200, f"GET {empty_url} -> HTTP {status}: {text[:300]}"
            parsed = parse_ics(text)
            assert parsed["events"] == [], parsed
            assert parsed["calendar"].get("VERSION") == "2.0" and text.startswith("BEGIN:VCALENDAR\r\n") \
                and text.endswith("END:VCALENDAR\r\n"), text
            assert parsed["calendar"].get("X-WR-CALNAME") == plugin_config(server, "calendar")["config"]["feed_name"]

            url = await feed_url(clinic, kai)
            # A long title with TEXT specials and non-ASCII: escaping and folding.
            title = f"Check-in, week 3; the long-titled session \\ with folding — über {RUN}"
            start = now_ms() + 2 * HOUR
            room, _ = await clinic.create(doctor, "individual", title, {kai: "client"}, starts_at=start, minutes=50)
            start2 = now_ms() + 26 * HOUR
            room2, _ = await clinic.create(doctor2, "group", f"Group {RUN}", {kai: "client"}, starts_at=start2,
                                           minutes=90)
            uid, uid2 = expected_uid(server, room), expected_uid(server, room2)

            async def both():
                events = await feed_events(clinic, url)
                assert set(events) == {uid, uid2}, f"feed UIDs {sorted(events)}, expected {uid} and {uid2}"
                return events
            events = await eventually(both, "both sessions in kai's feed")
            ev = events[uid]
            assert (ev["DTSTART"], ev["DTEND"]) == (ical_utc(start), ical_utc(start + 50 * MINUTE)), ev
            assert ev["SUMMARY"] == title, ev
            assert ev.get("STATUS") == "CONFIRMED", ev
            assert int(ev["SEQUENCE"]) == 0, ev
            assert events[uid2]["DTSTART"] == ical_utc(start2) and events[uid2]["SUMMARY"] == f"Group {RUN}"
            _, _, text = await feed(clinic, url)
            assert [e["UID"] for e in parse_ics(text)["events"]] == [uid, uid2], "sessions by start time"
            # The therapist's own feed has their session too, and only it.
            doctor_events = await eventually(lambda: feed_events_for(clinic, doctor), "the therapist's feed")
            assert set(doctor_events) == {uid}, f"the therapist's feed: {sorted(doctor_events)}"

            # Reschedule: new times, higher SEQUENCE, same UID.
            new_start = start + HOUR
            await clinic.patch(doctor, room, {"starts_at": new_start, "ends_at": new_start + 60 * MINUTE})

            async def moved():
                events = await feed_events(clinic, url)
                e = events.get(uid)
                assert e and e["DTSTART"] == ical_utc(new_start), f"after the reschedule: {e}"
                return e
            ev2 = await eventually(moved, "the rescheduled session in the feed")
            assert ev2["DTEND"] == ical_utc(new_start + 60 * MINUTE), ev2
            assert int(ev2["SEQUENCE"]) > int(ev["SEQUENCE"]), (ev, ev2)
            assert ev2["SUMMARY"] == title

            # Cancellation: still in the feed, STATUS:CANCELLED, SEQUENCE up again.
            await clinic.status(doctor, room, "cancelled")

            async def cancelled():
                e = (await feed_events(clinic, url)).get(uid)
                assert e and e.get("STATUS") == "CANCELLED", f"after the cancellation: {e}"
                return e
            ev3 = await eventually(cancelled, "the cancelled session in the feed")
            assert int(ev3["SEQUENCE"]) > int(ev2["SEQUENCE"]), (ev2, ev3)
            assert ev3["DTSTART"] == ical_utc(new_start), ev3
            assert (await feed_events(clinic, url))[uid2].get("STATUS") == "CONFIRMED"

            # Unknown tokens; the routes that need an access token.
            status, _, text = await feed(clinic, f"{CALENDAR}/feed/{secrets.token_hex(32)}.ics")
            assert status == 404, f"an unknown feed token -> HTTP {status}: {text[:200]}"
            status, _, _ = await feed(clinic, f"{CALENDAR}/feed/not-a-token.ics")
            assert status == 404, f"a malformed feed token -> HTTP {status}"
            refused(await clinic.api(None, "GET", f"{CALENDAR}/feed-url"), "GET /feed-url without a token",
                    401, "M_MISSING_TOKEN")
            refused(await clinic.api(None, "POST", f"{CALENDAR}/feed-url/reset"),
                    "POST /feed-url/reset without a token", 401, "M_MISSING_TOKEN")

            # Reset: the old URL is gone, the new one serves the same calendar.
            body = ok(await clinic.api(kai, "POST", f"{CALENDAR}/feed-url/reset"), "POST /feed-url/reset")
            new_url = body.get("url")
            assert new_url and new_url != url, f"the reset URL {new_url!r} (old {url!r})"
            status, _, text = await feed(clinic, url)
            assert status == 404, f"the old feed URL after a reset -> HTTP {status}: {text[:200]}"
            assert set(await feed_events(clinic, new_url)) == {uid, uid2}
            assert await feed_url(clinic, kai) == new_url, "GET /feed-url answers the new URL"

            SEEN["calendar"] = {"url": new_url, "events": await feed_events(clinic, new_url)}

    run(main())


def test_plugin_responses_have_one_content_type(server, admin):
    """The Content-Type a plugin answers with is the response's only one (RFC 9110 §8.3: a
    single value; with two, clients take either — aiohttp, browsers and calendar apps the first)."""
    async def main():
        async with Clinic(server, admin, "ct") as clinic:
            someone = await clinic.user("someone")
            url = await feed_url(clinic, someone)
            cases = [
                (url, None, None, "text/calendar"),
                (f"{BILLING}/invoices", someone.access_token, {"format": "csv"}, "text/csv"),
                (f"{BILLING}/invoices", someone.access_token, None, "application/json"),
                (f"{BILLING}/invoices", None, None, "application/json"),  # the plugin's 401
            ]
            problems = []
            for path, token, query, expected in cases:
                status, ctypes, _ = await get_raw(clinic.url, path, token, query)
                if media_types(ctypes) != [expected]:
                    problems.append(f"GET {path}{'?' + str(query) if query else ''} -> HTTP {status} with "
                                    f"Content-Type headers {ctypes}, expected only {expected}")
            assert not problems, "\n".join(problems)

    run(main())


async def feed_events_for(clinic: Clinic, who: AsyncClient) -> dict[str, dict]:
    return await feed_events(clinic, await feed_url(clinic, who))


# --- 4. CalDAV against Radicale ------------------------------------------------------------------


async def mkcalendar(radicale: Radicale, user: str, name: str) -> str:
    """Creates /<user>/<name>/ as a calendar collection; returns its URL (ending in '/')."""
    url = f"{radicale.url}/{user}/{name}/"
    body = ('<?xml version="1.0" encoding="utf-8"?>'
            '<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:set><D:prop>'
            f'<D:displayname>{name}</D:displayname>'
            '</D:prop></D:set></C:mkcalendar>')
    status, _, text = await radicale.request("MKCALENDAR", url, user, body,
                                             {"Content-Type": "application/xml; charset=utf-8"})
    assert status == 201, f"MKCALENDAR {url} -> HTTP {status}: {text[:300]}\n{radicale.log_tail()}"
    return url


async def collection_hrefs(radicale: Radicale, user: str, url: str) -> set[str]:
    """The member resources of a collection (PROPFIND depth 1)."""
    status, _, text = await radicale.request(
        "PROPFIND", url, user,
        '<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop><D:getetag/></D:prop>'
        '</D:propfind>', {"Depth": "1", "Content-Type": "application/xml; charset=utf-8"})
    assert status == 207, f"PROPFIND {url} -> HTTP {status}: {text[:300]}"
    hrefs = {unquote(h) for h in re.findall(r"<(?:\w+:)?href>([^<]+)</(?:\w+:)?href>", text)}
    base = url[len(radicale.url):]
    return {h for h in hrefs if h.startswith(base) and h != base}


def test_caldav_push_to_radicale(server, admin, radicale):
    async def main():
        async with Clinic(server, admin, "dav") as clinic:
            doctor = await clinic.therapist("doctor")
            kim = await clinic.user("kim")
            collection = await mkcalendar(radicale, "kim", "therapy")
            coll_path = collection[len(radicale.url):]

            start = now_ms() + 3 * HOUR
            title = f"CalDAV session {RUN}"
            room, _ = await clinic.create(doctor, "individual", title, {kim: "client"}, starts_at=start)
            uid = expected_uid(server, room)
            resource = f"{collection}{resource_name(uid)}.ics"
            # The plugin knows the session (kim's feed shows it) before the collection is set.
            await eventually(lambda: _has_uid(clinic, kim, uid), "the session in kim's feed")

            # Bad configurations.
            refused(await clinic.api(kim, "PUT", f"{CALENDAR}/caldav", {"url": "ftp://127.0.0.1/x/"}),
                    "PUT /caldav with an ftp URL", 400, "M_BAD_JSON")
            refused(await clinic.api(None, "PUT", f"{CALENDAR}/caldav", {"url": collection}),
                    "PUT /caldav without a token", 401, "M_MISSING_TOKEN")
            refused(await clinic.api(kim, "GET", f"{CALENDAR}/caldav"), "GET /caldav before any", 404,
                    "M_NOT_FOUND")
            # A wrong password: stored, the push fails with Radicale's 401 (not retried).
            body = ok(await clinic.api(kim, "PUT", f"{CALENDAR}/caldav",
                                       {"url": collection, "username": "kim", "password": "wrong"}),
                      "PUT /caldav with a wrong password")
            assert (body.get("pushed"), body.get("failed")) == (0, 1), body
            assert any("401" in e for e in body.get("errors", [])), body

            # The right one (without the final '/': the plugin adds it): the session is pushed at once.
            password = radicale.users["kim"]
            body = ok(await clinic.api(kim, "PUT", f"{CALENDAR}/caldav",
                                       {"url": collection.rstrip("/"), "username": "kim", "password": password}),
                      "PUT /caldav")
            assert (body.get("url"), body.get("username"), body.get("pushed"), body.get("failed")) == \
                (collection, "kim", 1, 0), body
            assert password not in str(body), f"the PUT /caldav answer shows the password: {body}"

            status, headers, text = await radicale.request("GET", resource, "kim")
            assert status == 200, f"GET {resource} from Radicale -> HTTP {status}: {text[:300]}\n" \
                                  f"collection: {await collection_hrefs(radicale, 'kim', collection)}"
            stored = parse_ics(text)["events"]
            assert [e["UID"] for e in stored] == [uid], stored
            assert (stored[0]["DTSTART"], stored[0]["SUMMARY"]) == (ical_utc(start), title), stored[0]
            assert await collection_hrefs(radicale, "kim", collection) == {f"{coll_path}{resource_name(uid)}.ics"}

            # GET /caldav: url and username, never the password.
            body = ok(await clinic.api(kim, "GET", f"{CALENDAR}/caldav"), "GET /caldav")
            assert body == {"url": collection, "username": "kim"}, body
            _, _, raw_body = await raw_bytes(clinic.url, "GET", f"{CALENDAR}/caldav", kim.access_token)
            assert password.encode() not in raw_body and b"password" not in raw_body, raw_body

            # A reschedule updates the stored event.
            new_start = start + 2 * HOUR
            await clinic.patch(doctor, room, {"starts_at": new_start, "ends_at": new_start + 45 * MINUTE})

            async def moved():
                status, _, text = await radicale.request("GET", resource, "kim")
                assert status == 200, f"GET {resource} -> HTTP {status}"
                e = parse_ics(text)["events"][0]
                assert e["DTSTART"] == ical_utc(new_start), f"stored DTSTART {e['DTSTART']}"
                return e
            e = await eventually(moved, "the rescheduled event in Radicale")
            assert e["DTEND"] == ical_utc(new_start + 45 * MINUTE) and int(e["SEQUENCE"]) >= 1, e

            # A new session for kim is pushed by on-event; its cancellation deletes the resource.
            start2 = now_ms() + 30 * HOUR
            room2, _ = await clinic.create(doctor, "individual", f"Second {RUN}", {kim: "client"}, starts_at=start2)
            resource2 = f"{collection}{resource_name(expected_uid(server, room2))}.ics"

            async def exists(url=resource2):
                status, _, text = await radicale.request("GET", url, "kim")
                assert status == 200, f"GET {url} -> HTTP {status}"
                return text
            await eventually(exists, "the second session in Radicale")
            await clinic.status(doctor, room2, "cancelled")

            async def gone():
                status, _, _ = await radicale.request("GET", resource2, "kim")
                assert status == 404, f"GET {resource2} after the cancellation -> HTTP {status}"
                return True
            await eventually(gone, "the cancelled session deleted from Radicale")
            assert (await radicale.request("GET", resource, "kim"))[0] == 200, "the other session stays"

            # DELETE /caldav: nothing more reaches the collection.
            assert ok(await clinic.api(kim, "DELETE", f"{CALENDAR}/caldav"), "DELETE /caldav") == {}
            refused(await clinic.api(kim, "GET", f"{CALENDAR}/caldav"), "GET /caldav after DELETE", 404,
                    "M_NOT_FOUND")
            later = now_ms() + 50 * HOUR
            await clinic.patch(doctor, room, {"starts_at": later, "ends_at": later + 45 * MINUTE})
            start3 = now_ms() + 60 * HOUR
            room3, _ = await clinic.create(doctor, "individual", f"Third {RUN}", {kim: "client"}, starts_at=start3)
            uid3 = expected_uid(server, room3)
            # Once kim's feed shows both changes, the plugin has handled them (and pushed nothing).
            async def handled():
                events = await feed_events_for(clinic, kim)
                assert uid3 in events and events[uid]["DTSTART"] == ical_utc(later), \
                    f"kim's feed: {sorted(events)}"
                return True
            await eventually(handled, "the changes after DELETE /caldav in kim's feed")
            status, _, text = await radicale.request("GET", resource, "kim")
            assert status == 200 and parse_ics(text)["events"][0]["DTSTART"] == ical_utc(new_start), \
                f"the stored event changed after DELETE /caldav: HTTP {status} {text[:300]}"
            hrefs = await collection_hrefs(radicale, "kim", collection)
            assert hrefs == {f"{coll_path}{resource_name(uid)}.ics"}, f"the collection after DELETE /caldav: {hrefs}"

    run(main())


async def _has_uid(clinic: Clinic, who: AsyncClient, uid: str) -> bool:
    events = await feed_events_for(clinic, who)
    assert uid in events, f"{who.user_id}'s feed: {sorted(events)}"
    return True


def test_caldav_host_not_granted(admin, radicale, tmp_path_factory):
    """The plain example config (calendar `http_hosts = []`): configuring CalDAV is stored and
    answered with the failed push (`not-granted: http to 127.0.0.1:<port>`), logged, and nothing
    reaches Radicale."""
    srv = LimbicServer("test_plugins_ungranted", tmp_path_factory.mktemp("ungranted"))
    assert plugin_config(srv, "calendar").get("http_hosts", []) == [], "the example grants no CalDAV host"
    srv.start()
    try:
        async def main():
            secret = srv.config["registration"]["shared_secret"]
            admin2 = await register_with_shared_secret(srv.url, secret, f"ungranted-admin-{RUN}",
                                                       "ungranted-admin-password-1", admin=True)
            async with Clinic(srv, admin2, "ng") as clinic:
                doctor = await clinic.therapist("doctor")
                noah = await clinic.user("noah")
                collection = await mkcalendar(radicale, "noah", "sessions")
                start = now_ms() + 4 * HOUR
                room, _ = await clinic.create(doctor, "individual", f"Ungranted {RUN}", {noah: "client"},
                                              starts_at=start)
                uid = expected_uid(srv, room)
                await eventually(lambda: _has_uid(clinic, noah, uid), "the session in noah's feed")
                body = ok(await clinic.api(noah, "PUT", f"{CALENDAR}/caldav",
                                           {"url": collection, "username": "noah", "password": radicale.users["noah"]}),
                          "PUT /caldav on a server that does not grant the host")
                assert (body.get("pushed"), body.get("failed")) == (0, 1), body
                port = radicale.port
                assert any("not-granted" in e and f"127.0.0.1:{port}" in e for e in body.get("errors", [])), \
                    f"the answer should say the host is not granted: {body}"
                assert ok(await clinic.api(noah, "GET", f"{CALENDAR}/caldav"), "GET /caldav") == \
                    {"url": collection, "username": "noah"}
                # A change of the session tries again (and fails the same way).
                await clinic.patch(doctor, room, {"starts_at": start + HOUR, "ends_at": start + 2 * HOUR})

                async def logged():
                    lines = [l for l in server_log(srv).splitlines()
                             if "CalDAV PUT" in l and "not-granted" in l and noah.user_id in l]
                    assert len(lines) >= 2, f"log lines about the refused pushes: {lines}"
                    return lines
                await eventually(logged, "the refused pushes in the server log")
                hrefs = await collection_hrefs(radicale, "noah", collection)
                assert hrefs == set(), f"Radicale got resources from a server without the grant: {hrefs}"
                # Not retried (a not-granted push never succeeds): nothing queued for on-tick.
                assert "will retry" not in "\n".join(l for l in server_log(srv).splitlines() if noah.user_id in l)

        run(main())
    finally:
        srv.stop()


# --- 5. exactly once across a restart ------------------------------------------------------------


def test_restart_bills_and_follows_up_exactly_once(server, admin):
    if not SEEN:
        pytest.skip("the tests before did not get far enough to compare")
    server.restart()

    async def main():
        async with Clinic(server, admin, "rs") as clinic:
            # A barrier: a group session completed after the restart. Delivery is in stream order,
            # so once its invoice and follow-up room exist, every older event has been delivered
            # (again, if the cursor replays).
            doctor = await clinic.therapist("doctor")
            pat = await clinic.user("pat")
            room, _ = await clinic.create(doctor, "group", f"After restart {RUN}", {pat: "client"})
            await clinic.join(pat, room)
            await clinic.status(doctor, room, "open")
            await clinic.status(doctor, room, "in_progress")
            await clinic.status(doctor, room, "completed")
            await eventually(lambda: _ok_json(clinic, doctor, f"{BILLING}/invoices/{q(room)}"),
                             "the invoice of the session completed after the restart")
            await eventually(lambda: _ok_json(clinic, pat, f"{FOLLOWUP}/rooms/{q(room)}"),
                             "the follow-up room of the session completed after the restart")

            problems = []
            if "billing" in SEEN:
                before = SEEN["billing"]["invoices"]
                therapist = SEEN["billing"]["doctor"]
                body = ok(await clinic.api(therapist, "GET", f"{BILLING}/invoices"), "GET /invoices after restart")
                if body["invoices"] != before:
                    problems.append(f"the therapist's invoices changed across the restart:\n before {before}\n "
                                    f"after {body['invoices']}")
                body = ok(await clinic.api(admin, "GET", f"{BILLING}/invoices"), "GET /invoices as admin")
                rooms = [i["room_id"] for i in body["invoices"]]
                dupes = {r for r in rooms if rooms.count(r) > 1}
                if dupes:
                    problems.append(f"rooms invoiced more than once: {dupes}")
            if "followup" in SEEN:
                f = SEEN["followup"]
                got = ok(await clinic.api(f["accounts"][0].access_token, "GET", f"{FOLLOWUP}/rooms/{q(f['room'])}"),
                         "the follow-up room after restart")
                if got != {"room_id": f["followup"]}:
                    problems.append(f"the follow-up room changed: {got}, was {f['followup']}")
                for account in f["accounts"]:
                    fresh = new_client(clinic.url, account)
                    try:
                        resp = await expect(await fresh.sync(timeout=0, full_state=True), SyncResponse, "full sync")
                        rooms = followup_rooms(resp, f["name"])
                        if rooms != {f["followup"]}:
                            problems.append(f"{account.user_id} has rooms named {f['name']!r}: {rooms}")
                        link = await fresh.room_get_state_event(f["room"], "org.limbic.followup", "")
                        if getattr(link, "content", None) != {"room_id": f["followup"]}:
                            problems.append(f"org.limbic.followup after restart: {await explain(link)}")
                    finally:
                        await fresh.close()
            if "calendar" in SEEN:
                c = SEEN["calendar"]
                after = await feed_events(clinic, c["url"])
                before = {uid: (e["SEQUENCE"], e["DTSTART"], e.get("STATUS")) for uid, e in c["events"].items()}
                now = {uid: (e["SEQUENCE"], e["DTSTART"], e.get("STATUS")) for uid, e in after.items()}
                if before != now:
                    problems.append(f"the calendar feed changed across the restart: before {before}, after {now}")
            assert not problems, "\n".join(problems)

    run(main())


async def _ok_json(clinic: Clinic, who, path: str):
    return ok(await clinic.api(who, "GET", path), f"GET {path}")
