"""Issue 3 through matrix-nio with end-to-end encryption on (vodozemac), against a real server.

- two users in a Megolm-encrypted room decrypt each other's messages; the server only ever
  holds ciphertext;
- a second device of the same user gets the room key over to-device (Olm) and decrypts, from
  another user and from its own first device; to-device transaction ids are idempotent and
  delivered messages are not delivered again;
- server-side key backup (`room_keys/*`, raw HTTP: nio has no API for it) with real Megolm
  session keys encrypted to a curve25519 backup key, decrypted again after the round trip;
- media: upload, download (authenticated; the legacy endpoints refuse new media), thumbnails (scale and crop), an
  encrypted attachment;
- relations: an edit bundled as `m.replace`, reactions and a thread through `/relations` and
  `/threads`;
- push: `unread_notifications` counts after mentions, reset by a read receipt;
- the admin API refuses non-admins and serves an admin (registered with the shared secret).

The tests of this module share one server, one event loop and the nio clients (with their
crypto stores in a temporary directory), and run in file order.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import vodozemac
from nio import (
    AsyncClient,
    DownloadResponse,
    JoinResponse,
    KeysQueryResponse,
    KeysUploadResponse,
    MegolmEvent,
    ResizingMethod,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomMessageText,
    RoomPreset,
    RoomSendResponse,
    ThumbnailResponse,
    ToDeviceMessage,
    ToDeviceResponse,
    UnknownToDeviceEvent,
    UpdateReceiptMarkerResponse,
    UploadResponse,
)
from nio.crypto import decrypt_attachment
from PIL import Image

from mx import (
    e2e_client,
    expect,
    login,
    raw,
    raw_bytes,
    register,
    register_with_shared_secret,
    session,
    shared_secret_mac,
    sync_once,
    sync_until,
)

PASSWORDS = {"alice": "alice-e2ee-password-1", "bob": "bob-e2ee-password-2"}
MEGOLM = "m.megolm.v1.aes-sha2"
BACKUP_ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2"
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}

# What the encrypted_room fixture leaves for the first test: one-time key counts after upload.
STATE: dict = {}


def q(s: str) -> str:
    return quote(s, safe="")


def b64(data: bytes) -> str:
    """Unpadded standard base64, as Matrix uses."""
    return base64.b64encode(data).decode().rstrip("=")


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the nio clients (and their HTTP sessions) outlive a test."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def accounts(server, loop):
    async def go():
        return {name: await register(server.url, name, pw) for name, pw in PASSWORDS.items()}

    return loop.run_until_complete(go())


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """Where the nio clients keep their crypto stores, one directory per device."""
    return tmp_path_factory.mktemp("nio-stores")


@pytest.fixture(scope="module")
def devices(server, accounts, loop, stores):
    """Encryption-enabled nio clients by name ("alice", "bob"; test 2 adds "alice2")."""
    clients: dict[str, AsyncClient] = {
        "alice": e2e_client(server.url, accounts["alice"], stores / "alice-1"),
        "bob": e2e_client(server.url, accounts["bob"], stores / "bob-1"),
    }
    yield clients
    for c in clients.values():
        loop.run_until_complete(c.close())


async def upload_keys(client: AsyncClient) -> KeysUploadResponse | None:
    if not client.should_upload_keys:
        return None
    return await expect(await client.keys_upload(), KeysUploadResponse,
                        f"keys/upload of {client.user_id}/{client.device_id}")


async def query_keys(client: AsyncClient) -> KeysQueryResponse | None:
    if not client.should_query_keys:
        return None
    return await expect(await client.keys_query(), KeysQueryResponse,
                        f"keys/query of {client.user_id}/{client.device_id}")


async def send_text(client: AsyncClient, room_id: str, body: str) -> str:
    resp = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body},
                                  ignore_unverified_devices=True)
    await expect(resp, RoomSendResponse, f"{client.user_id}/{client.device_id} sends {body!r}")
    return resp.event_id


async def receive_plaintext(client: AsyncClient, room_id: str, event_id: str, body: str,
                            deadline_s: float = 15.0) -> RoomMessageText:
    """Sync until the event arrives decrypted; a Megolm event nio could not decrypt is reported
    with the inbound sessions the client holds."""
    deadline = time.monotonic() + deadline_s
    undecrypted: list[str] = []
    while True:
        resp = await sync_once(client, timeout_ms=1000, limit=50)
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
            sessions = [(s.id, s.sender_key) for s in client.olm.inbound_group_store
                        if s.room_id == room_id]
            raise AssertionError(
                f"{client.user_id}/{client.device_id} never decrypted {event_id} ({body!r}); "
                f"undecryptable copies: {undecrypted or 'none (never received)'}; "
                f"inbound sessions for the room: {sessions}")


async def raw_event(base_url: str, token: str, room_id: str, event_id: str) -> dict:
    status, ev = await raw(base_url, "GET",
                           f"/_matrix/client/v3/rooms/{q(room_id)}/event/{q(event_id)}", token)
    assert status == 200, f"GET /rooms/{room_id}/event/{event_id} -> HTTP {status}: {ev}"
    return ev


@pytest.fixture(scope="module")
def encrypted_room(server, accounts, devices, loop):
    """alice creates a room with m.room.encryption (Megolm) in its initial state; bob joins.
    Both devices have uploaded their identity and one-time keys first."""
    a, b = devices["alice"], devices["bob"]
    bob_id = accounts["bob"].user_id

    async def go():
        for c in (a, b):
            await sync_once(c)
            up = await upload_keys(c)
            assert up is not None, f"nio did not want to upload keys for {c.user_id}"
            assert up.signed_curve25519_count > 0, \
                f"keys/upload answered one_time_key_counts.signed_curve25519 = {up.signed_curve25519_count}"
            STATE.setdefault("otk_after_upload", {})[c.user_id] = up.signed_curve25519_count
        created = await a.room_create(name="encrypted", preset=RoomPreset.private_chat,
                                      invite=[bob_id], initial_state=[ENCRYPTION_STATE])
        await expect(created, RoomCreateResponse, "createRoom with m.room.encryption")
        room_id = created.room_id
        await sync_until(b, lambda r: room_id in r.rooms.invite, f"the invite to {room_id}")
        await expect(await b.join(room_id), JoinResponse, f"bob joins {room_id}")
        await sync_until(a, lambda r: bob_id in (a.rooms.get(room_id).users if room_id in a.rooms else {}),
                         f"bob's join of {room_id}")
        await sync_once(b)
        for c in (a, b):
            assert c.rooms[room_id].encrypted, f"{c.user_id} does not see {room_id} as encrypted"
        return room_id

    return loop.run_until_complete(go())


# --- 1. two users decrypt each other ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_users_decrypt_each_other(server, accounts, devices, encrypted_room, loop):
    a, b = devices["alice"], devices["bob"]
    room = encrypted_room

    async def go():
        body_a = "only bob can read this (alice)"
        eid_a = await send_text(a, room, body_a)
        # The server stores ciphertext only.
        stored = await raw_event(server.url, accounts["bob"].access_token, room, eid_a)
        assert stored["type"] == "m.room.encrypted", stored
        assert stored["content"].get("algorithm") == MEGOLM, stored
        assert "body" not in stored["content"] and body_a not in json.dumps(stored), stored

        ev = await receive_plaintext(b, room, eid_a, body_a)
        assert ev.sender == accounts["alice"].user_id

        # alice claimed one of bob's one-time keys to open an Olm session: the count in bob's
        # sync (device_one_time_keys_count) went down by exactly one.
        resp = await sync_once(b)
        uploaded = STATE["otk_after_upload"][accounts["bob"].user_id]
        assert resp.device_key_count.signed_curve25519 == uploaded - 1, (
            f"device_one_time_keys_count.signed_curve25519 is "
            f"{resp.device_key_count.signed_curve25519}, expected {uploaded - 1}")

        body_b = "only alice can read this (bob)"
        eid_b = await send_text(b, room, body_b)
        stored = await raw_event(server.url, accounts["alice"].access_token, room, eid_b)
        assert stored["type"] == "m.room.encrypted" and "body" not in stored["content"], stored
        ev = await receive_plaintext(a, room, eid_b, body_b)
        assert ev.sender == accounts["bob"].user_id

    loop.run_until_complete(go())


# --- 2. a second device gets the room key over to-device -------------------------------------


@pytest.mark.timeout(90)
def test_second_device_receives_room_key(server, accounts, devices, stores, encrypted_room, loop):
    a, b = devices["alice"], devices["bob"]
    room = encrypted_room
    alice_id = accounts["alice"].user_id

    async def go():
        bob_since = (await sync_once(b)).next_batch
        second = await login(server.url, "alice", PASSWORDS["alice"], device_name="alice phone")
        a2 = e2e_client(server.url, second, stores / "alice-2")
        devices["alice2"] = a2
        await sync_once(a2)
        await expect(await upload_keys(a2), KeysUploadResponse, "keys/upload of the second device")

        # Both the other user and alice's first device learn about the new device from
        # device_lists.changed in their incremental syncs, then query its keys.
        for c in (b, a):
            await sync_until(c, lambda r: alice_id in r.device_list.changed,
                             f"{alice_id} in device_lists.changed after a new device uploaded keys")
            query = await query_keys(c)
            assert query is not None, f"nio did not mark {alice_id} for a key query"
            assert second.device_id in query.device_keys.get(alice_id, {}), (
                f"keys/query by {c.user_id} lacks {second.device_id}: "
                f"{list(query.device_keys.get(alice_id, {}))}")

        # keys/changes between bob's two sync tokens names alice too.
        status, changes = await raw(server.url, "GET", "/_matrix/client/v3/keys/changes",
                                    accounts["bob"].access_token,
                                    query={"from": bob_since, "to": b.next_batch})
        assert status == 200 and alice_id in changes.get("changed", []), \
            f"GET /keys/changes?from={bob_since}&to={b.next_batch} -> HTTP {status}: {changes}"

        # bob's next message shares a new Megolm session with every device, alice's phone too.
        body = "bob to all of alice's devices"
        eid = await send_text(b, room, body)
        await receive_plaintext(a2, room, eid, body)
        await receive_plaintext(a, room, eid, body)

        # A delivered to-device message is gone once the device synced past it.
        again = await sync_once(a2)
        assert not again.to_device_events, \
            f"to-device messages delivered again: {[e.source for e in again.to_device_events]}"

        # alice's first device shares its session with her own phone.
        body = "alice's laptop to alice's phone"
        eid = await send_text(a, room, body)
        await receive_plaintext(a2, room, eid, body)
        await receive_plaintext(b, room, eid, body)

        # sendToDevice is idempotent per transaction id: the same txn twice arrives once.
        message = ToDeviceMessage("org.limbic.interop.ping", alice_id, second.device_id,
                                  {"n": 1})
        for _ in range(2):
            await expect(await b.to_device(message, tx_id="ping-txn-1"), ToDeviceResponse,
                         "PUT /sendToDevice/org.limbic.interop.ping/ping-txn-1")
        await expect(await b.to_device(ToDeviceMessage("org.limbic.interop.ping", alice_id,
                                                       second.device_id, {"n": 2}),
                                       tx_id="ping-txn-2"),
                     ToDeviceResponse, "PUT /sendToDevice/org.limbic.interop.ping/ping-txn-2")
        pings: list[int] = []

        def got_pings(r):
            pings.extend(e.source["content"]["n"] for e in r.to_device_events
                         if isinstance(e, UnknownToDeviceEvent)
                         and e.source.get("type") == "org.limbic.interop.ping")
            return 2 in pings

        await sync_until(a2, got_pings, "both pings")
        await sync_once(a2)  # one more: nothing may follow
        assert pings == [1, 2], f"to-device pings received: {pings} (expected [1, 2], in order)"

    loop.run_until_complete(go())


# --- 3. key backup round trip -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_key_backup_round_trip(server, accounts, devices, encrypted_room, loop):
    """The alice device's Megolm sessions of the room go to a backup encrypted to a fresh
    curve25519 key; read back and decrypted, one of them decrypts bob's message again."""
    a, b = devices["alice"], devices["bob"]
    room = encrypted_room
    token = accounts["alice"].access_token
    base = "/_matrix/client/v3/room_keys"
    url = server.url

    async def call(method, path, body=None, query=None, expect_status=200):
        status, resp = await raw(url, method, base + path, token, body, query)
        assert status == expect_status, \
            f"{method} {base}{path} {query or ''} -> HTTP {status} (expected {expect_status}): {resp}"
        return resp

    async def go():
        body_b = "a message to recover from the key backup"
        eid_b = await send_text(b, room, body_b)
        await receive_plaintext(a, room, eid_b, body_b)

        await call("GET", "/version", expect_status=404)  # no backup yet
        backup_key = vodozemac.PkDecryption()
        public_key = backup_key.public_key.to_base64()
        auth_data = {"public_key": public_key}
        version = (await call("POST", "/version",
                              {"algorithm": BACKUP_ALGORITHM, "auth_data": auth_data}))["version"]
        assert isinstance(version, str) and version
        info = await call("GET", "/version")
        assert info["version"] == version and info["algorithm"] == BACKUP_ALGORITHM, info
        assert info["auth_data"] == auth_data and info["count"] == 0, info
        assert info == await call("GET", f"/version/{q(version)}")
        etag0 = info["etag"]

        sessions = [s for s in a.olm.inbound_group_store if s.room_id == room]
        assert sessions, "alice holds no Megolm session for the room"
        encryptor = vodozemac.PkEncryption.from_key(vodozemac.Curve25519PublicKey.from_base64(public_key))
        uploaded = {}
        for s in sessions:
            plaintext = {
                "algorithm": MEGOLM,
                "sender_key": s.sender_key,
                "session_key": s.export_session(s.first_known_index),
                "sender_claimed_keys": {"ed25519": s.ed25519},
                "forwarding_curve25519_key_chain": [],
            }
            message = encryptor.encrypt(json.dumps(plaintext).encode())
            ciphertext, mac, ephemeral = (b64(message.ciphertext), b64(message.mac),
                                          b64(message.ephemeral_key))
            uploaded[s.id] = {
                "first_message_index": s.first_known_index,
                "forwarded_count": 0,
                "is_verified": False,
                "session_data": {"ephemeral": ephemeral, "ciphertext": ciphertext, "mac": mac},
            }
        put = await call("PUT", "/keys", {"rooms": {room: {"sessions": uploaded}}},
                         {"version": version})
        assert put["count"] == len(uploaded) and put["etag"] != etag0, put
        info = await call("GET", "/version")
        assert info["count"] == len(uploaded) and info["etag"] == put["etag"], info

        # All keys, one room's keys, one session's key: exactly what was uploaded.
        everything = await call("GET", "/keys", query={"version": version})
        assert everything == {"rooms": {room: {"sessions": uploaded}}}, everything
        in_room = await call("GET", f"/keys/{q(room)}", query={"version": version})
        assert in_room == {"sessions": uploaded}, in_room

        # Decrypt the backed-up keys and bob's message with them: the round trip kept them usable.
        event = await raw_event(url, token, room, eid_b)
        sid = event["content"]["session_id"]
        assert sid in uploaded, f"bob's session {sid} is not among alice's sessions"
        one = await call("GET", f"/keys/{q(room)}/{q(sid)}", query={"version": version})
        assert one == uploaded[sid], one
        sd = one["session_data"]
        exported = json.loads(backup_key.decrypt(
            vodozemac.Message.from_base64(sd["ciphertext"], sd["mac"], sd["ephemeral"])))
        inbound = vodozemac.InboundGroupSession.import_session(
            vodozemac.ExportedSessionKey(exported["session_key"]))
        decrypted = inbound.decrypt(vodozemac.MegolmMessage.from_base64(event["content"]["ciphertext"]))
        assert json.loads(decrypted.plaintext)["content"]["body"] == body_b

        # A worse copy (higher first_message_index) does not replace the stored key.
        worse = dict(uploaded[sid], first_message_index=uploaded[sid]["first_message_index"] + 5)
        await call("PUT", f"/keys/{q(room)}/{q(sid)}", worse, {"version": version})
        assert await call("GET", f"/keys/{q(room)}/{q(sid)}", query={"version": version}) == uploaded[sid]

        # A newer backup version becomes current; writing to the old one is refused.
        newer = (await call("POST", "/version",
                            {"algorithm": BACKUP_ALGORITHM, "auth_data": auth_data}))["version"]
        assert newer != version
        assert (await call("GET", "/version"))["version"] == newer
        refused = await call("PUT", "/keys", {"rooms": {room: {"sessions": uploaded}}},
                             {"version": version}, expect_status=403)
        assert refused.get("errcode") == "M_WRONG_ROOM_KEYS_VERSION", refused
        assert refused.get("current_version") == newer, refused
        await call("DELETE", f"/version/{q(newer)}")

        # Delete one session, then the version.
        deleted = await call("DELETE", f"/keys/{q(room)}/{q(sid)}", query={"version": version})
        assert deleted["count"] == len(uploaded) - 1, deleted
        gone = await call("GET", f"/keys/{q(room)}/{q(sid)}", query={"version": version},
                          expect_status=404)
        assert gone.get("errcode") == "M_NOT_FOUND", gone
        await call("DELETE", f"/version/{q(version)}")
        gone = await call("GET", f"/version/{q(version)}", expect_status=404)
        assert gone.get("errcode") == "M_NOT_FOUND", gone
        gone = await call("GET", "/version", expect_status=404)
        assert gone.get("errcode") == "M_NOT_FOUND", gone

    loop.run_until_complete(go())


