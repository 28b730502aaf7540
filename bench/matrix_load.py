#!/usr/bin/env python3
"""Matrix client-server load generator for comparing homeservers.

Runs these measurements against ONE homeserver and prints a JSON document:

  send        message send throughput with N concurrent senders (default 4),
              once with all senders in one shared room and once with each
              sender in its own room;
  latency     send -> /sync delivery latency: one user sends a message, another
              user is already long-polling /sync with a `since` token; the
              figure is the time from the start of the send request to the
              arrival of the sync response carrying that event (p50/p90/p99);
  initial     initial sync of a user joined to R rooms (default 200) that each
              hold a few messages: `GET /sync` with no `since`, averaged over a
              few runs after one warm-up run;
  wrk         message sends at the rate wrk (Debian's `wrk`, a C load generator)
              drives: with 4, 16 and 64 senders in one shared room and 64 senders
              in 64 rooms, each for --wrk-seconds; requests/s, latency p50/p99
              (wrk's) and the server's CPU per message. Not in the default
              phases: the Python senders of `send` saturate this client long
              before a fast server;
  sliding     simplified sliding sync (MSC4186), only with --sliding-rooms N:
              the first response of a new connection asking for a 20-room
              window of a user in N rooms (one cold request, then a mean of
              several), and the wake-up latency of a long-polling connection,
              measured like `latency`;
  syncers     memory per connected client (only with --only syncers): --syncers
              users (default 1,000), in pairs sharing a room as a therapist and
              a client do, each long-polling /sync at once; the server's RSS
              at rest with all of them waiting, against its RSS at rest just
              before they connected, per 1,000 clients;
  rss         the server process's VmRSS from /proc/<pid>/status at start and
              after everything, once the server has been idle --idle-wait seconds.

Users are registered through the Synapse-compatible shared-secret admin API
(`/_synapse/admin/v1/register`, HMAC-SHA1 over nonce\\0user\\0password\\0notadmin)
when --shared-secret is given, otherwise through `/register` with m.login.dummy.

Every loop here is bounded in count and in time; only the given base URL
(loopback) is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import statistics
import sys
import time
import urllib.parse
from typing import Any, Awaitable, Callable

import aiohttp

API = "/_matrix/client/v3"
SLIDING = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


def log(*args: Any) -> None:
    print("[matrix_load]", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc helpers (the server runs on this machine)
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_status_kb(pids: list[int], field: str) -> int | None:
    """A /proc/<pid>/status field, summed over the server's processes (its nodes)."""
    total = 0
    for pid in pids:
        value = None
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        value = int(line.split()[1])
        except OSError:
            pass
        if value is None:
            return None
        total += value
    return total if pids else None


