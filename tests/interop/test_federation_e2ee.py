"""End-to-end encryption across two federating Limbic servers, through matrix-nio (vodozemac).

Two Limbic servers, A and B, federate over TLS on loopback with a test CA (`make_pki` of
test_federation_synapse), each named `127.0.0.1:<its federation port>`. Encryption-enabled nio
clients:

1. alice (on A) creates a Megolm-encrypted room (`m.room.encryption` in its initial state) and
   invites bob (on B): the invite crosses with federation `/v2/invite` and shows in bob's sync;
   bob joins (make_join/send_join against A) and both clients see the room as encrypted.
2. Both query each other's device keys (the remote user's keys come over federation
   `user/keys/query`), claim one-time keys (federation `user/keys/claim`), share their Megolm
   sessions (to-device `m.room.encrypted`, carried between the servers as `m.direct_to_device`
   EDUs), and decrypt each other's messages.
3. A second device of bob's logs in on B and uploads keys: alice's sync names bob in
   `device_lists.changed` (an `m.device_list_update` EDU from B), her key query lists the new
   device, and a message she sends afterwards decrypts on it.

The tests share the servers, one event loop and the nio clients, and run in file order.
Every HTTP exchange of the nio clients is recorded; a failure quotes the relevant ones, the
federation routes each server answered (from its /metrics) and both servers' log tails
(`.artifacts/test_federation_e2ee-a.log`, `.artifacts/test_federation_e2ee-b.log`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from nio import (
    AsyncClient,
    JoinResponse,
    KeysClaimResponse,
    KeysQueryResponse,
    KeysUploadResponse,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessageText,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
)

from conftest import LimbicServer, federated_server, federation_requests
from mx import Account, e2e_client, login, register
from test_federation_synapse import Pki, make_pki

MODULE = "test_federation_e2ee"
RUN = secrets.token_hex(3)
PASSWORDS = {"alice": "alice-fed-e2ee-password-1", "bob": "bob-fed-e2ee-password-2"}
MEGOLM = "m.megolm.v1.aes-sha2"
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}
DEADLINE = 30.0


def q(s: str) -> str:
    return quote(s, safe="")


# --- recording nio's HTTP exchanges -----------------------------------------------------------


@dataclass
class Exchange:
    who: str
    method: str
    path: str
    request: str
    status: int
    response: str

    def __str__(self) -> str:
        return f"[{self.who}] {self.method} {self.path} {self.request} -> HTTP {self.status}: {self.response}"


@dataclass
class Recorder:
    exchanges: list[Exchange] = field(default_factory=list)

    def attach(self, client: AsyncClient, who: str) -> AsyncClient:
        """Wraps the client's `send` (every request nio makes goes through it): keeps method,
        path, request body and the answer. The answer's body is read here; aiohttp keeps it, so
        nio parses it afterwards as usual."""
        original = client.send

        async def send(method, path, data=None, headers=None, trace_context=None, timeout=None):
            response = await original(method, path, data, headers, trace_context, timeout)
            try:
                text = await response.text()
            except Exception as e:  # noqa: BLE001 - only for the record
                text = f"<unreadable: {e!r}>"
            request = data if isinstance(data, str) else ("" if data is None else f"<{type(data).__name__}>")
            self.exchanges.append(Exchange(who, method, path.split("?")[0] if "/sync" in path else path,
                                           request[:1500], response.status, text[:2500]))
            return response

        client.send = send
        return client

    def show(self, *fragments: str, last: int = 12) -> str:
        """The last exchanges whose path contains one of `fragments` (all of them if none)."""
        chosen = [e for e in self.exchanges if not fragments or any(f in e.path for f in fragments)]
        lines = [str(e) for e in chosen[-last:]]
        return "\n".join(lines) if lines else "(none)"


RECORDER = Recorder()


# --- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    """Server A (named `server` so that conftest's report hook adds its log tail to failures)."""
    srv = federated_server(f"{MODULE}-a", tmp_path_factory.mktemp("a"), pki)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server_b(tmp_path_factory, pki):
    srv = federated_server(f"{MODULE}-b", tmp_path_factory.mktemp("b"), pki)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def federation_routes(srv: LimbicServer) -> list[str]:
    """The federation routes the server answered, with status and count (each node's /metrics)."""
    found = []
    for node in getattr(srv, "nodes", [srv]):
        try:
            found += [f"{node.name}: {line}" for line in federation_requests(node)]
        except OSError as e:
            found.append(f"(no /metrics from {node.name}: {e!r})")
    return found


def context(a: LimbicServer, b: LimbicServer, *fragments: str, lines: int = 30) -> str:
    """What a failure message carries: nio's exchanges, federation routes served, log tails."""
    return (f"\n--- nio exchanges ({', '.join(fragments) or 'all'}) ---\n{RECORDER.show(*fragments)}"
            f"\n--- federation routes served by A ({a.server_name}) ---\n" + "\n".join(federation_routes(a))
            + f"\n--- federation routes served by B ({b.server_name}) ---\n" + "\n".join(federation_routes(b))
            + f"\n--- A's log tail ({a.log_path}) ---\n{a.log_tail(lines)}"
            f"\n--- B's log tail ({b.log_path}) ---\n{b.log_tail(lines)}")


# --- clients ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the nio clients (and their HTTP sessions) outlive a test."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@dataclass
class World:
    a: LimbicServer
    b: LimbicServer
    alice: Account
    bob: Account
    clients: dict[str, AsyncClient]
    stores: Path
    room_id: str = ""

    def ctx(self, *fragments: str) -> str:
        return context(self.a, self.b, *fragments)


@pytest.fixture(scope="module")
def world(server, server_b, loop, tmp_path_factory):
    stores = tmp_path_factory.mktemp("nio-stores")

    async def accounts():
        return (await register(server.url, f"alice{RUN}", PASSWORDS["alice"]),
                await register(server_b.url, f"bob{RUN}", PASSWORDS["bob"]))

    alice, bob = loop.run_until_complete(accounts())
    assert alice.user_id == f"@alice{RUN}:{server.server_name}", alice
    assert bob.user_id == f"@bob{RUN}:{server_b.server_name}", bob
    clients = {
        "alice": RECORDER.attach(e2e_client(server.url, alice, stores / "alice"), "alice@A"),
        "bob": RECORDER.attach(e2e_client(server_b.url, bob, stores / "bob"), "bob@B"),
    }
    w = World(server, server_b, alice, bob, clients, stores)
    yield w
    for c in clients.values():
        loop.run_until_complete(c.close())


async def sync(client: AsyncClient, timeout_ms: int = 0) -> SyncResponse:
    resp = await client.sync(timeout=timeout_ms, sync_filter={"room": {"timeline": {"limit": 50}}})
    assert isinstance(resp, SyncResponse), f"sync of {client.user_id}/{client.device_id}: {resp!r}\n{RECORDER.show('/sync', last=3)}"
    return resp


async def sync_until(client: AsyncClient, predicate, what: str, ctx, deadline_s: float = DEADLINE):
    """Incremental syncs until predicate(resp) is truthy; its value is returned."""
    deadline = time.monotonic() + deadline_s
    count = 0
    while True:
        resp = await sync(client, timeout_ms=1000)
        count += 1
        value = predicate(resp)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{client.user_id}/{client.device_id} never saw {what} in {count} syncs "
                                 f"({deadline_s:.0f}s){ctx()}")


