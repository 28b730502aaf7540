"""Small helpers around matrix-nio for the interop tests.

Every failing request is reported with its method, URL, HTTP status and body, so
that a failure names the endpoint that misbehaved.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    LoginResponse,
    MessageDirection,
    RegisterResponse,
    RoomMessagesResponse,
    SyncResponse,
)

# Marks the messages of a test run; the value is the message's sequence number.
SEQ_KEY = "org.limbic.interop.seq"


def run(coro):
    """Run a coroutine to completion on a fresh event loop (tests are plain functions)."""
    return asyncio.run(coro)


def client_config(retries: int = 2, encryption: bool = False) -> AsyncClientConfig:
    # nio retries connection errors and 429s forever by default; a test must fail instead.
    return AsyncClientConfig(
        max_limit_exceeded=0,
        max_timeouts=retries,
        request_timeout=30,
        encryption_enabled=encryption,
        store_sync_tokens=False,
    )


@dataclass
class Account:
    localpart: str
    password: str
    user_id: str = ""
    device_id: str = ""
    access_token: str = ""


async def explain(resp: Any) -> str:
    """Method, URL, status and body of the HTTP exchange behind a nio response."""
    tr = getattr(resp, "transport_response", None)
    if tr is None:
        return repr(resp)
    try:
        body = (await tr.text())[:800]
    except Exception as e:  # body already released or not text
        body = f"<unreadable body: {e!r}>"
    return f"{tr.method} {tr.url.path_qs} -> HTTP {tr.status}: {body}  [nio: {type(resp).__name__}]"


async def expect(resp: Any, cls: type | tuple[type, ...], what: str):
    """Assert that `resp` is a `cls` (a nio success response); otherwise fail with details."""
    if not isinstance(resp, cls):
        raise AssertionError(f"{what} failed: {await explain(resp)}")
    return resp


async def expect_error(resp: Any, what: str, errcode: str | None = None, status: int | None = None):
    """Assert that `resp` is an error, optionally with this `errcode` and/or HTTP `status`."""
    if not isinstance(resp, ErrorResponse):
        raise AssertionError(f"{what}: expected an error, got success: {await explain(resp)}")
    if errcode is not None and resp.status_code != errcode:
        raise AssertionError(f"{what}: expected {errcode}: {await explain(resp)}")
    tr = getattr(resp, "transport_response", None)
    if status is not None and (tr is None or tr.status != status):
        raise AssertionError(f"{what}: expected HTTP {status}: {await explain(resp)}")
    return resp


def new_client(base_url: str, account: Account | None = None, retries: int = 2) -> AsyncClient:
    client = AsyncClient(
        base_url,
        user=account.localpart if account else "",
        config=client_config(retries),
    )
    if account and account.access_token:
        client.restore_login(account.user_id, account.device_id, account.access_token)
    return client


def e2e_client(base_url: str, account: Account, store_dir: Path, retries: int = 2) -> AsyncClient:
    """A nio client with end-to-end encryption on (vodozemac), logged in with the account's
    access token; its crypto store (Olm account, sessions, device lists) lives in `store_dir`.

    The caller owns it: `await client.close()` releases the HTTP session (the client can be used
    again afterwards, on the same event loop)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    client = AsyncClient(
        base_url,
        account.user_id,
        device_id=account.device_id,
        store_path=str(store_dir),
        config=client_config(retries, encryption=True),
    )
    client.restore_login(account.user_id, account.device_id, account.access_token)  # loads the store
    return client


@asynccontextmanager
async def session(base_url: str, account: Account, retries: int = 2):
    """A nio client using the account's stored access token."""
    client = new_client(base_url, account, retries)
    try:
        yield client
    finally:
        await client.close()


