"""Limbic federating with Synapse, the reference homeserver (matrix-synapse from PyPI, in this
venv), over TLS on loopback with a test CA.

What is checked, each in both directions where the spec has two:

- key servers and notaries: each server's `/_matrix/key/v2/server` verifies, Synapse's notary
  relays Limbic's keys (fetched with Synapse's own key fetcher) signed by both servers, and
  Limbic's notary relays Synapse's keys signed by both;
- profiles: a Synapse user's client reads a Limbic user's profile (Synapse signs an X-Matrix
  `query/profile` request that Limbic verifies) and a Limbic user's client reads a Synapse
  user's (Limbic signs, Synapse verifies);
- device keys: keys uploaded on one server (with a real ed25519 self-signature) are seen by a
  client of the other through `/keys/query`, signature intact, `failures` empty;
- OpenID: tokens of both servers validated at their `openid/userinfo` over TLS, same shape;
- the room directory: an alias on Limbic resolved by Synapse's client;
- rooms across the two: a Synapse user joins a public room on Limbic (Synapse's make_join and
  send_join against Limbic) and a Limbic user joins a version 11 room on Synapse (Limbic's
  join_remote); in both, the room's state is on the joining side, messages cross both ways (each
  server's /send) and show in /messages and /sync, state changes cross (a power level Limbic sent
  authorizes a rename from Synapse), typing and read receipts cross, Synapse backfills Limbic's
  history from before its join, invites go both ways (federation /invite), and users leave and
  rejoin; a Limbic user also tries a room in Synapse's default room version (12).

Setup, all inside the module: a CA and a certificate for 127.0.0.1 (SAN IP 127.0.0.1 and DNS
localhost) made with `cryptography`; Synapse with SQLite, a plain-HTTP client listener and a TLS
federation listener, server name `127.0.0.1:<its federation port>`; Limbic (conftest's
`federated_server`) with `[federation]` on its own TLS port, named `127.0.0.1:<that port>`
(with INTEROP_CLUSTER=1, two nodes on one PostgreSQL database, each with its own federation
listener behind a TCP proxy on that port, so that Synapse's connections alternate between
them). Both trust only the test CA. Synapse's /sync response cache is off, so that polling sees what
arrives. Logs: `.artifacts/test_federation_synapse.log` (Limbic) and
`.artifacts/test_federation_synapse-synapse.log` (Synapse); failing assertions quote both tails.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import json
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import nacl.public
import pytest
import signedjson.key
import signedjson.sign
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from unpaddedbase64 import decode_base64, encode_base64

from conftest import ARTIFACTS, LimbicServer, _die_with_parent, federated_server, free_port
from mx import Account, raw, register, run

MODULE = "test_federation_synapse"
PASSWORD = "interop-federation-password"
RUN = secrets.token_hex(3)


def q(s: str) -> str:
    return quote(s, safe="")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the test CA ------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    certificate: Path
    key: Path

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the test CA only, and checks names (127.0.0.1 against the IP SAN)."""
        return ssl.create_default_context(cafile=str(self.ca))


