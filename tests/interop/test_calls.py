"""Calls through Limbic's built-in SFU with LiveKit's Python SDK (PyPI `livekit`, whose WebRTC
engine is LiveKit's Rust SDK with libwebrtc, bundled in the wheel): the SDK fetches nothing but
a token from Limbic's call-token service (spec/calls.md) and joins with it, unmodified.

1. Two members of a room join its call: one publishes a synthetic tone, the other subscribes
   automatically and receives audio frames carrying it; a mute reaches the listener as a muted
   track; leaving reaches them as a disconnected participant.
2. Three in a call: one publishes a tone and simulcast video, both others receive both; one of
   them gets the low layer after asking for low quality and a higher one back after asking for
   it, and no frames once it unsubscribes, while the third's video goes on.
3. Screen share: a second video track (not simulcast) beside the camera, each received as its
   own track with its source; stopping the share removes it and the camera goes on.
4. Dynacast: with nobody watching a simulcast layer, its publisher (the SDK with dynacast on) is
   told to pause it, and the bytes it sends into the SFU drop; a layer wanted again comes back.
   A screen share sent as one layer stops when nobody watches it and comes back when somebody
   does.
5. In a therapy session, the therapist (a moderator by role) mutes a client's microphone and
   then removes the client from the call, through LiveKit's RoomService API; a client may do
   neither.
6. A recording in a session that allows it: refused until everyone in the call consented, then
   started by the therapist (both SDKs show the call recorded), stopped, and stored as an Ogg/Opus file PyAV decodes to the tone
   and an IVF file it decodes to VP8 frames, each for as long as it ran; a client withdrawing consent stops the next one at once.
7. Data packets (LiveKit's `publish_data`) reach the others, with their sender, or only those
   they name.
8. Completing the session ends its call, and no new call token is given for it.
9. Signalling refuses a forged call token before any media.

The module uses conftest's per-module `server`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import secrets
import urllib.error
import urllib.request
from urllib.parse import quote

import numpy as np
import pytest
from livekit import rtc

from call_media import HEIGHT, WIDTH, Member, call_token, http, loud_frames, member, publish_tone, publish_video, shared_room, two_in_a_call, until
from mx import register_with_shared_secret, run

# scripts/test runs the media modules one after the other, beside the others: the SFU's
# bandwidth estimate takes a busy machine's delays for congestion.
pytestmark = pytest.mark.media


def options() -> rtc.RoomOptions:
    return rtc.RoomOptions(auto_subscribe=True, connect_timeout=20)


def test_a_tone_published_by_one_member_reaches_the_other(server):
    async def scenario():
        url, ana_token, ben_token, _ = await two_in_a_call(server.url)
        publisher, listener = rtc.Room(), rtc.Room()
        subscribed: asyncio.Future = asyncio.get_running_loop().create_future()
        events: list[str] = []

        @listener.on("track_subscribed")
        def on_subscribed(track, publication, participant):
            if track.kind == rtc.TrackKind.KIND_AUDIO and not subscribed.done():
                subscribed.set_result((track, publication, participant))

        @listener.on("track_muted")
        def on_muted(participant, publication):
            events.append(f"muted {participant.identity}")

        @listener.on("participant_disconnected")
        def on_left(participant):
            events.append(f"left {participant.identity}")

        @listener.on("active_speakers_changed")
        def on_speakers(speakers):
            events.extend(f"speaking {p.identity}" for p in speakers)

        stop = asyncio.Event()
        try:
            await publisher.connect(url, ana_token, options())
            await listener.connect(url, ben_token, options())
            publication = await publish_tone(publisher, stop)
            track, _, participant = await asyncio.wait_for(subscribed, 20)
            assert participant.identity == publisher.local_participant.identity
            loud = await loud_frames(track, 50, 20)
            assert loud >= 50, f"the listener got {loud} frames of the tone"
            for _ in range(50):
                if f"speaking {participant.identity}" in events:
                    break
                await asyncio.sleep(0.1)
            assert f"speaking {participant.identity}" in events, events

            publication.track.mute()
            for _ in range(100):
                if f"muted {participant.identity}" in events:
                    break
                await asyncio.sleep(0.1)
            assert f"muted {participant.identity}" in events, events

            stop.set()
            await publisher.disconnect()
            for _ in range(100):
                if f"left {participant.identity}" in events:
                    break
                await asyncio.sleep(0.1)
            assert f"left {participant.identity}" in events, events
        finally:
            stop.set()
            await publisher.disconnect()
            await listener.disconnect()
    run(scenario())


def test_an_unpublished_track_is_gone_for_the_others(server):
    async def scenario():
        url, ana_token, ben_token, _ = await two_in_a_call(server.url)
        publisher, listener = rtc.Room(), rtc.Room()
        subscribed: asyncio.Future = asyncio.get_running_loop().create_future()
        unpublished: asyncio.Future = asyncio.get_running_loop().create_future()
        listener.on("track_subscribed", lambda track, publication, participant: subscribed.done() or subscribed.set_result(publication.sid))
        listener.on("track_unpublished", lambda publication, participant: unpublished.done() or unpublished.set_result(publication.sid))
        stop = asyncio.Event()
        try:
            await publisher.connect(url, ana_token, options())
            await listener.connect(url, ben_token, options())
            publication = await publish_tone(publisher, stop)
            assert await asyncio.wait_for(subscribed, 20) == publication.sid
            stop.set()
            await publisher.local_participant.unpublish_track(publication.sid)
            assert await asyncio.wait_for(unpublished, 20) == publication.sid
            assert not listener.remote_participants[publisher.local_participant.identity].track_publications
        finally:
            stop.set()
            await publisher.disconnect()
            await listener.disconnect()
    run(scenario())


def test_simulcast_video_switches_layers_and_stops_when_unsubscribed(server):
    """Three in a call: Ana publishes a tone and simulcast video; Ben and Cara both get both.
    Ben switches layers and unsubscribes; Cara's video goes on meanwhile."""
    async def scenario():
        room_id, (ana, ben, cara) = await shared_room(server.url, ["ana", "ben", "cara"])
        tokens = [call_token(server.url, who, room_id) for who in (ana, ben, cara)]
        url = tokens[0][0]
        publisher, viewer, other = rtc.Room(), rtc.Room(), rtc.Room()
        widths: list[int] = []
        other_frames: list[int] = []
        subscribed: asyncio.Future = asyncio.get_running_loop().create_future()
        other_tracks: dict[str, rtc.Track] = {}
        unsubscribed: list[str] = []

        @viewer.on("track_subscribed")
        def on_subscribed(track, publication, participant):
            if track.kind == rtc.TrackKind.KIND_VIDEO and not subscribed.done():
                subscribed.set_result((track, publication))

        @viewer.on("track_unsubscribed")
        def on_unsubscribed(track, publication, participant):
            unsubscribed.append(publication.sid)

        @other.on("track_subscribed")
        def on_other(track, publication, participant):
            other_tracks["video" if track.kind == rtc.TrackKind.KIND_VIDEO else "audio"] = track

        async def watch(track, into):
            async for event in rtc.VideoStream(track):
                into.append(event.frame.width)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            for room, (_, token) in zip((publisher, viewer, other), tokens):
                await room.connect(url, token, options())
            await publish_tone(publisher, stop)
            await publish_video(publisher, stop)
            track, publication = await asyncio.wait_for(subscribed, 20)
            assert publication.simulcasted, "the SFU announced the track as simulcast"
            watcher = loop.create_task(watch(track, widths))
            await until("Cara subscribed to both tracks", lambda: len(other_tracks) == 2)
            other_watcher = loop.create_task(watch(other_tracks["video"], other_frames))
            assert await loud_frames(other_tracks["audio"], 30, 15) >= 30, "Cara hears the tone"
            await until("20 decoded frames each", lambda: len(widths) >= 20 and len(other_frames) >= 20)
            widest = max(widths)

            publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_LOW)
            mark = len(widths)
            await until(f"the low layer (frames narrower than {widest})", lambda: any(w < widest for w in widths[mark:]) and widths[-1] < widest,
                        context=lambda: sorted(set(widths[mark:])))
            low = widths[-1]
            publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_HIGH)
            mark = len(widths)
            await until(f"a higher layer again (frames wider than {low})", lambda: any(w > low for w in widths[mark:]),
                        context=lambda: sorted(set(widths[mark:])))

            publication.set_subscribed(False)
            await until("the track unsubscribed", lambda: publication.sid in unsubscribed)
            await asyncio.sleep(1)
            frozen, others = len(widths), len(other_frames)
            await asyncio.sleep(1.5)
            assert len(widths) - frozen <= 1, f"{len(widths) - frozen} frames after unsubscribing"
            assert len(other_frames) - others >= 10, "Cara's video goes on"
            watcher.cancel()
            other_watcher.cancel()
        finally:
            stop.set()
            for room in (publisher, viewer, other):
                await room.disconnect()
    run(scenario())


