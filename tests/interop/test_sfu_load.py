"""The SFU benchmark's load client (`limbic-sfu-load`, scripts/bench-sfu) against Limbic: its
publishers and subscribers get call tokens through the Matrix API, join over LiveKit's
signalling (over `/rtc/v1`, and over `/rtc`) and exchange simulcast VP8 and Opus, and what it
reports is sound: every down-track flows, nothing is lost, each video down-track gets the best
layer, latencies are measured.
This keeps the benchmark's instrument working (Janus is not installed where the tests run).

The module uses conftest's per-module `server`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import _binary

# scripts/test runs the media modules one after the other, beside the others: the SFU's
# bandwidth estimate takes a busy machine's delays for congestion.
pytestmark = pytest.mark.media

PUBLISHERS, SUBSCRIBERS = 2, 3


def primary_address() -> str:
    """The address the server announces for call media with `udp_address = "0.0.0.0"`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        return probe.getsockname()[0]


@pytest.mark.parametrize("two_connections", [False, True], ids=["rtc-v1", "rtc"])
def test_the_load_client_measures_a_call_through_limbic(server, tmp_path: Path, two_connections: bool):
    load = _binary().with_name("limbic-sfu-load")
    assert load.exists(), f"{load} is not built (scripts/test builds it)"
    figures = tmp_path / "load.jsonl"
    done = subprocess.run(
        [str(load), "--limbic", server.url, "--pid", str(server.proc.pid), "--publishers", str(PUBLISHERS),
         "--subscribers", str(SUBSCRIBERS), "--warm-up", "2", "--seconds", "3", "--address", primary_address(),
         "--json", str(figures)] + (["--two-connections"] if two_connections else []),
        capture_output=True, text=True, timeout=120, env={**os.environ, "RUST_BACKTRACE": "1"},
    )
    assert done.returncode == 0, done.stderr
    label = "limbic-rtc" if two_connections else "limbic"
    assert done.stdout.startswith(f"| {label} | 12 (2×3, 12 flowing) |"), done.stdout
    result = json.loads(figures.read_text().splitlines()[-1])
    assert result["down_tracks"] == result["down_tracks_flowing"] == PUBLISHERS * SUBSCRIBERS * 2
    assert result["loss"] < 0.02, result
    # 3 s of 50 audio packets and 30 video frames a second per down-track, all timed.
    assert result["frames_timed"] >= 0.95 * 3 * (50 + 30) * PUBLISHERS * SUBSCRIBERS, result
    assert 0 < result["audio_latency_p50_ms"] <= result["audio_latency_p99_ms"] < 200, result
    assert 0 < result["video_latency_p50_ms"] <= result["video_latency_p99_ms"] < 200, result
    # The best layer (300 kbit/s by default), not the 60 or 150 kbit/s ones.
    assert 250 < result["video_kbps_per_down_track"] < 350, result
    assert result["joined"] == SUBSCRIBERS and result["join_p50_ms"] > 0, result
    assert result["server_cpu_share"] > 0 and result["rss_loaded_mib"] > 0, result