def make_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Limbic interop test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pki = Pki(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pki


# --- Synapse ------------------------------------------------------------------------------------

HIGH = {"per_second": 100000, "burst_count": 100000}
_live_synapses: set["SynapseServer"] = set()


@atexit.register
def _kill_leftover_synapses() -> None:
    for srv in list(_live_synapses):
        srv.stop(grace=0)


class SynapseServer:
    """A Synapse process: SQLite, client API on plain HTTP, federation (and key server, notary,
    OpenID) on TLS with the test certificate, trusting the test CA only."""

    def __init__(self, workdir: Path, pki: Pki):
        self.workdir = workdir
        self.pki = pki
        self.client_port = free_port()
        self.fed_port = free_port()
        self.server_name = f"127.0.0.1:{self.fed_port}"
        self.config_path = workdir / "homeserver.yaml"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{MODULE}-synapse.log"
        self.log_path.write_text("")
        self.proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def fed_url(self) -> str:
        return f"https://{self.server_name}"

    def _write_config(self) -> None:
        # A Synapse signing key, as `--generate-keys` would write it.
        signing_key_path = self.workdir / "signing.key"
        with open(signing_key_path, "w") as f:
            signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("a_" + secrets.token_hex(2))])
        log_config = self.workdir / "log.yaml"
        # JSON is YAML: no need for a YAML writer.
        log_config.write_text(json.dumps({
            "version": 1,
            "formatters": {"precise": {
                "format": "%(asctime)s %(name)s %(lineno)d %(levelname)s %(request)s %(message)s"}},
            "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter", "request": ""}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "precise",
                                     "filters": ["context"], "stream": "ext://sys.stderr"}},
            "loggers": {"synapse.storage.SQL": {"level": "WARNING"},
                        "synapse.util.caches.lrucache": {"level": "WARNING"}},
            "root": {"level": "INFO", "handlers": ["console"]},
            "disable_existing_loggers": False,
        }, indent=1))
        config = {
            "server_name": self.server_name,
            "pid_file": str(self.workdir / "homeserver.pid"),
            "signing_key_path": str(signing_key_path),
            "log_config": str(log_config),
            "media_store_path": str(self.workdir / "media"),
            "database": {"name": "sqlite3", "args": {"database": str(self.workdir / "homeserver.db")}},
            "listeners": [
                {"port": self.client_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                 "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]},
                # "federation" brings the key server, the notary and openid/userinfo.
                {"port": self.fed_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                 "x_forwarded": False, "resources": [{"names": ["federation"], "compress": False}]},
            ],
            "tls_certificate_path": str(self.pki.certificate),
            "tls_private_key_path": str(self.pki.key),
            "federation_verify_certificates": True,
            "federation_custom_ca_list": [str(self.pki.ca)],
            # Synapse refuses to connect to loopback and private ranges by default. In 1.163 the
            # options are still spelled *_blacklist/*_whitelist; federation uses them unless the
            # deprecated federation_ip_range_blacklist is set (it is not).
            "ip_range_blacklist": [],
            "ip_range_whitelist": ["127.0.0.1/32"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "report_stats": False,
            "enable_metrics": False,
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            # Synapse answers a repeated identical /sync from a cache for 2 minutes by default,
            # which would hide what arrives while a test polls.
            "caches": {"sync_response_cache_duration": 0},
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "registration_shared_secret": secrets.token_hex(16),
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            # every rate limit out of the way (the list of bench/configs.py)
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
            "rc_federation": {"window_size": 1000, "sleep_limit": 1000, "sleep_delay": 0,
                              "reject_limit": 10000, "concurrent": 100},
        }
        self.config_path.write_text(json.dumps(config, indent=1))

    def start(self, timeout: float = 90.0) -> None:
        log = open(self.log_path, "ab")
        log.write(f"===== {sys.executable} -m synapse.app.homeserver --config-path {self.config_path}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "--config-path", str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        _live_synapses.add(self)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        context = self.pki.ssl_context()
        last = "no attempt"
        ready = {"client": False, "federation": False}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"synapse exited with status {self.proc.returncode} before it was ready\n"
                                   f"--- log tail ---\n{self.log_tail(40)}")
            for what, url, ctx in (("client", self.url + "/_matrix/client/versions", None),
                                   ("federation", self.fed_url + "/_matrix/federation/v1/version", context)):
                if ready[what]:
                    continue
                try:
                    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                        ready[what] = r.status == 200
                except (OSError, ValueError) as e:
                    last = f"{url}: {e!r}"
            if all(ready.values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"synapse was not ready within {timeout}s (last: {last})\n"
                           f"--- log tail ---\n{self.log_tail(40)}")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        _live_synapses.discard(self)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def synapse(tmp_path_factory, pki):
    srv = SynapseServer(tmp_path_factory.mktemp("synapse"), pki)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    """Limbic (named `server` so that conftest's report hook adds its log tail to failures),
    federating on its own TLS port and named after it (two nodes with INTEROP_CLUSTER=1)."""
    # test_profiles_both_ways reads profiles across servers between users who share no room,
    # which the example's [privacy] refuses to Limbic's clients (tests/privacy.rs covers it, and
    # tests/federation.rs that other servers' queries are answered with it on).
    privacy = {"privacy": {"limit_profile_requests_to_users_who_share_rooms": False}}
    srv = federated_server(MODULE, tmp_path_factory.mktemp(MODULE), pki, privacy)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@dataclass
class Users:
    lina: Account  # on Limbic
    sam: Account  # on Synapse


@pytest.fixture(scope="module")
def users(server, synapse) -> Users:
    async def both():
        return (await register(server.url, f"lina{RUN}", PASSWORD),
                await register(synapse.url, f"sam{RUN}", PASSWORD))
    lina, sam = run(both())
    assert lina.user_id == f"@lina{RUN}:{server.server_name}", lina
    assert sam.user_id == f"@sam{RUN}:{synapse.server_name}", sam
    return Users(lina, sam)


# --- helpers ----------------------------------------------------------------------------------


def client(base_url: str, method: str, path: str, token: str | None = None, body=None):
    """A client-server API call (plain HTTP); returns (status, JSON)."""
    return run(raw(base_url, method, path, token=token, body=body))


def tls(pki: Pki, method: str, url: str, body=None):
    """A request to a federation listener, trusting the test CA only; returns (status, JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=pki.ssl_context()) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text.decode(errors="replace")


def errcode(body) -> str | None:
    return body.get("errcode") if isinstance(body, dict) else None


def logs(limbic: LimbicServer, synapse: SynapseServer, lines: int = 25) -> str:
    return (f"\n--- limbic log tail ({limbic.log_path}) ---\n{limbic.log_tail(lines)}"
            f"\n--- synapse log tail ({synapse.log_path}) ---\n{synapse.log_tail(lines)}")


def verify_keys_of(response: dict) -> dict:
    """The signedjson verify keys of a key server response, by key id."""
    keys = {}
    for key_id, entry in response["verify_keys"].items():
        keys[key_id] = signedjson.key.decode_verify_key_bytes(key_id, decode_base64(entry["key"]))
    return keys


def assert_signed_by(obj: dict, signer: str, keys: dict, what: str) -> None:
    signatures = obj.get("signatures", {}).get(signer, {})
    assert signatures, f"{what}: no signature by {signer}: {obj}"
    checked = [key_id for key_id in signatures if key_id in keys]
    assert checked, f"{what}: {signer} signed with {list(signatures)}, its keys are {list(keys)}"
    for key_id in checked:
        try:
            signedjson.sign.verify_signed_json(obj, signer, keys[key_id])
        except signedjson.sign.SignatureVerifyException as e:
            raise AssertionError(f"{what}: the signature of {signer} ({key_id}) does not verify: {e}: {obj}")


def own_keys(pki: Pki, fed_url: str, name: str) -> dict:
    """A server's key server response, checked: its name, and self-signed with its keys."""
    status, body = tls(pki, "GET", fed_url + "/_matrix/key/v2/server")
    assert status == 200, f"GET {fed_url}/_matrix/key/v2/server -> {status}: {body}"
    assert body["server_name"] == name, body
    assert body["valid_until_ts"] > now_ms(), body
    assert_signed_by(body, name, verify_keys_of(body), f"{name}'s key server response")
    return body


def signed_device_keys(account: Account) -> tuple[dict, signedjson.key.SigningKey]:
    """A device_keys object with a real ed25519 key and self-signature, as a client makes one."""
    signing_key = signedjson.key.generate_signing_key(account.device_id)  # ed25519:<device_id>
    curve = nacl.public.PrivateKey.generate().public_key
    keys = {
        "user_id": account.user_id,
        "device_id": account.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"curve25519:{account.device_id}": encode_base64(bytes(curve)),
            f"ed25519:{account.device_id}": signedjson.key.encode_verify_key_base64(signing_key.verify_key),
        },
    }
    return signedjson.sign.sign_json(keys, account.user_id, signing_key), signing_key


# --- tests ------------------------------------------------------------------------------------


def test_key_servers_and_notaries_both_ways(server, synapse, pki):
    limbic_keys = own_keys(pki, f"https://{server.server_name}", server.server_name)
    synapse_keys = own_keys(pki, synapse.fed_url, synapse.server_name)
    limbic_verify, synapse_verify = verify_keys_of(limbic_keys), verify_keys_of(synapse_keys)

    # Synapse's notary, asked for a key of Limbic it does not have: it fetches it from Limbic's
    # key server with its own fetcher (TLS with the test CA, its own verification), then relays
    # the response with its signature beside Limbic's. (A GET without key id only answers from
    # Synapse's cache, so the POST form, with the key id, comes first.)
    key_id = next(iter(limbic_keys["verify_keys"]))
    query = {"server_keys": {server.server_name: {key_id: {"minimum_valid_until_ts": now_ms()}}}}
    status, body = tls(pki, "POST", synapse.fed_url + "/_matrix/key/v2/query", query)
    assert status == 200, f"POST {synapse.fed_url}/_matrix/key/v2/query {query} -> {status}: {body}{logs(server, synapse)}"
    relayed = [k for k in body["server_keys"] if k.get("server_name") == server.server_name]
    assert relayed, f"Synapse's notary has no keys of Limbic: {body}{logs(server, synapse)}"
    assert relayed[0]["verify_keys"] == limbic_keys["verify_keys"], relayed[0]
    assert_signed_by(relayed[0], server.server_name, limbic_verify, "Limbic's keys relayed by Synapse")
    assert_signed_by(relayed[0], synapse.server_name, synapse_verify, "Limbic's keys relayed by Synapse")
    # Cached now, the GET form answers too.
    status, body = tls(pki, "GET", f"{synapse.fed_url}/_matrix/key/v2/query/{server.server_name}")
    assert status == 200 and body["server_keys"], body
    assert_signed_by(body["server_keys"][0], server.server_name, limbic_verify, "Limbic's keys relayed by Synapse (GET)")
    assert_signed_by(body["server_keys"][0], synapse.server_name, synapse_verify, "Limbic's keys relayed by Synapse (GET)")

    # Limbic's notary, for Synapse's keys.
    url = f"https://{server.server_name}/_matrix/key/v2/query/{synapse.server_name}"
    status, body = tls(pki, "GET", url)
    assert status == 200, f"GET {url} -> {status}: {body}{logs(server, synapse)}"
    assert len(body["server_keys"]) == 1, f"GET {url}: {body}{logs(server, synapse)}"
    relayed = body["server_keys"][0]
    assert relayed["server_name"] == synapse.server_name, relayed
    assert relayed["verify_keys"] == synapse_keys["verify_keys"], relayed
    assert_signed_by(relayed, synapse.server_name, synapse_verify, "Synapse's keys relayed by Limbic")
    assert_signed_by(relayed, server.server_name, limbic_verify, "Synapse's keys relayed by Limbic")
    # And the POST form of Limbic's notary.
    query = {"server_keys": {synapse.server_name: {}}}
    status, body = tls(pki, "POST", f"https://{server.server_name}/_matrix/key/v2/query", query)
    assert status == 200 and len(body["server_keys"]) == 1, f"{status}: {body}"
    assert_signed_by(body["server_keys"][0], synapse.server_name, synapse_verify, "Synapse's keys relayed by Limbic (POST)")
    assert_signed_by(body["server_keys"][0], server.server_name, limbic_verify, "Synapse's keys relayed by Limbic (POST)")


def test_profiles_both_ways(server, synapse, users):
    lina, sam = users.lina, users.sam
    status, body = client(server.url, "PUT", f"/_matrix/client/v3/profile/{q(lina.user_id)}/displayname",
                          lina.access_token, {"displayname": "Lina at Limbic"})
    assert status == 200, body
    status, body = client(synapse.url, "PUT", f"/_matrix/client/v3/profile/{q(sam.user_id)}/displayname",
                          sam.access_token, {"displayname": "Sam at Synapse"})
    assert status == 200, body

    # Synapse signs a query/profile request; Limbic verifies it (fetching Synapse's keys) and answers.
    path = f"/_matrix/client/v3/profile/{q(lina.user_id)}"
    status, body = client(synapse.url, "GET", path, sam.access_token)
    assert (status, body.get("displayname") if isinstance(body, dict) else None) == (200, "Lina at Limbic"), \
        f"Synapse client GET {path} -> {status}: {body}{logs(server, synapse)}"
    path = f"/_matrix/client/v3/profile/{q(lina.user_id)}/displayname"
    status, body = client(synapse.url, "GET", path, sam.access_token)
    assert (status, body) == (200, {"displayname": "Lina at Limbic"}), \
        f"Synapse client GET {path} -> {status}: {body}{logs(server, synapse)}"

    # Limbic signs; Synapse verifies (fetching Limbic's keys) and answers.
    path = f"/_matrix/client/v3/profile/{q(sam.user_id)}"
    status, body = client(server.url, "GET", path, lina.access_token)
    assert (status, body.get("displayname") if isinstance(body, dict) else None) == (200, "Sam at Synapse"), \
        f"Limbic client GET {path} -> {status}: {body}{logs(server, synapse)}"
    path = f"/_matrix/client/v3/profile/{q(sam.user_id)}/displayname"
    status, body = client(server.url, "GET", path, lina.access_token)
    assert (status, body) == (200, {"displayname": "Sam at Synapse"}), \
        f"Limbic client GET {path} -> {status}: {body}{logs(server, synapse)}"


def test_device_keys_both_ways(server, synapse, users):
    lina, sam = users.lina, users.sam
    lina_keys, lina_signing = signed_device_keys(lina)
    sam_keys, sam_signing = signed_device_keys(sam)
    status, body = client(server.url, "POST", "/_matrix/client/v3/keys/upload", lina.access_token, {"device_keys": lina_keys})
    assert status == 200, f"Limbic keys/upload -> {status}: {body}"
    status, body = client(synapse.url, "POST", "/_matrix/client/v3/keys/upload", sam.access_token, {"device_keys": sam_keys})
    assert status == 200, f"Synapse keys/upload -> {status}: {body}"

    for (reader, base, token), (owner, keys, signing, where) in (
        (("Synapse", synapse.url, sam.access_token), (lina, lina_keys, lina_signing, "Limbic")),
        (("Limbic", server.url, lina.access_token), (sam, sam_keys, sam_signing, "Synapse")),
    ):
        query = {"device_keys": {owner.user_id: []}}
        status, body = client(base, "POST", "/_matrix/client/v3/keys/query", token, query)
        what = f"{reader} client POST /keys/query {query}"
        assert status == 200, f"{what} -> {status}: {body}{logs(server, synapse)}"
        assert body.get("failures") == {}, f"{what}: failures: {body}{logs(server, synapse)}"
        device = body.get("device_keys", {}).get(owner.user_id, {}).get(owner.device_id)
        assert device is not None, f"{what}: no keys of the device uploaded on {where}: {body}{logs(server, synapse)}"
        assert device["keys"] == keys["keys"] and device["algorithms"] == keys["algorithms"], f"{what}: {device} vs {keys}"
        assert (device["user_id"], device["device_id"]) == (owner.user_id, owner.device_id), device
        # The self-signature made on the uploading side survives the hop.
        signedjson.sign.verify_signed_json(device, owner.user_id, signedjson.key.get_verify_key(signing))


def test_openid_tokens_validated_at_userinfo(server, synapse, users, pki):
    shapes = {}
    for name, base, fed_url, account in (
        ("Limbic", server.url, f"https://{server.server_name}", users.lina),
        ("Synapse", synapse.url, synapse.fed_url, users.sam),
    ):
        path = f"/_matrix/client/v3/user/{q(account.user_id)}/openid/request_token"
        status, token = client(base, "POST", path, account.access_token, {})
        assert status == 200, f"{name} POST {path} -> {status}: {token}"
        assert token["token_type"] == "Bearer" and isinstance(token["expires_in"], int), token
        assert token["matrix_server_name"] == account.user_id.split(":", 1)[1], token

        url = f"{fed_url}/_matrix/federation/v1/openid/userinfo?access_token={q(token['access_token'])}"
        status, info = tls(pki, "GET", url)
        assert (status, info) == (200, {"sub": account.user_id}), f"{name} GET {url} -> {status}: {info}"
        status, forged = tls(pki, "GET", f"{fed_url}/_matrix/federation/v1/openid/userinfo?access_token=forged{RUN}")
        assert (status, errcode(forged)) == (401, "M_UNKNOWN_TOKEN"), f"{name} forged token -> {status}: {forged}"
        shapes[name] = (sorted(token), sorted(info), status, forged["errcode"])
    assert shapes["Limbic"] == shapes["Synapse"], shapes


def test_room_alias_on_limbic_resolves_from_synapse(server, synapse, users):
    lina, sam = users.lina, users.sam
    localpart = f"consult{RUN}"
    status, room = client(server.url, "POST", "/_matrix/client/v3/createRoom", lina.access_token,
                          {"room_alias_name": localpart, "preset": "public_chat"})
    assert status == 200, f"Limbic createRoom -> {status}: {room}"
    alias = f"#{localpart}:{server.server_name}"

    # Synapse asks Limbic's query/directory, signed.
    path = f"/_matrix/client/v3/directory/room/{q(alias)}"
    status, body = client(synapse.url, "GET", path, sam.access_token)
    assert status == 200, f"Synapse client GET {path} -> {status}: {body}{logs(server, synapse)}"
    assert body["room_id"] == room["room_id"], body
    assert server.server_name in body["servers"], body

    # An alias Limbic does not know: Limbic's 404 reaches Synapse's client as one.
    path = f"/_matrix/client/v3/directory/room/{q(f'#nowhere{RUN}:{server.server_name}')}"
    status, body = client(synapse.url, "GET", path, sam.access_token)
    assert (status, errcode(body)) == (404, "M_NOT_FOUND"), f"Synapse client GET {path} -> {status}: {body}{logs(server, synapse)}"


# --- rooms across the two servers ---------------------------------------------------------------
#
# What Limbic does not do yet, so these tests do not ask for it: presence and device list update
# EDUs are accepted and ignored; concurrent forks are not state-resolved; Limbic serves
# `/backfill`, `/state`, `/state_ids`, `/event/{id}` and `/get_missing_events` but never asks for
# them, so a Limbic user joining a room on Synapse has no history from before the join.

DEADLINE = 20.0


def messages(base_url: str, token: str, room_id: str, limit: int = 50) -> tuple[int, dict]:
    """The latest events of a room's timeline through a client's `/messages` (newest first)."""
    return client(base_url, "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/messages?dir=b&limit={limit}", token)


def bodies(body) -> list[str]:
    chunk = body.get("chunk", []) if isinstance(body, dict) else []
    return [e["content"].get("body") for e in chunk if e.get("type") == "m.room.message" and isinstance(e.get("content"), dict)]


def eventually(what: str, attempt, deadline: float = DEADLINE, interval: float = 0.5, context=lambda: ""):
    """Calls `attempt()` until it returns (ok, value) with ok true; fails with the last value."""
    end = time.monotonic() + deadline
    while True:
        ok, value = attempt()
        if ok:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline}s; last: {value}{context()}")
        time.sleep(interval)