def test_a_screen_share_is_a_second_video_track(server):
    """Ana shares her screen (1024x768, not simulcast, as the SDKs publish a screen) besides her
    simulcast camera: Ben gets both, each as its own track with its source and its own frames;
    when she stops sharing, the screen share is gone for him and the camera goes on."""
    async def scenario():
        url, ana_token, ben_token, _ = await two_in_a_call(server.url)
        publisher, viewer = rtc.Room(), rtc.Room()
        tracks: dict[str, rtc.Track] = {}
        sources: dict[str, int] = {}
        unpublished: list[str] = []
        sizes: dict[str, list[tuple[int, int]]] = {"camera": [], "screen": []}

        @viewer.on("track_subscribed")
        def on_subscribed(track, publication, participant):
            if track.kind == rtc.TrackKind.KIND_VIDEO:
                tracks[publication.name], sources[publication.name] = track, publication.source

        @viewer.on("track_unpublished")
        def on_unpublished(publication, participant):
            unpublished.append(publication.name)

        async def watch(name):
            async for event in rtc.VideoStream(tracks[name]):
                sizes[name].append((event.frame.width, event.frame.height))

        stop, screen_stop = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await publisher.connect(url, ana_token, options())
            await viewer.connect(url, ben_token, options())
            await publish_video(publisher, stop)
            screen = await publish_video(publisher, screen_stop, "screen", (1024, 768), rtc.TrackSource.SOURCE_SCREENSHARE, simulcast=False)
            await until("Ben subscribed to the camera and the screen", lambda: len(tracks) == 2, context=lambda: list(tracks))
            assert sources == {"camera": rtc.TrackSource.SOURCE_CAMERA, "screen": rtc.TrackSource.SOURCE_SCREENSHARE}, sources
            watchers = [loop.create_task(watch(name)) for name in ("camera", "screen")]
            await until("frames of both", lambda: len(sizes["camera"]) >= 20 and len(sizes["screen"]) >= 20)
            # Each track's own frames: 4:3 of the screen, 16:9 of the camera (libwebrtc may scale
            # a stream down when the machine is busy, but keeps its shape).
            assert all(abs(h / w - 768 / 1024) < 0.02 for w, h in sizes["screen"]), f"the screen share's frames: {sorted(set(sizes['screen']))}"
            assert all(abs(h / w - HEIGHT / WIDTH) < 0.02 for w, h in sizes["camera"]), f"the camera's frames: {sorted(set(sizes['camera']))}"

            await publisher.local_participant.unpublish_track(screen.sid)
            screen_stop.set()
            await until("the screen share unpublished for Ben", lambda: "screen" in unpublished)
            frames = len(sizes["camera"])
            await until("the camera goes on", lambda: len(sizes["camera"]) >= frames + 20)
            assert "camera" not in unpublished
            for watcher in watchers:
                watcher.cancel()
        finally:
            stop.set()
            screen_stop.set()
            for room in (publisher, viewer):
                await room.disconnect()
    run(scenario())


