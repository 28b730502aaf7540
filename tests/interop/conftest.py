"""Fixtures for the matrix-nio interop suite.

Each test module gets its own real `limbic` server (the binary built by
`cargo build -p limbic-server --bins`), listening on a free loopback port, with
a fresh RocksDB store in a temporary directory. The config is
config.example.toml with the port, store path, rate limits and registration
mode overridden. `server.restart()` restarts it on the same store; `server.kill()`
is `kill -9`.

Environment:
  LIMBIC_BIN        path of the server binary (default: <target dir>/debug/limbic)
  INTEROP_CLUSTER=1 each server is two nodes on one PostgreSQL database (a throwaway cluster
                    from limbic-test-postgres, built beside the server) behind a proxy that
                    sends each client to the node its access token picks (docs/TESTING.md)
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import ctypes
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / ".artifacts"
EXAMPLE_CONFIG = REPO / "config.example.toml"

_live_servers: set["LimbicServer"] = set()


def limbic_env() -> dict[str, str]:
    """This environment without LIMBIC_* variables, for a `limbic` process: Limbic reads them as
    overrides of its config, and refuses one it does not know (LIMBIC_BIN, say)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LIMBIC_")}


def _binary() -> Path:
    if os.environ.get("LIMBIC_BIN"):
        return Path(os.environ["LIMBIC_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "limbic"


_PORT_SPAN = 12_000
_next_port = None


def free_port() -> int:
    """A loopback TCP port free now, never handed out before by this process, and below the
    kernel's ephemeral range: a server stopped and started again (the crash tests) must find its
    port still free, and ports in that range are what every outgoing connection and every
    `bind(0)` (the servers' own ICE-over-TCP listeners) take meanwhile."""
    global _next_port
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768
    if ephemeral_start < _PORT_SPAN + 1024:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if _next_port is None:
        # Each test process starts at its own offset, so that two running at once rarely meet.
        _next_port = os.getpid() * 7919 % _PORT_SPAN
    for _ in range(_PORT_SPAN):
        port = ephemeral_start - _PORT_SPAN + _next_port % _PORT_SPAN
        _next_port += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# --- a minimal TOML writer (tomllib only reads) --------------------------------


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v)} to TOML")


def dump_toml(data: dict) -> str:
    """Top-level scalars, then one [table] per top-level dict; deeper dicts inline."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _merge(config: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            _merge(config.setdefault(key, {}), value)
        else:
            config[key] = value


def _merged(base: dict, overrides: dict) -> dict:
    """A copy of `base` with `overrides` merged in; `base` is left as it was."""
    config = copy.deepcopy(base)
    _merge(config, overrides)
    return config


def write_config(path: Path, port: int, store: Path, overrides: dict | None = None) -> dict:
    with open(EXAMPLE_CONFIG, "rb") as f:
        cfg = tomllib.load(f)
    cfg.setdefault("listen", {})
    cfg["listen"]["address"] = "127.0.0.1"
    cfg["listen"]["port"] = port
    cfg.setdefault("database", {})["path"] = str(store)
    cfg.setdefault("rate_limits", {})["enabled"] = False
    cfg.setdefault("registration", {})["mode"] = "open"
    # The example ships no admin registration secret; the tests that register admins need one.
    cfg["registration"]["shared_secret"] = "interop-shared-secret-0123456789abcdef"
    cfg.setdefault("calls", {}).update(udp_port=0, tcp_port=0)  # any free ports: servers run side by side
    cfg.setdefault("web", {})["assets_dir"] = str(REPO / "web" / "dist")
    # The example's plugins, from the repository's build; compiled once for every server.
    for plugin in cfg.get("plugins", []):
        for key in ("path", "manifest"):
            plugin[key] = str(REPO / plugin[key])
    cfg.setdefault("plugin_host", {})["cache_dir"] = str(ARTIFACTS / "plugin-cache")
    _merge(cfg, overrides or {})
    path.write_text(dump_toml(cfg))
    return cfg


# --- the server process ----------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if pytest dies, so no server is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LimbicServer:
    def __init__(self, name: str, workdir: Path, store: Path | None = None, overrides: dict | None = None):
        self.name = name
        self.workdir = workdir
        self.store = store or workdir / "store"
        self.config_path = workdir / "limbic.toml"
        self.port = free_port()
        self.config = write_config(self.config_path, self.port, self.store, overrides)
        self.server_name = self.config.get("server_name", "localhost")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        self.log_path.write_text("")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_paths(self) -> list[Path]:
        return [self.log_path]

    def start(self, timeout: float = 60.0) -> None:
        binary = _binary()
        if not binary.exists():
            pytest.fail(
                f"server binary {binary} does not exist: run `cargo build -p limbic-server --bins` "
                "(scripts/test does) or set LIMBIC_BIN",
                pytrace=False,
            )
        env = limbic_env()
        env["NO_COLOR"] = "1"  # plain log files
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {binary} serve --config {self.config_path}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        _live_servers.add(self)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"limbic exited with status {self.proc.returncode} before answering "
                    f"/_matrix/client/versions\n--- log tail ---\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/_matrix/client/versions", timeout=2) as r:
                    body = json.loads(r.read())
                    if r.status == 200 and isinstance(body.get("versions"), list):
                        return
                    last_error = f"status {r.status}, body {body!r}"
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code}: {e.read()[:300]!r}"
            except (OSError, ValueError) as e:
                last_error = repr(e)
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"limbic did not answer GET /_matrix/client/versions within {timeout}s "
            f"(last: {last_error})\n--- log tail ---\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        _live_servers.discard(self)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        _live_servers.discard(self)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, timeout: float = 60.0) -> None:
        """Stop gracefully and start again on the same store, config and port."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@atexit.register