def send_text(base_url: str, account: Account, room_id: str, text: str) -> str:
    path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{secrets.token_hex(8)}"
    status, body = client(base_url, "PUT", path, account.access_token, {"msgtype": "m.text", "body": text})
    assert status == 200 and "event_id" in body, f"{account.user_id}: PUT {path} -> {status}: {body}"
    return body["event_id"]


def sees_message(base_url: str, account: Account, room_id: str, text: str, where: str, limbic, synapse) -> dict:
    """Polls the account's `/messages` until `text` is in the room's timeline."""
    def attempt():
        status, body = messages(base_url, account.access_token, room_id)
        return status == 200 and text in bodies(body), (status, bodies(body) if status == 200 else body)
    return eventually(f"{where}: {account.user_id}'s GET /rooms/{room_id}/messages shows {text!r}",
                      attempt, context=lambda: logs(limbic, synapse, 40))


def joined_members(base_url: str, account: Account, room_id: str) -> tuple[int, dict]:
    return client(base_url, "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/joined_members", account.access_token)


def has_member(base_url: str, account: Account, room_id: str, user_id: str, where: str, limbic, synapse) -> None:
    def attempt():
        status, body = joined_members(base_url, account, room_id)
        return status == 200 and user_id in body.get("joined", {}), (status, body)
    eventually(f"{where}: {user_id} in the joined members of {room_id} (asked by {account.user_id})",
               attempt, context=lambda: logs(limbic, synapse, 40))