# --- 4. media -----------------------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 255) // width, (y * 255) // height, 128)
                 for y in range(height) for x in range(width)])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.timeout(60)
def test_media_upload_download_thumbnail(server, accounts, devices, loop):
    b = devices["bob"]
    data = png(640, 480)

    async def go():
        resp, keys = await b.upload(io.BytesIO(data), content_type="image/png",
                                    filename="gradient.png", filesize=len(data))
        await expect(resp, UploadResponse, "POST /_matrix/media/v3/upload")
        assert keys is None
        mxc = resp.content_uri
        assert mxc.startswith(f"mxc://{server.server_name}/"), mxc
        server_name, media_id = mxc[len("mxc://"):].split("/", 1)

        # Authenticated download (nio uses /_matrix/client/v1/media/download).
        down = await b.download(mxc)
        await expect(down, DownloadResponse, f"download {mxc}")
        assert down.body == data
        assert down.content_type.split(";")[0] == "image/png", down.content_type
        assert down.filename == "gradient.png", down.filename

        # Another user can download it; a request without a token is refused on the
        # authenticated endpoint, and the legacy one does not serve new media (as Synapse
        # with enable_authenticated_media).
        path = f"/_matrix/client/v1/media/download/{server_name}/{media_id}"
        status, _, body = await raw_bytes(server.url, "GET", path, accounts["alice"].access_token)
        assert status == 200 and body == data, f"GET {path} as alice -> HTTP {status}"
        status, _, body = await raw_bytes(server.url, "GET", path)
        assert status == 401, f"GET {path} without a token -> HTTP {status}: {body[:200]!r}"
        assert json.loads(body).get("errcode") == "M_MISSING_TOKEN", body[:200]
        path = f"/_matrix/client/v1/media/download/{server_name}/{media_id}/other-name.png"
        status, headers, body = await raw_bytes(server.url, "GET", path, accounts["alice"].access_token)
        assert status == 200 and body == data, f"GET {path} -> HTTP {status}"
        assert "other-name.png" in headers.get("Content-Disposition", ""), headers
        path = f"/_matrix/media/v3/download/{server_name}/{media_id}"
        status, _, body = await raw_bytes(server.url, "GET", path)
        assert status == 404 and json.loads(body).get("errcode") == "M_NOT_FOUND", f"GET {path} -> HTTP {status}: {body[:200]!r}"

        # Thumbnails: scale keeps the aspect ratio, crop gives the requested aspect ratio.
        for width, height, method in ((320, 240, ResizingMethod.scale), (32, 32, ResizingMethod.crop),
                                      (96, 96, ResizingMethod.crop)):
            thumb = await b.thumbnail(server_name, media_id, width, height, method=method)
            await expect(thumb, ThumbnailResponse,
                         f"thumbnail {width}x{height} {method.value} of {mxc}")
            assert thumb.content_type.split(";")[0] in ("image/png", "image/jpeg"), thumb.content_type
            img = Image.open(io.BytesIO(thumb.body))
            w, h = img.size
            what = f"{method.value} {width}x{height} thumbnail of a 640x480 PNG is {w}x{h}"
            assert w <= 640 and h <= 480 and (w, h) != (640, 480), what
            assert w >= width or h >= height, what
            if method is ResizingMethod.scale:
                assert abs(w * 3 - h * 4) <= 4, what
            else:
                assert w == h and w >= width, what

        # Unknown media is M_NOT_FOUND.
        missing = await b.download(f"mxc://{server_name}/doesnotexist1234")
        assert not isinstance(missing, DownloadResponse), "download of unknown media succeeded"
        assert missing.status_code == "M_NOT_FOUND", missing

        # An encrypted attachment (as clients send in encrypted rooms) round-trips byte for byte.
        secret = b"session notes: " + bytes(range(256)) * 8
        resp, file_keys = await b.upload(io.BytesIO(secret), content_type="application/octet-stream",
                                         filename="notes.bin", encrypt=True, filesize=len(secret))
        await expect(resp, UploadResponse, "upload of an encrypted attachment")
        down = await b.download(resp.content_uri)
        await expect(down, DownloadResponse, f"download {resp.content_uri}")
        assert down.body != secret
        assert decrypt_attachment(down.body, file_keys["key"]["k"], file_keys["hashes"]["sha256"],
                                  file_keys["iv"]) == secret

    loop.run_until_complete(go())