async def upload_keys(client: AsyncClient, ctx) -> KeysUploadResponse:
    """Identity and one-time keys, as nio uploads them for a fresh Olm account."""
    assert client.should_upload_keys, f"nio does not want to upload keys for {client.user_id}/{client.device_id}"
    resp = await client.keys_upload()
    assert isinstance(resp, KeysUploadResponse), f"keys/upload of {client.user_id}/{client.device_id} failed: {resp!r}{ctx('/keys/upload')}"
    assert resp.signed_curve25519_count > 0, f"one_time_key_counts after upload: {resp}{ctx('/keys/upload')}"
    return resp


async def query_keys(client: AsyncClient, user_id: str, device_id: str, ctx) -> KeysQueryResponse:
    """keys/query for everyone nio tracks, `user_id` included; `device_id` must be in the answer,
    with its identity keys, and nothing may have failed."""
    client.olm.users_for_key_query.add(user_id)  # normally nio's own doing after the membership sync
    resp = await client.keys_query()
    what = f"keys/query by {client.user_id}/{client.device_id} for {user_id}"
    assert isinstance(resp, KeysQueryResponse), f"{what} failed: {resp!r}{ctx('/keys/query')}"
    assert not resp.failures, f"{what}: failures {resp.failures}{ctx('/keys/query')}"
    device = resp.device_keys.get(user_id, {}).get(device_id)
    assert device is not None, f"{what}: no device {device_id} in {list(resp.device_keys.get(user_id, {}))}{ctx('/keys/query')}"
    assert f"curve25519:{device_id}" in device.get("keys", {}) and f"ed25519:{device_id}" in device.get("keys", {}), device
    assert device_id in {d.id for d in client.device_store.active_user_devices(user_id)}, \
        f"{what}: nio did not store the device (bad signature?): {device}"
    return resp