def state_content(base_url: str, account: Account, room_id: str, kind: str, key: str = "") -> tuple[int, dict]:
    return client(base_url, "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state/{kind}/{q(key)}", account.access_token)


def assert_same_state(resident_url: str, resident: Account, joined_url: str, joined: Account, room_id: str,
                      kinds: tuple[str, ...], limbic, synapse) -> None:
    """The joined server shows the resident's current state for each of `kinds`, which is set."""
    for kind in kinds:
        status, expected = state_content(resident_url, resident, room_id, kind)
        assert status == 200 and expected, f"resident GET /rooms/{room_id}/state/{kind} -> {status}: {expected}"
        eventually(f"{joined.user_id}'s server shows {kind} {expected} in {room_id}",
                   lambda: (lambda got: (got == (200, expected), got))(state_content(joined_url, joined, room_id, kind)),
                   context=lambda: logs(limbic, synapse))


@dataclass
class SharedRoom:
    room_id: str
    name: str
    before: str  # sent on the resident server before the other joined


# Every test of a shared room runs in version 11 (room ids with a server name, the creator's
# power in m.room.power_levels) and 12 (room ids that are the create event's hash, creators with
# implied power, state resolution v2.1).
ROOM_VERSIONS = ["11", "12"]


@pytest.fixture(scope="module", params=ROOM_VERSIONS)
def limbic_room(request, server, synapse, users) -> SharedRoom:
    """A public room on Limbic that Synapse's user joins (Synapse's make_join/send_join against
    Limbic)."""
    lina, sam = users.lina, users.sam
    name = f"Limbic clinic v{request.param} {RUN}"
    status, room = client(server.url, "POST", "/_matrix/client/v3/createRoom", lina.access_token,
                          {"preset": "public_chat", "name": name, "topic": "made on Limbic",
                           "room_version": request.param})
    assert status == 200, f"Limbic createRoom -> {status}: {room}"
    room_id = room["room_id"]
    assert (":" in room_id) == (request.param == "11"), f"a version {request.param} room id: {room_id}"
    before = f"on Limbic before Synapse joined {RUN}"
    send_text(server.url, lina, room_id, before)

    path = f"/_matrix/client/v3/join/{q(room_id)}?server_name={q(server.server_name)}"
    status, body = client(synapse.url, "POST", path, sam.access_token, {})
    assert (status, body.get("room_id") if isinstance(body, dict) else None) == (200, room_id), \
        f"Synapse client POST {path} -> {status}: {body}{logs(server, synapse, 60)}"
    return SharedRoom(room_id, name, before)


