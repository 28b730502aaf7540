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
- the room directory: an alias on Limbic resolved by Synapse's client.

Setup, all inside the module: a CA and a certificate for 127.0.0.1 (SAN IP 127.0.0.1 and DNS
localhost) made with `cryptography`; Synapse with SQLite, a plain-HTTP client listener and a TLS
federation listener, server name `127.0.0.1:<its federation port>`; Limbic (conftest's
`LimbicServer`) with `[federation]` on its own TLS port, named `127.0.0.1:<that port>`. Both
trust only the test CA. Logs: `.artifacts/test_federation_synapse.log` (Limbic) and
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

from conftest import ARTIFACTS, LimbicServer, _die_with_parent, dump_toml, free_port
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
    federating on its own TLS port and named after it."""
    srv = LimbicServer(MODULE, tmp_path_factory.mktemp(MODULE))
    srv.fed_port = free_port()
    srv.server_name = f"127.0.0.1:{srv.fed_port}"
    srv.config["server_name"] = srv.server_name
    srv.config.pop("plugins", None)  # not what this module is about; keeps startup short
    srv.config["federation"] = {
        "enabled": True,
        "address": "127.0.0.1",
        "port": srv.fed_port,
        "tls_certificate": str(pki.certificate),
        "tls_private_key": str(pki.key),
        "ca_certificates": [str(pki.ca)],
        "trust_web_pki": False,
    }
    srv.config_path.write_text(dump_toml(srv.config))
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
