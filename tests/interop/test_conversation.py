"""Two matrix-nio users talk through a real limbic server.

Registration, room creation, invites and joins, 1,000 messages in both directions,
history pagination both ways, typing, read receipts, redaction, kick, ban, knocking,
and finally a server restart on the same store after which everything is still there.

The tests of this module share one server and run in file order; the restart test
is last on purpose.
"""

from __future__ import annotations

import pytest
from nio import (
    FullyReadEvent,
    JoinedMembersResponse,
    JoinResponse,
    MessageDirection,
    ReceiptEvent,
    RoomContextResponse,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomGetStateEventResponse,
    RoomInviteResponse,
    RoomKnockResponse,
    RoomPreset,
    RoomReadMarkersResponse,
    RoomRedactResponse,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
    TypingNoticeEvent,
    UpdateReceiptMarkerResponse,
    WhoamiResponse,
)
from nio.responses import RoomBanResponse, RoomKickResponse

from mx import (
    SEQ_KEY,
    expect,
    expect_error,
    full_history,
    login,
    paginate,
    raw,
    register,
    run,
    seq_messages,
    session,
    sync_once,
    sync_until,
    timeline_sources,
)

MESSAGES = 1000
PASSWORDS = {"alice": "alice-interop-password-1", "bob": "bob-interop-password-2"}

# What earlier tests leave for the restart test to check again.
STATE: dict = {}


def text(i: int, sender: str) -> dict:
    return {"msgtype": "m.text", "body": f"message {i} from {sender}", SEQ_KEY: i}


def member_events(sources: list[dict], user_id: str, membership: str) -> list[dict]:
    return [
        ev for ev in sources
        if ev.get("type") == "m.room.member" and ev.get("state_key") == user_id
        and (ev.get("content") or {}).get("membership") == membership
    ]


async def membership_of(client, room_id: str, user_id: str) -> dict:
    resp = await client.room_get_state_event(room_id, "m.room.member", user_id)
    await expect(resp, RoomGetStateEventResponse, f"GET m.room.member/{user_id} in {room_id}")
    return resp.content


# --- shared fixtures -------------------------------------------------------------


@pytest.fixture(scope="module")
def accounts(server):
    async def go():
        return {name: await register(server.url, name, pw) for name, pw in PASSWORDS.items()}

    return run(go())


@pytest.fixture(scope="module")
def room(server, accounts):
    """A private room created by alice; bob is invited and joins."""
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            created = await a.room_create(name="interop", topic="nio interop test",
                                          preset=RoomPreset.private_chat)
            await expect(created, RoomCreateResponse, "createRoom")
            room_id = created.room_id
            await sync_once(b)
            await expect(await a.room_invite(room_id, bob.user_id), RoomInviteResponse,
                         f"invite bob to {room_id}")
            await sync_until(b, lambda r: room_id in r.rooms.invite, f"the invite to {room_id}")
            await expect(await b.join(room_id), JoinResponse, f"bob joins {room_id}")
            members = await a.joined_members(room_id)
            await expect(members, JoinedMembersResponse, "joined_members")
            assert {m.user_id for m in members.members} == {alice.user_id, bob.user_id}
            return room_id

    return run(go())


@pytest.fixture(scope="module")
def history(server, accounts, room):
    """1,000 messages, alternating alice -> bob and bob -> alice. Returns the acks in order."""
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            before = await sync_once(b, limit=1)
            acks = []  # (seq, event_id, sender)
            for i in range(MESSAGES):
                client, name = (a, "alice") if i % 2 == 0 else (b, "bob")
                resp = await client.room_send(room, "m.room.message", text(i, name))
                await expect(resp, RoomSendResponse, f"message {i} from {name}")
                acks.append((i, resp.event_id, client.user_id))
            return {"acks": acks, "bob_since": before.next_batch}

    return run(go())


# --- tests -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_register_whoami_and_password_login(server, accounts):
    async def go():
        for name, acc in accounts.items():
            assert acc.user_id == f"@{name}:{server.server_name}"
            assert acc.access_token and acc.device_id
            async with session(server.url, acc) as c:
                who = await expect(await c.whoami(), WhoamiResponse, f"whoami {name}")
                assert who.user_id == acc.user_id
            again = await login(server.url, name, acc.password, device_name="second device")
            assert again.user_id == acc.user_id and again.device_id != acc.device_id
        # A wrong password is refused.
        status, body = await raw(server.url, "POST", "/_matrix/client/v3/login", body={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"},
            "password": "not the password",
        })
        assert status == 403 and body.get("errcode") == "M_FORBIDDEN", (status, body)

    run(go())