async def claim_keys(client: AsyncClient, room_id: str, user_id: str, device_id: str, ctx) -> KeysClaimResponse | None:
    """Claims a one-time key for every device of the room the client has no Olm session with
    (what nio's room_send does before sharing a Megolm session), and checks that `device_id` of
    `user_id` got one. None if the client already has a session with that device."""
    missing = client.get_missing_sessions(room_id)
    if device_id not in missing.get(user_id, []):
        return None
    resp = await client.keys_claim(missing)
    what = f"keys/claim by {client.user_id}/{client.device_id} for {dict(missing)}"
    assert isinstance(resp, KeysClaimResponse), f"{what} failed: {resp!r}{ctx('/keys/claim')}"
    claimed = resp.one_time_keys.get(user_id, {}).get(device_id, {})
    assert not resp.failures and any(k.startswith("signed_curve25519:") for k in claimed), (
        f"{what}: no one-time key of {user_id}/{device_id} (one_time_keys={resp.one_time_keys}, "
        f"failures={resp.failures}){ctx('/keys/claim')}")
    assert device_id not in client.get_missing_sessions(room_id).get(user_id, []), \
        f"{what}: nio made no Olm session from the claimed key {claimed}"
    return resp


async def send_text(client: AsyncClient, room_id: str, body: str, ctx) -> str:
    resp = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body},
                                  ignore_unverified_devices=True)
    assert isinstance(resp, RoomSendResponse), \
        f"{client.user_id}/{client.device_id} sending {body!r} failed: {resp!r}{ctx('/send/', '/sendToDevice/')}"
    return resp.event_id


async def receive_plaintext(client: AsyncClient, room_id: str, event_id: str, body: str, ctx,
                            deadline_s: float = DEADLINE) -> RoomMessageText:
    """Syncs until the event arrives decrypted. A Megolm event nio could not decrypt is reported
    with the inbound sessions and to-device events the client got."""
    deadline = time.monotonic() + deadline_s
    undecrypted: list[str] = []
    to_device: list[str] = []
    while True:
        resp = await sync(client, timeout_ms=1000)
        to_device += [f"{e.source.get('type')} from {e.source.get('sender')}" for e in resp.to_device_events]
        room = resp.rooms.join.get(room_id)
        for ev in room.timeline.events if room else []:
            if ev.event_id != event_id:
                continue
            if isinstance(ev, RoomMessageText):
                assert ev.decrypted, f"{event_id} arrived unencrypted: {ev.source}"
                assert ev.body == body, (ev.body, body)
                return ev
            if isinstance(ev, MegolmEvent):
                undecrypted.append(f"session {ev.session_id} from {ev.sender_key}")
        if time.monotonic() > deadline:
            sessions = [(s.id, s.sender_key) for s in client.olm.inbound_group_store if s.room_id == room_id]
            raise AssertionError(
                f"{client.user_id}/{client.device_id} never decrypted {event_id} ({body!r}) within {deadline_s:.0f}s; "
                f"undecryptable copies: {undecrypted or 'none (never received)'}; inbound Megolm sessions "
                f"for the room: {sessions}; to-device events received: {to_device or 'none'}"
                f"{ctx('/keys/claim', '/sendToDevice/', '/send/')}")


# --- 1. the invite crosses, bob joins ---------------------------------------------------------


@pytest.fixture(scope="module")
def room(world, loop) -> str:
    """alice creates the encrypted room and invites bob; bob joins. Both devices uploaded
    their identity and one-time keys first."""
    a, b = world.clients["alice"], world.clients["bob"]
    bob_id = world.bob.user_id

    async def go():
        for c in (a, b):
            await sync(c)
            await upload_keys(c, world.ctx)
        created = await a.room_create(name=f"encrypted across servers {RUN}", preset=RoomPreset.private_chat,
                                      invite=[bob_id], initial_state=[ENCRYPTION_STATE])
        assert isinstance(created, RoomCreateResponse), f"createRoom on A: {created!r}{world.ctx('/createRoom')}"
        room_id = created.room_id
        await sync_until(b, lambda r: room_id in r.rooms.invite, f"the invite to {room_id} (made on A)",
                         lambda: world.ctx('/sync', '/createRoom'))
        joined = await b.join(room_id)
        assert isinstance(joined, JoinResponse), f"bob joins {room_id} through A: {joined!r}{world.ctx('/join/')}"
        await sync_until(a, lambda r: room_id in a.rooms and bob_id in a.rooms[room_id].users,
                         f"bob's join of {room_id}", lambda: world.ctx('/sync'))
        await sync_until(b, lambda r: room_id in b.rooms and world.alice.user_id in b.rooms[room_id].users,
                         f"the joined room {room_id} with alice in it", lambda: world.ctx('/sync', '/join/'))
        for c in (a, b):
            assert c.rooms[room_id].encrypted, f"{c.user_id} does not see {room_id} as encrypted{world.ctx('/sync')}"
        return room_id

    world.room_id = loop.run_until_complete(go())
    return world.room_id


