#!/usr/bin/env python3
"""Writes the benchmark configs of both servers.

  configs.py synapse GENERATED_YAML PORT SECRET LOG_CONFIG
      rewrites a config made by `python -m synapse.app.homeserver
      --generate-config` in place: SQLite, one plain-HTTP client listener on
      127.0.0.1:PORT, open registration, the shared secret, every rc_* rate
      limit out of the way, no federation, no key server, no sync cache;
      LOG_CONFIG gets a WARNING-level log config.

  configs.py limbic EXAMPLE_TOML OUT_TOML PORT DB_PATH SECRET [PLUGINS]
      writes OUT_TOML from Limbic's config.example.toml with [listen] port,
      [database] path, [registration] open with the shared secret,
      [rate_limits] enabled = false, [logging] level = "warn", and
      [media] path beside DB_PATH when the example has a [media] section.
      PLUGINS is "none" (default: the example's [[plugins]] are left out)
      or "example" (kept, their paths made absolute from the example's
      directory).

  configs.py limbic-sfu EXAMPLE_TOML OUT_TOML PORT DB_PATH SECRET UDP_ADDRESS UDP_PORT
      as `limbic` without plugins, and for the SFU benchmark: call media on
      UDP_ADDRESS:UDP_PORT only (no ICE over TCP, no TURN servers), calls of
      up to 1,000 participants.

Run the synapse variant with the bench venv's Python (it needs PyYAML).
"""

from __future__ import annotations

import json
import re
import sys

HIGH = {"per_second": 100000, "burst_count": 100000}


def synapse(path: str, port: str, secret: str, log_config: str, postgres: str = "") -> None:
    import yaml  # from the bench venv (a Synapse dependency)

    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg.update(
        {
            "listeners": [
                {
                    "port": int(port),
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": postgres_database(postgres) if postgres else {
                "name": "sqlite3",
                "args": {"database": cfg["database"]["args"]["database"]},
            },
            "log_config": log_config,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "registration_shared_secret": secret,
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "url_preview_enabled": False,
            "enable_metrics": False,
            # Synapse otherwise caches a /sync response for 2 minutes, which
            # would turn repeated initial syncs into cache hits.
            "caches": {"sync_response_cache_duration": 0},
            # every rate limit out of the way
            "rc_message": HIGH,
            "rc_registration": HIGH,
            "rc_registration_token_validity": HIGH,
            "rc_login": {"address": HIGH, "account": HIGH, "failed_attempts": HIGH},
            "rc_admin_redaction": HIGH,
            "rc_joins": {"local": HIGH, "remote": HIGH},
            "rc_joins_per_room": HIGH,
            "rc_3pid_validation": HIGH,
            "rc_invites": {"per_room": HIGH, "per_user": HIGH, "per_issuer": HIGH},
            "rc_third_party_invite": HIGH,
            "rc_media_create": HIGH,
            "rc_presence": {"per_user": HIGH},
            "rc_delayed_event_mgmt": HIGH,
            "rc_room_creation": HIGH,
            "rc_reports": HIGH,
            "rc_user_directory": HIGH,
            "rc_profile": HIGH,
            "rc_key_requests": HIGH,
        }
    )
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    log_cfg = {
        "version": 1,
        "formatters": {"precise": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "precise",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "WARNING", "handlers": ["console"]},
        "disable_existing_loggers": False,
    }
    with open(log_config, "w") as f:
        yaml.safe_dump(log_cfg, f, sort_keys=False)


def plugin_lines(lines: list[str], mode: str, base: str) -> list[str]:
    """The example's lines without its [[plugins]] entries (mode "none"), or with their
    component and manifest paths made absolute (mode "example")."""
    import os

    kept: list[str] = []
    in_plugins = False
    for line in lines:
        header = re.match(r"^\s*\[\[?([A-Za-z0-9_.-]+)\]?\]\s*$", line)
        if header:
            in_plugins = header.group(1) == "plugins" or header.group(1).startswith("plugins.")
        if in_plugins and mode == "none":
            continue
        path = re.match(r'^(\s*)(path|manifest)\s*=\s*"(.*)"\s*$', line)
        if in_plugins and path and not os.path.isabs(path.group(3)):
            line = f'{path.group(1)}{path.group(2)} = {json.dumps(os.path.join(base, path.group(3)))}'
        kept.append(line)
    return kept


def postgres_database(url: str) -> dict:
    """Synapse's psycopg2 settings for a postgresql://user@host:port/database URL."""
    from urllib.parse import urlparse

    u = urlparse(url)
    return {
        "name": "psycopg2",
        "args": {"user": u.username, "host": u.hostname, "port": u.port, "database": u.path.lstrip("/"), "cp_min": 5, "cp_max": 10},
    }


def limbic(example: str, out: str, port: str, db_path: str, secret: str, plugins: str = "none", calls: dict[str, str] | None = None) -> None:
    import os

    if plugins not in ("none", "example"):
        sys.exit(f"PLUGINS must be none or example, not {plugins!r}")
    wanted = {
        "listen": {"address": '"127.0.0.1"', "port": port},
        "database": {"path": json.dumps(db_path)},
        "registration": {"mode": '"open"', "shared_secret": json.dumps(secret)},
        "rate_limits": {"enabled": "false"},
        "logging": {"level": '"warn"'},
        # only rewritten when the example has it (older binaries reject it)
        "media": {"path": json.dumps(db_path + "-media")},
    }
    if calls is not None:
        wanted["calls"] = calls
        wanted["voip"] = {"turn_uris": "[]"}
    optional = {"media"}
    seen: dict[str, set[str]] = {k: set() for k in wanted}
    section = ""
    lines_out: list[str] = []

    def flush_missing(sec: str) -> None:
        if sec in optional:
            return
        for key, val in wanted.get(sec, {}).items():
            if key not in seen[sec]:
                lines_out.append(f"{key} = {val}")
                seen[sec].add(key)

    with open(example) as f:
        lines = plugin_lines(f.read().splitlines(), plugins, os.path.dirname(os.path.abspath(example)))
    for line in lines:
        m = re.match(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*$", line)
        if m:
            flush_missing(section)
            section = m.group(1)
            lines_out.append(line)
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+)\s*=", line)
        if m and section in wanted and m.group(2) in wanted[section]:
            key = m.group(2)
            lines_out.append(f"{m.group(1)}{key} = {wanted[section][key]}")
            seen[section].add(key)
            continue
        lines_out.append(line)
    flush_missing(section)
    for sec, kv in wanted.items():
        if not seen[sec] and kv and sec not in optional:
            lines_out.append("")
            lines_out.append(f"[{sec}]")
            flush_missing(sec)
    with open(out, "w") as f:
        f.write("\n".join(lines_out) + "\n")


if __name__ == "__main__":
    if len(sys.argv) in (6, 7) and sys.argv[1] == "synapse":
        synapse(*sys.argv[2:])
    elif len(sys.argv) in (7, 8) and sys.argv[1] == "limbic":
        limbic(*sys.argv[2:])
    elif len(sys.argv) == 9 and sys.argv[1] == "limbic-sfu":
        sfu = {
            "udp_address": json.dumps(sys.argv[7]),
            "udp_port": sys.argv[8],
            "ice_tcp": "false",
            "max_participants_per_call": "1000",
        }
        limbic(*sys.argv[2:7], "none", sfu)
    else:
        sys.exit(__doc__)