@pytest.mark.timeout(60)
def test_create_invite_join(server, accounts, room):
    async def go():
        async with session(server.url, accounts["bob"]) as b:
            resp = await sync_once(b, limit=15)
            assert room in resp.rooms.join
            content = await membership_of(b, room, accounts["bob"].user_id)
            assert content["membership"] == "join"

    run(go())


@pytest.mark.timeout(180)
def test_exchange_1000_messages(server, accounts, room, history):
    acks = history["acks"]
    assert len(acks) == MESSAGES
    assert len({eid for _, eid, _ in acks}) == MESSAGES, "event ids are not unique"

    async def go():
        async with session(server.url, accounts["bob"]) as b:
            # An incremental sync over the 1,000 messages is limited and ends with the last one.
            resp = await b.sync(timeout=0, since=history["bob_since"],
                                sync_filter={"room": {"timeline": {"limit": 5}}})
            await expect(resp, SyncResponse, "incremental sync over the 1,000 messages")
            room_info = resp.rooms.join.get(room)
            assert room_info is not None, "the room is missing from bob's incremental sync"
            assert room_info.timeline.limited is True
            assert room_info.timeline.prev_batch
            got = seq_messages([ev.source for ev in room_info.timeline.events])
            assert got == [(s, e) for s, e, _ in acks[-5:]]

    run(go())


@pytest.mark.timeout(120)
def test_paginate_history_both_ways(server, accounts, room, history):
    expected = [(s, e) for s, e, _ in history["acks"]]

    async def go():
        async with session(server.url, accounts["bob"]) as b:
            resp = await sync_once(b, limit=20)
            timeline = resp.rooms.join[room].timeline
            assert timeline.prev_batch, "sync timeline has no prev_batch"
            recent = [ev.source for ev in timeline.events]

            # Backwards from the sync's prev_batch to the start of the room.
            back, last_end, last_page_had_end = await paginate(
                b, room, timeline.prev_batch, MessageDirection.back, limit=50)
            seen = seq_messages(list(reversed(back)) + recent)
            assert len(seen) == len(set(seen)), "some message was returned twice going backwards"
            assert seen == expected, "backwards pagination lost or reordered messages"

            # The start of the room is the create event.
            assert back[-1]["type"] == "m.room.create", back[-1]

            # Then forwards again from the end token backward pagination stopped at
            # (or, if its last page had no `end`, from the start of the room).
            start = last_end if last_page_had_end else None
            fwd, _, _ = await paginate(b, room, start, MessageDirection.front, limit=50)
            seen_fwd = seq_messages(fwd)
            assert seen_fwd == expected, "forwards pagination lost or reordered messages"

    run(go())


@pytest.mark.timeout(60)
def test_typing_notifications(server, accounts, room):
    alice, bob = accounts["alice"], accounts["bob"]

    def typing_users(resp):
        info = resp.rooms.join.get(room)
        for ev in (info.ephemeral if info else []):
            if isinstance(ev, TypingNoticeEvent):
                return {"users": ev.users}
        return None

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            await sync_once(b, limit=1)
            await expect(await a.room_typing(room, True, timeout=30000), RoomTypingResponse,
                         "alice starts typing")
            await sync_until(b, lambda r: (t := typing_users(r)) and alice.user_id in t["users"],
                             "alice typing")
            await expect(await a.room_typing(room, False), RoomTypingResponse, "alice stops typing")
            await sync_until(b, lambda r: (t := typing_users(r)) is not None
                             and alice.user_id not in t["users"], "alice no longer typing")

    run(go())