def proc_cpu_s(pids: list[int]) -> float | None:
    """utime + stime of the server's processes (all threads), in seconds."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            return None
        # the command name may contain spaces; fields after the closing paren
        rest = data[data.rindex(")") + 2 :].split()
        total += (int(rest[11]) + int(rest[12])) / CLK_TCK
    return total if pids else None


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    vals = [int(x) for x in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    return (sum(vals[:8]) - idle) / CLK_TCK


class CpuMeter:
    """Server, client and other processes' CPU seconds within a with-block.

    other_cpu_s is the machine's busy time minus the server's and this
    client's: CPU taken by unrelated processes (a build, say), which skews
    the figures on a 2-core machine.
    """

    def __init__(self, pids: list[int]):
        self.pid = pids

    def __enter__(self) -> "CpuMeter":
        self.s0 = proc_cpu_s(self.pid)
        self.c0 = time.process_time()
        self.m0 = machine_busy_s()
        self.w0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        s1 = proc_cpu_s(self.pid)
        self.server_cpu_s = (
            round(s1 - self.s0, 3) if s1 is not None and self.s0 is not None else None
        )
        self.client_cpu_s = round(time.process_time() - self.c0, 3)
        self.wall_s = round(time.perf_counter() - self.w0, 3)
        m1 = machine_busy_s()
        self.other_cpu_s = None
        if m1 is not None and self.m0 is not None and self.server_cpu_s is not None:
            self.other_cpu_s = round(
                max(0.0, (m1 - self.m0) - self.server_cpu_s - self.client_cpu_s), 3
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "server_cpu_s": self.server_cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "other_cpu_s": self.other_cpu_s,
        }


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def summarize_ms(vals_s: list[float]) -> dict[str, Any]:
    v = sorted(x * 1000.0 for x in vals_s)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "min_ms": round(v[0], 3),
        "p50_ms": round(pct(v, 50), 3),
        "p90_ms": round(pct(v, 90), 3),
        "p99_ms": round(pct(v, 99), 3),
        "max_ms": round(v[-1], 3),
        "mean_ms": round(statistics.fmean(v), 3),
    }


# --------------------------------------------------------------------------
# A tiny Matrix client
# --------------------------------------------------------------------------


class MatrixError(Exception):
    pass


class Client:
    def __init__(self, http: aiohttp.ClientSession, base: str, stats: dict[str, int]):
        self.http = http
        self.base = base.rstrip("/")
        self.stats = stats
        self.token: str | None = None
        self.user_id: str | None = None
        self._txn = 0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        timeout: float = 60.0,
        max_retries: int = 5,
    ) -> tuple[int, Any, int]:
        """Returns (status, json, body bytes). Retries 429 a bounded number of times."""
        url = self.base + path
        for attempt in range(max_retries + 1):
            async with self.http.request(
                method,
                url,
                json=body,
                params=params,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                raw = await r.read()
                status = r.status
            self.stats["requests"] = self.stats.get("requests", 0) + 1
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = None
            if status == 429 and attempt < max_retries:
                self.stats["rate_limited"] = self.stats.get("rate_limited", 0) + 1
                wait = 0.1
                if isinstance(data, dict) and isinstance(data.get("retry_after_ms"), int):
                    wait = min(5.0, data["retry_after_ms"] / 1000.0)
                await asyncio.sleep(wait)
                continue
            if status not in ok:
                self.stats["errors"] = self.stats.get("errors", 0) + 1
                raise MatrixError(f"{method} {path} -> {status}: {raw[:300]!r}")
            return status, data, len(raw)
        raise MatrixError(f"{method} {path}: still rate limited after {max_retries} retries")

    # ---- account -------------------------------------------------------

    async def register(self, username: str, password: str, shared_secret: str | None) -> None:
        if shared_secret:
            _, nonce_resp, _ = await self.request("GET", "/_synapse/admin/v1/register")
            nonce = nonce_resp["nonce"]
            mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
            mac.update(nonce.encode())
            mac.update(b"\x00")
            mac.update(username.encode())
            mac.update(b"\x00")
            mac.update(password.encode())
            mac.update(b"\x00")
            mac.update(b"notadmin")
            _, data, _ = await self.request(
                "POST",
                "/_synapse/admin/v1/register",
                {
                    "nonce": nonce,
                    "username": username,
                    "password": password,
                    "admin": False,
                    "mac": mac.hexdigest(),
                },
            )
        else:
            body = {
                "username": username,
                "password": password,
                "auth": {"type": "m.login.dummy"},
                "initial_device_display_name": "limbic-bench",
            }
            status, data, _ = await self.request(
                "POST", API + "/register", body, ok=(200, 401)
            )
            if status == 401:
                # UIA: retry with the session the server handed out
                body["auth"]["session"] = data.get("session")
                _, data, _ = await self.request("POST", API + "/register", body)
        self.token = data["access_token"]
        self.user_id = data["user_id"]

    # ---- rooms ---------------------------------------------------------

    async def create_room(self, name: str, public: bool = False) -> str:
        body = {
            "preset": "public_chat" if public else "private_chat",
            "name": name,
            "visibility": "private",
        }
        _, data, _ = await self.request("POST", API + "/createRoom", body)
        return data["room_id"]

    async def join(self, room_id: str) -> None:
        await self.request("POST", API + "/join/" + urllib.parse.quote(room_id, safe=""), {})

    async def send_text(self, room_id: str, body: str, extra: dict[str, Any] | None = None) -> str:
        self._txn += 1
        txn = f"b{secrets.token_hex(4)}{self._txn}"
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if extra:
            content.update(extra)
        path = (
            f"{API}/rooms/{urllib.parse.quote(room_id, safe='')}"
            f"/send/m.room.message/{txn}"
        )
        _, data, _ = await self.request("PUT", path, content)
        return data["event_id"]

    async def sync(
        self,
        since: str | None = None,
        timeout_ms: int = 0,
        filter_json: str | None = None,
        request_timeout: float = 120.0,
    ) -> tuple[Any, int]:
        params: dict[str, str] = {"timeout": str(timeout_ms)}
        if since:
            params["since"] = since
        if filter_json:
            params["filter"] = filter_json
        _, data, nbytes = await self.request(
            "GET", API + "/sync", params=params, timeout=request_timeout
        )
        return data, nbytes

    async def sliding_sync(
        self,
        pos: str | None,
        body: dict[str, Any],
        timeout_ms: int = 0,
        request_timeout: float = 120.0,
    ) -> tuple[Any, int]:
        """One simplified sliding sync (MSC4186) request; no `pos`: a new connection."""
        params: dict[str, str] = {"timeout": str(timeout_ms)}
        if pos:
            params["pos"] = pos
        _, data, nbytes = await self.request(
            "POST", SLIDING, body, params=params, timeout=request_timeout
        )
        return data, nbytes


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


async def make_users(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, int],
    prefix: str,
    n: int,
) -> list[Client]:
    # A server of several nodes: user i goes through node i, round-robin (so that the
    # latency phase's receiver syncs through another node than its sender's).
    urls = [args.base_url, *args.node]
    out = []
    for i in range(n):
        c = Client(http, urls[i % len(urls)], stats)
        await c.register(f"{prefix}{i}", "bench-password-" + prefix, args.shared_secret)
        out.append(c)
    return out


async def measure_send(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, int],
    run_id: str,
    shared_room: bool,
) -> dict[str, Any]:
    n = args.senders
    tag = "s" if shared_room else "o"
    users = await make_users(http, args, stats, f"bench{run_id}{tag}", n)
    if shared_room:
        room = await users[0].create_room(f"send bench {run_id}", public=True)
        for u in users[1:]:
            await u.join(room)
        rooms = [room] * n
    else:
        rooms = [await u.create_room(f"send bench {run_id} {i}") for i, u in enumerate(users)]

    # warm-up (connections, caches), not timed
    await asyncio.gather(
        *(
            u.send_text(r, f"warm-up {k}")
            for u, r in zip(users, rooms)
            for k in range(args.send_warmup)
        )
    )

    deadline = time.perf_counter() + args.phase_time_limit
    lat: list[float] = []
    sent = [0] * n

    async def sender(i: int) -> None:
        u, r = users[i], rooms[i]
        for k in range(args.messages_per_sender):
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            await u.send_text(r, f"message {k} from sender {i}")
            lat.append(time.perf_counter() - t0)
            sent[i] += 1

    with CpuMeter(args.pid) as cpu:
        await asyncio.gather(*(sender(i) for i in range(n)))
    total = sum(sent)
    res = {
        "senders": n,
        "rooms": len(set(rooms)),
        "messages": total,
        "complete": total == n * args.messages_per_sender,
        "msgs_per_s": round(total / cpu.wall_s, 1) if cpu.wall_s > 0 else None,
        "request_latency": summarize_ms(lat),
        **cpu.as_dict(),
    }
    if cpu.server_cpu_s:
        res["server_cpu_ms_per_msg"] = round(cpu.server_cpu_s * 1000.0 / max(1, total), 3)
    return res


WRK_SCRIPT = """
-- Generated by bench/matrix_load.py: PUT /send with the senders' tokens in turn.
local senders = {%s}
local thread_count = %d
local next_index = 0
local counter = 0
function setup(thread)
  thread:set("index", next_index)
  next_index = next_index + 1
