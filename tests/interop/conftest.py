"""Fixtures for the matrix-nio interop suite.

Each test module gets its own real `limbic` server (the binary built by
`cargo build -p limbic-server --bins`), listening on a free loopback port, with
a fresh RocksDB store in a temporary directory. The config is
config.example.toml with the port, store path, rate limits and registration
mode overridden. `server.restart()` restarts it on the same store; `server.kill()`
is `kill -9`.

Environment:
  LIMBIC_BIN    path of the server binary (default: <target dir>/debug/limbic)
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
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


def _binary() -> Path:
    if os.environ.get("LIMBIC_BIN"):
        return Path(os.environ["LIMBIC_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "limbic"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def write_config(path: Path, port: int, store: Path) -> dict:
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
    def __init__(self, name: str, workdir: Path):
        self.name = name
        self.workdir = workdir
        self.store = workdir / "store"
        self.config_path = workdir / "limbic.toml"
        self.port = free_port()
        self.config = write_config(self.config_path, self.port, self.store)
        self.server_name = self.config.get("server_name", "localhost")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        self.log_path.write_text("")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        binary = _binary()
        if not binary.exists():
            pytest.fail(
                f"server binary {binary} does not exist: run `cargo build -p limbic-server --bins` "
                "(scripts/test does) or set LIMBIC_BIN",
                pytrace=False,
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIMBIC_")}
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


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """A running limbic server with a fresh store, one per test module."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    srv = LimbicServer(name, tmp_path_factory.mktemp(name))
    srv.start()
    yield srv
    srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        srv = item.funcargs.get("server") if hasattr(item, "funcargs") else None
        if isinstance(srv, LimbicServer):
            report.sections.append(
                (f"limbic log tail ({srv.log_path})", srv.log_tail(30))
            )