# --- 5. edits, reactions, threads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_room(server, accounts, loop):
    """An unencrypted room (relations and push rules see the content) with alice and bob."""
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            created = await a.room_create(name="plain", preset=RoomPreset.private_chat,
                                          invite=[bob.user_id])
            await expect(created, RoomCreateResponse, "createRoom")
            await expect(await b.join(created.room_id), JoinResponse, "bob joins")
            return created.room_id

    return loop.run_until_complete(go())


@pytest.mark.timeout(60)
def test_edits_reactions_and_threads(server, accounts, plain_room, loop):
    alice, bob = accounts["alice"], accounts["bob"]
    room = plain_room

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            async def send(client, event_type, content, what):
                resp = await client.room_send(room, event_type, content)
                await expect(resp, RoomSendResponse, what)
                return resp.event_id

            original = await send(a, "m.room.message", {"msgtype": "m.text", "body": "see you at 10"},
                                  "original message")
            edit = await send(a, "m.room.message", {
                "msgtype": "m.text", "body": "* see you at 11",
                "m.new_content": {"msgtype": "m.text", "body": "see you at 11"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": original},
            }, "edit (m.replace)")
            # An "edit" by someone else is not a valid replacement and must not be bundled.
            await send(b, "m.room.message", {
                "msgtype": "m.text", "body": "* see you never",
                "m.new_content": {"msgtype": "m.text", "body": "see you never"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": original},
            }, "bob's invalid edit of alice's message")
            reactions = []
            for client, key in ((b, "👍"), (a, "👍"), (b, "❤️")):
                reactions.append(await send(client, "m.reaction", {
                    "m.relates_to": {"rel_type": "m.annotation", "event_id": original, "key": key},
                }, f"reaction {key}"))
            reply = await send(b, "m.room.message", {
                "msgtype": "m.text", "body": "in a thread",
                "m.relates_to": {"rel_type": "m.thread", "event_id": original},
            }, "thread reply")

            # The original, fetched again, carries the valid edit bundled (server-side aggregation).
            got = await expect(await b.room_get_event(room, original), RoomGetEventResponse,
                               f"GET /event/{original}")
            relations = got.event.source.get("unsigned", {}).get("m.relations", {})
            replace = relations.get("m.replace")
            assert replace is not None, f"no bundled m.replace: unsigned = {got.event.source.get('unsigned')}"
            assert replace.get("event_id") == edit, f"bundled m.replace is {replace}, expected {edit}"
            thread = relations.get("m.thread")
            assert thread is not None, f"no bundled m.thread: {relations}"
            assert thread.get("count") == 1 and thread.get("latest_event", {}).get("event_id") == reply, thread
            assert thread.get("current_user_participated") is True, thread  # bob replied

            # /messages bundles the same aggregations.
            status, page = await raw(server.url, "GET", f"/_matrix/client/v3/rooms/{q(room)}/messages",
                                     bob.access_token, query={"dir": "b", "limit": "20"})
            assert status == 200, f"GET /messages -> HTTP {status}: {page}"
            listed = [ev for ev in page["chunk"] if ev["event_id"] == original]
            assert listed, f"{original} not in the last 20 events of /messages"
            bundled = listed[0].get("unsigned", {}).get("m.relations", {})
            assert bundled.get("m.replace", {}).get("event_id") == edit, \
                f"/messages: bundled relations of {original} are {bundled}"

            # /relations, filtered by rel_type and by rel_type + event_type.
            base = f"/_matrix/client/v1/rooms/{q(room)}/relations/{q(original)}"

            async def ids(path, query=None):
                status, body = await raw(server.url, "GET", base + path, bob.access_token, query=query)
                assert status == 200, f"GET {base}{path} -> HTTP {status}: {body}"
                return [ev["event_id"] for ev in body["chunk"]], body

            annotations, body = await ids("/m.annotation")
            assert sorted(annotations) == sorted(reactions), body
            keyed, _ = await ids("/m.annotation/m.reaction")
            assert sorted(keyed) == sorted(reactions)
            none, _ = await ids("/m.annotation/m.room.message")
            assert none == []
            replaces, _ = await ids("/m.replace")
            assert edit in replaces
            everything, _ = await ids("", {"dir": "f"})
            assert set(reactions) | {edit, reply} <= set(everything), everything
            # Paginated one at a time, in order, without repeats.
            paged, token = [], None
            for _ in range(10):
                query = {"limit": "1", "dir": "f", **({"from": token} if token else {})}
                page, body = await ids("/m.annotation", query)
                assert len(page) <= 1, body
                paged += page
                token = body.get("next_batch")
                if not token:
                    break
            assert paged == reactions, f"paginated /relations/m.annotation: {paged}, sent {reactions}"

            # /threads lists the root.
            path = f"/_matrix/client/v1/rooms/{q(room)}/threads"
            status, body = await raw(server.url, "GET", path, alice.access_token)
            assert status == 200, f"GET {path} -> HTTP {status}: {body}"
            assert [ev["event_id"] for ev in body["chunk"]] == [original], body

    loop.run_until_complete(go())


# --- 6. notification counts -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_notification_counts_after_mentions(server, accounts, plain_room, loop):
    alice, bob = accounts["alice"], accounts["bob"]
    room = plain_room

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            # alice reads everything so far: her counts start at zero.
            first = await sync_once(a, limit=1)
            last = first.rooms.join[room].timeline.events[-1].event_id
            await expect(await a.update_receipt_marker(room, last), UpdateReceiptMarkerResponse,
                         "receipt/m.read")
            await sync_until(a, lambda r: room in r.rooms.join and
                             r.rooms.join[room].unread_notifications.notification_count == 0,
                             "notification_count 0 after the read receipt")

            sent = []
            for content in (
                {"msgtype": "m.text", "body": "just chatting"},
                {"msgtype": "m.text", "body": "hey, are you there?",  # intentional mention
                 "m.mentions": {"user_ids": [alice.user_id]}},
                {"msgtype": "m.text", "body": "still chatting"},
                # @room from bob, who lacks the power level for it (notifications.room = 50):
                # a notification, not a highlight.
                {"msgtype": "m.text", "body": "@room see above", "m.mentions": {"room": True}},
            ):
                resp = await b.room_send(room, "m.room.message", content)
                await expect(resp, RoomSendResponse, f"bob sends {content['body']!r}")
                sent.append(resp.event_id)
            # alice's own message is not a notification for her.
            await expect(await a.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "me"}),
                         RoomSendResponse, "alice's own message")

            def counts(r):
                info = r.rooms.join.get(room)
                if info is None:
                    return None
                n = info.unread_notifications
                got = (n.notification_count, n.highlight_count)
                counts.last = got
                return got if got[0] is not None and got[0] >= 4 else None

            counts.last = None
            try:
                got = await sync_until(a, counts, "4 notifications", deadline_s=10)
            except AssertionError:
                got = counts.last
            assert got == (4, 1), (
                f"alice's unread_notifications (notification_count, highlight_count) = {got}; "
                "expected (4, 1): 4 messages from bob in a 1:1 room, one mentioning her in m.mentions")


            # Reading up to bob's first message leaves 3 (the highlight among them); all, 0.
            await expect(await a.update_receipt_marker(room, sent[0]), UpdateReceiptMarkerResponse,
                         "receipt/m.read on the first message")
            got = await sync_until(a, lambda r: (room in r.rooms.join and
                                                 (r.rooms.join[room].unread_notifications.notification_count,
                                                  r.rooms.join[room].unread_notifications.highlight_count)),
                                   "new counts after a receipt")
            assert got == (3, 1), f"counts after reading the first of 4: {got}"
            await expect(await a.update_receipt_marker(room, sent[-1]), UpdateReceiptMarkerResponse,
                         "receipt/m.read on the last message")
            got = await sync_until(a, lambda r: (room in r.rooms.join and
                                                 (r.rooms.join[room].unread_notifications.notification_count,
                                                  r.rooms.join[room].unread_notifications.highlight_count)),
                                   "new counts after a receipt")
            assert got == (0, 0), f"counts after reading everything: {got}"

    loop.run_until_complete(go())