end
function init(args)
  mine = {}
  for i, sender in ipairs(senders) do
    if (i - 1) %% thread_count == index then table.insert(mine, sender) end
  end
end
function request()
  counter = counter + 1
  local sender = mine[(counter %% #mine) + 1]
  local path = "/_matrix/client/v3/rooms/" .. sender[2] .. "/send/m.room.message/w" .. index .. "_" .. counter
  return wrk.format("PUT", path, { ["Authorization"] = "Bearer " .. sender[1], ["Content-Type"] = "application/json" },
    '{"msgtype":"m.text","body":"wrk message ' .. counter .. '"}')
end
"""


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, the latency percentiles and the failures from wrk --latency's report."""
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def ms(text: str) -> float:
        number, suffix = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()
        return round(float(number) * unit[suffix], 3)

    res: dict[str, Any] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] in ("50%", "90%", "99%"):
            res["p" + words[0].rstrip("%") + "_ms"] = ms(words[1])
        elif line.startswith("Requests/sec:"):
            res["requests_per_s"] = float(words[1])
        elif "requests in" in line:
            res["requests"] = int(words[0])
        elif line.startswith("  Non-2xx or 3xx responses:"):
            res["failed"] = int(words[-1])
        elif line.startswith("  Socket errors:"):
            res["socket_errors"] = line.split(":", 1)[1].strip()
    res.setdefault("failed", 0)
    return res


async def measure_wrk(
    http: aiohttp.ClientSession, args: argparse.Namespace, stats: dict[str, int], run_id: str,
    senders: int, rooms: int,
) -> dict[str, Any]:
    """`senders` users spread over `rooms` rooms, sending through wrk for --wrk-seconds."""
    users = await make_users(http, args, stats, f"bench{run_id}w{senders}r{rooms}u", senders)
    room_ids = [await users[i].create_room(f"wrk bench {run_id} {senders} {i}", public=True) for i in range(rooms)]
    for i, user in enumerate(users):
        if i >= rooms:
            await user.join(room_ids[i % rooms])
        await user.send_text(room_ids[i % rooms], "warm-up")
    threads = min(2, senders)
    entries = ",".join(
        '{"%s","%s"}' % (u.token, urllib.parse.quote(room_ids[i % rooms], safe="")) for i, u in enumerate(users)
    )
    script = os.path.join(args.wrk_dir, f"send-{run_id}-{senders}-{rooms}.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT % (entries, threads))
    command = ["wrk", "-t", str(threads), "-c", str(senders), "-d", f"{args.wrk_seconds}s", "--latency", "-s", script, args.base_url]
    with CpuMeter(args.pid) as cpu:
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {err.decode()}")
    res = {"senders": senders, "rooms": rooms, **parse_wrk(out.decode()), **cpu.as_dict()}
    # The client's CPU is wrk's, not this process's: it is part of other_cpu_s here.
    if cpu.server_cpu_s and res.get("requests"):
        res["server_cpu_ms_per_msg"] = round(cpu.server_cpu_s * 1000.0 / res["requests"], 3)
    rss = proc_status_kb(args.pid, "VmRSS")
    res["rss_after_mb"] = round(rss / 1024, 1) if rss else None
    return res


MARKER = "org.limbic.bench.marker"


def carries_marker(events: list[Any], marker: str) -> bool:
    return any((ev.get("content") or {}).get(MARKER) == marker for ev in events)


async def delivery_latency(
    args: argparse.Namespace,
    sender: Client,
    room: str,
    run_id: str,
    poll: Callable[[], Awaitable[Any]],
    advance: Callable[[Any], None],
    has_marker: Callable[[Any, str], bool],
) -> dict[str, Any]:
    """Send -> long-poll delivery latency, the same for /sync and sliding sync.

    `poll()` is one long-poll from the receiver's current position, `advance(response)`
    moves that position past a response, and `has_marker(response, marker)` says whether
    the response carries the probe. Per sample: park a long-poll, wait --settle-ms, send a
    probe into `room`; the figure is the time from the start of the send request to the
    arrival of the response carrying it. A long-poll that returns without the probe is
    re-issued and the time keeps counting (extra_polls).
    """
    samples: list[float] = []
    send_times: list[float] = []  # the probe's own PUT /send round trip, for comparison
    extra_polls = 0
    early_returns = 0
    deadline = time.perf_counter() + args.phase_time_limit

    async def timed_send(i: int, marker: str) -> float:
        await sender.send_text(
            room,
            f"latency probe {i}",
            {
                MARKER: marker,
                # canonical JSON has no floats: integer ms
                "org.limbic.bench.sent_ts": int(time.time() * 1000),
            },
        )
        return time.perf_counter()

    with CpuMeter(args.pid) as cpu:
        for i in range(args.latency_samples):
            if time.perf_counter() > deadline:
                break
            marker = f"{run_id}-{i}"
            pending_poll = asyncio.create_task(poll())
            await asyncio.sleep(args.settle_ms / 1000.0)
            # The long-poll may have returned early with something unrelated:
            # take it and park a new one (bounded).
            for _ in range(10):
                if not pending_poll.done():
                    break
                early_returns += 1
                advance(pending_poll.result())
                pending_poll = asyncio.create_task(poll())
                await asyncio.sleep(args.settle_ms / 1000.0)
            t0 = time.perf_counter()
            send = asyncio.create_task(timed_send(i, marker))
            arrived = None
            sample_deadline = t0 + args.sample_timeout
            for _ in range(20):  # bounded re-polls until the event shows up
                # Wait for the poll, but fail fast if the send fails.
                while not pending_poll.done():
                    left = sample_deadline - time.perf_counter()
                    if left <= 0:
                        break
                    waiting = {pending_poll} if send.done() else {pending_poll, send}
                    await asyncio.wait(
                        waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED
                    )
                    if send.done() and send.exception() is not None:
                        pending_poll.cancel()
                        raise send.exception()  # type: ignore[misc]
                if not pending_poll.done():
                    break
                data = pending_poll.result()
                t1 = time.perf_counter()
                advance(data)
                if has_marker(data, marker):
                    arrived = t1
                    break
                extra_polls += 1
                pending_poll = asyncio.create_task(poll())
            if arrived is None:
                pending_poll.cancel()
                send.cancel()
                raise MatrixError(
                    f"latency probe {i} did not arrive within {args.sample_timeout}s"
                )
            send_times.append(await send - t0)
            samples.append(arrived - t0)
    return {
        "samples": len(samples),
        "settle_ms": args.settle_ms,
        "extra_polls": extra_polls,
        "early_returns": early_returns,
        **summarize_ms(samples),
        "send_request": summarize_ms(send_times),
        **cpu.as_dict(),
    }


async def measure_latency(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, int],
    run_id: str,
) -> dict[str, Any]:
    sender, receiver = await make_users(http, args, stats, f"bench{run_id}l", 2)
    room = await sender.create_room(f"latency bench {run_id}", public=True)
    await receiver.join(room)

    # A filter a real client would use for a chat view: this room's timeline,
    # no presence. Servers that reject inline filters get none.
    filt: str | None = json.dumps(
        {
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "rooms": [room],
                "timeline": {"limit": 20},
                "account_data": {"types": []},
                "ephemeral": {"types": []},
            },
        },
        separators=(",", ":"),
    )
    try:
        data, _ = await receiver.sync(None, 0, filt)
    except MatrixError as e:
        log("server rejected the inline sync filter, going without:", e)
        filt = None
        data, _ = await receiver.sync(None, 0, None)
    since = data["next_batch"]
    for k in range(args.send_warmup):  # warm-up, untimed
        await sender.send_text(room, f"latency warm-up {k}")
    for _ in range(20):  # drain: bounded
        data, _ = await receiver.sync(since, 0, filt)
        if data["next_batch"] == since:
            break
        since = data["next_batch"]

    def has_marker(d: Any, marker: str) -> bool:
        r = (d.get("rooms") or {}).get("join", {}).get(room)
        return bool(r) and carries_marker((r.get("timeline") or {}).get("events", []), marker)

    async def poll() -> Any:
        data, _ = await receiver.sync(since, args.longpoll_ms, filt)
        return data

    def advance(d: Any) -> None:
        nonlocal since
        since = d["next_batch"]

    res = await delivery_latency(args, sender, room, run_id, poll, advance, has_marker)
    return {"filter": filt is not None, **res}


