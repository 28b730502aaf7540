// What the browser tests share: a real `limbic serve` on a free loopback port with a fresh
// store, and Debian's Chromium through playwright-core. Not a test file itself (`node --test
// tests/browser/` runs only *.test.mjs).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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
    const bin = binary();
    assert.ok(existsSync(bin), `no server binary at ${bin}: run \`cargo build -p limbic-server --bins\` or set LIMBIC_BIN`);
    this.port = await freePort();
    this.url = `http://${this.address}:${this.port}`;
    const example = readFileSync(join(REPO, 'config.example.toml'), 'utf8');
    const configPath = join(this.workdir, 'limbic.toml');
    // The example's plugins' files are relative to the repository; the server runs elsewhere.
    const config = this.plugins
      ? example.replace(/^(path|manifest) = "plugins\//gm, (_, key) => `${key} = "${join(REPO, 'plugins')}/`)
      : example.split(/^\[\[plugins\]\]/m)[0];
    writeFileSync(configPath, config);
    const overrides = {
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
    const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('LIMBIC_')));
    mkdirSync(ARTIFACTS, { recursive: true });
    this.logPath = join(ARTIFACTS, this.logName);
    const log = openSync(this.logPath, 'w');
    writeFileSync(log, `${bin} serve --config ${configPath}\n${JSON.stringify(overrides, null, 2)}\n`);
    this.process = spawn(bin, ['serve', '--config', configPath], {
      cwd: this.workdir,
      env: { ...env, ...overrides, NO_COLOR: '1' },
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