def _kill_leftovers() -> None:
    for srv in list(_live_servers):
        srv.kill()


# --- cluster mode: two nodes on one PostgreSQL database, behind a proxy ----------------

CLUSTER = os.environ.get("INTEROP_CLUSTER") == "1"


class _Postgres:
    """The throwaway PostgreSQL server of this pytest run (limbic-test-postgres): it hands out
    new databases, and stops when pytest ends (its standard input closes)."""

    proc: subprocess.Popen | None = None

    @classmethod
    def new_database(cls, purpose: str) -> str:
        if cls.proc is None:
            binary = _binary().with_name("limbic-test-postgres")
            if not binary.exists():
                pytest.fail(f"{binary} does not exist: run `cargo build -p limbic-test-postgres --bins` (scripts/test does)", pytrace=False)
            cls.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        cls.proc.stdin.write(purpose + "\n")
        cls.proc.stdin.flush()
        return cls.proc.stdout.readline().strip()


class _Proxy:
    """A load balancer in front of the nodes, on a thread of its own: each request goes to the
    node its access token picks (one client keeps to one node), requests without one alternate.
    WebSockets are not passed on: call tokens send LiveKit's SDKs to their node directly."""

    DROPPED = {"host", "connection", "transfer-encoding", "content-length", "keep-alive", "upgrade"}

    def __init__(self) -> None:
        self.port = free_port()
        self.ports: list[int] = []
        self.turn = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        from aiohttp import ClientSession, ClientTimeout, web

        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            self.session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None))
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            started.set()

        self.loop.run_until_complete(serve())
        self.loop.run_forever()

    def _pick(self, request) -> int:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or request.query.get("access_token")
        if token:
            return self.ports[hashlib.sha256(token.encode()).digest()[0] % len(self.ports)]
        self.turn += 1
        return self.ports[self.turn % len(self.ports)]

    async def _forward(self, request):
        from aiohttp import web

        from aiohttp import ClientError

        port = self._pick(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.DROPPED}
        try:
            async with self.session.request(request.method, f"http://127.0.0.1:{port}{request.raw_path}", headers=headers, data=await request.read(), allow_redirects=False) as answer:
                body = await answer.read()
                kept = {k: v for k, v in answer.headers.items() if k.lower() not in self.DROPPED}
                return web.Response(status=answer.status, body=body, headers=kept)
        except (ClientError, ValueError) as error:
            # As a load balancer answers for a node it cannot reach.
            return web.Response(status=502, text=f"the proxy could not pass the request on: {error}")