async def measure_initial_sync(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, int],
    run_id: str,
) -> dict[str, Any]:
    (user,) = await make_users(http, args, stats, f"bench{run_id}i", 1)
    n_rooms = args.rooms
    next_room = 0
    created: list[str] = []

    async def worker() -> None:
        nonlocal next_room
        while next_room < n_rooms:
            idx = next_room
            next_room += 1
            rid = await user.create_room(f"initial sync bench room {idx}")
            for m in range(args.messages_per_room):
                await user.send_text(rid, f"message {m} in room {idx}")
            created.append(rid)

    with CpuMeter(args.pid) as setup_cpu:
        await asyncio.gather(*(worker() for _ in range(args.setup_concurrency)))
    log(f"initial sync: created {len(created)} rooms in {setup_cpu.wall_s:.1f}s")

    async def one() -> tuple[float, int, int]:
        t0 = time.perf_counter()
        data, nbytes = await user.sync(None, 0, None, request_timeout=300.0)
        dt = time.perf_counter() - t0
        joined = len((data.get("rooms") or {}).get("join") or {})
        return dt, joined, nbytes

    first, joined, nbytes = await one()
    runs: list[float] = []
    with CpuMeter(args.pid) as cpu:
        for _ in range(args.initial_sync_runs):
            dt, j, nbytes = await one()
            joined = min(joined, j)
            runs.append(dt)
    return {
        "rooms": len(created),
        "messages_per_room": args.messages_per_room,
        "rooms_in_response": joined,
        "response_bytes": nbytes,
        "first_ms": round(first * 1000.0, 2),
        "runs": len(runs),
        "mean_ms": round(statistics.fmean(runs) * 1000.0, 2),
        "min_ms": round(min(runs) * 1000.0, 2),
        "max_ms": round(max(runs) * 1000.0, 2),
        "server_cpu_s": cpu.server_cpu_s,
        "other_cpu_s": cpu.other_cpu_s,
        "timed_wall_s": cpu.wall_s,
        "setup": {
            **setup_cpu.as_dict(),
            "rooms_per_s": round(len(created) / setup_cpu.wall_s, 2)
            if setup_cpu.wall_s
            else None,
        },
    }


