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
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { ARTIFACTS, LimbicServer, REPO, SERVER_NAME, bookAppointment, expectVideoFrom, launchChromium } from './harness.mjs';

const WEB_DIST = join(REPO, 'web/dist');
const SERVICE_SECRET = 'browser-test-service-secret';
const LINK_SECRET = 'browser-test-link-secret';
const STEP_TIMEOUT = 30_000;

/** A link token signed with the server's key (LINK_SECRET), for links the server would not make. */
function linkToken(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${unsigned}.${createHmac('sha256', LINK_SECRET).update(unsigned).digest('base64url')}`;
}

const server = new LimbicServer({
  overrides: (url) => ({
    LIMBIC_APPOINTMENTS__SHARED_SECRET: SERVICE_SECRET,
    LIMBIC_APPOINTMENTS__JWT_SECRET: LINK_SECRET,
    LIMBIC_APPOINTMENTS__LINK_BASE_URL: `${url}/join`,
    LIMBIC_WEB__ASSETS_DIR: WEB_DIST,
  }),
});
let browser;
let therapist; // {userId, token}
let clientId;
let roomId;
const appointment = 'browser-test-1';

async function links() {
  const booked = await bookAppointment(server, SERVICE_SECRET, { appointment, therapist: therapist.userId, client: clientId });
  roomId = booked.roomId;
  return booked;
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

before(async () => {
  assert.ok(existsSync(join(WEB_DIST, 'join.js')), 'no built page in web/dist: run `npm run build --prefix web`');
  await server.start();
  const admin = await server.register('admin', true);
  therapist = await server.register('dr.jones', false);
  clientId = `@alice:${SERVER_NAME}`;
  await server.api('PUT', `/_limbic/admin/v1/therapists/${encodeURIComponent(therapist.userId)}`, { token: admin.token, body: { verified: true } });
  await server.api('PUT', `/_matrix/client/v3/profile/${encodeURIComponent(therapist.userId)}/displayname`, {
    token: therapist.token, body: { displayname: 'Dr Jones' },
  });
  browser = await launchChromium([
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
    '--autoplay-policy=no-user-gesture-required',
  ]);
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