def synapse_room_joined_by_limbic(server, synapse, users, room_version: str | None) -> SharedRoom:
    """A public room Synapse's user creates (in `room_version`, else Synapse's default) and
    Limbic's user joins through Synapse (Limbic's join_remote: make_join, send_join)."""
    lina, sam = users.lina, users.sam
    name = f"Synapse clinic {room_version or 'default'} {RUN}"
    request = {"preset": "public_chat", "name": name, "topic": "made on Synapse"}
    if room_version:
        request["room_version"] = room_version
    status, room = client(synapse.url, "POST", "/_matrix/client/v3/createRoom", sam.access_token, request)
    assert status == 200, f"Synapse createRoom {request} -> {status}: {room}"
    room_id = room["room_id"]
    if room_version in ("10", "11"):  # from version 12 on, room ids name no server
        assert room_id.endswith(":" + synapse.server_name), room_id
    before = f"on Synapse before Limbic joined {RUN}"
    send_text(synapse.url, sam, room_id, before)

    path = f"/_matrix/client/v3/join/{q(room_id)}?via={q(synapse.server_name)}"
    status, body = client(server.url, "POST", path, lina.access_token, {})
    assert (status, body.get("room_id") if isinstance(body, dict) else None) == (200, room_id), \
        f"Limbic client POST {path} (a room version {room_version or 'default'} room on Synapse) -> {status}: {body}{logs(server, synapse, 60)}"
    return SharedRoom(room_id, name, before)


@pytest.fixture(scope="module", params=ROOM_VERSIONS)
def synapse_room(request, server, synapse, users) -> SharedRoom:
    """A room on Synapse joined by Limbic's user."""
    return synapse_room_joined_by_limbic(server, synapse, users, request.param)


def test_synapse_user_joins_a_room_on_limbic(server, synapse, users, limbic_room):
    lina, sam = users.lina, users.sam
    room_id = limbic_room.room_id
    # Synapse has the room's state from Limbic's send_join answer (and what changed since).
    assert_same_state(server.url, lina, synapse.url, sam, room_id, ("m.room.name", "m.room.topic"), server, synapse)
    status, body = state_content(synapse.url, sam, room_id, "m.room.member", sam.user_id)
    assert status == 200 and body.get("membership") == "join", f"Synapse: sam's membership -> {status}: {body}"
    has_member(synapse.url, sam, room_id, lina.user_id, "Synapse", server, synapse)
    # And Limbic appended Synapse's signed join.
    has_member(server.url, lina, room_id, sam.user_id, "Limbic", server, synapse)


def test_messages_flow_both_ways_in_a_limbic_room(server, synapse, users, limbic_room):
    lina, sam = users.lina, users.sam
    room_id = limbic_room.room_id
    # Limbic's queue → Synapse's /send.
    text = f"from Limbic to Synapse {RUN}"
    send_text(server.url, lina, room_id, text)
    sees_message(synapse.url, sam, room_id, text, "Synapse", server, synapse)
    # Synapse → Limbic's /send.
    text = f"from Synapse to Limbic {RUN}"
    send_text(synapse.url, sam, room_id, text)
    sees_message(server.url, lina, room_id, text, "Limbic", server, synapse)
    # A second round, each side's event now following the other's.
    texts = [f"Limbic again {RUN}", f"Synapse again {RUN}"]
    send_text(server.url, lina, room_id, texts[0])
    send_text(synapse.url, sam, room_id, texts[1])
    for base, account, where in ((server.url, lina, "Limbic"), (synapse.url, sam, "Synapse")):
        for t in texts:
            sees_message(base, account, room_id, t, where, server, synapse)


def test_limbic_user_joins_a_room_on_synapse(server, synapse, users, synapse_room):
    lina, sam = users.lina, users.sam
    room_id = synapse_room.room_id
    # Limbic stored the state Synapse's send_join answered with (and what changed since).
    assert_same_state(synapse.url, sam, server.url, lina, room_id, ("m.room.name", "m.room.topic"), server, synapse)
    status, body = state_content(server.url, lina, room_id, "m.room.create")
    assert status == 200 and body.get("creator", sam.user_id) == sam.user_id, f"Limbic: m.room.create -> {status}: {body}"
    status, body = state_content(server.url, lina, room_id, "m.room.member", lina.user_id)
    assert status == 200 and body.get("membership") == "join", f"Limbic: lina's membership -> {status}: {body}"
    has_member(server.url, lina, room_id, sam.user_id, "Limbic", server, synapse)
    # Synapse appended Limbic's signed join.
    has_member(synapse.url, sam, room_id, lina.user_id, "Synapse", server, synapse)