# What matrix-sdk's room list asks for when it opens: the most recent rooms with their
# last event and the state a room list shows, on the connection that also carries the
# extensions the SDK's sync service enables.
SLIDING_LIST = "all_rooms"
SLIDING_REQUIRED_STATE = [
    ["m.room.name", ""],
    ["m.room.avatar", ""],
    ["m.room.encryption", ""],
    ["m.room.member", "$LAZY"],
    ["m.room.member", "$ME"],
]
SLIDING_EXTENSIONS = ("e2ee", "to_device", "account_data", "receipts", "typing")


def sliding_body(window: int) -> dict[str, Any]:
    return {
        "conn_id": "room-list",
        "lists": {
            SLIDING_LIST: {
                "ranges": [[0, window - 1]],
                "timeline_limit": 1,
                "required_state": SLIDING_REQUIRED_STATE,
            }
        },
        "extensions": {name: {"enabled": True} for name in SLIDING_EXTENSIONS},
    }


async def measure_sliding(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, int],
    run_id: str,
) -> dict[str, Any]:
    """Simplified sliding sync (MSC4186): the first window of a user in many rooms, and the
    wake-up latency of a long-polling connection."""
    probe = Client(http, args.base_url, stats)
    _, versions, _ = await probe.request("GET", "/_matrix/client/versions")
    advertised = bool((versions.get("unstable_features") or {}).get("org.matrix.simplified_msc3575"))

    # Setup, untimed but bounded: one user in N named rooms with a few messages each, so
    # that every room has its own bump stamp.
    (user,) = await make_users(http, args, stats, f"bench{run_id}w", 1)
    n_rooms, window = args.sliding_rooms, args.sliding_window
    next_room = 0
    done: list[str] = []  # in the order their last message was acknowledged
    setup_deadline = time.perf_counter() + args.sliding_setup_limit

    async def worker() -> None:
        nonlocal next_room
        while next_room < n_rooms and time.perf_counter() < setup_deadline:
            idx = next_room
            next_room += 1
            rid = await user.create_room(f"sliding bench room {idx}")
            for m in range(args.sliding_messages_per_room):
                await user.send_text(rid, f"message {m} in room {idx}")
            done.append(rid)
            if len(done) % 100 == 0:
                log(f"sliding sync setup: {len(done)}/{n_rooms} rooms")

    with CpuMeter(args.pid) as setup_cpu:
        await asyncio.gather(*(worker() for _ in range(args.setup_concurrency)))
    setup = {
        **setup_cpu.as_dict(),
        "rooms": len(done),
        "messages_per_room": args.sliding_messages_per_room,
        "concurrency": args.setup_concurrency,
        "rooms_per_s": round(len(done) / setup_cpu.wall_s, 2) if setup_cpu.wall_s else None,
    }
    log(f"sliding sync: created {len(done)} rooms in {setup_cpu.wall_s:.1f}s")
    if len(done) < n_rooms:
        raise MatrixError(
            f"sliding sync setup created only {len(done)} of {n_rooms} rooms within "
            f"--sliding-setup-limit {args.sliding_setup_limit}s"
        )

    # First window: each request a new connection (no pos), as an app that starts.
    body = sliding_body(window)
    recent = set(done[-window:])
    counts: set[Any] = set()
    in_window: list[int] = []
    named: list[int] = []
    recent_found: list[int] = []

    async def first_window() -> tuple[float, int]:
        t0 = time.perf_counter()
        data, nbytes = await user.sliding_sync(None, body, 0, request_timeout=300.0)
        dt = time.perf_counter() - t0
        rooms = data.get("rooms") or {}
        counts.add(((data.get("lists") or {}).get(SLIDING_LIST) or {}).get("count"))
        in_window.append(len(rooms))
        named.append(sum(1 for r in rooms.values() if r.get("name")))
        recent_found.append(len(recent & set(rooms)))
        return dt, nbytes

    cold, nbytes = await first_window()
    runs: list[float] = []
    deadline = time.perf_counter() + args.phase_time_limit
    with CpuMeter(args.pid) as cpu:
        for _ in range(args.sliding_runs):
            if time.perf_counter() > deadline:
                break
            dt, nbytes = await first_window()
            runs.append(dt)
    first = {
        "cold_ms": round(cold * 1000.0, 2),
        "runs": len(runs),
        **summarize_ms(runs),
        "count": sorted(counts, key=str) if len(counts) > 1 else next(iter(counts)),
        "rooms_in_response": min(in_window),
        "named_rooms_in_response": min(named),
        # the window should be the rooms last written to (give or take the setup's concurrency)
        "most_recent_rooms_in_response": min(recent_found),
        "response_bytes": nbytes,
        **cpu.as_dict(),
    }
    log(f"   first window: cold {first['cold_ms']} ms, mean {first.get('mean_ms')} ms, "
        f"count {first['count']}, {first['rooms_in_response']} rooms")

    # Wake-up: user B keeps a connection long-polling in one room; user A sends.
    sender, receiver = await make_users(http, args, stats, f"bench{run_id}x", 2)
    room = await sender.create_room(f"sliding wake-up bench {run_id}", public=True)
    await receiver.join(room)
    wake_body = sliding_body(window)
    data, _ = await receiver.sliding_sync(None, wake_body, 0)
    pos = data["pos"]

    def advance(d: Any) -> None:
        nonlocal pos
        pos = d["pos"]
        # acknowledge to-device messages as matrix-sdk does
        batch = ((d.get("extensions") or {}).get("to_device") or {}).get("next_batch")
        if batch:
            wake_body["extensions"]["to_device"]["since"] = batch

    advance(data)
    for k in range(args.send_warmup):  # warm-up, untimed
        await sender.send_text(room, f"wake-up warm-up {k}")
    for _ in range(20):  # drain: bounded
        data, _ = await receiver.sliding_sync(pos, wake_body, 0)
        advance(data)
        if not data.get("rooms"):
            break

    async def poll() -> Any:
        data, _ = await receiver.sliding_sync(pos, wake_body, args.longpoll_ms)
        return data

    def has_marker(d: Any, marker: str) -> bool:
        r = (d.get("rooms") or {}).get(room)
        return bool(r) and carries_marker(r.get("timeline") or [], marker)

    wake = await delivery_latency(args, sender, room, run_id, poll, advance, has_marker)
    return {
        "advertised": advertised,
        "rooms": n_rooms,
        "window": window,
        "setup": setup,
        "first_window": first,
        "wake_up": wake,
    }