@pytest.mark.timeout(60)
def test_read_receipts(server, accounts, room, history):
    alice, bob = accounts["alice"], accounts["bob"]
    last_from_bob = next(e for _, e, s in reversed(history["acks"]) if s == bob.user_id)
    last_from_alice = next(e for _, e, s in reversed(history["acks"]) if s == alice.user_id)

    def receipt(resp, user_id, event_id):
        info = resp.rooms.join.get(room)
        for ev in (info.ephemeral if info else []):
            if isinstance(ev, ReceiptEvent):
                for r in ev.receipts:
                    if r.user_id == user_id and r.event_id == event_id and r.receipt_type == "m.read":
                        return r
        return None

    def fully_read(resp):
        info = resp.rooms.join.get(room)
        for ev in (info.account_data if info else []):
            if isinstance(ev, FullyReadEvent) and ev.event_id == last_from_bob:
                return ev
        return None

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            await sync_once(a, limit=1)
            await sync_once(b, limit=1)
            # alice: read markers (m.fully_read + m.read) on bob's last message.
            await expect(await a.room_read_markers(room, last_from_bob, read_event=last_from_bob),
                         RoomReadMarkersResponse, "alice POST read_markers")
            await sync_until(b, lambda r: receipt(r, alice.user_id, last_from_bob),
                             "alice's m.read receipt")
            await sync_until(a, fully_read, "alice's m.fully_read room account data")
            # bob: a plain receipt on alice's last message.
            await expect(await b.update_receipt_marker(room, last_from_alice),
                         UpdateReceiptMarkerResponse, "bob POST receipt/m.read")
            await sync_until(a, lambda r: receipt(r, bob.user_id, last_from_alice),
                             "bob's m.read receipt")

    run(go())


@pytest.mark.timeout(60)
def test_redaction(server, accounts, room):
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            await sync_once(b, limit=1)
            sent = await a.room_send(room, "m.room.message",
                                     {"msgtype": "m.text", "body": "this will be redacted"})
            await expect(sent, RoomSendResponse, "send the message to redact")
            eid = sent.event_id
            red = await a.room_redact(room, eid, reason="interop redaction")
            await expect(red, RoomRedactResponse, f"redact {eid}")

            def saw_redaction(resp):
                for ev in timeline_sources(resp, room):
                    if ev.get("type") == "m.room.redaction" and eid in (
                            ev.get("redacts"), (ev.get("content") or {}).get("redacts")):
                        return ev
                return None

            redaction = await sync_until(b, saw_redaction, f"the redaction of {eid}")
            assert redaction["event_id"] == red.event_id
            # Clients before room v11 (nio among them) read the top-level `redacts`.
            assert redaction.get("redacts") == eid, f"no top-level redacts: {redaction}"

            got = await b.room_get_event(room, eid)
            await expect(got, RoomGetEventResponse, f"GET event {eid}")
            assert got.event.source["content"] == {}, got.event.source
            assert got.event.source["type"] == "m.room.message"
            assert got.event.source["sender"] == alice.user_id

            ctx = await b.room_context(room, eid, limit=2)
            await expect(ctx, RoomContextResponse, f"GET context/{eid}")
            assert ctx.event.source["event_id"] == eid
            assert ctx.event.source["content"] == {}, ctx.event.source

            page = await b.room_messages(room, start=b.next_batch, direction=MessageDirection.back,
                                         limit=10)
            in_page = [ev.source for ev in page.chunk if ev.source.get("event_id") == eid]
            assert in_page, f"{eid} not in the last 10 events of /messages"
            assert in_page[0]["content"] == {}, in_page[0]
            STATE["redacted"] = eid

    run(go())


@pytest.mark.timeout(60)
def test_kick_and_ban(server, accounts):
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            created = await a.room_create(name="public", preset=RoomPreset.public_chat)
            await expect(created, RoomCreateResponse, "createRoom (public_chat)")
            rid = created.room_id
            await expect(await b.join(rid), JoinResponse, "bob joins the public room")
            await sync_once(b, limit=1)

            # Kick: bob is out, cannot send, and (not being banned) may join again.
            await expect(await a.room_kick(rid, bob.user_id, reason="kick test"),
                         RoomKickResponse, "kick bob")
            member = await membership_of(a, rid, bob.user_id)
            assert member["membership"] == "leave" and member.get("reason") == "kick test", member
            await sync_until(b, lambda r: rid in r.rooms.leave, "the kick (rooms.leave)")
            await expect_error(await b.room_send(rid, "m.room.message",
                                                 {"msgtype": "m.text", "body": "after kick"}),
                               "bob sends after being kicked", "M_FORBIDDEN")
            await expect(await b.join(rid), JoinResponse, "bob rejoins after a kick")

            # Ban: bob is out and cannot come back.
            await expect(await a.room_ban(rid, bob.user_id, reason="ban test"),
                         RoomBanResponse, "ban bob")
            member = await membership_of(a, rid, bob.user_id)
            assert member["membership"] == "ban", member
            await expect_error(await b.join(rid), "banned bob joins", status=403)
            await expect_error(await b.room_send(rid, "m.room.message",
                                                 {"msgtype": "m.text", "body": "after ban"}),
                               "banned bob sends", "M_FORBIDDEN")
            STATE["ban_room"] = rid

    run(go())


