// A browser Matrix client on another origin than the homeserver (issue 13): matrix-js-sdk,
// bundled into a small page (fixtures/matrix_client.js) that a static server of this test serves
// from another loopback port than `limbic`'s, in headless Chromium. Two people register, log in,
// sync, exchange messages, and one shows the image the other uploaded, fetched through
// authenticated media. Every request is cross-origin, so each one needs the server's CORS
// answers (spec/cors.md); without them the browser refuses the first call.
//
// Needs: the server binary (target/debug/limbic, or LIMBIC_BIN), web/'s dev dependencies
// (npm ci --prefix web: esbuild, matrix-js-sdk, playwright-core) and Debian's chromium.
//
//   node --test tests/browser/cross_origin.test.mjs

import assert from 'node:assert/strict';
import { readFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { ARTIFACTS, LimbicServer, REPO, launchChromium, requireFromWeb } from './harness.mjs';

const esbuild = requireFromWeb('esbuild');
const STEP_TIMEOUT = 30_000;
const IMAGE = { width: 48, height: 32 };

const server = new LimbicServer({ logName: 'cross-origin-limbic.log' });
let site; // the page's own origin: { url, close }
let browser;
let bundleDir;

/** Bundles the page's client (matrix-js-sdk included) into a temporary directory. */
async function buildPage() {
  bundleDir = await mkdtemp(join(tmpdir(), 'limbic-cross-origin-'));
  await esbuild.build({
    entryPoints: [join(REPO, 'tests/browser/fixtures/matrix_client.js')],
    outfile: join(bundleDir, 'client.js'),
    bundle: true,
    format: 'esm',
    platform: 'browser',
    // matrix-js-sdk is web/'s dev dependency. (Its crypto WebAssembly would load on first use
    // only; this page uses no encryption.)
    nodePaths: [join(REPO, 'web/node_modules')],
    logLevel: 'warning',
  });
  await writeFile(join(bundleDir, 'index.html'), '<!doctype html><meta charset="utf-8"><title>cross-origin client</title><script type="module" src="/client.js"></script>\n');
}

/** A static server for the page, on a loopback port of its own: another origin than limbic's. */
function serveStatic(dir) {
  const files = { '/': ['index.html', 'text/html'], '/client.js': ['client.js', 'text/javascript'] };
  const http = createServer(async (request, response) => {
    const file = files[new URL(request.url, 'http://page').pathname];
    if (!file) return response.writeHead(404).end();
    response.writeHead(200, { 'Content-Type': file[1] }).end(await readFile(join(dir, file[0])));
  });
  return new Promise((resolve) => {
    http.listen(0, '127.0.0.1', () => {
      resolve({ url: `http://127.0.0.1:${http.address().port}`, close: () => new Promise((done) => http.close(done)) });
    });
  });
}

/** A person's browser tab with the page loaded. */
async function person(name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('pageerror', (error) => console.error(`${name}: page error: ${error.message}`));
  // The browser's own word when it refuses an answer (the SDK's console noise is left out).
  page.on('console', (message) => /CORS|Access-Control/.test(message.text()) && console.error(`${name}: ${message.text()}`));
  await page.goto(site.url);
  await page.waitForFunction(() => window.matrix !== undefined);
  const call = (method, ...args) => page.evaluate(([method, args]) => window.matrix[method](...args), [method, args]);
  return { context, page, call };
}

before(async () => {
  await buildPage();
  await server.start();
  site = await serveStatic(bundleDir);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await site?.close();
  await server.stop();
  if (bundleDir) await rm(bundleDir, { recursive: true, force: true });
});

test('matrix-js-sdk on another origin registers, logs in, syncs, chats and shows an uploaded image', { timeout: 120_000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  const origin = await alice.page.evaluate(() => location.origin);
  assert.notEqual(origin, new URL(server.url).origin, 'the page and the homeserver are on different origins');

  const aliceId = await alice.call('signUp', server.url, 'alice', 'alice-password-1');
  const bobId = await bob.call('signUp', server.url, 'bob', 'bob-password-1');
  await alice.call('startSync');
  await bob.call('startSync');

  const roomId = await alice.call('createRoom', bobId);
  await bob.call('acceptInvite', roomId);

  await alice.call('sendText', roomId, 'hello from another origin');
  const message = await bob.call('waitFor', aliceId, 'm.room.message', 'hello from another origin');
  assert.equal(message.roomId, roomId);
  await bob.call('sendText', roomId, 'hello back');
  await alice.call('waitFor', bobId, 'm.room.message', 'hello back');

  const mxc = await alice.call('sendImage', roomId, IMAGE.width, IMAGE.height);
  const image = await bob.call('waitFor', aliceId, 'm.room.message', 'square.png');
  assert.equal(image.content.url, mxc);
  const shown = await bob.call('showImage', mxc);
  assert.deepEqual(shown, { naturalWidth: IMAGE.width, naturalHeight: IMAGE.height, type: 'image/png' });
  await bob.page.screenshot({ path: join(ARTIFACTS, 'cross-origin.png') });

  await alice.context.close();
  await bob.context.close();
});
