// End-to-end test of the join page (web/, issue 8) in headless Chromium: a real `limbic`
// server, appointment links, a therapist and a client in two browser contexts with fake
// cameras and microphones, the waiting room, the call through the built-in SFU, chat,
// recording with consent, mute and leave; then links that are expired, forged or used, and a
// browser that refuses the camera and microphone.
//
// Needs: the server binary (target/debug/limbic, or LIMBIC_BIN), the built page (npm run build
// --prefix web), playwright-core (npm ci --prefix web) and Debian's chromium (CHROMIUM to use
// another). Screenshots and the server's log go to tests/browser/artifacts/.
//
//   node --test tests/browser/

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const ARTIFACTS = join(REPO, 'tests/browser/artifacts');
const WEB_DIST = join(REPO, 'web/dist');
// playwright-core is the web client's dev dependency: resolve it from web/.
const { chromium } = createRequire(join(REPO, 'web/package.json'))('playwright-core');

const SERVER_NAME = 'localhost';
const REGISTRATION_SECRET = 'browser-test-registration-secret';
const SERVICE_SECRET = 'browser-test-service-secret';
const LINK_SECRET = 'browser-test-link-secret';
const STEP_TIMEOUT = 30_000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function freePort() {
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

/**
 * A `limbic serve` on a free loopback port with a fresh store: config.example.toml without its
 * plugins (the page needs none, and they need a separate build), the rest as environment
 * overrides (LIMBIC_SECTION__KEY, see the example's header).
 */
class LimbicServer {
  constructor() {
    this.workdir = mkdtempSync(join(tmpdir(), 'limbic-browser-'));
    this.process = null;
  }

  async start() {
    const bin = binary();
    assert.ok(existsSync(bin), `no server binary at ${bin}: run \`cargo build -p limbic-server --bins\` or set LIMBIC_BIN`);
    assert.ok(existsSync(join(WEB_DIST, 'join.js')), 'no built page in web/dist: run `npm run build --prefix web`');
    this.port = await freePort();
    this.url = `http://127.0.0.1:${this.port}`;
    const example = readFileSync(join(REPO, 'config.example.toml'), 'utf8');
    const configPath = join(this.workdir, 'limbic.toml');
    writeFileSync(configPath, example.split(/^\[\[plugins\]\]/m)[0]);
    const overrides = {
      LIMBIC_SERVER_NAME: SERVER_NAME,
      LIMBIC_LISTEN__ADDRESS: '127.0.0.1',
      LIMBIC_LISTEN__PORT: String(this.port),
      LIMBIC_DATABASE__PATH: join(this.workdir, 'store'),
      LIMBIC_MEDIA__PATH: join(this.workdir, 'media'),
      LIMBIC_RATE_LIMITS__ENABLED: 'false',
      LIMBIC_REGISTRATION__SHARED_SECRET: REGISTRATION_SECRET,
      LIMBIC_APPOINTMENTS__SHARED_SECRET: SERVICE_SECRET,
      LIMBIC_APPOINTMENTS__JWT_SECRET: LINK_SECRET,
      LIMBIC_APPOINTMENTS__LINK_BASE_URL: `${this.url}/join`,
      LIMBIC_CALLS__UDP_PORT: '0', // any free port
      LIMBIC_WEB__ASSETS_DIR: WEB_DIST,
    };
    const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('LIMBIC_')));
    mkdirSync(ARTIFACTS, { recursive: true });
    this.logPath = join(ARTIFACTS, 'limbic.log');
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
    return { userId: account.user_id, token: account.access_token };
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

/** A link token signed with the server's key (LINK_SECRET), for links the server would not make. */
function linkToken(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${unsigned}.${createHmac('sha256', LINK_SECRET).update(unsigned).digest('base64url')}`;
}

const server = new LimbicServer();
let browser;
let therapist; // {userId, token}
let clientId;
let roomId;
const appointment = 'browser-test-1';

async function links() {
  const now = Date.now();
  const answer = await server.api('POST', '/_limbic/service/v1/appointments', {
    token: SERVICE_SECRET,
    body: {
      appointment_id: appointment,
      therapist: therapist.userId,
      client: clientId,
      title: 'Intake',
      starts_at: now,
      ends_at: now + 3_600_000,
      timezone: 'UTC',
    },
  });
  roomId = answer.room_id;
  return { therapist: answer.links[therapist.userId], client: answer.links[clientId] };
}

/** A browser context as a person on a device: camera and microphone allowed (fake devices). */
async function person(viewport) {
  const context = await browser.newContext({ viewport, permissions: ['camera', 'microphone'] });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('pageerror', (error) => console.error(`page error: ${error.message}`));
  page.on('dialog', (dialog) => dialog.accept());
  return { context, page };
}

const shown = (page, testId) => page.getByTestId(testId).waitFor({ state: 'visible' });

/** The frames the page decoded from others' video, per inbound-rtp `framesDecoded`. */
async function expectVideoFrom(page, who) {
  const deadline = Date.now() + STEP_TIMEOUT;
  let first = null;
  let last = null;
  while (Date.now() < deadline) {
    last = await page.evaluate(() => window.__limbicStats());
    if (last.framesDecoded > 0 && first === null) first = last.framesDecoded;
    // Frames keep coming: the video plays, it is not one stuck frame.
    else if (first !== null && last.framesDecoded >= first + 15) break;
    await sleep(250);
  }
  assert.ok(first !== null && last.framesDecoded >= first + 15, `${who} decodes the other's video: ${JSON.stringify(last)}`);
  const width = await page.getByTestId('remote-video').first().evaluate((video) => video.videoWidth);
  assert.ok(width > 0, `${who}'s remote <video> shows a picture`);
}

before(async () => {
  await server.start();
  const admin = await server.register('admin', true);
  therapist = await server.register('dr.jones', false);
  clientId = `@alice:${SERVER_NAME}`;
  await server.api('PUT', `/_limbic/admin/v1/therapists/${encodeURIComponent(therapist.userId)}`, { token: admin.token, body: { verified: true } });
  await server.api('PUT', `/_matrix/client/v3/profile/${encodeURIComponent(therapist.userId)}/displayname`, {
    token: therapist.token, body: { displayname: 'Dr Jones' },
  });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream',
      '--autoplay-policy=no-user-gesture-required',
      '--no-sandbox',
    ],
  });
});

