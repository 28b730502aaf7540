"""A LiveKit participant that joins a call, waits for a tone and reports what it heard and over
which network path, as JSON on stdout. Run by test_call_networks.py, inside a network namespace
whose UDP to the SFU is blocked (so it runs as a process of its own).

    call_listener.py URL TOKEN [--frames N] [--timeout S] [--relay-only] [--interrupted]

With --interrupted it hears the tone, prints `{"ready": true}`, waits for a line on stdin (the
test breaks its network and restores it meanwhile), then hears the tone again, and prints its
report while still in the call (adding what it heard after, its participant sid before and
after, and the engine's events); it leaves after one more line on stdin. Without it, the report
is printed before leaving too: LiveKit's SDK sometimes aborts while it shuts down (a panic in
its FFI), after the part under test. Progress goes to stderr, so a failure says how far it got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from livekit import rtc

from call_media import loud_frames, media_paths, receiving_stats


async def listen(url: str, token: str, frames: int, timeout: float, relay_only: bool, interrupted: bool) -> None:
    room = rtc.Room()
    subscribed: asyncio.Future = asyncio.get_running_loop().create_future()
    events: list[str] = []
    for name in ("reconnecting", "reconnected", "disconnected"):
        room.on(name, lambda *args, name=name: events.append(name))

    @room.on("track_subscribed")
    def on_subscribed(track, publication, participant):
        if track.kind == rtc.TrackKind.KIND_AUDIO and not subscribed.done():
            subscribed.set_result(track)

    config = rtc.RtcConfiguration(ice_transport_type=rtc.IceTransportType.TRANSPORT_RELAY) if relay_only else None
    await room.connect(url, token, rtc.RoomOptions(auto_subscribe=True, connect_timeout=30, rtc_config=config))
    progress("connected")
    try:
        track = await asyncio.wait_for(subscribed, timeout)
        progress("subscribed")
        loud = await loud_frames(track, frames, timeout)
        progress(f"heard {loud} loud frames")
        report = {"loud": loud, "paths": media_paths(receiving_stats(await room.get_rtc_stats())), "identity": room.local_participant.identity}
        if interrupted:
            sid = room.local_participant.sid
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            report.update(loud_after=await loud_frames(track, frames, timeout), sid_before=sid, sid_after=room.local_participant.sid, events=list(events))
            print(json.dumps(report), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        else:
            print(json.dumps(report), flush=True)
        progress("leaving")
    finally:
        await room.disconnect()


def progress(step: str) -> None:
    print(f"call_listener: {step}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--relay-only", action="store_true")
    parser.add_argument("--interrupted", action="store_true")
    args = parser.parse_args()
    asyncio.run(listen(args.url, args.token, args.frames, args.timeout, args.relay_only, args.interrupted))


if __name__ == "__main__":
    main()