@pytest.mark.timeout(120)
def test_invite_crosses_and_bob_joins_the_encrypted_room(world, room):
    """Everything is in the fixture; this names the step when it fails."""
    assert world.clients["alice"].rooms[room].encrypted and world.clients["bob"].rooms[room].encrypted


# --- 2. keys cross, sessions are shared, both decrypt ------------------------------------------


@pytest.mark.timeout(180)
def test_keys_cross_and_both_decrypt_each_other(world, room, loop):
    a, b = world.clients["alice"], world.clients["bob"]
    alice, bob = world.alice, world.bob

    async def go():
        # Device keys over federation user/keys/query, both ways.
        await query_keys(a, bob.user_id, bob.device_id, world.ctx)
        await query_keys(b, alice.user_id, alice.device_id, world.ctx)
        otk_before = (await sync(b)).device_key_count.signed_curve25519

        # One-time keys over federation user/keys/claim: alice needs an Olm session with bob's
        # device to give it her Megolm session.
        claimed = await claim_keys(a, room, bob.user_id, bob.device_id, world.ctx)
        assert claimed is not None, f"alice already had an Olm session with {bob.device_id}: nothing claimed"

        # The Megolm session goes to bob's device as to-device m.room.encrypted (an
        # m.direct_to_device EDU from A to B); the message decrypts on B.
        body = f"alice on A to bob on B {RUN}"
        event_id = await send_text(a, room, body, world.ctx)
        ev = await receive_plaintext(b, room, event_id, body, world.ctx)
        assert ev.sender == alice.user_id

        # The claim took exactly one of bob's one-time keys on B.
        otk_after = (await sync(b)).device_key_count.signed_curve25519
        assert otk_after == otk_before - 1, (
            f"bob's device_one_time_keys_count.signed_curve25519 went from {otk_before} to {otk_after}, "
            f"expected {otk_before - 1}{world.ctx('/keys/claim')}")

        # Back: bob already holds an Olm session with alice's device (from her pre-key
        # message); if nio wants a new one, the claim crosses the other way.
        await claim_keys(b, room, alice.user_id, alice.device_id, world.ctx)
        body = f"bob on B to alice on A {RUN}"
        event_id = await send_text(b, room, body, world.ctx)
        ev = await receive_plaintext(a, room, event_id, body, world.ctx)
        assert ev.sender == bob.user_id

    loop.run_until_complete(go())


# --- 3. bob's second device -------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_second_device_of_bob_appears_and_decrypts(world, room, loop):
    a, b = world.clients["alice"], world.clients["bob"]
    alice, bob = world.alice, world.bob

    async def go():
        await sync(a)  # alice's since token is now before the new device
        second = await login(world.b.url, bob.localpart, bob.password, device_name="bob's phone")
        assert second.user_id == bob.user_id and second.device_id != bob.device_id, second
        b2 = RECORDER.attach(e2e_client(world.b.url, second, world.stores / "bob-2"), "bob2@B")
        world.clients["bob2"] = b2
        await sync(b2)
        await upload_keys(b2, world.ctx)  # B sends m.device_list_update to A

        # alice's incremental sync names bob in device_lists.changed; her key query (federation
        # user/keys/query) lists the new device.
        await sync_until(a, lambda r: bob.user_id in r.device_list.changed,
                         f"{bob.user_id} in device_lists.changed after a new device of his uploaded keys on B",
                         lambda: world.ctx('/sync', '/keys/upload'))
        query = await query_keys(a, bob.user_id, second.device_id, world.ctx)
        assert bob.device_id in query.device_keys[bob.user_id], query.device_keys
        # The new device knows alice's keys too.
        await sync_until(b2, lambda r: room in b2.rooms, f"the room {room}", lambda: world.ctx('/sync'))
        await query_keys(b2, alice.user_id, alice.device_id, world.ctx)

        # alice's next message: nio dropped the outbound session when bob's devices changed,
        # claims a key of the new device (over federation) and shares a new session with both.
        claimed = await claim_keys(a, room, bob.user_id, second.device_id, world.ctx)
        assert claimed is not None, f"alice already had an Olm session with {second.device_id}: nothing claimed"
        body = f"alice on A to both of bob's devices {RUN}"
        event_id = await send_text(a, room, body, world.ctx)
        await receive_plaintext(b2, room, event_id, body, world.ctx)
        await receive_plaintext(b, room, event_id, body, world.ctx)

    loop.run_until_complete(go())