async def measure_syncers(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, int],
    run_id: str,
) -> dict[str, Any]:
    n = max(2, args.syncers - args.syncers % 2)  # pairs
    slots = asyncio.Semaphore(args.setup_concurrency)
    urls = [args.base_url, *args.node]
    clients = [Client(http, urls[i % len(urls)], stats) for i in range(n)]

    async def pair(k: int) -> None:
        async with slots:
            a, b = clients[2 * k], clients[2 * k + 1]
            for i, c in ((2 * k, a), (2 * k + 1, b)):
                await c.register(f"bench{run_id}y{i}", "bench-password-y", args.shared_secret)
            room = await a.create_room(f"syncers room {k}", public=True)
            await b.join(room)

    with CpuMeter(args.pid) as setup:
        await asyncio.gather(*(pair(k) for k in range(n // 2)))
    log(f"syncers: {n} users in {n // 2} rooms in {setup.wall_s:.1f}s")

    async def first_sync(c: Client) -> str:
        async with slots:
            data, _ = await c.sync(None, 0)
            return data["next_batch"]

    tokens = await asyncio.gather(*(first_sync(c) for c in clients))
    await asyncio.sleep(args.idle_wait)
    before = proc_status_kb(args.pid, "VmRSS")
    # Every client keeps a long-poll open, as a connected app does: one that returns (with
    # whatever reached the user since its first sync) is sent again at once.
    answered = 0

    async def keep_polling(c: Client, token: str) -> None:
        nonlocal answered
        while True:
            data, _ = await c.sync(token, args.longpoll_ms, request_timeout=args.longpoll_ms / 1000 + 30)
            token = data["next_batch"]
            answered += 1

    polls = [asyncio.ensure_future(keep_polling(c, token)) for c, token in zip(clients, tokens)]
    # Read once the server is at rest again with all of them connected.
    await asyncio.sleep(args.idle_wait)
    connected = proc_status_kb(args.pid, "VmRSS")
    for p in polls:
        p.cancel()
    failed = [r for r in await asyncio.gather(*polls, return_exceptions=True) if not isinstance(r, asyncio.CancelledError)]
    if failed:
        raise MatrixError(f"{len(failed)} of {n} long-polling clients failed: {failed[0]!r}")
    per_1000 = (connected - before) / n * 1000 / 1024 if before and connected else None
    return {
        "clients": n,
        "rss_at_rest_mb": round(before / 1024, 1) if before else None,
        "rss_connected_mb": round(connected / 1024, 1) if connected else None,
        "mb_per_1000_clients": round(per_1000, 1) if per_1000 is not None else None,
        "polls_answered_before_the_reading": answered,
        "setup": setup.as_dict(),
    }


def rss_snapshot(pid: list[int]) -> dict[str, Any]:
    return {
        "vmrss_kb": proc_status_kb(pid, "VmRSS"),
        "vmhwm_kb": proc_status_kb(pid, "VmHWM"),
    }


async def wait_ready(base: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(
                    base.rstrip("/") + "/_matrix/client/versions",
                    timeout=aiohttp.ClientTimeout(total=2),
                ) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server at {base} not ready after {limit_s}s")
            await asyncio.sleep(0.25)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    await wait_ready(args.base_url, args.ready_timeout)
    run_id = args.run_id or secrets.token_hex(3)
    phases = set(args.only.split(",")) if args.only else {"send", "latency", "initial"}
    if not args.only and args.sliding_rooms > 0:
        phases.add("sliding")
    stats: dict[str, int] = {}
    out: dict[str, Any] = {
        "server": args.name,
        "base_url": args.base_url,
        "pid": args.pid,
        "run_id": run_id,
        "params": {
            "senders": args.senders,
            "messages_per_sender": args.messages_per_sender,
            "latency_samples": args.latency_samples,
            "rooms": args.rooms,
            "messages_per_room": args.messages_per_room,
            "initial_sync_runs": args.initial_sync_runs,
            "idle_wait_s": args.idle_wait,
            "phases": sorted(phases),
            "sliding_rooms": args.sliding_rooms,
            "sliding_window": args.sliding_window,
            "sliding_runs": args.sliding_runs,
            "sliding_messages_per_room": args.sliding_messages_per_room,
            "syncers": args.syncers,
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    await asyncio.sleep(args.idle_wait)
    out["rss_start"] = rss_snapshot(args.pid)

    conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=conn) as http:
        if "send" in phases:
            log("send throughput, shared room ...")
            out["send_shared_room"] = await measure_send(http, args, stats, run_id, True)
            log("  ", out["send_shared_room"]["msgs_per_s"], "msg/s")
            log("send throughput, one room per sender ...")
            out["send_own_rooms"] = await measure_send(http, args, stats, run_id, False)
            log("  ", out["send_own_rooms"]["msgs_per_s"], "msg/s")
        if "wrk" in phases:
            out["wrk"] = {}
            for senders, rooms in [(n, 1) for n in args.wrk_senders] + [(max(args.wrk_senders), max(args.wrk_senders))]:
                log(f"wrk: {senders} senders in {rooms} room(s) ...")
                res = await measure_wrk(http, args, stats, run_id, senders, rooms)
                out["wrk"][f"{senders}_in_{rooms}"] = res
                log("  ", res.get("requests_per_s"), "msg/s  p99", res.get("p99_ms"), "ms  failed", res["failed"])
        if "latency" in phases:
            log("send -> /sync delivery latency ...")
            out["latency"] = await measure_latency(http, args, stats, run_id)
            log("   p50", out["latency"].get("p50_ms"), "ms  p99", out["latency"].get("p99_ms"), "ms")
        if "initial" in phases:
            log(f"initial sync of a user in {args.rooms} rooms ...")
            out["initial_sync"] = await measure_initial_sync(http, args, stats, run_id)
            log("   mean", out["initial_sync"]["mean_ms"], "ms")
        if "sliding" in phases:
            log(f"sliding sync: a user in {args.sliding_rooms} rooms ...")
            out["sliding"] = await measure_sliding(http, args, stats, run_id)
            wake = out["sliding"]["wake_up"]
            log("   wake-up p50", wake.get("p50_ms"), "ms  p99", wake.get("p99_ms"), "ms")
        if "syncers" in phases:
            log(f"{args.syncers} clients long-polling /sync ...")
            out["syncers"] = await measure_syncers(http, args, stats, run_id)
            log("  ", out["syncers"]["mb_per_1000_clients"], "MB per 1,000 clients")

    log(f"idle {args.idle_wait}s, then RSS ...")
    await asyncio.sleep(args.idle_wait)
    out["rss_idle"] = rss_snapshot(args.pid)
    out["http"] = stats
    out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base_url", help="homeserver base URL, e.g. http://127.0.0.1:8008 (loopback only)")
    p.add_argument("--name", default="server", help="label for the JSON output")
    p.add_argument("--pid", type=lambda value: [int(pid) for pid in value.split(",")], default=[],
                   help="server process ids (comma-separated: its nodes), for RSS and CPU from /proc")
    p.add_argument("--node", action="append", default=[],
                   help="another node of the same server (repeatable): users are spread over the nodes")
    p.add_argument("--shared-secret", help="registration shared secret (admin register API); "
                   "without it, /register with m.login.dummy")
    p.add_argument("--run-id", help="suffix for user names (default: random)")
    p.add_argument("--only", help="comma list of phases: send,wrk,latency,initial,sliding,syncers "
                   "(default: the first three, and sliding when --sliding-rooms is given)")
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--messages-per-sender", type=int, default=250)
    p.add_argument("--send-warmup", type=int, default=10, help="untimed messages per sender first")
    p.add_argument("--wrk-senders", type=lambda v: [int(x) for x in v.split(",")], default=[4, 16, 64],
                   help="wrk phase: senders in one room, one run each (the largest also in as many rooms)")
    p.add_argument("--wrk-seconds", type=int, default=10, help="wrk phase: seconds per run")
    p.add_argument("--wrk-dir", default="/tmp", help="wrk phase: where its Lua scripts go")
    p.add_argument("--syncers", type=int, default=1000, help="syncers phase: clients long-polling at once")
    p.add_argument("--latency-samples", type=int, default=300)
    p.add_argument("--settle-ms", type=float, default=30.0,
                   help="pause after starting the long-poll before sending")
    p.add_argument("--longpoll-ms", type=int, default=30000)
    p.add_argument("--sample-timeout", type=float, default=10.0,
                   help="a latency probe that has not arrived by then fails the run")
    p.add_argument("--rooms", type=int, default=200)
    p.add_argument("--messages-per-room", type=int, default=3)
    p.add_argument("--setup-concurrency", type=int, default=4)
    p.add_argument("--initial-sync-runs", type=int, default=5)
    p.add_argument("--sliding-rooms", type=int, default=0,
                   help="sliding sync phase: rooms of its user (0: no sliding sync phase)")
    p.add_argument("--sliding-window", type=int, default=20, help="rooms in the first window")
    p.add_argument("--sliding-runs", type=int, default=10,
                   help="timed first-window requests, after one cold one")
    p.add_argument("--sliding-messages-per-room", type=int, default=2)
    p.add_argument("--sliding-setup-limit", type=float, default=1800.0,
                   help="seconds the sliding sync setup may take before the run fails")
    p.add_argument("--idle-wait", type=float, default=12.0,
                   help="seconds idle before each RSS reading (Limbic hands back what it keeps for "
                   "speed 5-10 s after its last write)")
    p.add_argument("--phase-time-limit", type=float, default=300.0,
                   help="a timed phase stops issuing new requests after this many seconds")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args()
    if args.only:
        unknown = set(args.only.split(",")) - {"send", "wrk", "latency", "initial", "sliding", "syncers"}
        if unknown:
            p.error(f"unknown phase(s) in --only: {', '.join(sorted(unknown))}")
        if "sliding" in args.only.split(",") and args.sliding_rooms <= 0:
            p.error("--only sliding needs --sliding-rooms N")

    for url in [args.base_url, *args.node]:
        host = urllib.parse.urlparse(url).hostname or ""
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise SystemExit("refusing to load a non-loopback address: " + host)

    try:
        import uvloop  # type: ignore
    except ImportError:
        uvloop = None
    result = uvloop.run(run(args)) if uvloop else asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
