// What the browser tests share: a real `limbic serve` on a free loopback port with a fresh
// store, and Debian's Chromium through playwright-core. Not a test file itself (`node --test
// tests/browser/` runs only *.test.mjs).

import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = fileURLToPath(new URL('../../', import.meta.url));
export const ARTIFACTS = join(REPO, 'tests/browser/artifacts');
/** Resolves the web client's dev dependencies (playwright-core, esbuild, matrix-js-sdk) from web/. */
export const requireFromWeb = createRequire(join(REPO, 'web/package.json'));
const { chromium } = requireFromWeb('playwright-core');

export const SERVER_NAME = 'localhost';
const REGISTRATION_SECRET = 'browser-test-registration-secret';

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function binary() {
  if (process.env.LIMBIC_BIN) return process.env.LIMBIC_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? 'target';
  return join(target.startsWith('/') ? target : join(REPO, target), 'debug/limbic');
}

/** Debian's chromium (CHROMIUM to use another, or `executablePath`, e.g. a wrapper), headless. */
export function launchChromium(args = [], executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium') {
  return chromium.launch({ executablePath, args: [...args, '--no-sandbox'] });
}

/**
 * A `limbic serve` on a free loopback port with a fresh store: config.example.toml (its plugins
 * only with `plugins`: they need their own build, scripts/test makes it), the rest as environment
 * overrides (LIMBIC_SECTION__KEY, see the example's header). `overrides(url)` adds a test's own;
 * the server's log goes to tests/browser/artifacts/`logName`.
 */
export class LimbicServer {
  /** `address`: where it listens, and its SFU (loopback unless a test has a network of its own). */
  constructor({ logName = 'limbic.log', overrides = () => ({}), plugins = false, address = '127.0.0.1' } = {}) {
    this.workdir = mkdtempSync(join(tmpdir(), 'limbic-browser-'));
    this.process = null;
    this.address = address;
    this.logName = logName;
    this.overrides = overrides;
    this.plugins = plugins;
  }

  async start() {
    await this.configure();
    await this.launch();
  }

  /** Picks its port and writes its configuration (`configPath`, and `env` over it), so that a
   * test can run `limbic` commands on it (`command`) before it starts. */
  async configure() {
    this.port = await freePort();
    this.url = `http://${this.address}:${this.port}`;
    const example = readFileSync(join(REPO, 'config.example.toml'), 'utf8');
    this.configPath = join(this.workdir, 'limbic.toml');
    // The example's plugins' files are relative to the repository; the server runs elsewhere.
    const config = this.plugins
      ? example.replace(/^(path|manifest) = "plugins\//gm, (_, key) => `${key} = "${join(REPO, 'plugins')}/`)
      : example.split(/^\[\[plugins\]\]/m)[0];
    writeFileSync(this.configPath, config);
    this.overridden = {
      LIMBIC_SERVER_NAME: SERVER_NAME,
      LIMBIC_LISTEN__ADDRESS: this.address,
      LIMBIC_LISTEN__PORT: String(this.port),
      LIMBIC_DATABASE__PATH: join(this.workdir, 'store'),
      LIMBIC_MEDIA__PATH: join(this.workdir, 'media'),
      LIMBIC_RATE_LIMITS__ENABLED: 'false',
      LIMBIC_REGISTRATION__SHARED_SECRET: REGISTRATION_SECRET,
      LIMBIC_CALLS__UDP_PORT: '0', // any free ports
      LIMBIC_CALLS__TCP_PORT: '0',
      ...this.overrides(this.url),
    };
    const inherited = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('LIMBIC_')));
    this.env = { ...inherited, ...this.overridden, NO_COLOR: '1' };
  }

  /** The output of `limbic ARGS --config` with this server's configuration. */
  command(...args) {
    return execFileSync(binary(), [...args, '--config', this.configPath], { cwd: this.workdir, env: this.env, encoding: 'utf8' });
  }

  async launch() {
    const bin = binary();
    assert.ok(existsSync(bin), `no server binary at ${bin}: run \`cargo build -p limbic-server --bins\` or set LIMBIC_BIN`);
    mkdirSync(ARTIFACTS, { recursive: true });
    this.logPath = join(ARTIFACTS, this.logName);
    const log = openSync(this.logPath, 'w');
    writeFileSync(log, `${bin} serve --config ${this.configPath}\n${JSON.stringify(this.overridden, null, 2)}\n`);
    this.process = spawn(bin, ['serve', '--config', this.configPath], {
      cwd: this.workdir,
      env: this.env,
      stdio: ['ignore', log, log],
    });
    this.exited = new Promise((resolve) => this.process.once('exit', resolve));
    await this.waitReady();
  }