after(async () => {
  await browser?.close();
  await server.stop();
});

test('a client waits, is admitted, and has a call with chat, recording, mute and leave', async () => {
  const link = await links();
  // The session may be recorded, with everyone's consent.
  await server.api('PATCH', `/_limbic/client/v1/sessions/${encodeURIComponent(roomId)}`, {
    token: therapist.token, body: { recording_policy: 'with_consent' },
  });

  const doctor = await person({ width: 1280, height: 800 });
  const client = await person({ width: 390, height: 844 }); // a phone

  await doctor.page.goto(link.therapist);
  await shown(doctor.page, 'page-lobby');
  await doctor.page.getByTestId('join-call').click();
  await shown(doctor.page, 'page-call');
  assert.equal(new URL(doctor.page.url()).search, '', 'the token leaves the address bar');

  await client.page.goto(link.client);
  await shown(client.page, 'page-waiting');
  await client.page.getByTestId('waiting-status').filter({ hasText: 'Dr Jones' }).waitFor();
  await client.page.screenshot({ path: join(ARTIFACTS, 'waiting-room.png'), fullPage: true });

  const entry = doctor.page.getByTestId('waiting-entry').filter({ hasText: 'alice' });
  await entry.getByTestId('admit').click();
  await shown(client.page, 'page-call');
  await shown(doctor.page, 'tile-remote');
  await shown(client.page, 'tile-remote');

  await expectVideoFrom(doctor.page, 'the therapist');
  await expectVideoFrom(client.page, 'the client');

  await client.page.getByTestId('chat-input').fill('Hello from the client');
  await client.page.getByTestId('chat-send').click();
  await doctor.page.getByTestId('chat-messages').getByText('Hello from the client').waitFor();
  await doctor.page.getByTestId('chat-input').fill('Welcome, Alice');
  await doctor.page.getByTestId('chat-input').press('Enter');
  await client.page.getByTestId('chat-messages').getByText('Welcome, Alice').waitFor();

  // Recording: everyone is asked; it starts once all allowed, and everyone sees it.
  for (const { page } of [doctor, client]) {
    await shown(page, 'consent-prompt');
    await page.getByTestId('consent-allow').click();
    await page.getByTestId('consent-prompt').waitFor({ state: 'hidden' });
  }
  await doctor.page.getByTestId('toggle-recording').click();
  await shown(client.page, 'recording-indicator');
  await shown(doctor.page, 'recording-indicator');
  await doctor.page.screenshot({ path: join(ARTIFACTS, 'call.png'), fullPage: true });
  await client.page.screenshot({ path: join(ARTIFACTS, 'call-phone.png'), fullPage: true });
  await doctor.page.getByTestId('toggle-recording').filter({ hasText: 'Stop recording' }).click();
  await client.page.getByTestId('recording-indicator').waitFor({ state: 'hidden' });

  // The client mutes: the therapist sees it on the client's tile.
  const clientTile = doctor.page.getByTestId('tile-remote');
  assert.equal(await clientTile.getByTestId('mic-muted').isHidden(), true, 'the client starts unmuted');
  await client.page.getByTestId('toggle-mic').click();
  await shown(clientTile, 'mic-muted');

  // The client leaves: gone from the therapist's call.
  await client.page.getByTestId('leave').click();
  await shown(client.page, 'page-left');
  await doctor.page.getByTestId('tile-remote').waitFor({ state: 'detached' });

  await client.context.close();
  await doctor.context.close();
});

test('expired, forged and used links show the expired-link page', async () => {
  const { page, context } = await person({ width: 800, height: 700 });
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: clientId, aud: `limbic-join:${roomId}`, iss: SERVER_NAME, iat: now - 7200, exp: now - 3600, jti: randomBytes(16).toString('hex') };

  await page.goto(`${server.url}/join?token=${linkToken(claims)}`);
  await shown(page, 'page-expired');
  await page.getByTestId('expired-reason').getByText('expired').waitFor();
  await page.screenshot({ path: join(ARTIFACTS, 'expired-link.png'), fullPage: true });

  const forged = `${linkToken({ ...claims, exp: now + 3600 }).slice(0, -4)}AAAA`;
  await page.goto(`${server.url}/join?token=${forged}`);
  await shown(page, 'page-expired');
  await page.getByTestId('expired-reason').getByText('not valid').waitFor();

  // Each link signs in once; a second browser opening it is turned away.
  const link = (await links()).client;
  const first = await person({ width: 800, height: 700 });
  await first.page.goto(link);
  await first.page.getByTestId('page-loading').waitFor({ state: 'hidden' });
  await page.goto(link);
  await shown(page, 'page-expired');
  await page.getByTestId('expired-reason').getByText('used already').waitFor();
  await first.context.close();
  await context.close();
});

test('a browser that refuses the camera and microphone gets the permissions page, and can join without', async () => {
  const { page, context } = await person({ width: 800, height: 700 });
  await context.addInitScript(() => {
    navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));
  });
  await page.goto((await links()).client);
  await shown(page, 'page-permissions');
  await page.getByTestId('permissions-continue').click();
  await shown(page, 'page-call');
  await context.close();
});