@pytest.mark.timeout(60)
def test_knock_and_admit(server, accounts):
    alice, bob = accounts["alice"], accounts["bob"]

    async def go():
        async with session(server.url, alice) as a, session(server.url, bob) as b:
            created = await a.room_create(
                name="waiting room",
                preset=RoomPreset.private_chat,
                initial_state=[{"type": "m.room.join_rules", "state_key": "",
                                "content": {"join_rule": "knock"}}],
            )
            await expect(created, RoomCreateResponse, "createRoom with join_rule knock")
            rid = created.room_id
            rules = await a.room_get_state_event(rid, "m.room.join_rules")
            await expect(rules, RoomGetStateEventResponse, "GET m.room.join_rules")
            assert rules.content["join_rule"] == "knock"
            await sync_once(a, limit=1)

            await expect_error(await b.join(rid), "bob joins a knock room uninvited", status=403)
            knocked = await b.room_knock(rid, reason="let me in")
            await expect(knocked, RoomKnockResponse, f"POST /knock/{rid}")
            assert knocked.room_id == rid

            knock = await sync_until(
                a, lambda r: member_events(timeline_sources(r, rid), bob.user_id, "knock"),
                "bob's knock in the timeline")
            assert knock[0]["content"].get("reason") == "let me in", knock[0]

            await sync_once(b, limit=1)
            await expect(await a.room_invite(rid, bob.user_id), RoomInviteResponse, "admit bob")
            await sync_until(b, lambda r: rid in r.rooms.invite, "the invite after knocking")
            await expect(await b.join(rid), JoinResponse, "bob joins after being admitted")
            await sync_until(a, lambda r: member_events(timeline_sources(r, rid), bob.user_id, "join"),
                             "bob's join")
            STATE["knock_room"] = rid

    run(go())


@pytest.mark.timeout(150)
def test_everything_survives_restart(server, accounts, room, history):
    expected = [(s, e) for s, e, _ in history["acks"]]
    server.restart()

    async def go():
        a_acc = await login(server.url, "alice", PASSWORDS["alice"], "after restart")
        b_acc = await login(server.url, "bob", PASSWORDS["bob"], "after restart")
        assert a_acc.user_id == accounts["alice"].user_id
        assert b_acc.user_id == accounts["bob"].user_id
        async with session(server.url, a_acc) as a, session(server.url, b_acc) as b:
            members = await a.joined_members(room)
            await expect(members, JoinedMembersResponse, "joined_members after restart")
            assert {m.user_id for m in members.members} == {a_acc.user_id, b_acc.user_id}

            resp = await sync_once(b, limit=3)
            assert room in resp.rooms.join, "the room is missing from bob's sync after restart"
            events = await full_history(b, room)
            assert seq_messages(events) == expected, "messages lost or reordered by the restart"

            if "redacted" in STATE:
                got = await b.room_get_event(room, STATE["redacted"])
                await expect(got, RoomGetEventResponse, "GET the redacted event after restart")
                assert got.event.source["content"] == {}
            if "ban_room" in STATE:
                await expect_error(await b.join(STATE["ban_room"]),
                                   "banned bob joins after restart", status=403)
            if "knock_room" in STATE:
                member = await membership_of(a, STATE["knock_room"], b_acc.user_id)
                assert member["membership"] == "join"

            # The server goes on working.
            sent = await b.room_send(room, "m.room.message",
                                     {"msgtype": "m.text", "body": "after restart"})
            await expect(sent, RoomSendResponse, "send after restart")

    run(go())


@pytest.mark.timeout(30)
def test_access_tokens_survive_restart(server, accounts):
    async def go():
        for name, acc in accounts.items():
            async with session(server.url, acc) as c:
                who = await c.whoami()
                await expect(who, WhoamiResponse, f"whoami with {name}'s pre-restart token")
                assert who.user_id == acc.user_id

    run(go())
