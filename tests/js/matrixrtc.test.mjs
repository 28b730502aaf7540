// MatrixRTC with matrix-js-sdk 36 (the SDK inside Element Call and Element Web) against a real
// `limbic`: a MatrixRTCSession joins a room's call with the LiveKit focus from the client
// well-known; its call membership is sent with a delayed leave (MSC4140) that it keeps
// restarting; another member's session sees it; the call token comes from the focus' service
// (MSC4195 `/get_token` and the earlier `/sfu/get`) in exchange for an OpenID token; leaving
// sends the delayed leave at once; and when the app dies the server sends it by itself.
//
// Needs the server binary (target/debug/limbic, or LIMBIC_BIN) and `npm ci --prefix tests/js`
// (scripts/setup). The server is the browser tests' (tests/browser/harness.mjs); its log goes to
// tests/browser/artifacts/limbic-matrixrtc.log. The SDK leaves
// request timers behind after stopClient(), hence --test-force-exit:
//
//   node --test --test-force-exit tests/js/

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { ClientEvent, createClient, EventType } from 'matrix-js-sdk';
import { logger } from 'matrix-js-sdk/lib/logger.js';
import { MatrixRTCSessionEvent } from 'matrix-js-sdk/lib/matrixrtc/index.js';

import { LimbicServer, sleep } from '../browser/harness.mjs';

const CALL_MEMBER = EventType.GroupCallMemberPrefix; // org.matrix.msc3401.call.member
const DELAYED_EVENTS = '/_matrix/client/unstable/org.matrix.msc4140/delayed_events';
// Short timers so that the test sees several keep-alives and a server-side leave quickly.
const MEMBERSHIP = { membershipServerSideExpiryTimeout: 3000, membershipKeepAlivePeriod: 1000 };
const STEP = 15_000;

logger.setLevel('warn');

