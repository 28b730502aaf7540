#!/usr/bin/env python3
"""Matrix client-server load generator for comparing homeservers.

Runs four measurements against ONE homeserver and prints a JSON document:

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
  rss         the server process's VmRSS from /proc/<pid>/status at start and
              after everything, once the server has been idle a few seconds.

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
import secrets
import statistics
import sys
import time
import urllib.parse
from typing import Any

import aiohttp

API = "/_matrix/client/v3"


def log(*args: Any) -> None:
    print("[matrix_load]", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc helpers (the server runs on this machine)
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_status_kb(pid: int | None, field: str) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of the process (all threads), in seconds."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # the command name may contain spaces; fields after the closing paren
    rest = data[data.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / CLK_TCK


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

    def __init__(self, pid: int | None):
        self.pid = pid

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
    out = []
    for i in range(n):
        c = Client(http, args.base_url, stats)
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
        if not r:
            return False
        for ev in (r.get("timeline") or {}).get("events", []):
            if (ev.get("content") or {}).get("org.limbic.bench.marker") == marker:
                return True
        return False

    samples: list[float] = []
    extra_polls = 0
    early_returns = 0
    deadline = time.perf_counter() + args.phase_time_limit
    with CpuMeter(args.pid) as cpu:
        for i in range(args.latency_samples):
            if time.perf_counter() > deadline:
                break
            marker = f"{run_id}-{i}"
            poll = asyncio.create_task(receiver.sync(since, args.longpoll_ms, filt))
            await asyncio.sleep(args.settle_ms / 1000.0)
            # The long-poll may have returned early with something unrelated:
            # take it and park a new one (bounded).
            for _ in range(10):
                if not poll.done():
                    break
                early_returns += 1
                data, _ = poll.result()
                since = data["next_batch"]
                poll = asyncio.create_task(receiver.sync(since, args.longpoll_ms, filt))
                await asyncio.sleep(args.settle_ms / 1000.0)
            t0 = time.perf_counter()
            send = asyncio.create_task(
                sender.send_text(
                    room,
                    f"latency probe {i}",
                    {
                        "org.limbic.bench.marker": marker,
                        # canonical JSON has no floats: integer ms
                        "org.limbic.bench.sent_ts": int(time.time() * 1000),
                    },
                )
            )
            arrived = None
            sample_deadline = t0 + args.sample_timeout
            for _ in range(20):  # bounded re-polls until the event shows up
                # Wait for the poll, but fail fast if the send fails.
                while not poll.done():
                    left = sample_deadline - time.perf_counter()
                    if left <= 0:
                        break
                    pending = {poll} if send.done() else {poll, send}
                    await asyncio.wait(
                        pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                    )
                    if send.done() and send.exception() is not None:
                        poll.cancel()
                        raise send.exception()  # type: ignore[misc]
                if not poll.done():
                    break
                data, _ = poll.result()
                t1 = time.perf_counter()
                since = data["next_batch"]
                if has_marker(data, marker):
                    arrived = t1
                    break
                extra_polls += 1
                poll = asyncio.create_task(receiver.sync(since, args.longpoll_ms, filt))
            if arrived is None:
                poll.cancel()
                send.cancel()
                raise MatrixError(
                    f"latency probe {i} did not arrive in /sync within {args.sample_timeout}s"
                )
            await send
            samples.append(arrived - t0)
    res = {
        "samples": len(samples),
        "filter": filt is not None,
        "settle_ms": args.settle_ms,
        "extra_polls": extra_polls,
        "early_returns": early_returns,
        **summarize_ms(samples),
        **cpu.as_dict(),
    }
    return res


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


def rss_snapshot(pid: int | None) -> dict[str, Any]:
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
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    await asyncio.sleep(args.idle_wait)
    out["rss_start"] = rss_snapshot(args.pid)

    conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=conn) as http:
        phases = set(args.only.split(",")) if args.only else {"send", "latency", "initial"}
        if "send" in phases:
            log("send throughput, shared room ...")
            out["send_shared_room"] = await measure_send(http, args, stats, run_id, True)
            log("  ", out["send_shared_room"]["msgs_per_s"], "msg/s")
            log("send throughput, one room per sender ...")
            out["send_own_rooms"] = await measure_send(http, args, stats, run_id, False)
            log("  ", out["send_own_rooms"]["msgs_per_s"], "msg/s")
        if "latency" in phases:
            log("send -> /sync delivery latency ...")
            out["latency"] = await measure_latency(http, args, stats, run_id)
            log("   p50", out["latency"].get("p50_ms"), "ms  p99", out["latency"].get("p99_ms"), "ms")
        if "initial" in phases:
            log(f"initial sync of a user in {args.rooms} rooms ...")
            out["initial_sync"] = await measure_initial_sync(http, args, stats, run_id)
            log("   mean", out["initial_sync"]["mean_ms"], "ms")

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
    p.add_argument("--pid", type=int, help="server process id, for RSS and CPU from /proc")
    p.add_argument("--shared-secret", help="registration shared secret (admin register API); "
                   "without it, /register with m.login.dummy")
    p.add_argument("--run-id", help="suffix for user names (default: random)")
    p.add_argument("--only", help="comma list of phases: send,latency,initial (default all)")
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--messages-per-sender", type=int, default=250)
    p.add_argument("--send-warmup", type=int, default=10, help="untimed messages per sender first")
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
    p.add_argument("--idle-wait", type=float, default=5.0, help="seconds idle before each RSS reading")
    p.add_argument("--phase-time-limit", type=float, default=300.0,
                   help="a timed phase stops issuing new requests after this many seconds")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args()

    host = urllib.parse.urlparse(args.base_url).hostname or ""
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
