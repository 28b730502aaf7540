"""kill -9 while two clients send: nothing that was acknowledged is lost.

Two matrix-nio clients send messages concurrently (one asyncio task each, one send
at a time per client). Once both have a few dozen acknowledged sends, the server is
killed with SIGKILL mid-stream. After a restart on the same store every event id
that was answered with 200 must be in /messages, each sender's in the order it got
them, and the server must take new messages. Done twice, so the store that came back
from one crash also survives the next. With INTEROP_CLUSTER=1 the server is two nodes on one
PostgreSQL database, both killed.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from nio import JoinResponse, RoomCreateResponse, RoomPreset, RoomSendResponse

from conftest import CLUSTER
from mx import SEQ_KEY, expect, explain, full_history, login, register, run, session

# scripts/test runs the media modules one after the other, beside the others: the SFU's
# bandwidth estimate takes a busy machine's delays for congestion.
pytestmark = pytest.mark.media

ACKS_BEFORE_KILL = 150
ROUNDS = 2
PASSWORDS = {"carol": "carol-crash-password-1", "dave": "dave-crash-password-2"}


async def send_until_killed(client, room_id: str, name: str, acked: list[str], round_no: int) -> str:
    """Send in a loop; record each acknowledged event id. Returns why it stopped."""
    for i in range(20000):
        content = {"msgtype": "m.text", "body": f"{name} round {round_no} #{i}",
                   SEQ_KEY: i, "round": round_no}
        try:
            resp = await client.room_send(room_id, "m.room.message", content)
        except Exception as e:  # the server died under us: what we expect
            return f"connection: {type(e).__name__}"
        if not isinstance(resp, RoomSendResponse):
            gone = getattr(resp, "transport_response", None)
            if CLUSTER and gone is not None and gone.status == 502:
                # The proxy in front of two nodes answers for a node it cannot reach.
                return f"connection: {await explain(resp)}"
            return f"error: {await explain(resp)}"
        acked.append(resp.event_id)
    return "never killed"


@pytest.mark.timeout(150)
def test_acknowledged_sends_survive_kill_9(server):
    async def prepare():
        accounts = {n: await register(server.url, n, pw) for n, pw in PASSWORDS.items()}
        async with session(server.url, accounts["carol"]) as c, \
                session(server.url, accounts["dave"]) as d:
            created = await c.room_create(name="crash", preset=RoomPreset.public_chat)
            await expect(created, RoomCreateResponse, "createRoom")
            await expect(await d.join(created.room_id), JoinResponse, "dave joins")
        return accounts, created.room_id

    _, room_id = run(prepare())
    all_acked: dict[str, list[str]] = {"carol": [], "dave": []}

    for round_no in range(ROUNDS):
        async def storm():
            # Fresh logins each round: the crash test is about messages, not sessions.
            accs = {n: await login(server.url, n, pw, f"crash round {round_no}")
                    for n, pw in PASSWORDS.items()}
            async with session(server.url, accs["carol"], retries=0) as c, \
                    session(server.url, accs["dave"], retries=0) as d:
                acked = {"carol": [], "dave": []}
                tasks = [
                    asyncio.create_task(send_until_killed(c, room_id, "carol", acked["carol"], round_no)),
                    asyncio.create_task(send_until_killed(d, room_id, "dave", acked["dave"], round_no)),
                ]
                deadline = time.monotonic() + 60
                while min(len(v) for v in acked.values()) < ACKS_BEFORE_KILL:
                    done = [t.result() for t in tasks if t.done()]
                    assert not done, f"a sender stopped before the kill: {done}"
                    assert time.monotonic() < deadline, f"too slow: {[len(v) for v in acked.values()]} acks in 60 s"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(random.uniform(0, 0.02))  # land the kill mid-request
                server.kill()
                reasons = await asyncio.gather(*tasks)
                for reason in reasons:
                    assert reason.startswith("connection:"), f"a sender stopped for another reason: {reason}"
                return acked

        acked = run(storm())
        for name in acked:
            all_acked[name] += acked[name]

        server.start()

        async def verify():
            acc = await login(server.url, "dave", PASSWORDS["dave"], f"verify round {round_no}")
            async with session(server.url, acc) as d:
                events = await full_history(d, room_id)
                ids = [ev["event_id"] for ev in events]
                assert len(ids) == len(set(ids)), "/messages returned an event twice"
                position = {eid: i for i, eid in enumerate(ids)}
                for name, acked_ids in all_acked.items():
                    missing = [eid for eid in acked_ids if eid not in position]
                    assert not missing, (
                        f"round {round_no}: {len(missing)} of {len(acked_ids)} acknowledged sends "
                        f"of {name} are gone after kill -9, first {missing[:3]}")
                    order = [position[eid] for eid in acked_ids]
                    assert order == sorted(order), f"{name}'s acknowledged messages are out of order"

                # The server takes new messages, and they land at the end of the timeline.
                sent = await d.room_send(room_id, "m.room.message",
                                         {"msgtype": "m.text", "body": f"alive after round {round_no}"})
                await expect(sent, RoomSendResponse, "send after the crash")
                events = await full_history(d, room_id)
                assert events[-1]["event_id"] == sent.event_id

        run(verify())

    assert all(len(v) >= ROUNDS * ACKS_BEFORE_KILL for v in all_acked.values())


def test_a_recording_cut_by_kill_9_is_stored_at_restart(server):
    """A session's call is being recorded (a client's tone and video, LiveKit's SDK) when the
    server is killed with SIGKILL: at the next start the recording is stored as far as it was
    written (at most the last second lost), announced, and `org.limbic.recording` says it
    ended with the server."""
    from urllib.parse import quote

    from livekit import rtc

    from call_media import http
    from test_calls import decoded_audio, decoded_video, download, recording_call, recording_state

    recorded_for = 4.0

    async def record_until_killed():
        therapist_room, client_room = rtc.Room(), rtc.Room()
        stop = asyncio.Event()
        try:
            room_id, therapist, client = await recording_call(server, therapist_room, client_room, stop)
            await asyncio.sleep(recorded_for)
            server.kill()
        finally:
            stop.set()
            for room in (client_room, therapist_room):
                await room.disconnect()
        return room_id, therapist, client

    room_id, therapist, client = run(record_until_killed())
    server.start()
    state = recording_state(server.url, client, room_id)
    assert state.get("recording") is False and "server stopped" in state.get("stopped_because", ""), state
    status, listed = http(server.url, "GET", f"/_limbic/client/v1/sessions/{quote(room_id, safe='')}/recordings", therapist.access_token)
    assert status == 200, (status, listed)
    audio = [r for r in listed["recordings"] if r["kind"] == "m.audio" and r["owner"] == client.user_id]
    video = [r for r in listed["recordings"] if r["kind"] == "m.video" and r["owner"] == client.user_id]
    assert len(audio) == 1 and len(video) == 1, listed
    seconds, peak = decoded_audio(download(server.url, therapist, audio[0]["url"]))
    assert recorded_for - 1.5 <= seconds <= recorded_for + 0.5 and peak > 0.1, f"{seconds:.2f} s (peak {peak}) of a {recorded_for} s recording"
    frames, video_seconds, width = decoded_video(download(server.url, therapist, video[0]["url"]))
    assert frames >= 20 and width > 0 and video_seconds >= recorded_for - 2, f"{frames} frames, {video_seconds:.2f} s, width {width}"