async def layer_rates(room: rtc.Room, seconds: float = 1.0) -> dict[str, float]:
    """The bytes per second a publisher sent into the SFU on each simulcast layer of its video,
    over the next `seconds` (from its WebRTC stats: outbound RTP per rid)."""
    async def sent() -> dict[str, int]:
        stats = (await room.get_rtc_stats()).publisher_stats
        return {s.outbound_rtp.outbound.rid: s.outbound_rtp.sent.bytes_sent for s in stats
                if s.WhichOneof("stats") == "outbound_rtp" and s.outbound_rtp.stream.kind == "video"}
    before = await sent()
    await asyncio.sleep(seconds)
    after = await sent()
    return {rid: (count - before.get(rid, 0)) / seconds for rid, count in after.items()}


async def until_rates(what: str, room: rtc.Room, check, timeout: float = 12.0) -> dict[str, float]:
    """Layer rates, measured each second until `check` holds of them."""
    deadline, rates = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        rates = await layer_rates(room)
        if check(rates):
            return rates
    raise AssertionError(f"not within {timeout}s: {what}; the last rates (bytes/s per layer): {rates}")


def test_dynacast_pauses_the_layers_nobody_watches(server):
    """Ana publishes simulcast video with dynacast on (as Element Call does); Ben watches. When
    he asks for the low layer, Ana's SDK is told to stop sending the two others and the bytes
    into the SFU drop; when he wants the best again it comes back; when he stops watching,
    Ana sends no video at all."""
    async def scenario():
        url, ana_token, ben_token, _ = await two_in_a_call(server.url)
        publisher, viewer = rtc.Room(), rtc.Room()
        widths: list[int] = []
        subscribed: asyncio.Future = asyncio.get_running_loop().create_future()

        @viewer.on("track_subscribed")
        def on_subscribed(track, publication, participant):
            if track.kind == rtc.TrackKind.KIND_VIDEO and not subscribed.done():
                subscribed.set_result((track, publication))

        async def watch(track):
            async for event in rtc.VideoStream(track):
                widths.append(event.frame.width)

        stop = asyncio.Event()
        try:
            await publisher.connect(url, ana_token, rtc.RoomOptions(auto_subscribe=False, dynacast=True, connect_timeout=20))
            await viewer.connect(url, ben_token, options())
            await publish_video(publisher, stop)
            track, publication = await asyncio.wait_for(subscribed, 20)
            watcher = asyncio.get_running_loop().create_task(watch(track))
            await until("Ben sees the widest layer", lambda: widths and widths[-1] == WIDTH)
            everything = await layer_rates(publisher, 2.0)
            assert len(everything) == 3 and all(v > 1000 for v in everything.values()), everything

            publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_LOW)
            low_only = await until_rates("only the low layer flowing", publisher, lambda r: r.get("q", 0) > 1000 and r.get("h", 0) < 500 and r.get("f", 0) < 500)
            assert sum(low_only.values()) < 0.5 * sum(everything.values()), (everything, low_only)
            await until("Ben sees the low layer", lambda: widths[-1] < WIDTH)

            publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_HIGH)
            await until_rates("the best layer flowing again", publisher, lambda r: r.get("f", 0) > 1000, timeout=6)
            # Ben's connection carried only the low layer meanwhile: if its estimate fell short of
            # the widest on the way back (a busy machine delays packets as congestion does), the
            # SFU probes again only after sfu::forwarding::RETRY_FIRST (10 s), and switches up once
            # the estimate has held for HOLD (2 s).
            await until("Ben sees the widest layer again", lambda: widths[-1] == WIDTH, timeout=25,
                        context=lambda: sorted(set(widths[-100:])))

            publication.set_subscribed(False)
            await until_rates("no video flowing", publisher, lambda r: sum(r.values()) < 500)
            watcher.cancel()
        finally:
            stop.set()
            for room in (publisher, viewer):
                await room.disconnect()
    run(scenario())