# --- 7. admin API ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_admin_api_refuses_non_admins(server, accounts, plain_room, loop):
    secret = server.config["registration"]["shared_secret"]
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        admin = await register_with_shared_secret(server.url, secret, "root", "root-password-1", admin=True)
        plain = await register_with_shared_secret(server.url, secret, "carol", "carol-password-1")

        # A nonce is good for one registration only.
        status, body = await raw(server.url, "GET", "/_synapse/admin/v1/register")
        assert status == 200, (status, body)
        nonce = body["nonce"]
        for attempt, (localpart, expected) in enumerate((("erin", 200), ("frank", 400))):
            status, resp = await raw(server.url, "POST", "/_synapse/admin/v1/register", body={
                "nonce": nonce, "username": localpart, "password": "pw-" + localpart, "admin": False,
                "mac": shared_secret_mac(secret, nonce, localpart, "pw-" + localpart, False)})
            assert status == expected, (f"POST /_synapse/admin/v1/register ({localpart}) with a nonce "
                                        f"used {attempt} time(s) before -> HTTP {status}: {resp}")

        status, body = await raw(server.url, "GET", "/_synapse/admin/v1/server_version", admin.access_token)
        assert status == 200 and isinstance(body.get("server_version"), str), \
            f"GET /_synapse/admin/v1/server_version as admin -> HTTP {status}: {body}"

        endpoints = [
            ("GET", "/_synapse/admin/v2/users", None),
            ("GET", f"/_synapse/admin/v2/users/{q(bob.user_id)}", None),
            ("GET", "/_synapse/admin/v1/rooms", None),
            ("GET", f"/_synapse/admin/v1/whois/{q(alice.user_id)}", None),  # (own whois may be allowed)
            ("PUT", f"/_synapse/admin/v2/users/{q('@dave:' + server.server_name)}", {"password": "dave-pw-1"}),
        ]
        # Non-admins (a registered user, one made with the shared secret as non-admin) are refused.
        for who in (bob, plain):
            for method, path, body in endpoints:
                status, resp = await raw(server.url, method, path, who.access_token, body)
                assert status == 403 and isinstance(resp, dict) and resp.get("errcode") == "M_FORBIDDEN", \
                    f"{method} {path} as non-admin {who.user_id} -> HTTP {status}: {resp} (expected 403 M_FORBIDDEN)"
        # Without a token: 401.
        status, resp = await raw(server.url, "GET", "/_synapse/admin/v2/users")
        assert status == 401 and resp.get("errcode") == "M_MISSING_TOKEN", (status, resp)

        # The admin is served.
        status, users = await raw(server.url, "GET", "/_synapse/admin/v2/users", admin.access_token,
                                  query={"limit": "100"})
        assert status == 200, f"GET /_synapse/admin/v2/users as admin -> HTTP {status}: {users}"
        names = {u["name"] for u in users["users"]}
        assert {bob.user_id, admin.user_id, plain.user_id, alice.user_id} <= names, names
        assert users.get("total", len(users["users"])) >= 4, users
        admins = {u["name"]: u.get("admin") for u in users["users"]}
        assert admins[admin.user_id] in (True, 1) and admins[bob.user_id] in (False, 0, None), admins

        status, user = await raw(server.url, "GET", f"/_synapse/admin/v2/users/{q(bob.user_id)}",
                                 admin.access_token)
        assert status == 200 and user.get("name") == bob.user_id, (status, user)
        assert user.get("deactivated") in (False, 0), user

        status, rooms = await raw(server.url, "GET", "/_synapse/admin/v1/rooms", admin.access_token)
        assert status == 200 and plain_room in {r["room_id"] for r in rooms["rooms"]}, (status, rooms)

        # Creating a user through the admin API: 201, then dave can log in.
        status, resp = await raw(server.url, "PUT", f"/_synapse/admin/v2/users/{q('@dave:' + server.server_name)}",
                                 admin.access_token, {"password": "dave-pw-1", "displayname": "Dave"})
        assert status == 201, f"PUT /_synapse/admin/v2/users/@dave (new user) -> HTTP {status}: {resp}"
        dave = await login(server.url, "dave", "dave-pw-1")
        assert dave.user_id == f"@dave:{server.server_name}"

    loop.run_until_complete(go())
