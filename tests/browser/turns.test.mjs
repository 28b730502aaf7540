// The join page completes a call from a browser that may reach the clinic's network only through
// TLS to its TURN server (a firewall that lets out nothing but the web's ports): the client's
// Chromium runs in a network namespace the test creates, where nftables drops every UDP datagram
// to the server's address and every TCP connection but those to the page's port and to coturn's
// TLS port. Debian's coturn runs with the configuration `limbic voip coturn-config` prints for a
// `[voip]` with a `turns:` URI and a certificate (made here, for the veth address); the join
// response hands the browser that URI and its credentials. Chromium checks a TURN server's
// certificate (without being told to trust this one, the client's call does not connect: tried
// by hand), so it trusts it by its key (`--ignore-certificate-errors-spki-list`), as a browser
// trusts a clinic's real one by its CA. The client and the therapist, outside, see each other's
// video, and coturn's log shows the client's allocation made over TLS.
//
// Needs root, `ip`, `nft`, coturn's `turnserver` and `openssl` (scripts/setup installs them);
// skipped otherwise. Nothing outside the namespace and the veth pair is touched.
//
//   node --test tests/browser/turns.test.mjs

import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { ARTIFACTS, Fence, LimbicServer, REPO, callThroughTheJoinPage, freePort, launchChromium, sleep } from './harness.mjs';

const SERVICE_SECRET = 'browser-test-service-secret';
const LINK_SECRET = 'browser-test-link-secret';
const FAKE_MEDIA = ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required'];

const possible = Fence.possible && ['turnserver', 'openssl'].every((tool) => spawnSync('which', [tool]).status === 0);
const fence = new Fence();
const HOST = fence.host;
const COTURN_LOG = join(ARTIFACTS, 'coturn-turns.log');

let workdir;
let server;
let coturn;
let browser;
let fenced;

/** A self-signed certificate for `address` and its key; the base64 SHA-256 of its public key. */
function certificateFor(address) {
  const [cert, key] = [join(workdir, 'turn-cert.pem'), join(workdir, 'turn-key.pem')];
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
    '-subj', `/CN=${address}`, '-addext', `subjectAltName=IP:${address}`, '-keyout', key, '-out', cert], { stdio: 'pipe' });
  const publicKey = execFileSync('openssl', ['x509', '-in', cert, '-pubkey', '-noout']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: publicKey });
  const spki = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der }).toString('base64');
  return { cert, key, spki };
}

before(async () => {
  if (!possible) return;
  workdir = mkdtempSync(join(tmpdir(), 'limbic-turns-'));
  fence.up();
  const { cert, key, spki } = certificateFor(HOST);
  const [turnPort, tlsPort] = [await freePort(), await freePort()];
  server = new LimbicServer({
    logName: 'limbic-turns.log',
    address: HOST,
    overrides: (url) => ({
      LIMBIC_CALLS__UDP_ADDRESS: HOST,
      LIMBIC_VOIP__TURN_URIS: JSON.stringify([`turn:${HOST}:${turnPort}?transport=udp`, `turns:${HOST}:${tlsPort}?transport=tcp`]),
      LIMBIC_VOIP__TURN_TLS_CERT: cert,
      LIMBIC_VOIP__TURN_TLS_KEY: key,
      LIMBIC_APPOINTMENTS__SHARED_SECRET: SERVICE_SECRET,
      LIMBIC_APPOINTMENTS__JWT_SECRET: LINK_SECRET,
      LIMBIC_APPOINTMENTS__LINK_BASE_URL: `${url}/join`,
      LIMBIC_WEB__ASSETS_DIR: join(REPO, 'web/dist'),
    }),
  });
  await server.configure();
  // Before the server starts, while its store is free: the TURN secret it makes is the one coturn gets.
  const config = server.command('voip', 'coturn-config');
  assert.match(config, new RegExp(`^tls-listening-port=${tlsPort}$`, 'm'));
  writeFileSync(join(workdir, 'turnserver.conf'), config);
  rmSync(COTURN_LOG, { force: true });
  const relayPorts = await freePort(); // and the 20 above it, most likely free too
  coturn = spawn('turnserver', ['-c', join(workdir, 'turnserver.conf'), `--listening-ip=${HOST}`, `--relay-ip=${HOST}`,
    `--min-port=${relayPorts}`, `--max-port=${relayPorts + 20}`, `--userdb=${join(workdir, 'turndb')}`, `--pidfile=${join(workdir, 'turn.pid')}`,
    `--log-file=${COTURN_LOG}`, '--simple-log', '--verbose'], { stdio: 'ignore' });
  await server.launch();
  // Out of the namespace to the server: the page's port and coturn's TLS port, nothing else.
  fence.drop(['meta l4proto udp', `tcp dport != { ${server.port}, ${tlsPort} }`]);
  assert.ok(!fence.udpReachesHost(), "the namespace's UDP to the server is not blocked");
  // The page is served from the veth address, not loopback: a secure context only by this flag.
  const flags = [...FAKE_MEDIA, `--unsafely-treat-insecure-origin-as-secure=${server.url}`];
  fenced = await fence.chromium([...flags, `--ignore-certificate-errors-spki-list=${spki}`]);
  browser = await launchChromium(flags);
});

after(async () => {
  await fenced?.close();
  await browser?.close();
  await server?.stop();
  coturn?.kill();
  if (workdir) rmSync(workdir, { recursive: true, force: true });
  if (possible) fence.down();
});

test('a client who can reach only TURN over TLS has a call through the join page', { skip: !possible && 'needs root, ip, nft, turnserver and openssl' }, async () => {
  await callThroughTheJoinPage(server, SERVICE_SECRET, { outside: browser, inside: fenced, appointment: 'turns-1', therapist: 'dr.turns', client: 'cai', how: 'through TURN over TLS' });

  // coturn relayed for the client, over TLS (it writes its log a moment later).
  const overTls = () => readFileSync(COTURN_LOG, 'utf8').split('\n').filter((line) => line.includes(': new, realm=') && line.includes('method=TLS'));
  for (let tries = 0; tries < 50 && overTls().length === 0; tries++) await sleep(100);
  assert.ok(overTls().length > 0, `no allocation over TLS in coturn's log:\n${readFileSync(COTURN_LOG, 'utf8').slice(-3000)}`);
});