class _TcpProxy:
    """A layer-4 load balancer: each connection goes to the next node in turn, its bytes passed
    on untouched both ways (TLS, or HTTP an HTTP proxy would refuse), a thread per direction.
    Blocking sockets, not asyncio's streams: a node that answers before it has read a whole body
    closes with a reset, and a stream that saw the reset drops the answer it had already read."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.ports: list[int] = []
        self.turn = 0
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            self.turn += 1
            threading.Thread(target=self._connection, args=(client, self.ports[self.turn % len(self.ports)]), daemon=True).start()

    @staticmethod
    def _connection(client: socket.socket, port: int) -> None:
        try:
            node = socket.create_connection(("127.0.0.1", port))
        except OSError:
            client.close()  # as a balancer drops what it cannot place
            return

        def pipe(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(1 << 16):
                    sink.sendall(data)
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                # One side went away: what the other sent is still passed on until it ends too.
                pass

        answers = threading.Thread(target=pipe, args=(node, client), daemon=True)
        answers.start()
        pipe(client, node)
        answers.join()
        node.close()
        client.close()


class LimbicCluster:
    """Two `limbic` nodes (a and b) on one new PostgreSQL database, sharing the store directory
    (key files, media), behind a proxy: the same interface as one LimbicServer."""

    def __init__(self, name: str, workdir: Path, overrides: dict | None = None, passthrough: bool = False):
        """`passthrough`: the client listener's proxy passes each connection on as it comes
        (_TcpProxy), for clients that send what an HTTP proxy would refuse or mend."""
        self.proxy = _TcpProxy() if passthrough else _Proxy()
        url = _Postgres.new_database(name)
        store = workdir / "store"
        # Federation (if asked for) listens on each node's own port, behind one TCP proxy on the
        # port the server's name names, as a layer-4 balancer in front of TLS listeners would.
        federation = (overrides or {}).get("federation", {})
        self.fed_proxy = _TcpProxy(federation["port"]) if federation.get("enabled") else None

        def node(node_name: str) -> LimbicServer:
            own = {
                "database": {"backend": "postgres", "url": url, "pool_size": 4},
                "cluster": {"node_name": node_name},
                # One media directory for both, as a shared volume would be.
                "media": {"path": str(workdir / "media")},
                "calls": {"service_url": f"http://127.0.0.1:{self.proxy.port}/_limbic/calls"},
            }
            if self.fed_proxy:
                own["federation"] = {"port": free_port()}
            (workdir / node_name).mkdir(exist_ok=True)
            return LimbicServer(f"{name}-{node_name}", workdir / node_name, store, _merged(overrides or {}, own))

        self.nodes = [node("a"), node("b")]
        self.proxy.ports = [n.port for n in self.nodes]
        if self.fed_proxy:
            self.fed_proxy.ports = [n.config["federation"]["port"] for n in self.nodes]
        first = self.nodes[0]
        self.port, self.server_name, self.config, self.config_path, self.log_path, self.store = (
            self.proxy.port, first.server_name, first.config, first.config_path, first.log_path, store)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def log_paths(self) -> list[Path]:
        return [n.log_path for n in self.nodes]

    @property
    def proc(self):
        return self.nodes[0].proc

    def start(self, timeout: float = 60.0) -> None:
        for n in self.nodes:
            n.start(timeout)

    def stop(self, grace: float = 10.0) -> int | None:
        return [n.stop(grace) for n in self.nodes][0]

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- node {n.name} ---\n{n.log_tail(lines)}" for n in self.nodes)


def limbic(name: str, workdir: Path, overrides: dict | None = None, passthrough: bool = False) -> LimbicServer | LimbicCluster:
    """One server, or two nodes and their proxies with INTEROP_CLUSTER=1 (see LimbicCluster
    for `passthrough`); not started."""
    if CLUSTER:
        return LimbicCluster(name, workdir, overrides, passthrough)
    return LimbicServer(name, workdir, overrides=overrides)


def federated_server(name: str, workdir: Path, pki, overrides: dict | None = None) -> LimbicServer | LimbicCluster:
    """A server with `[federation]` on TLS (`pki`: the test CA's `certificate`, `key` and `ca`
    files), named `127.0.0.1:<its federation port>` and trusting the test CA only; not started."""
    port = free_port()
    federation = {
        "server_name": f"127.0.0.1:{port}",
        "plugins": [],  # not what federation tests are about; keeps startup short
        "federation": {
            "enabled": True,
            "address": "127.0.0.1",
            "port": port,
            "tls_certificate": str(pki.certificate),
            "tls_private_key": str(pki.key),
            "ca_certificates": [str(pki.ca)],
            "trust_web_pki": False,
            # The peer is on loopback, which federation refuses unless allowed.
            "allowed_networks": ["127.0.0.1/32"],
        },
    }
    return limbic(name, workdir, _merged(federation, overrides or {}))


def federation_requests(node: LimbicServer) -> list[str]:
    """The federation routes one node answered, with status and count (its /metrics)."""
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = []
    for line in text.splitlines():
        m = re.match(r'limbic_http_requests_seconds_count\{method="(\w+)",route="([^"]*)",status="(\d+)"\} (\d+)', line)
        if m and "/_matrix/federation/" in m.group(2):
            found.append(f"{m.group(1)} {m.group(2)} -> {m.group(3)} x{m.group(4)}")
    return found


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """A running limbic server with a fresh store, one per test module (two nodes and a proxy
    with INTEROP_CLUSTER=1; a module that sends what an HTTP proxy would refuse or mend sets
    `RAW_CLIENT = True` to have its connections passed on byte for byte)."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    srv = limbic(name, tmp_path_factory.mktemp(name), passthrough=getattr(request.module, "RAW_CLIENT", False))
    srv.start()
    yield srv
    srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        srv = item.funcargs.get("server") if hasattr(item, "funcargs") else None
        if isinstance(srv, (LimbicServer, LimbicCluster)):
            report.sections.append(
                (f"limbic log tail ({srv.log_path})", srv.log_tail(30))
            )