async def raw(base_url: str, method: str, path: str, token: str | None = None,
              body: Any = None, query: dict | None = None) -> tuple[int, Any]:
    """A plain HTTP request for what nio does not cover; returns (status, parsed JSON)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, base_url + path, json=body, params=query,
                                headers=headers) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text) if text else None
            except ValueError:
                return r.status, text


async def raw_bytes(base_url: str, method: str, path: str, token: str | None = None,
                    query: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request answered with bytes; returns (status, headers, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, base_url + path, params=query, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


def shared_secret_mac(secret: str, nonce: str, localpart: str, password: str, admin: bool) -> str:
    """HMAC-SHA1 (hex) over nonce NUL user NUL password NUL ("admin" | "notadmin"), as Synapse."""
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\0".join([nonce.encode(), localpart.encode(), password.encode(),
                           b"admin" if admin else b"notadmin"]))
    return mac.hexdigest()


async def register_with_shared_secret(base_url: str, secret: str, localpart: str, password: str,
                                      admin: bool = False) -> Account:
    """Synapse's shared-secret registration (`/_synapse/admin/v1/register`): GET a one-use
    nonce, then POST the account with `shared_secret_mac`."""
    path = "/_synapse/admin/v1/register"
    status, body = await raw(base_url, "GET", path)
    assert status == 200 and isinstance(body, dict) and body.get("nonce"), \
        f"GET {path} -> HTTP {status}: {body!r}"
    nonce = body["nonce"]
    status, body = await raw(base_url, "POST", path, body={
        "nonce": nonce, "username": localpart, "password": password, "admin": admin,
        "mac": shared_secret_mac(secret, nonce, localpart, password, admin),
    })
    assert status == 200 and isinstance(body, dict) and body.get("access_token"), \
        f"POST {path} ({localpart}, admin={admin}) -> HTTP {status}: {body!r}"
    return Account(localpart, password, body["user_id"], body["device_id"], body["access_token"])


async def register(base_url: str, localpart: str, password: str) -> Account:
    """Register with nio's `register` (m.login.dummy).

    nio sends the dummy auth stage straight away; a server may instead answer
    401 with a UIA session first (both are spec-conformant), in which case the
    stage is completed with that session, as a client following the spec does.
    """
    client = new_client(base_url)
    try:
        resp = await client.register(localpart, password, device_name="nio interop")
        if not isinstance(resp, RegisterResponse):
            tr = getattr(resp, "transport_response", None)
            if tr is not None and tr.status == 401:
                status, uia = await raw(base_url, "POST", "/_matrix/client/v3/register",
                                        body={"username": localpart, "password": password})
                if status == 401 and isinstance(uia, dict) and uia.get("session"):
                    resp = await client.register(localpart, password, device_name="nio interop",
                                                 session_token=uia["session"])
        await expect(resp, RegisterResponse, f"register {localpart}")
        return Account(localpart, password, resp.user_id, resp.device_id, resp.access_token)
    finally:
        await client.close()


async def login(base_url: str, localpart: str, password: str, device_name: str = "nio interop") -> Account:
    client = new_client(base_url)
    client.user = localpart
    try:
        resp = await client.login(password=password, device_name=device_name)
        await expect(resp, LoginResponse, f"password login of {localpart}")
        return Account(localpart, password, resp.user_id, resp.device_id, resp.access_token)
    finally:
        await client.close()


def timeline_filter(limit: int) -> dict:
    return {"room": {"timeline": {"limit": limit}}}


async def sync_once(client: AsyncClient, timeout_ms: int = 0, limit: int = 10) -> SyncResponse:
    resp = await client.sync(timeout=timeout_ms, sync_filter=timeline_filter(limit))
    return await expect(resp, SyncResponse, f"sync of {client.user_id}")


async def sync_until(client: AsyncClient, predicate: Callable[[SyncResponse], Any],
                     what: str, deadline_s: float = 15.0, limit: int = 50) -> Any:
    """Incremental /sync (from the client's last next_batch) until predicate(resp) is truthy.

    Returns the predicate's value.
    """
    deadline = time.monotonic() + deadline_s
    seen = 0
    while True:
        resp = await sync_once(client, timeout_ms=1000, limit=limit)
        seen += 1
        value = predicate(resp)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{client.user_id} never saw {what} in {seen} syncs ({deadline_s}s)")


def timeline_sources(resp: SyncResponse, room_id: str) -> list[dict]:
    room = resp.rooms.join.get(room_id)
    return [ev.source for ev in room.timeline.events] if room else []


async def paginate(client: AsyncClient, room_id: str, start: str | None,
                   direction: MessageDirection, limit: int = 100,
                   max_pages: int = 100) -> tuple[list[dict], str | None, bool]:
    """Page through /messages from `start` until the server says there is no more.

    Returns (event sources in the order received, the last `end` token seen,
    whether the last non-empty page carried an `end` token).
    """
    events: list[dict] = []
    token = start
    last_end = None
    last_page_had_end = True
    for _ in range(max_pages):
        resp = await client.room_messages(room_id, start=token, direction=direction, limit=limit)
        await expect(resp, RoomMessagesResponse,
                     f"/messages dir={direction.value} from={token!r}")
        events += [ev.source for ev in resp.chunk]
        if resp.chunk:
            last_page_had_end = resp.end is not None
        if resp.end is not None:
            last_end = resp.end
        if not resp.chunk or resp.end is None or resp.end == token:
            return events, last_end, last_page_had_end
        token = resp.end
    raise AssertionError(f"/messages did not end after {max_pages} pages of {limit}")


def seq_messages(sources: list[dict]) -> list[tuple[int, str]]:
    """(seq, event_id) of this suite's numbered messages, in the given order."""
    out = []
    for ev in sources:
        if ev.get("type") == "m.room.message":
            seq = (ev.get("content") or {}).get(SEQ_KEY)
            if seq is not None:
                out.append((seq, ev["event_id"]))
    return out


async def full_history(client: AsyncClient, room_id: str, page: int = 100) -> list[dict]:
    """The room's whole visible timeline, oldest first: /messages backwards from a fresh
    sync's next_batch (a valid `from` token per the spec) to the start of the room."""
    resp = await sync_once(client, limit=1)
    events, _, _ = await paginate(client, room_id, resp.next_batch, MessageDirection.back, limit=page)
    return list(reversed(events))
