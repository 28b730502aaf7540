"""A LiveKit participant that joins a call, watches the first video track it is given, and once
a second prints the widths of the frames it decoded in that second (width -> frames), and the
audio packets it received and lost in that second (its WebRTC statistics), as a JSON line on
stdout, until its stdin closes. Run by test_call_networks.py inside a network namespace
whose bandwidth the test limits (so it runs as a process of its own).

    call_viewer.py URL TOKEN
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys

from livekit import rtc

from call_media import receiving_stats


async def view(url: str, token: str) -> None:
    room = rtc.Room()
    subscribed: asyncio.Future = asyncio.get_running_loop().create_future()

    @room.on("track_subscribed")
    def on_subscribed(track, publication, participant):
        if track.kind == rtc.TrackKind.KIND_VIDEO and not subscribed.done():
            subscribed.set_result(track)

    await room.connect(url, token, rtc.RoomOptions(auto_subscribe=True, connect_timeout=30))
    widths: collections.Counter = collections.Counter()

    async def watch(track):
        async for event in rtc.VideoStream(track):
            widths[event.frame.width] += 1

    async def audio() -> tuple[int, int]:
        stats = receiving_stats(await room.get_rtc_stats())
        inbound = [s.inbound_rtp for s in stats if s.WhichOneof("stats") == "inbound_rtp" and s.inbound_rtp.stream.kind == "audio"]
        return sum(s.received.packets_received for s in inbound), sum(s.received.packets_lost for s in inbound)

    try:
        watcher = asyncio.get_running_loop().create_task(watch(await asyncio.wait_for(subscribed, 30)))
        closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        before = await audio()
        while not closed.done():
            await asyncio.sleep(1)
            now = await audio()
            received, lost = now[0] - before[0], now[1] - before[1]
            before = now
            print(json.dumps({"widths": dict(widths), "audio": {"received": received, "lost": lost}}), flush=True)
            widths.clear()
        watcher.cancel()
    finally:
        await room.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("token")
    args = parser.parse_args()
    asyncio.run(view(args.url, args.token))


if __name__ == "__main__":
    main()