  async waitReady() {
    const deadline = Date.now() + 60_000;
    let last = 'no answer';
    while (Date.now() < deadline) {
      if (this.process.exitCode !== null) break;
      try {
        const response = await fetch(`${this.url}/_matrix/client/versions`);
        if (response.ok) return;
        last = `HTTP ${response.status}`;
      } catch (error) {
        last = error.message;
      }
      await sleep(100);
    }
    assert.fail(`limbic did not start (${last}); see ${this.logPath}:\n${readFileSync(this.logPath, 'utf8').slice(-3000)}`);
  }

  async api(method, path, { token, body } = {}) {
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(`${this.url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await response.text();
    assert.ok(response.ok, `${method} ${path} -> HTTP ${response.status}: ${text}`);
    return text ? JSON.parse(text) : {};
  }

  /** Synapse's shared-secret registration: HMAC-SHA1 over nonce, user, password and admin flag. */
  async register(localpart, admin) {
    const password = randomBytes(12).toString('hex');
    const { nonce } = await this.api('GET', '/_synapse/admin/v1/register');
    const mac = createHmac('sha1', REGISTRATION_SECRET)
      .update([nonce, localpart, password, admin ? 'admin' : 'notadmin'].join('\0'))
      .digest('hex');
    const account = await this.api('POST', '/_synapse/admin/v1/register', { body: { nonce, username: localpart, password, admin, mac } });
    return { userId: account.user_id, token: account.access_token, password };
  }

  async stop() {
    if (this.process && this.process.exitCode === null) {
      this.process.kill('SIGTERM');
      const killed = setTimeout(() => this.process.kill('SIGKILL'), 10_000);
      await this.exited;
      clearTimeout(killed);
    }
    rmSync(this.workdir, { recursive: true, force: true });
  }
}

/**
 * An appointment (starting now, for an hour) of `therapist` with `client` booked through the
 * booking service's API (`[appointments] shared_secret` = `serviceSecret`): its session room and
 * each one's sign-in link.
 */
export async function bookAppointment(server, serviceSecret, { appointment, therapist, client, title = 'Intake' }) {
  const now = Date.now();
  const answer = await server.api('POST', '/_limbic/service/v1/appointments', {
    token: serviceSecret,
    body: { appointment_id: appointment, therapist, client, title, starts_at: now, ends_at: now + 3_600_000, timezone: 'UTC' },
  });
  return { roomId: answer.room_id, therapist: answer.links[therapist], client: answer.links[client] };
}

/**
 * A therapist (in browser `outside`) and a client (in browser `inside`) have a call through the
 * join page: an appointment booked through `serviceSecret`, the therapist in the lobby and the
 * call, the client in the waiting room and admitted, each decoding the other's video. `how`
 * says how the client's media goes, for the failure messages.
 */
export async function callThroughTheJoinPage(server, serviceSecret, { outside, inside, appointment, therapist, client, how }) {
  assert.ok(existsSync(join(REPO, 'web/dist/join.js')), 'no built page in web/dist: run `npm run build --prefix web`');
  const admin = await server.register('admin', true);
  const doctorAccount = await server.register(therapist, false);
  await server.api('PUT', `/_limbic/admin/v1/therapists/${encodeURIComponent(doctorAccount.userId)}`, { token: admin.token, body: { verified: true } });
  const link = await bookAppointment(server, serviceSecret, { appointment, therapist: doctorAccount.userId, client: `@${client}:${SERVER_NAME}` });

  const open = async (chromium) => {
    const context = await chromium.newContext({ permissions: ['camera', 'microphone'] });
    const page = await context.newPage();
    page.setDefaultTimeout(30_000);
    return page;
  };
  const shown = (page, testId) => page.getByTestId(testId).waitFor({ state: 'visible' });
  const doctor = await open(outside);
  const patient = await open(inside);

  await doctor.goto(link.therapist);
  await shown(doctor, 'page-lobby');
  await doctor.getByTestId('join-call').click();
  await shown(doctor, 'page-call');
  await patient.goto(link.client);
  await shown(patient, 'page-waiting');
  await doctor.getByTestId('waiting-entry').filter({ hasText: client }).getByTestId('admit').click();
  await shown(patient, 'page-call');
  await expectVideoFrom(patient, `the client, ${how}`);
  await expectVideoFrom(doctor, `the therapist, from the client ${how}`);
}

/**
 * The join page (in `page`) decodes the others' video, and frames keep coming (it is not one
 * stuck frame), per inbound-rtp `framesDecoded`; its remote <video> shows a picture.
 */
export async function expectVideoFrom(page, who, timeout = 30_000) {
  const deadline = Date.now() + timeout;
  let first = null;
  let last = null;
  while (Date.now() < deadline) {
    last = await page.evaluate(() => window.__limbicStats());
    if (last.framesDecoded > 0 && first === null) first = last.framesDecoded;
    else if (first !== null && last.framesDecoded >= first + 15) break;
    await sleep(250);
  }
  assert.ok(first !== null && last.framesDecoded >= first + 15, `${who} decodes the other's video: ${JSON.stringify(last)}`);
  const width = await page.getByTestId('remote-video').first().evaluate((video) => video.videoWidth);
  assert.ok(width > 0, `${who}'s remote <video> shows a picture`);
}

/**
 * A network namespace of the test's own, joined to this one by a veth pair (`host` outside,
 * `guest` inside), whose nftables rules drop some of what leaves it for the host, as a hospital's
 * or a company's firewall would; Chromium runs inside through a wrapper script given to
 * Playwright as the executable. Needs root, `ip` and `nft` (scripts/setup installs nftables):
 * `Fence.possible`. Nothing outside the namespace and the veth pair is touched.
 */
export class Fence {
  static possible = process.getuid?.() === 0 && ['ip', 'nft'].every((tool) => spawnSync('which', [tool]).status === 0);

  constructor() {
    const tag = process.pid % 10000;
    this.namespace = `limbic-b${tag}`;
    [this.outside, this.inside] = [`lb${tag}h`, `lb${tag}n`];
    this.host = `10.232.${tag % 250}.1`;
    this.guest = `10.232.${tag % 250}.2`;
  }

  up() {
    const sh = (...args) => execFileSync(args[0], args.slice(1), { stdio: 'pipe' });
    sh('ip', 'netns', 'add', this.namespace);
    sh('ip', 'link', 'add', this.outside, 'type', 'veth', 'peer', 'name', this.inside, 'netns', this.namespace);
    sh('ip', 'addr', 'add', `${this.host}/30`, 'dev', this.outside);
    sh('ip', 'link', 'set', this.outside, 'up');
    sh('ip', '-n', this.namespace, 'addr', 'add', `${this.guest}/30`, 'dev', this.inside);
    sh('ip', '-n', this.namespace, 'link', 'set', this.inside, 'up');
    sh('ip', '-n', this.namespace, 'link', 'set', 'lo', 'up');
    assert.ok(this.udpReachesHost(), 'UDP from the namespace does not arrive even without a rule');
  }

  /** Drops what leaves the namespace for the host and matches one of `matches` (nftables
   * expressions, e.g. `meta l4proto udp`). */
  drop(matches) {
    const rules = matches.map((match) => `  ip daddr ${this.host} ${match} drop\n`).join('');
    const table = `table inet limbic_test {\n chain output {\n  type filter hook output priority 0;\n${rules} }\n}\n`;
    execFileSync('ip', ['netns', 'exec', this.namespace, 'nft', '-f', '-'], { input: table });
  }

  /** Whether a UDP datagram sent from inside the namespace reaches the host. */
  udpReachesHost() {
    // One process listens outside, one sends from inside; the listener says what it got.
    const script = `
import socket, subprocess, sys
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(('${this.host}', 0)); r.settimeout(2)
send = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'probe', ('${this.host}', %d))" % r.getsockname()[1]
subprocess.run(['ip', 'netns', 'exec', '${this.namespace}', sys.executable, '-c', send], capture_output=True)
try: print(r.recv(16) == b'probe')
except socket.timeout: print(False)`;
    return execFileSync('python3', ['-c', script], { encoding: 'utf8' }).trim() === 'True';
  }

  /** Chromium inside the namespace. */
  chromium(flags) {
    this.workdir ??= mkdtempSync(join(tmpdir(), 'limbic-netns-'));
    const wrapper = join(this.workdir, 'chromium-in-namespace');
    writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${this.namespace} ${process.env.CHROMIUM ?? '/usr/bin/chromium'} "$@"\n`);
    chmodSync(wrapper, 0o755);
    return launchChromium(flags, wrapper);
  }

  down() {
    if (this.workdir) rmSync(this.workdir, { recursive: true, force: true });
    spawnSync('ip', ['link', 'del', this.outside]);
    spawnSync('ip', ['netns', 'del', this.namespace]);
  }
}