def test_messages_flow_both_ways_in_a_synapse_room(server, synapse, users, synapse_room):
    lina, sam = users.lina, users.sam
    room_id = synapse_room.room_id
    # Synapse → Limbic's /send.
    text = f"from Synapse to Limbic, Synapse's room {RUN}"
    send_text(synapse.url, sam, room_id, text)
    sees_message(server.url, lina, room_id, text, "Limbic", server, synapse)
    # Limbic's queue → Synapse's /send.
    text = f"from Limbic to Synapse, Synapse's room {RUN}"
    send_text(server.url, lina, room_id, text)
    sees_message(synapse.url, sam, room_id, text, "Synapse", server, synapse)
    texts = [f"Synapse again, Synapse's room {RUN}", f"Limbic again, Synapse's room {RUN}"]
    send_text(synapse.url, sam, room_id, texts[0])
    send_text(server.url, lina, room_id, texts[1])
    for base, account, where in ((server.url, lina, "Limbic"), (synapse.url, sam, "Synapse")):
        for t in texts:
            sees_message(base, account, room_id, t, where, server, synapse)


def test_transactions_with_edus_still_deliver_pdus(server, synapse, users, limbic_room):
    """Synapse puts typing notifications and read receipts (EDUs) into its transactions to Limbic;
    whatever Limbic makes of them, it accepts the transactions: the PDU sent after them arrives."""
    lina, sam = users.lina, users.sam
    room_id = limbic_room.room_id
    status, body = client(synapse.url, "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/typing/{q(sam.user_id)}",
                          sam.access_token, {"typing": True, "timeout": 10000})
    assert status == 200, f"Synapse typing -> {status}: {body}"
    status, body = messages(synapse.url, sam.access_token, room_id, 1)
    assert status == 200 and body["chunk"], body
    latest = body["chunk"][0]["event_id"]
    status, body = client(synapse.url, "POST", f"/_matrix/client/v3/rooms/{q(room_id)}/receipt/m.read/{q(latest)}",
                          sam.access_token, {})
    assert status == 200, f"Synapse receipt -> {status}: {body}"
    text = f"after typing and a receipt {RUN}"
    send_text(synapse.url, sam, room_id, text)
    sees_message(server.url, lina, room_id, text, "Limbic", server, synapse)


def test_limbic_user_joins_a_room_of_synapses_default_version(server, synapse, users):
    """Synapse creates rooms in its default version (12 in Synapse 1.163: room ids without a
    server name, the creator's power implied by m.room.create). A Limbic user cannot join one
    unless Limbic has that room version."""
    status, versions = client(synapse.url, "GET", "/_matrix/client/v3/capabilities", users.sam.access_token)
    default = versions["capabilities"]["m.room_versions"]["default"] if status == 200 else None
    room = synapse_room_joined_by_limbic(server, synapse, users, None)
    status, body = state_content(server.url, users.lina, room.room_id, "m.room.name")
    assert (status, body) == (200, {"name": room.name}), \
        f"Limbic: the name of a version {default} room joined on Synapse -> {status}: {body}{logs(server, synapse)}"


def initial_sync(base_url: str, account: Account) -> tuple[int, dict]:
    flt = q(json.dumps({"room": {"timeline": {"limit": 50}}}))
    return client(base_url, "GET", f"/_matrix/client/v3/sync?filter={flt}", account.access_token)


def test_sync_shows_the_other_servers_messages(server, synapse, users, limbic_room, synapse_room):
    """What a client actually reads: the joined room and the other server's messages in /sync."""
    for base, account, where, room, other, other_base in (
        (server.url, users.lina, "Limbic", synapse_room, users.sam, synapse.url),
        (synapse.url, users.sam, "Synapse", limbic_room, users.lina, server.url),
        (server.url, users.lina, "Limbic", limbic_room, users.sam, synapse.url),
        (synapse.url, users.sam, "Synapse", synapse_room, users.lina, server.url),
    ):
        text = f"for {account.user_id}'s sync {secrets.token_hex(4)}"
        send_text(other_base, other, room.room_id, text)

        def attempt():
            status, body = initial_sync(base, account)
            joined = body.get("rooms", {}).get("join", {}).get(room.room_id) if status == 200 else None
            if joined is None:
                return False, (status, "room not in rooms.join" if status == 200 else body)
            events = joined.get("timeline", {}).get("events", [])
            from_other = [e["content"].get("body") for e in events if e.get("sender") == other.user_id and e.get("type") == "m.room.message"]
            return text in from_other, (status, [(e.get("type"), e.get("sender"), e.get("content", {}).get("body")) for e in events])
        eventually(f"{where}: {account.user_id}'s /sync has {room.room_id} with messages of {other.user_id}",
                   attempt, context=lambda: logs(server, synapse, 30))


def wait_state(base_url: str, account: Account, room_id: str, kind: str, key: str, expected: dict, where: str, limbic, synapse):
    def attempt():
        status, body = state_content(base_url, account, room_id, kind, key)
        return status == 200 and all(body.get(k) == v for k, v in expected.items()), (status, body)
    eventually(f"{where}: {account.user_id}'s GET /rooms/{room_id}/state/{kind}/{key} has {expected}",
               attempt, context=lambda: logs(limbic, synapse, 40))


def test_state_changes_cross_both_ways(server, synapse, users, limbic_room, synapse_room):
    lina, sam = users.lina, users.sam
    # Limbic's room: a topic by its creator on Limbic reaches Synapse's state.
    topic = f"topic set on Limbic {RUN}"
    status, body = client(server.url, "PUT", f"/_matrix/client/v3/rooms/{q(limbic_room.room_id)}/state/m.room.topic/",
                          lina.access_token, {"topic": topic})
    assert status == 200, f"Limbic: set topic -> {status}: {body}"
    wait_state(synapse.url, sam, limbic_room.room_id, "m.room.topic", "", {"topic": topic}, "Synapse", server, synapse)

    # Limbic's room: lina makes sam a moderator on Limbic; then sam renames the room from Synapse,
    # which Limbic authorizes against the power levels it sent.
    path = f"/_matrix/client/v3/rooms/{q(limbic_room.room_id)}/state/m.room.power_levels/"
    status, levels = client(server.url, "GET", path, lina.access_token)
    assert status == 200, f"Limbic: power levels -> {status}: {levels}"
    levels.setdefault("users", {})[sam.user_id] = 50
    status, body = client(server.url, "PUT", path, lina.access_token, levels)
    assert status == 200, f"Limbic: set power levels -> {status}: {body}"
    wait_state(synapse.url, sam, limbic_room.room_id, "m.room.power_levels", "", {"users": levels["users"]}, "Synapse", server, synapse)
    name = f"renamed from Synapse {RUN}"
    status, body = client(synapse.url, "PUT", f"/_matrix/client/v3/rooms/{q(limbic_room.room_id)}/state/m.room.name/",
                          sam.access_token, {"name": name})
    assert status == 200, f"Synapse: rename the Limbic room -> {status}: {body}{logs(server, synapse)}"
    wait_state(server.url, lina, limbic_room.room_id, "m.room.name", "", {"name": name}, "Limbic", server, synapse)

    # Synapse's room: a topic set on Synapse reaches Limbic's state.
    topic = f"topic set on Synapse {RUN}"
    status, body = client(synapse.url, "PUT", f"/_matrix/client/v3/rooms/{q(synapse_room.room_id)}/state/m.room.topic/",
                          sam.access_token, {"topic": topic})
    assert status == 200, f"Synapse: set topic -> {status}: {body}"
    wait_state(server.url, lina, synapse_room.room_id, "m.room.topic", "", {"topic": topic}, "Limbic", server, synapse)


