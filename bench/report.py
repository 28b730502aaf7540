#!/usr/bin/env python3
"""Prints a Markdown table from the JSON of bench/matrix_load.py.

  report.py [--limbic limbic.json] [--synapse synapse.json] [--title TEXT]

Either side may be missing (a one-server run); ratios and target checks need
both for the ratio targets, and Limbic's figures for the absolute targets.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable


def get(d: dict[str, Any] | None, path: str) -> float | None:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


# (label, json path, scale, higher_is_better, target)
# target: ("ratio", x) = Limbic must beat Synapse by x times;
#         ("max", x)   = Limbic's value must be below x (after scaling).
ROWS: list[tuple[str, str, float, bool, tuple[str, float] | None]] = [
    ("Send throughput, {senders} senders, one shared room (msg/s)", "send_shared_room.msgs_per_s", 1, True, ("ratio", 10)),
    ("Send throughput, {senders} senders, a room each (msg/s)", "send_own_rooms.msgs_per_s", 1, True, ("ratio", 10)),
    ("Send request latency p50, shared room (ms)", "send_shared_room.request_latency.p50_ms", 1, False, None),
    ("Server CPU per message sent, shared room (ms)", "send_shared_room.server_cpu_ms_per_msg", 1, False, None),
    ("wrk: send throughput, 4 senders, one room (msg/s)", "wrk.4_in_1.requests_per_s", 1, True, None),
    ("wrk: send latency p99, 4 senders, one room (ms)", "wrk.4_in_1.p99_ms", 1, False, None),
    ("wrk: server CPU per message, 4 senders, one room (ms)", "wrk.4_in_1.server_cpu_ms_per_msg", 1, False, None),
    ("wrk: send throughput, 16 senders, one room (msg/s)", "wrk.16_in_1.requests_per_s", 1, True, None),
    ("wrk: send latency p99, 16 senders, one room (ms)", "wrk.16_in_1.p99_ms", 1, False, None),
    ("wrk: server CPU per message, 16 senders, one room (ms)", "wrk.16_in_1.server_cpu_ms_per_msg", 1, False, None),
    ("wrk: send throughput, 64 senders, one room (msg/s)", "wrk.64_in_1.requests_per_s", 1, True, None),
    ("wrk: send latency p99, 64 senders, one room (ms)", "wrk.64_in_1.p99_ms", 1, False, None),
    ("wrk: server CPU per message, 64 senders, one room (ms)", "wrk.64_in_1.server_cpu_ms_per_msg", 1, False, None),
    ("wrk: send throughput, 64 senders, 64 rooms (msg/s)", "wrk.64_in_64.requests_per_s", 1, True, None),
    ("wrk: send latency p99, 64 senders, 64 rooms (ms)", "wrk.64_in_64.p99_ms", 1, False, None),
    ("wrk: server CPU per message, 64 senders, 64 rooms (ms)", "wrk.64_in_64.server_cpu_ms_per_msg", 1, False, None),
    ("Send → /sync delivery p50 (ms)", "latency.p50_ms", 1, False, None),
    ("Send → /sync delivery p99 (ms)", "latency.p99_ms", 1, False, ("max", 10)),
    ("Initial sync, {rooms} rooms, mean of {runs} runs (ms)", "initial_sync.mean_ms", 1, False, ("ratio", 5)),
    ("Initial sync, {rooms} rooms, first run (ms)", "initial_sync.first_ms", 1, False, None),
    ("Room setup rate (createRoom + {mpr} messages, rooms/s)", "initial_sync.setup.rooms_per_s", 1, True, None),
    ("Sliding sync first window, {swin} of {srooms} rooms, mean of {sruns} new connections (ms)",
     "sliding.first_window.mean_ms", 1, False, ("ratio", 5)),
    ("Sliding sync first window, p50 (ms)", "sliding.first_window.p50_ms", 1, False, None),
    ("Sliding sync first window, cold: first request after the setup (ms)",
     "sliding.first_window.cold_ms", 1, False, None),
    ("Sliding sync send → wake-up p50 (ms)", "sliding.wake_up.p50_ms", 1, False, None),
    ("Sliding sync send → wake-up p90 (ms)", "sliding.wake_up.p90_ms", 1, False, None),
    ("Sliding sync send → wake-up p99 (ms)", "sliding.wake_up.p99_ms", 1, False, ("max", 10)),
    ("Sliding sync wake-up: the probe's own PUT /send, p50 (ms)",
     "sliding.wake_up.send_request.p50_ms", 1, False, None),
    ("Sliding sync setup: {srooms} rooms (createRoom with a name + {smpr} messages), untimed (s)",
     "sliding.setup.wall_s", 1, False, None),
    ("RSS at rest before the /sync clients connect (MB)", "syncers.rss_at_rest_mb", 1, False, None),
    ("RSS with {syncers} clients long-polling /sync (MB)", "syncers.rss_connected_mb", 1, False, None),
    ("RSS per 1,000 connected /sync clients (MB)", "syncers.mb_per_1000_clients", 1, False, None),
    ("Idle RSS after the run (MB)", "rss_idle.vmrss_kb", 1 / 1024, False, ("max", 40)),
    ("RSS at start (MB)", "rss_start.vmrss_kb", 1 / 1024, False, None),
    ("Peak RSS, VmHWM (MB)", "rss_idle.vmhwm_kb", 1 / 1024, False, None),
]


# Rows of these are shown even when empty (a one-phase run still shows the memory figures).
PHASES_ALWAYS_SHOWN = ("rss_idle", "rss_start")


def table(lim: dict[str, Any] | None, syn: dict[str, Any] | None) -> str:
    comparable = not (lim and syn and lim.get("params") != syn.get("params"))
    out = [
        "| measurement | Limbic | Synapse | Limbic vs Synapse | target | met |",
        "|---|---:|---:|---:|---|:---:|",
    ]
    params = (lim or syn or {}).get("params", {})
    subst = {
        "senders": params.get("senders", "?"),
        "rooms": params.get("rooms", "?"),
        "runs": params.get("initial_sync_runs", "?"),
        "mpr": params.get("messages_per_room", "?"),
        "swin": params.get("sliding_window", "?"),
        "srooms": params.get("sliding_rooms", "?"),
        "sruns": params.get("sliding_runs", "?"),
        "smpr": params.get("sliding_messages_per_room", "?"),
        "syncers": params.get("syncers", "?"),
    }
    for label, path, scale, higher, target in ROWS:
        label = label.format(**subst)
        lv, sv = get(lim, path), get(syn, path)
        if lv is None and sv is None and path.split(".")[0] not in PHASES_ALWAYS_SHOWN:
            continue  # a phase neither run had
        lv = lv * scale if lv is not None else None
        sv = sv * scale if sv is not None else None
        ratio = "–"
        r: float | None = None
        if lv and sv and comparable:
            r = (lv / sv) if higher else (sv / lv)
            word = "more" if higher else ("less" if ("MB" in label or "CPU" in label) else "faster")
            ratio = f"{r:.2f}× {word}"
        tgt, met = "", ""
        if target:
            kind, x = target
            if kind == "ratio":
                tgt = f"≥ {x:g}× Synapse"
                met = "–" if r is None else ("yes" if r >= x else "no")
            else:
                tgt = f"< {x:g}"
                met = "–" if lv is None else ("yes" if lv < x else "no")
        out.append(f"| {label} | {fmt(lv)} | {fmt(sv)} | {ratio} | {tgt} | {met} |")
    return "\n".join(out)


def notes(name: str, d: dict[str, Any] | None) -> list[str]:
    if not d:
        return []
    n = []
    http = d.get("http", {})
    if http.get("rate_limited"):
        n.append(f"{name}: {http['rate_limited']} requests were rate limited (429) and retried")
    for key in ("send_shared_room", "send_own_rooms"):
        s = d.get(key)
        if s and not s.get("complete"):
            n.append(f"{name}: {key} hit the phase time limit after {s.get('messages')} messages")
    for key in ("send_shared_room", "send_own_rooms"):
        s = d.get(key) or {}
        if s.get("wall_s") and (s.get("client_cpu_s") or 0) / s["wall_s"] > 0.8:
            n.append(
                f"{name}: the load generator used {100 * s['client_cpu_s'] / s['wall_s']:.0f}% of a core "
                f"in {key}: it may be the bottleneck, not the server"
            )
    lat = d.get("latency")
    if lat and lat.get("extra_polls"):
        n.append(f"{name}: {lat['extra_polls']} long-polls returned without the probe and were re-issued")
    ini = d.get("initial_sync")
    if ini and ini.get("rooms_in_response") != ini.get("rooms"):
        n.append(
            f"{name}: initial sync returned {ini.get('rooms_in_response')} joined rooms, "
            f"expected {ini.get('rooms')}"
        )
    sl = d.get("sliding")
    if sl:
        first, wake = sl.get("first_window") or {}, sl.get("wake_up") or {}
        if not sl.get("advertised"):
            n.append(f"{name}: /versions does not list org.matrix.simplified_msc3575")
        if first.get("count") != sl.get("rooms"):
            n.append(f"{name}: the sliding sync list counted {first.get('count')} rooms, expected {sl.get('rooms')}")
        if first.get("rooms_in_response") != sl.get("window"):
            n.append(
                f"{name}: a sliding sync first window held {first.get('rooms_in_response')} rooms, "
                f"expected {sl.get('window')}"
            )
        elif first.get("named_rooms_in_response") != sl.get("window"):
            n.append(f"{name}: only {first.get('named_rooms_in_response')} rooms of the first window had their name")
        slack = (sl.get("setup") or {}).get("concurrency") or 0
        if (first.get("most_recent_rooms_in_response") or 0) < (sl.get("window") or 0) - slack:
            n.append(
                f"{name}: only {first.get('most_recent_rooms_in_response')} rooms of the first window "
                "were among the most recently written to: the window is not ordered by recency"
            )
        if wake.get("extra_polls"):
            n.append(f"{name}: {wake['extra_polls']} sliding sync long-polls returned without the probe and were re-issued")
    other = wall = 0.0
    for key, wkey in (("send_shared_room", "wall_s"), ("send_own_rooms", "wall_s"),
                      ("latency", "wall_s"), ("initial_sync", "timed_wall_s"),
                      ("sliding.first_window", "wall_s"), ("sliding.wake_up", "wall_s")):
        ph: Any = d
        for part in key.split("."):
            ph = (ph or {}).get(part)
        ph = ph or {}
        if isinstance(ph.get("other_cpu_s"), (int, float)) and ph.get(wkey):
            other += ph["other_cpu_s"]
            wall += ph[wkey]
    if wall and other / wall > 0.1:
        n.append(
            f"{name}: other processes kept {100 * other / wall:.0f}% of a core busy during the "
            "timed phases: the machine was not quiet, figures are skewed"
        )
    return n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limbic")
    p.add_argument("--synapse")
    p.add_argument("--title", default="")
    a = p.parse_args()
    lim = json.load(open(a.limbic)) if a.limbic else None
    syn = json.load(open(a.synapse)) if a.synapse else None
    if a.title:
        print(f"### {a.title}\n")
    print(table(lim, syn))
    ns = notes("Limbic", lim) + notes("Synapse", syn)
    if lim and syn and lim.get("params") != syn.get("params"):
        ns.insert(0, "the two runs used different load parameters: ratios are not comparable")
    if ns:
        print()
        for x in ns:
            print(f"- {x}")


if __name__ == "__main__":
    main()