def test_dynacast_pauses_a_screen_share_nobody_watches(server):
    """Ana shares her screen as one layer (no simulcast, as screen shares often are), dynacast
    on; Ben watches it. When he unsubscribes, her SDK is told to stop sending it and the bytes
    into the SFU stop; when he subscribes again it comes back at once and he sees it again."""
    async def scenario():
        url, ana_token, ben_token, _ = await two_in_a_call(server.url)
        publisher, viewer = rtc.Room(), rtc.Room()
        frames: list[int] = []
        subscribed: asyncio.Queue = asyncio.Queue()

        @viewer.on("track_subscribed")
        def on_subscribed(track, publication, participant):
            if track.kind == rtc.TrackKind.KIND_VIDEO:
                subscribed.put_nowait((track, publication))

        async def watch(track):
            async for event in rtc.VideoStream(track):
                frames.append(event.frame.width)

        stop = asyncio.Event()
        watchers = []
        try:
            await publisher.connect(url, ana_token, rtc.RoomOptions(auto_subscribe=False, dynacast=True, connect_timeout=20))
            await viewer.connect(url, ben_token, options())
            await publish_video(publisher, stop, "screen", (640, 360), rtc.TrackSource.SOURCE_SCREENSHARE, simulcast=False)
            track, publication = await asyncio.wait_for(subscribed.get(), 20)
            assert not publication.simulcasted
            watchers.append(asyncio.get_running_loop().create_task(watch(track)))
            await until("Ben sees the screen", lambda: len(frames) > 10)
            sending = await until_rates("the screen flowing", publisher, lambda r: sum(r.values()) > 1000)
            assert len(sending) == 1, sending

            publication.set_subscribed(False)
            await until_rates("the screen no longer sent", publisher, lambda r: sum(r.values()) < 500)

            publication.set_subscribed(True)
            track, _ = await asyncio.wait_for(subscribed.get(), 20)
            seen = len(frames)
            watchers.append(asyncio.get_running_loop().create_task(watch(track)))
            await until_rates("the screen sent again", publisher, lambda r: sum(r.values()) > 1000, timeout=6)
            await until("Ben sees the screen again", lambda: len(frames) > seen + 10)
        finally:
            stop.set()
            for watcher in watchers:
                watcher.cancel()
            for room in (publisher, viewer):
                await room.disconnect()
    run(scenario())


def claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def room_service(base: str, token: str, method: str, body: dict) -> tuple[int, dict]:
    return http(base, "POST", f"/twirp/livekit.RoomService/{method}", token, body)


async def session_with_client(base: str, shared_secret: str, recording_policy: str = "forbidden") -> tuple[str, Member, Member]:
    """An open individual session: a verified therapist and a joined client."""
    admin = await register_with_shared_secret(base, shared_secret, f"admin{secrets.token_hex(3)}", "call-interop-password", True)
    therapist, client = await member(base, "therapist"), await member(base, "client")
    status, body = http(base, "PUT", f"/_limbic/admin/v1/therapists/{quote(therapist.user_id)}", admin.access_token, {"verified": True})
    assert status == 200, body
    now = int(time.time() * 1000)
    status, created = http(base, "POST", "/_limbic/client/v1/sessions", therapist.access_token, {
        "kind": "individual", "title": "Call", "starts_at": now, "ends_at": now + 3_600_000, "timezone": "UTC",
        "participants": [{"user_id": client.user_id, "role": "client"}], "recording_policy": recording_policy,
    })
    assert status == 200, created
    room_id = created["room_id"]
    status, body = http(base, "PUT", f"/_limbic/client/v1/sessions/{quote(room_id)}/status", therapist.access_token, {"status": "open"})
    assert status == 200, body
    status, body = http(base, "POST", f"/_matrix/client/v3/join/{quote(room_id)}", client.access_token, {})
    assert status == 200, body
    return room_id, therapist, client


def test_the_therapist_mutes_and_removes_a_client(server):
    async def scenario():
        room_id, therapist, client = await session_with_client(server.url, server.config["registration"]["shared_secret"])
        url, therapist_token = call_token(server.url, therapist, room_id)
        _, client_token = call_token(server.url, client, room_id)
        sfu_room = claims(therapist_token)["video"]["room"]
        therapist_room, client_room = rtc.Room(), rtc.Room()
        seen: list[str] = []

        @client_room.on("track_muted")
        def on_muted(participant, publication):
            seen.append("muted")

        @client_room.on("disconnected")
        def on_disconnected(reason):
            seen.append("disconnected")

        stop = asyncio.Event()
        try:
            await therapist_room.connect(url, therapist_token, options())
            await client_room.connect(url, client_token, options())
            publication = await publish_tone(client_room, stop)
            identity = client_room.local_participant.identity
            for _ in range(100):
                status, listed = room_service(server.url, therapist_token, "ListParticipants", {"room": sfu_room})
                tracks = [t for p in listed.get("participants", []) if p["identity"] == identity for t in p.get("tracks", [])]
                if tracks:
                    break
                await asyncio.sleep(0.1)
            assert status == 200 and tracks and tracks[0]["sid"] == publication.sid, (status, listed)

            # A client is no moderator; nobody unmutes someone else.
            request = {"room": sfu_room, "identity": identity, "trackSid": publication.sid, "muted": True}
            status, body = room_service(server.url, client_token, "MutePublishedTrack", request)
            assert status == 403 and body["code"] == "permission_denied", (status, body)
            status, body = room_service(server.url, therapist_token, "MutePublishedTrack", dict(request, muted=False))
            assert status == 403, (status, body)

            status, body = room_service(server.url, therapist_token, "MutePublishedTrack", request)
            assert status == 200 and body["track"]["muted"] is True, (status, body)
            for _ in range(100):
                if publication.muted:
                    break
                await asyncio.sleep(0.1)
            assert publication.muted, f"the client's own track was not muted: {seen}"

            status, body = room_service(server.url, therapist_token, "RemoveParticipant", {"room": sfu_room, "identity": identity})
            assert status == 200, (status, body)
            for _ in range(100):
                if "disconnected" in seen:
                    break
                await asyncio.sleep(0.1)
            assert "disconnected" in seen, seen
            status, body = room_service(server.url, therapist_token, "RemoveParticipant", {"room": sfu_room, "identity": identity})
            assert status == 404, (status, body)
        finally:
            stop.set()
            await client_room.disconnect()
            await therapist_room.disconnect()
    run(scenario())


def set_consent(base: str, who: Member, room_id: str, consent: bool) -> None:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/org.limbic.recording.consent/{quote(who.user_id)}"
    status, body = http(base, "PUT", path, who.access_token, {"consent": consent})
    assert status == 200, (status, body)


def recording_state(base: str, who: Member, room_id: str) -> dict:
    status, body = http(base, "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state/org.limbic.recording/", who.access_token)
    return body if status == 200 else {}