def test_a_limbic_user_invites_a_synapse_user(server, synapse, users):
    """An invite of a user on another server goes to that server with the federation `invite`
    API (PUT /_matrix/federation/v2/invite/{roomId}/{eventId}), which it countersigns; the
    invited user's client then sees the room under rooms.invite."""
    lina, sam = users.lina, users.sam
    status, room = client(server.url, "POST", "/_matrix/client/v3/createRoom", lina.access_token,
                          {"preset": "private_chat", "name": f"Private on Limbic {RUN}"})
    assert status == 200, f"Limbic createRoom -> {status}: {room}"
    room_id = room["room_id"]
    path = f"/_matrix/client/v3/rooms/{q(room_id)}/invite"
    status, body = client(server.url, "POST", path, lina.access_token, {"user_id": sam.user_id})
    assert status == 200, f"Limbic client POST {path} (inviting {sam.user_id}) -> {status}: {body}{logs(server, synapse)}"

    def attempt():
        status, body = initial_sync(synapse.url, sam)
        invites = body.get("rooms", {}).get("invite", {}) if status == 200 else {}
        return room_id in invites, (status, sorted(invites))
    eventually(f"Synapse: {sam.user_id}'s /sync has the invite to {room_id} made on Limbic", attempt,
               context=lambda: logs(server, synapse, 30))
    path = f"/_matrix/client/v3/join/{q(room_id)}?server_name={q(server.server_name)}"
    status, body = client(synapse.url, "POST", path, sam.access_token, {})
    assert status == 200, f"Synapse client POST {path} (accepting the invite) -> {status}: {body}{logs(server, synapse)}"
    has_member(server.url, lina, room_id, sam.user_id, "Limbic", server, synapse)


def test_a_synapse_user_invites_a_limbic_user(server, synapse, users):
    lina, sam = users.lina, users.sam
    status, room = client(synapse.url, "POST", "/_matrix/client/v3/createRoom", sam.access_token,
                          {"preset": "private_chat", "name": f"Private on Synapse {RUN}", "room_version": "11"})
    assert status == 200, f"Synapse createRoom -> {status}: {room}"
    room_id = room["room_id"]
    path = f"/_matrix/client/v3/rooms/{q(room_id)}/invite"
    status, body = client(synapse.url, "POST", path, sam.access_token, {"user_id": lina.user_id})
    assert status == 200, f"Synapse client POST {path} (inviting {lina.user_id}) -> {status}: {body}{logs(server, synapse)}"

    def attempt():
        status, body = initial_sync(server.url, lina)
        invites = body.get("rooms", {}).get("invite", {}) if status == 200 else {}
        return room_id in invites, (status, sorted(invites))
    eventually(f"Limbic: {lina.user_id}'s /sync has the invite to {room_id} made on Synapse", attempt,
               context=lambda: logs(server, synapse, 30))
    path = f"/_matrix/client/v3/join/{q(room_id)}?via={q(synapse.server_name)}"
    status, body = client(server.url, "POST", path, lina.access_token, {})
    assert status == 200, f"Limbic client POST {path} (accepting the invite) -> {status}: {body}{logs(server, synapse)}"
    has_member(synapse.url, sam, room_id, lina.user_id, "Synapse", server, synapse)


def ephemeral(base_url: str, account: Account, room_id: str) -> tuple[int, list[dict]]:
    status, body = initial_sync(base_url, account)
    if status != 200:
        return status, body
    return status, body.get("rooms", {}).get("join", {}).get(room_id, {}).get("ephemeral", {}).get("events", [])


def test_typing_and_receipts_both_ways(server, synapse, users, limbic_room, synapse_room):
    """m.typing and m.receipt EDUs, each way, in both rooms."""
    lina, sam = users.lina, users.sam
    for room in (limbic_room, synapse_room):
        room_id = room.room_id
        for (src, typist, dst, reader, where) in ((synapse.url, sam, server.url, lina, "Limbic"),
                                                  (server.url, lina, synapse.url, sam, "Synapse")):
            path = f"/_matrix/client/v3/rooms/{q(room_id)}/typing/{q(typist.user_id)}"
            status, body = client(src, "PUT", path, typist.access_token, {"typing": True, "timeout": 20000})
            assert status == 200, f"PUT {path} -> {status}: {body}"

            def typing():
                status, events = ephemeral(dst, reader, room_id)
                users_typing = [u for e in events if isinstance(e, dict) and e.get("type") == "m.typing" for u in e["content"].get("user_ids", [])] if status == 200 else []
                return typist.user_id in users_typing, (status, events)
            eventually(f"{where}: {reader.user_id}'s /sync shows {typist.user_id} typing in {room_id}", typing,
                       context=lambda: logs(server, synapse, 30))

            # A receipt for the newest event the reading side's own server has.
            status, body = messages(src, typist.access_token, room_id, 1)
            assert status == 200 and body["chunk"], body
            latest = body["chunk"][0]["event_id"]
            path = f"/_matrix/client/v3/rooms/{q(room_id)}/receipt/m.read/{q(latest)}"
            status, body = client(src, "POST", path, typist.access_token, {})
            assert status == 200, f"POST {path} -> {status}: {body}"

            def receipt():
                status, events = ephemeral(dst, reader, room_id)
                found = status == 200 and any(
                    isinstance(e, dict) and e.get("type") == "m.receipt"
                    and typist.user_id in e.get("content", {}).get(latest, {}).get("m.read", {})
                    for e in events)
                return found, (status, events)
            eventually(f"{where}: {reader.user_id}'s /sync shows {typist.user_id}'s read receipt for {latest} in {room_id}",
                       receipt, context=lambda: logs(server, synapse, 30))


