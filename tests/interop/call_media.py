"""What the call tests share: the Matrix side of joining a call (accounts, a shared room, call
tokens from the MSC4195 token service), a synthetic tone to publish and a count of the frames
that carry it, a synthetic camera to publish, and which network path a connection's media took.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from livekit import rtc

from mx import register

SAMPLE_RATE = 48000
FRAME = 480  # 10 ms


def http(base: str, method: str, path: str, token: str | None = None, body=None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


@dataclass
class Member:
    user_id: str
    access_token: str
    device_id: str


async def member(base: str, name: str) -> Member:
    account = await register(base, f"{name}{secrets.token_hex(3)}", "call-interop-password")
    return Member(account.user_id, account.access_token, account.device_id)


def call_token(base: str, who: Member, room_id: str) -> tuple[str, str]:
    """(signalling url, call token) from the MSC4195 token service."""
    status, openid = http(base, "POST", f"/_matrix/client/v3/user/{quote(who.user_id)}/openid/request_token", who.access_token, {})
    assert status == 200, openid
    body = {
        "room_id": room_id, "slot_id": "m.call#ROOM", "openid_token": openid,
        "member": {"id": f"m-{who.device_id}", "claimed_user_id": who.user_id, "claimed_device_id": who.device_id},
    }
    status, answer = http(base, "POST", "/_limbic/calls/get_token", None, body)
    assert status == 200, f"get_token for {who.user_id}: {status} {answer}"
    return answer["url"], answer["jwt"]


async def shared_room(base: str, names: list[str]) -> tuple[str, list[Member]]:
    members = [await member(base, name) for name in names]
    status, room = http(base, "POST", "/_matrix/client/v3/createRoom", members[0].access_token,
                        {"preset": "private_chat", "invite": [m.user_id for m in members[1:]]})
    assert status == 200, room
    for m in members[1:]:
        status, body = http(base, "POST", f"/_matrix/client/v3/join/{quote(room['room_id'])}", m.access_token, {})
        assert status == 200, body
    return room["room_id"], members


async def two_in_a_call(base: str) -> tuple[str, str, str, Member]:
    """Ana and Ben, members of one room: (signalling url, Ana's call token, Ben's, Ben)."""
    room_id, (ana, ben) = await shared_room(base, ["ana", "ben"])
    url, ana_token = call_token(base, ana, room_id)
    _, ben_token = call_token(base, ben, room_id)
    return url, ana_token, ben_token, ben


async def publish_tone(room: rtc.Room, stop: asyncio.Event, frequency: float = 440.0) -> rtc.LocalTrackPublication:
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track("tone", source)
    publish = rtc.TrackPublishOptions()
    publish.source = rtc.TrackSource.SOURCE_MICROPHONE
    publication = await room.local_participant.publish_track(track, publish)

    async def feed():
        phase = 0
        while not stop.is_set():
            frame = rtc.AudioFrame.create(SAMPLE_RATE, 1, FRAME)
            samples = np.frombuffer(frame.data, dtype=np.int16)
            t = (np.arange(FRAME) + phase) / SAMPLE_RATE
            samples[:] = (np.sin(2 * math.pi * frequency * t) * 12000).astype(np.int16)
            phase += FRAME
            await source.capture_frame(frame)
    asyncio.get_running_loop().create_task(feed())
    return publication


async def loud_frames(track: rtc.Track, wanted: int, timeout: float) -> int:
    """How many received 10 ms frames carry the tone (not silence), up to `wanted`."""
    loud = 0
    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)

    async def count():
        nonlocal loud
        async for event in stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            if samples.size and np.abs(samples).max() > 2000:
                loud += 1
                if loud >= wanted:
                    return
    try:
        await asyncio.wait_for(count(), timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        await stream.aclose()
    return loud


def receiving_stats(stats) -> list:
    """The WebRTC statistics (LiveKit's `get_rtc_stats`) of the connection a participant
    receives on: their subscriber connection, or, with one connection for everything
    (`/rtc/v1`, what the SDK uses where the server has it), that one."""
    return list(stats.subscriber_stats) or list(stats.publisher_stats)


def media_paths(stats: list) -> list[dict]:
    """The candidate pairs media arrived on (LiveKit's `get_rtc_stats`): the local candidate's
    type (`host`, `srflx`, `prflx`, `relay`), protocol and (of a relay) protocol to its TURN
    server, the remote's protocol, and bytes received."""
    local = {s.local_candidate.rtc.id: s.local_candidate.candidate for s in stats if s.WhichOneof("stats") == "local_candidate"}
    remote = {s.remote_candidate.rtc.id: s.remote_candidate.candidate for s in stats if s.WhichOneof("stats") == "remote_candidate"}
    found = []
    for s in stats:
        if s.WhichOneof("stats") != "candidate_pair":
            continue
        pair = s.candidate_pair.candidate_pair
        if pair.bytes_received == 0 or pair.local_candidate_id not in local or pair.remote_candidate_id not in remote:
            continue
        mine, theirs = local[pair.local_candidate_id], remote[pair.remote_candidate_id]
        def named(field: str) -> str:
            return mine.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(mine, field)].name.lower()
        kind = named("candidate_type")
        found.append({"local_type": kind, "local_protocol": mine.protocol, "relay_protocol": named("relay_protocol").removeprefix("transport_") if mine.HasField("relay_protocol") else None,
                      "remote_protocol": theirs.protocol, "remote_port": theirs.port, "bytes_received": pair.bytes_received})
    return found


WIDTH, HEIGHT = 1280, 720


async def publish_video(room: rtc.Room, stop: asyncio.Event, name: str = "camera", size: tuple[int, int] = (WIDTH, HEIGHT),
                        source_kind: int = rtc.TrackSource.SOURCE_CAMERA, simulcast: bool = True) -> rtc.LocalTrackPublication:
    """A moving gradient at 20 fps, by default simulcast (LiveKit's layers of a 720p camera)."""
    width, height = size
    source = rtc.VideoSource(width, height)
    track = rtc.LocalVideoTrack.create_video_track(name, source)
    publish = rtc.TrackPublishOptions(source=source_kind, simulcast=simulcast,
                                      video_encoding=rtc.VideoEncoding(max_framerate=20, max_bitrate=2_000_000))
    publication = await room.local_participant.publish_track(track, publish)
    base = np.tile((np.arange(width) % 256).astype(np.uint8), (height, 1))

    async def feed():
        n = 0
        while not stop.is_set():
            rgba = np.empty((height, width, 4), dtype=np.uint8)
            rgba[..., 0] = (base.astype(np.int32) + n * 4) % 256
            rgba[..., 1] = (n * 8) % 256
            rgba[..., 2] = 255 - base
            rgba[..., 3] = 255
            source.capture_frame(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, rgba.tobytes()))
            n += 1
            await asyncio.sleep(0.05)
    asyncio.get_running_loop().create_task(feed())
    return publication


async def until(what: str, check, timeout: float = 15.0, context=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what} {context()}")
