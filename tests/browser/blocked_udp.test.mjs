// The join page completes a call from a browser whose UDP is blocked (a hospital or corporate
// firewall): the client's Chromium runs in a network namespace the test creates, joined to this
// one by a veth pair, where an nftables rule drops every UDP datagram to the server's address
// (checked with a probe before and after the rule). Media then goes over ICE-TCP
// (spec/calls.md, "Networks that block UDP"): the therapist, outside, and the client see each
// other's video.
//
// Needs root, `ip` and `nft` (scripts/setup installs nftables); skipped otherwise. Nothing
// outside the namespace and the veth pair is touched.
//
//   node --test tests/browser/blocked_udp.test.mjs

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { Fence, LimbicServer, REPO, callThroughTheJoinPage, launchChromium } from './harness.mjs';

const SERVICE_SECRET = 'browser-test-service-secret';
const LINK_SECRET = 'browser-test-link-secret';
const FAKE_MEDIA = ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required'];

const possible = Fence.possible;
const fence = new Fence();
const HOST = fence.host;

let server;
let browser;
let fenced;

before(async () => {
  if (!possible) return;
  fence.up();
  fence.drop(['meta l4proto udp']);
  assert.ok(!fence.udpReachesHost(), "the namespace's UDP to the server is not blocked");
  server = new LimbicServer({
    logName: 'limbic-blocked-udp.log',
    address: HOST,
    overrides: (url) => ({
      LIMBIC_CALLS__UDP_ADDRESS: HOST,
      LIMBIC_VOIP__TURN_URIS: '[]',
      LIMBIC_APPOINTMENTS__SHARED_SECRET: SERVICE_SECRET,
      LIMBIC_APPOINTMENTS__JWT_SECRET: LINK_SECRET,
      LIMBIC_APPOINTMENTS__LINK_BASE_URL: `${url}/join`,
      LIMBIC_WEB__ASSETS_DIR: join(REPO, 'web/dist'),
    }),
  });
  await server.start();
  // The page is served from the veth address, not loopback: a secure context only by this flag.
  const flags = [...FAKE_MEDIA, `--unsafely-treat-insecure-origin-as-secure=${server.url}`];
  fenced = await fence.chromium(flags);
  browser = await launchChromium(flags);
});

after(async () => {
  await fenced?.close();
  await browser?.close();
  await server?.stop();
  if (possible) fence.down();
});

test('a client whose UDP is blocked has a call through the join page', { skip: !possible && 'needs root, ip and nft' }, async () => {
  await callThroughTheJoinPage(server, SERVICE_SECRET, { outside: browser, inside: fenced, appointment: 'blocked-udp-1', therapist: 'dr.tcp', client: 'bea', how: 'without UDP' });
});