def history(base_url: str, account: Account, room_id: str, pages: int = 10) -> list[str]:
    """The bodies of a room's messages, paginating /messages backwards to the start."""
    found, token = [], None
    for _ in range(pages):
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/messages?dir=b&limit=50" + (f"&from={q(token)}" if token else "")
        status, body = client(base_url, "GET", path, account.access_token)
        assert status == 200, f"GET {path} -> {status}: {body}"
        found += bodies(body)
        if not body.get("chunk") or not body.get("end") or body.get("end") == token:
            break
        token = body["end"]
    return found


def test_synapse_backfills_the_history_from_before_its_join(server, synapse, users, limbic_room):
    """Synapse paginating back past its join asks Limbic's /backfill for the earlier events."""
    before = limbic_room.before

    def attempt():
        found = history(synapse.url, users.sam, limbic_room.room_id)
        return before in found, found
    eventually(f"Synapse: {users.sam.user_id}'s /messages reaches {before!r}, sent on Limbic before the join",
               attempt, context=lambda: logs(server, synapse, 40))


def test_limbic_backfills_long_history_from_synapse(server, synapse, users):
    """Limbic takes the last 50 events at the join; paging back further fetches the rest from
    Synapse's /backfill: every message once, in the order Synapse has them."""
    lina, sam = users.lina, users.sam
    status, room = client(synapse.url, "POST", "/_matrix/client/v3/createRoom", sam.access_token,
                          {"preset": "public_chat", "name": f"long history {RUN}"})
    assert status == 200, f"Synapse createRoom -> {status}: {room}"
    room_id = room["room_id"]
    sent = [f"long history {n} {RUN}" for n in range(90)]
    for text in sent:
        send_text(synapse.url, sam, room_id, text)
    status, body = client(server.url, "POST", f"/_matrix/client/v3/join/{q(room_id)}?via={q(synapse.server_name)}",
                          lina.access_token, {})
    assert status == 200, f"Limbic: join the long-history room -> {status}: {body}{logs(server, synapse)}"
    found = [text for text in reversed(history(server.url, lina, room_id, pages=20)) if text.startswith("long history ")]
    assert found == sent, f"Limbic's /messages after backfill: {len(found)} of {len(sent)} messages{logs(server, synapse, 40)}"


def lacks_member(base_url: str, account: Account, room_id: str, user_id: str, where: str, limbic, synapse) -> None:
    def attempt():
        status, body = joined_members(base_url, account, room_id)
        return status == 200 and user_id not in body.get("joined", {}), (status, body)
    eventually(f"{where}: {user_id} no longer in the joined members of {room_id}", attempt,
               context=lambda: logs(limbic, synapse, 40))


def test_a_synapse_user_leaves_and_rejoins_a_limbic_room(server, synapse, users, limbic_room):
    lina, sam = users.lina, users.sam
    room_id = limbic_room.room_id
    status, body = client(synapse.url, "POST", f"/_matrix/client/v3/rooms/{q(room_id)}/leave", sam.access_token, {})
    assert status == 200, f"Synapse: leave -> {status}: {body}"
    lacks_member(server.url, lina, room_id, sam.user_id, "Limbic", server, synapse)
    # Changed while Synapse is out of the room: Synapse learns it from the rejoin's state.
    topic = f"changed while Synapse was away {RUN}"
    status, body = client(server.url, "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/state/m.room.topic/",
                          lina.access_token, {"topic": topic})
    assert status == 200, body
    path = f"/_matrix/client/v3/join/{q(room_id)}?server_name={q(server.server_name)}"
    status, body = client(synapse.url, "POST", path, sam.access_token, {})
    assert status == 200, f"Synapse client POST {path} (rejoin) -> {status}: {body}{logs(server, synapse, 40)}"
    has_member(server.url, lina, room_id, sam.user_id, "Limbic", server, synapse)
    wait_state(synapse.url, sam, room_id, "m.room.topic", "", {"topic": topic}, "Synapse", server, synapse)
    text = f"welcome back, Synapse {RUN}"
    send_text(server.url, lina, room_id, text)
    sees_message(synapse.url, sam, room_id, text, "Synapse", server, synapse)
    text = f"back from Synapse {RUN}"
    send_text(synapse.url, sam, room_id, text)
    sees_message(server.url, lina, room_id, text, "Limbic", server, synapse)


def test_a_limbic_user_leaves_and_rejoins_a_synapse_room(server, synapse, users, synapse_room):
    """When no local user is left in a room on another server, Limbic no longer receives its
    events, so a rejoin has to go through a resident server again (make_join/send_join) to learn
    the current state."""
    lina, sam = users.lina, users.sam
    room_id = synapse_room.room_id
    status, body = client(server.url, "POST", f"/_matrix/client/v3/rooms/{q(room_id)}/leave", lina.access_token, {})
    assert status == 200, f"Limbic: leave -> {status}: {body}"
    lacks_member(synapse.url, sam, room_id, lina.user_id, "Synapse", server, synapse)
    topic = f"changed while Limbic was away {RUN}"
    status, body = client(synapse.url, "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/state/m.room.topic/",
                          sam.access_token, {"topic": topic})
    assert status == 200, body
    path = f"/_matrix/client/v3/join/{q(room_id)}?via={q(synapse.server_name)}"
    status, body = client(server.url, "POST", path, lina.access_token, {})
    assert status == 200, f"Limbic client POST {path} (rejoin) -> {status}: {body}{logs(server, synapse, 40)}"
    has_member(synapse.url, sam, room_id, lina.user_id, "Synapse", server, synapse)
    text = f"welcome back, Limbic {RUN}"
    send_text(synapse.url, sam, room_id, text)
    sees_message(server.url, lina, room_id, text, "Limbic", server, synapse)
    text = f"back from Limbic {RUN}"
    send_text(server.url, lina, room_id, text)
    sees_message(synapse.url, sam, room_id, text, "Synapse", server, synapse)
    wait_state(server.url, lina, room_id, "m.room.topic", "", {"topic": topic}, "Limbic", server, synapse)