def download(base: str, who: Member, mxc: str) -> bytes:
    server_name, media_id = mxc.removeprefix("mxc://").split("/", 1)
    request = urllib.request.Request(f"{base}/_matrix/client/v1/media/download/{quote(server_name)}/{quote(media_id)}")
    request.add_header("Authorization", f"Bearer {who.access_token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def decoded_audio(data: bytes) -> tuple[float, float]:
    """(seconds, peak amplitude 0..1) of an audio file, decoded by FFmpeg (PyAV)."""
    import io
    import av
    samples, peak, rate = 0, 0.0, 48000
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            array = frame.to_ndarray()
            samples += frame.samples
            rate = frame.sample_rate
            if array.size:
                peak = max(peak, float(np.abs(array).max()) / (32768.0 if array.dtype == np.int16 else 1.0))
    return samples / rate, peak


def decoded_video(data: bytes) -> tuple[int, float, int]:
    """(frames, seconds, width) of a video file, decoded by FFmpeg (PyAV)."""
    import io
    import av
    frames, first, last, width = 0, None, None, 0
    with av.open(io.BytesIO(data), format="ivf") as container:
        for frame in container.decode(video=0):
            frames += 1
            width = frame.width
            seconds = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
            first = seconds if first is None else first
            last = seconds
    return frames, (last or 0.0) - (first or 0.0), width


async def recordable_call(server, therapist_room: rtc.Room, client_room: rtc.Room, stop: asyncio.Event) -> tuple[str, Member, Member]:
    """A session that allows recording, whose therapist and client are in its call (in the rooms
    given), the client publishing a tone and video until `stop`."""
    room_id, therapist, client = await session_with_client(server.url, server.config["registration"]["shared_secret"], "with_consent")
    url, therapist_token = call_token(server.url, therapist, room_id)
    _, client_token = call_token(server.url, client, room_id)
    await therapist_room.connect(url, therapist_token, options())
    await client_room.connect(url, client_token, options())
    await publish_tone(client_room, stop)
    await publish_video(client_room, stop)
    await asyncio.sleep(2)
    return room_id, therapist, client


async def recording_call(server, therapist_room: rtc.Room, client_room: rtc.Room, stop: asyncio.Event) -> tuple[str, Member, Member]:
    """[`recordable_call`] with both in it consenting and its recording started."""
    room_id, therapist, client = await recordable_call(server, therapist_room, client_room, stop)
    set_consent(server.url, therapist, room_id, True)
    set_consent(server.url, client, room_id, True)
    status, body = http(server.url, "PUT", f"/_limbic/client/v1/sessions/{quote(room_id)}/recording", therapist.access_token, {"recording": True})
    assert status == 200, (status, body)
    return room_id, therapist, client


def test_a_recording_needs_everyones_consent_and_yields_the_tone(server):
    async def scenario():
        therapist_room, client_room = rtc.Room(), rtc.Room()
        stop = asyncio.Event()
        try:
            room_id, therapist, client = await recordable_call(server, therapist_room, client_room, stop)
            recording_path = f"/_limbic/client/v1/sessions/{quote(room_id)}/recording"

            # Nobody consented yet: refused, naming who has not.
            status, body = http(server.url, "PUT", recording_path, therapist.access_token, {"recording": True})
            assert status == 403 and set(body.get("org.limbic.without_consent", [])) == {therapist.user_id, client.user_id}, (status, body)
            set_consent(server.url, therapist, room_id, True)
            set_consent(server.url, client, room_id, True)
            status, body = http(server.url, "PUT", recording_path, client.access_token, {"recording": True})
            assert status == 403, ("a client cannot record", status, body)

            status, body = http(server.url, "PUT", recording_path, therapist.access_token, {"recording": True})
            assert status == 200, (status, body)
            assert recording_state(server.url, client, room_id).get("recording") is True
            started = time.monotonic()
            # Both see it in their call as LiveKit's SDKs show a recording (`room_update`).
            await until("the SDKs show the call recorded", lambda: therapist_room.is_recording and client_room.is_recording, timeout=3)
            await asyncio.sleep(3)
            asked_to_stop = time.monotonic() - started
            status, body = http(server.url, "PUT", recording_path, therapist.access_token, {"recording": False})
            took = time.monotonic() - started
            assert status == 200, (status, body)
            audio = [f for f in body["files"] if f["kind"] == "m.audio" and f["owner"] == client.user_id]
            assert len(audio) == 1 and "url" in audio[0], body
            seconds, peak = decoded_audio(download(server.url, therapist, audio[0]["url"]))
            # The recording ends between the request to stop it and the answer (which waits for
            # the files: on a busy machine, and through another node, that can take a second).
            assert asked_to_stop - 0.8 < seconds < took + 0.8, \
                f"recorded {seconds:.2f} s of a recording stopped between {asked_to_stop:.2f} and {took:.2f} s"
            assert peak > 0.1, f"the recording is silent (peak {peak})"
            video = [f for f in body["files"] if f["kind"] == "m.video" and f["owner"] == client.user_id]
            assert len(video) == 1 and "url" in video[0], body
            frames, video_seconds, width = decoded_video(download(server.url, therapist, video[0]["url"]))
            assert frames >= 20 and width > 0, f"{frames} frames of width {width}"
            # Only the session's therapists read its recordings: not its client.
            for url in (audio[0]["url"], video[0]["url"]):
                try:
                    download(server.url, client, url)
                    raise AssertionError(f"the session's client downloaded its recording {url}")
                except urllib.error.HTTPError as error:
                    assert error.code == 403 and json.loads(error.read()).get("errcode") == "M_FORBIDDEN", error.code
            assert asked_to_stop - 1.0 < video_seconds < took + 1.0, \
                f"{video_seconds:.2f} s of video in a recording stopped between {asked_to_stop:.2f} and {took:.2f} s"
            # The session's recordings list the files as announced, for its therapists only.
            recordings_path = f"/_limbic/client/v1/sessions/{urllib.parse.quote(room_id, safe='')}/recordings"
            status, listed = http(server.url, "GET", recordings_path, therapist.access_token)
            assert status == 200, (status, listed)
            assert sorted(r["url"] for r in listed["recordings"]) == sorted(f["url"] for f in body["files"]), listed
            assert all(r["duration"] > 0 and r["size"] > 0 for r in listed["recordings"]), listed
            status, refused = http(server.url, "GET", recordings_path, client.access_token)
            assert status == 403 and refused.get("errcode") == "M_FORBIDDEN", (status, refused)
            assert recording_state(server.url, client, room_id).get("recording") is False
            await until("the SDKs show the recording stopped", lambda: not (therapist_room.is_recording or client_room.is_recording), timeout=3)

            # Recording again; the client withdraws consent: it stops by itself.
            status, body = http(server.url, "PUT", recording_path, therapist.access_token, {"recording": True})
            assert status == 200, (status, body)
            await asyncio.sleep(1)
            set_consent(server.url, client, room_id, False)
            state = recording_state(server.url, client, room_id)
            assert state.get("recording") is False and "withdrew" in state.get("stopped_because", ""), state
            await until("the SDKs show the withdrawal's stop", lambda: not client_room.is_recording, timeout=3)
            status, body = http(server.url, "PUT", recording_path, therapist.access_token, {"recording": True})
            assert status == 403, (status, body)
        finally:
            stop.set()
            await client_room.disconnect()
            await therapist_room.disconnect()
    run(scenario())


def test_data_packets_reach_the_others_marked_with_their_sender(server):
    async def scenario():
        room_id, (ana, ben, cara) = await shared_room(server.url, ["ana", "ben", "cara"])
        tokens = [call_token(server.url, who, room_id) for who in (ana, ben, cara)]
        url = tokens[0][0]
        rooms = [rtc.Room() for _ in tokens]
        got: dict[int, list[tuple[bytes, str, str | None]]] = {1: [], 2: []}
        for index in (1, 2):
            def on_data(packet, index=index):
                got[index].append((packet.data, packet.participant.identity if packet.participant else "", packet.topic))
            rooms[index].on("data_received", on_data)
        try:
            for room, (_, token) in zip(rooms, tokens):
                await room.connect(url, token, options())
            sender = rooms[0].local_participant
            # The first packets may go before the others' data channels are open: send until one arrives.
            for _ in range(50):
                await sender.publish_data(b"hello everyone", reliable=True, topic="chat")
                if got[1] and got[2]:
                    break
                await asyncio.sleep(0.2)
            for index in (1, 2):
                assert (b"hello everyone", sender.identity, "chat") in got[index], got
            # A packet for Cara only.
            cara = rooms[2].local_participant.identity
            for _ in range(50):
                await sender.publish_data(b"just for cara", reliable=True, destination_identities=[cara])
                if any(p[0] == b"just for cara" for p in got[2]):
                    break
                await asyncio.sleep(0.2)
            assert any(p[0] == b"just for cara" for p in got[2]), got[2]
            await asyncio.sleep(0.5)
            assert not any(p[0] == b"just for cara" for p in got[1]), "Ben got Cara's packet"
        finally:
            for room in rooms:
                await room.disconnect()
    run(scenario())


def test_completing_the_session_ends_its_call(server):
    async def scenario():
        room_id, therapist, client = await session_with_client(server.url, server.config["registration"]["shared_secret"])
        url, client_token = call_token(server.url, client, room_id)
        client_room = rtc.Room()
        ended: list[str] = []

        @client_room.on("disconnected")
        def on_disconnected(reason):
            ended.append(str(reason))

        try:
            await client_room.connect(url, client_token, options())
            for status in ("in_progress", "completed"):
                code, body = http(server.url, "PUT", f"/_limbic/client/v1/sessions/{quote(room_id)}/status", therapist.access_token, {"status": status})
                assert code == 200, (status, code, body)
            await until("the client's call ended", lambda: bool(ended))
            status, openid = http(server.url, "POST", f"/_matrix/client/v3/user/{quote(client.user_id)}/openid/request_token", client.access_token, {})
            body = {"room_id": room_id, "slot_id": "m.call#ROOM", "openid_token": openid,
                    "member": {"id": "m", "claimed_user_id": client.user_id, "claimed_device_id": client.device_id}}
            status, answer = http(server.url, "POST", "/_limbic/calls/get_token", None, body)
            assert status == 403, ("no way back into a completed session's call", status, answer)
        finally:
            await client_room.disconnect()
    run(scenario())


def test_signalling_refuses_forged_tokens(server):
    async def scenario():
        room_id, (ana,) = await shared_room(server.url, ["ana"])
        url, token = call_token(server.url, ana, room_id)
        # Where the token sends the SDK (the call's node, when the server is several).
        node = url.replace("ws://", "http://", 1)
        header, payload, signature = token.split(".")
        forged = f"{header}.{payload}.{signature[:-4]}AAAA"
        for bad in (forged, "not-a-token"):
            status, body = http(node, "GET", "/rtc/validate", bad)
            assert status == 401, (status, body)
            room = rtc.Room()
            with pytest.raises(Exception):
                await room.connect(url, bad, rtc.RoomOptions(connect_timeout=5))
            await room.disconnect()
        status, body = http(node, "GET", "/rtc/validate", token)
        assert status == 200, (status, body)
    run(scenario())


@pytest.mark.skipif(os.environ.get("INTEROP_CLUSTER") != "1", reason="needs two nodes: INTEROP_CLUSTER=1 (a CI step)")
def test_a_recording_whose_node_dies_is_stored_by_the_node_its_call_moves_to(server):
    """Two nodes: the call's node is killed while it records the client's tone; the next token,
    from the other node, moves the call there, and that node stores what the dead node recorded
    (moving the call, or, if its sweep of dead nodes came first, sweeping it)."""
    async def scenario():
        therapist_room, client_room = rtc.Room(), rtc.Room()
        stop = asyncio.Event()
        try:
            room_id, therapist, client = await recording_call(server, therapist_room, client_room, stop)
            await asyncio.sleep(4)
            url, _ = call_token(server.url, therapist, room_id)
            dead = next(node for node in server.nodes if url.endswith(f":{node.port}"))
            alive = next(node for node in server.nodes if node is not dead)
            dead.kill()
            # The database counts the node dead within a second or two; then the call moves.
            deadline = time.monotonic() + 15
            while not call_token(alive.url, therapist, room_id)[0].endswith(f":{alive.port}"):
                assert time.monotonic() < deadline, "the call did not move from the dead node"
                await asyncio.sleep(0.3)
            # A sweep that came first may still be storing it.
            await until("the dead node's recording stored", lambda: recording_state(alive.url, client, room_id).get("recording") is False, timeout=10)
            state = recording_state(alive.url, client, room_id)
            assert state.get("stopped_because") == "the server stopped during the recording", state
            status, listed = http(alive.url, "GET", f"/_limbic/client/v1/sessions/{quote(room_id, safe='')}/recordings", therapist.access_token)
            assert status == 200, (status, listed)
            audio = [r for r in listed["recordings"] if r["kind"] == "m.audio" and r["owner"] == client.user_id]
            assert len(audio) == 1, listed
            seconds, peak = decoded_audio(download(alive.url, therapist, audio[0]["url"]))
            # At most the last second before the kill is lost.
            assert seconds >= 2.5 and peak > 0.1, f"{seconds:.2f} s recorded, peak {peak}"
        finally:
            stop.set()
            await client_room.disconnect()
            await therapist_room.disconnect()
    run(scenario())