/** Polls `probe` until it answers something truthy. */
async function until(what, probe, timeout = STEP) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await probe();
    if (last) return last;
    await sleep(100);
  }
  assert.fail(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/** The browser tests' `limbic serve` (config.example.toml without its plugins, a free port, a
 * fresh store), with what MatrixRTC clients need on top. */
class MatrixRtcServer extends LimbicServer {
  constructor() {
    super({ logName: 'limbic-matrixrtc.log', overrides: () => ({ LIMBIC_CALLS__UDP_ADDRESS: '127.0.0.1' }) });
  }

  async request(method, path, { token, body } = {}) {
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path.startsWith('http') ? path : `${this.url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await response.text();
    return { status: response.status, body: text ? JSON.parse(text) : {} };
  }

  /** A registered user's started matrix-js-sdk client, synced once. */
  async client(localpart) {
    const { status, body } = await this.request('POST', '/_matrix/client/v3/register', {
      body: { username: localpart, password: `${localpart}-password`, auth: { type: 'm.login.dummy' } },
    });
    assert.equal(status, 200, JSON.stringify(body));
    const client = createClient({ baseUrl: this.url, accessToken: body.access_token, userId: body.user_id, deviceId: body.device_id });
    const prepared = new Promise((resolve) => client.once(ClientEvent.Sync, resolve));
    await client.startClient({ initialSyncLimit: 10 });
    await prepared;
    return client;
  }
}

const server = new MatrixRtcServer();
let alice;
let bob;
let roomId;
let foci;

/** The call membership state of `client`'s device, as the server has it (null: none yet). */
async function membershipOf(client) {
  const key = `_${client.getUserId()}_${client.getDeviceId()}`;
  const { status, body } = await server.request('GET', `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state/${CALL_MEMBER}/${encodeURIComponent(key)}`, {
    token: bob.getAccessToken(),
  });
  if (status === 404) return null;
  assert.equal(status, 200, JSON.stringify(body));
  return body;
}

/** `client`'s scheduled leave for its device, as listed by the SDK (MSC4140). */
async function delayedLeaveOf(client) {
  const { delayed_events: events } = await client._unstable_getDelayedEvents();
  const key = `_${client.getUserId()}_${client.getDeviceId()}`;
  return events.find((e) => e.room_id === roomId && e.type === CALL_MEMBER && e.state_key === key);
}

/** `session`'s current members' user ids (as computed by the SDK from room state). */
const membersOf = (session) => session.memberships.map((m) => m.sender);

before(async () => {
  await server.start();
  alice = await server.client('alice');
  bob = await server.client('bob');
  // Element creates rooms in which members may publish their call membership.
  ({ room_id: roomId } = await alice.createRoom({
    preset: 'private_chat',
    invite: [bob.getUserId()],
    power_level_content_override: { events: { [CALL_MEMBER]: 0 } },
  }));
  await bob.joinRoom(roomId);
  await until('both clients to see the room', () => alice.getRoom(roomId)?.getJoinedMemberCount() === 2 && bob.getRoom(roomId));
  // The LiveKit focus, as Element Call finds it: the homeserver's client well-known.
  const { body: wellKnown } = await server.request('GET', '/.well-known/matrix/client');
  foci = wellKnown['org.matrix.msc4143.rtc_foci'];
  assert.ok(Array.isArray(foci) && foci[0]?.type === 'livekit' && foci[0].livekit_service_url, JSON.stringify(wellKnown));
});

after(async () => {
  // Stopping a client ends its sessions (a leave that waits at most a second).
  alice?.stopClient();
  bob?.stopClient();
  await sleep(1500);
  await server.stop();
});

test('a MatrixRTC session joins with a delayed leave, gets a call token and leaves', async () => {
  assert.equal(await alice.doesServerSupportUnstableFeature('org.matrix.msc4140'), true, 'delayed events advertised in /versions');
  const session = alice.matrixRTC.getRoomSession(alice.getRoom(roomId));
  const seenByBob = bob.matrixRTC.getRoomSession(bob.getRoom(roomId));
  const bobSawAlice = new Promise((resolve) => {
    const check = () => membersOf(seenByBob).includes(alice.getUserId()) && resolve();
    seenByBob.on(MatrixRTCSessionEvent.MembershipsChanged, check);
  });

  session.joinRoomSession(foci, { type: 'livekit', focus_selection: 'oldest_membership' }, MEMBERSHIP);

  // The membership is in the room, with the focus, and a leave is scheduled for it.
  const membership = await until("alice's call membership", async () => {
    const content = await membershipOf(alice);
    return content?.application === 'm.call' ? content : null;
  });
  assert.equal(membership.device_id, alice.getDeviceId());
  assert.deepEqual(membership.foci_preferred, foci);
  const leave = await until("alice's delayed leave", () => delayedLeaveOf(alice));
  assert.deepEqual(leave.content, {}, 'the delayed event is the leave (empty membership)');
  assert.equal(leave.delay, MEMBERSHIP.membershipServerSideExpiryTimeout);
  // Listed to alice only.
  const { delayed_events: bobsEvents } = await bob._unstable_getDelayedEvents();
  assert.deepEqual(bobsEvents, []);
  await bobSawAlice;

  // The call token, from the focus' service, for an OpenID token (as Element Call asks).
  const serviceUrl = foci[0].livekit_service_url;
  const legacy = await server.request('POST', `${serviceUrl}/sfu/get`, {
    body: { room: roomId, openid_token: await alice.getOpenIdToken(), device_id: alice.getDeviceId() },
  });
  assert.equal(legacy.status, 200, JSON.stringify(legacy.body));
  assert.ok(legacy.body.url.startsWith('ws') && legacy.body.jwt.split('.').length === 3, JSON.stringify(legacy.body));
  const grants = JSON.parse(Buffer.from(legacy.body.jwt.split('.')[1], 'base64url').toString());
  assert.equal(grants.video.roomJoin, true, JSON.stringify(grants));
  const msc4195 = await server.request('POST', `${serviceUrl}/get_token`, {
    body: {
      room_id: roomId, slot_id: 'm.call#ROOM', openid_token: await alice.getOpenIdToken(),
      member: { id: `member-${alice.getDeviceId()}`, claimed_user_id: alice.getUserId(), claimed_device_id: alice.getDeviceId() },
    },
  });
  assert.equal(msc4195.status, 200, JSON.stringify(msc4195.body));
  assert.equal(JSON.parse(Buffer.from(msc4195.body.jwt.split('.')[1], 'base64url').toString()).video.room, grants.video.room, 'both APIs meet in one call');

  // Twice the server-side expiry later alice is still in the call: the SDK's restarts kept
  // pushing the leave back.
  const leaveScheduledSince = leave.running_since;
  await sleep(2 * MEMBERSHIP.membershipServerSideExpiryTimeout);
  assert.equal((await membershipOf(alice)).application, 'm.call', 'the keep-alives did not hold the leave back');
  assert.ok((await delayedLeaveOf(alice)).running_since > leaveScheduledSince, 'restarted');

  // Leaving sends the delayed leave now.
  assert.equal(await session.leaveRoomSession(STEP), true);
  assert.deepEqual(await membershipOf(alice), {});
  assert.equal(await delayedLeaveOf(alice), undefined, 'nothing left scheduled');
  await until('bob to see alice leave', () => !membersOf(seenByBob).includes(alice.getUserId()));
});

test('when the app dies, the server sends its leave', async () => {
  const session = alice.matrixRTC.getRoomSession(alice.getRoom(roomId));
  const seenByBob = bob.matrixRTC.getRoomSession(bob.getRoom(roomId));
  session.joinRoomSession(foci, { type: 'livekit', focus_selection: 'oldest_membership' }, MEMBERSHIP);
  await until('alice in the call again', async () => (await membershipOf(alice))?.application === 'm.call' && (await delayedLeaveOf(alice)));
  await until('bob to see alice', () => membersOf(seenByBob).includes(alice.getUserId()));

  // The app dies: no more requests reach the server (no keep-alive, no leave).
  alice.http.authedRequest = () => new Promise(() => {});
  alice.stopClient();
  const diedAt = Date.now();

  await until('the server to send alice\'s leave', async () => JSON.stringify(await membershipOf(alice)) === '{}', 4 * MEMBERSHIP.membershipServerSideExpiryTimeout);
  assert.ok(Date.now() - diedAt >= MEMBERSHIP.membershipServerSideExpiryTimeout - 1000, 'not before the last keep-alive expired');
  await until('bob to see alice gone', () => !membersOf(seenByBob).includes(alice.getUserId()));
  const { chunk } = (await server.request('GET', `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/messages?dir=b&limit=5`, { token: bob.getAccessToken() })).body;
  const sent = chunk.find((e) => e.type === CALL_MEMBER && JSON.stringify(e.content) === '{}');
  assert.equal(sent.sender, alice.getUserId(), 'sent as alice, by the server');
});
