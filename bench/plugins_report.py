#!/usr/bin/env python3
"""Compares two Limbic runs of bench/matrix_load.py: without plugins and with them.

  plugins_report.py NONE.json PLUGINS.json

Prints a Markdown table of send throughput and delivery latency, and the throughput loss
(target: under 10%).
"""

from __future__ import annotations

import json
import sys


def get(d: dict, path: str) -> float | None:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d if isinstance(d, (int, float)) else None


ROWS = [
    ("Send throughput, one shared room (msg/s)", "send_shared_room.msgs_per_s", True),
    ("Send throughput, a room each (msg/s)", "send_own_rooms.msgs_per_s", True),
    ("Send -> /sync delivery p50 (ms)", "latency.p50_ms", False),
    ("Send -> /sync delivery p99 (ms)", "latency.p99_ms", False),
    ("Idle RSS after the load (MB)", "rss_idle.vmrss_kb", False),
]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    none, plugins = (json.load(open(path)) for path in sys.argv[1:])
    print("| measurement | no plugins | three plugins | change |")
    print("|---|---|---|---|")
    for label, path, higher_is_better in ROWS:
        a, b = get(none, path), get(plugins, path)
        if a is None or b is None:
            print(f"| {label} | {a} | {b} | – |")
            continue
        if path.endswith("_kb"):
            a, b = a / 1024, b / 1024
        change = (b - a) / a * 100 if a else 0.0
        print(f"| {label} | {a:,.1f} | {b:,.1f} | {change:+.1f}% |")
    losses = [
        (get(none, p) - get(plugins, p)) / get(none, p) * 100
        for _, p, hib in ROWS
        if hib and get(none, p) and get(plugins, p) is not None
    ]
    if losses:
        worst = max(losses)
        verdict = "meets" if worst < 10 else "misses"
        print(f"\nWorst throughput loss with the plugins: {worst:.1f}% ({verdict} the < 10% target).")


if __name__ == "__main__":
    main()
