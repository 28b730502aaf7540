// End-to-end test of the clinic console (web/src/clinic, issue 16) in headless Chromium against
// a real `limbic` server: a therapist signs in, finds their calendar, schedules a group session
// with a client from the directory and a passcode shown once, sees it on the calendar, and is
// told at the start-time field when a second session would double-book them; someone who is not
// a verified therapist is told so; a clinic admin verifies a therapist, who can then schedule,
// filters the audit log and verifies its chain. axe-core checks every page; screenshots at phone
// and desktop size go to tests/browser/artifacts/.
//
//   node --test tests/browser/

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { ARTIFACTS, LimbicServer, REPO, expectVideoFrom, launchChromium, requireFromWeb } from './harness.mjs';

const WEB_DIST = join(REPO, 'web/dist');
const AXE = readFileSync(requireFromWeb.resolve('axe-core/axe.min.js'), 'utf8');
const STEP_TIMEOUT = 30_000;
const PHONE = { width: 360, height: 740 };
const DESKTOP = { width: 1280, height: 900 };

// With config.example.toml's plugins: billing makes the invoices, calendar the feed.
const server = new LimbicServer({ logName: 'limbic-clinic.log', plugins: true, overrides: () => ({ LIMBIC_WEB__ASSETS_DIR: WEB_DIST }) });
let browser;
let therapist; // {userId, token, password}
let client;
let stranger;
let admin;
let nina; // a therapist the admin verifies in the test
let uma; // a therapist whose whole day is one test
let openSession; // the room of the session the client waits in (the client test makes it)
let laterSession; // the room of a session later today

before(async () => {
  await server.start();
  admin = await server.register('clinicadmin', true);
  nina = await server.register('nina', false);
  uma = await server.register('uma', false);
  therapist = await server.register('theo', false);
  client = await server.register('casey', false);
  stranger = await server.register('sam', false);
  await server.api('PUT', `/_matrix/client/v3/profile/${encodeURIComponent(client.userId)}/displayname`, { token: client.token, body: { displayname: 'Casey Client' } });
  for (const who of [therapist, uma]) {
    await server.api('PUT', `/_limbic/admin/v1/therapists/${encodeURIComponent(who.userId)}`, { token: admin.token, body: { verified: true } });
  }
  // The therapist and the client share a room, so that the directory (limited to people one
  // shares a room with, as config.example.toml has it) finds the client.
  for (const who of [therapist, uma]) {
    const room = await server.api('POST', '/_matrix/client/v3/createRoom', { token: who.token, body: { invite: [client.userId] } });
    await server.api('POST', `/_matrix/client/v3/join/${encodeURIComponent(room.room_id)}`, { token: client.token, body: {} });
  }
  // Fake camera and microphone: a client's "Join" leads to the join page, which asks for them.
  browser = await launchChromium(['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required']);
});

after(async () => {
  await browser?.close();
  await server.stop();
});

/** A fresh tab of a person's browser; every CSP refusal and page error fails the test. */
async function open(viewport) {
  const context = await browser.newContext({ viewport, permissions: ['camera', 'microphone'] });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.url });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (/Content Security Policy|Refused to/i.test(message.text())) problems.push(`CSP: ${message.text()}`);
  });
  await page.goto(`${server.url}/clinic`);
  return { context, page, problems };
}

/** axe-core on the page as it is: no serious or critical violation. */
async function accessible(page, where) {
  // Evaluated through the DevTools protocol, which the page's CSP does not govern.
  await page.evaluate(AXE);
  const violations = await page.evaluate(async () => {
    const result = await window.axe.run(document, { resultTypes: ['violations'] });
    return result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
  });
  assert.deepEqual(violations, [], `${where}: axe-core found serious or critical violations`);
}

async function screenshot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `clinic-${name}.png`), fullPage: true });
}

async function signIn(page, person, name) {
  await page.getByTestId('page-sign-in').waitFor();
  await page.getByLabel('Username').fill(name);
  await page.getByLabel('Password').fill(person.password);
  await page.getByTestId('sign-in-submit').click();
}

/**
 * A session `minutes` long, starting `fromNow` ms from now, made by `by` through the API: an
 * individual one with Casey as its client unless `extra` says otherwise.
 */
function scheduleSession(by, title, fromNow, { minutes = 30, ...extra } = {}) {
  const start = Date.now() + fromNow;
  return server.api('POST', '/_limbic/client/v1/sessions', {
    token: by.token,
    body: {
      kind: 'individual', title, starts_at: start, ends_at: start + minutes * 60_000, timezone: 'UTC',
      participants: [{ user_id: client.userId, role: 'client' }], ...extra,
    },
  });
}

/** Tomorrow's date as the form's date input wants it (the browser's time zone is the test's). */
function tomorrow() {
  const day = new Date(Date.now() + 24 * 3_600_000);
  return `${day.getFullYear()}-${String(day.getMonth() + 1).padStart(2, '0')}-${String(day.getDate()).padStart(2, '0')}`;
}

/** The calendar event with this title, moving a week on if tomorrow is in the next one. */
async function calendarEvent(page, title) {
  const event = page.locator('.fc-event', { hasText: title });
  if (await event.count() === 0) await page.locator('.fc-next-button').click();
  await event.first().waitFor();
  return event.first();
}

test('a therapist signs in, schedules a group session with a passcode and is kept from double-booking', async () => {
  const { context, page, problems } = await open(DESKTOP);
  await accessible(page, 'sign-in');
  await screenshot(page, 'sign-in-desktop');

  // A wrong password is refused with a message a person can act on; the token never shows in the URL.
  await page.getByLabel('Username').fill('theo');
  await page.getByLabel('Password').fill('not the password');
  await page.getByTestId('sign-in-submit').click();
  await assert.doesNotReject(page.getByTestId('sign-in-error').filter({ hasText: 'do not match' }).waitFor());

  await signIn(page, therapist, 'theo');
  await page.getByTestId('page-calendar').waitFor();
  assert.ok(!page.url().includes(therapist.token) && !page.url().includes('access_token'));
  const zone = await page.evaluate(() => Intl.DateTimeFormat().resolvedOptions().timeZone.replaceAll('_', ' '));
  assert.equal(await page.getByTestId('calendar-timezone').textContent(), zone);
  await page.locator('.fc-view-harness').waitFor();
  // The calendar plugin's feed, to subscribe to from a calendar app.
  await page.getByTestId('feed').waitFor();
  await page.locator('#feed summary').click();
  const feed = await page.getByTestId('feed-url').textContent();
  assert.match(feed, new RegExp(`^${server.url}/_limbic/plugins/calendar/feed/[0-9a-f]{64}\\.ics$`));
  assert.equal(await page.getByTestId('feed-subscribe').getAttribute('href'), feed.replace(/^http:/, 'webcal:'));
  await accessible(page, 'calendar');
  await screenshot(page, 'calendar-desktop');

  // A click on an empty slot of the week starts a session there.
  await page.locator('.fc-timegrid-slot-lane[data-time="14:00:00"]').click();
  await page.getByTestId('schedule-dialog').waitFor();
  assert.equal(await page.getByTestId('schedule-time').inputValue(), '14:00');
  await page.locator('#schedule-cancel').click();
  await page.getByTestId('schedule-dialog').waitFor({ state: 'hidden' });
  // A drag over empty slots starts one with that time and length.
  const from = await page.locator('.fc-timegrid-slot-lane[data-time="15:00:00"]').boundingBox();
  const to = await page.locator('.fc-timegrid-slot-lane[data-time="16:30:00"]').boundingBox();
  const x = from.x + from.width / 2;
  await page.mouse.move(x, from.y + from.height / 2);
  await page.mouse.down();
  await page.mouse.move(x, to.y + to.height / 2, { steps: 10 });
  await page.mouse.up();
  await page.getByTestId('schedule-dialog').waitFor();
  assert.equal(await page.getByTestId('schedule-time').inputValue(), '15:00');
  assert.equal(await page.getByTestId('schedule-duration').inputValue(), '120');
  await page.locator('#schedule-cancel').click();
  await page.getByTestId('schedule-dialog').waitFor({ state: 'hidden' });
  assert.deepEqual(problems, [], 'the calendar takes the drag in its stride');

  // Schedule: a group session tomorrow at 10:00 for 90 minutes, Casey picked from the directory.
  await page.getByTestId('new-session').click();
  const dialog = page.getByTestId('schedule-dialog');
  await dialog.waitFor();
  await page.getByTestId('schedule-kind').selectOption('group');
  await page.getByTestId('schedule-title').fill('Tuesday group');
  await page.getByTestId('client-search').fill('casey');
  await page.getByTestId('client-results').getByRole('button', { name: /Casey Client/ }).click();
  assert.match(await page.getByTestId('chosen-clients').textContent(), /Casey Client/);
  await page.getByTestId('schedule-date').fill(tomorrow());
  await page.getByTestId('schedule-time').fill('10:00');
  await page.getByTestId('schedule-duration').selectOption('90');
  await page.getByTestId('schedule-passcode').check();
  await accessible(page, 'schedule dialog');
  await screenshot(page, 'schedule-desktop');
  await page.getByTestId('schedule-submit').click();

  // The passcode: six digits, shown once, copied with the link.
  await page.getByTestId('scheduled-dialog').waitFor();
  const passcode = await page.getByTestId('scheduled-passcode').textContent();
  assert.match(passcode, /^\d{6}$/);
  const link = await page.getByTestId('scheduled-link').textContent();
  assert.match(link, /\/clinic\/sessions\/!/);
  await page.getByTestId('scheduled-copy').click();
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  assert.ok(copied.includes(passcode) && copied.includes(link), copied);
  await page.getByTestId('scheduled-close').click();
  assert.equal(await page.getByTestId('scheduled-passcode').textContent(), '', 'the passcode is gone once the dialog closes');

  // The server has it as asked: a group session, the client invited, the passcode required.
  const start = new Date(`${tomorrow()}T10:00`).valueOf();
  const listed = await server.api('GET', `/_limbic/client/v1/sessions?from=${start}&to=${start + 1}`, { token: therapist.token });
  assert.equal(listed.sessions.length, 1);
  const [view] = listed.sessions;
  assert.equal(view.session.kind, 'group');
  assert.equal(view.session.title, 'Tuesday group');
  assert.equal(view.session.ends_at - view.session.starts_at, 90 * 60_000);
  assert.equal(view.session.starts_at, start);
  assert.equal(view.roles[client.userId], 'client');
  const knock = await fetch(`${server.url}/_matrix/client/v3/knock/${encodeURIComponent(view.room_id)}`, {
    method: 'POST', headers: { Authorization: `Bearer ${stranger.token}`, 'Content-Type': 'application/json' }, body: '{}',
  });
  assert.equal(knock.status, 403, 'a knock without the passcode is refused');

  // The feed has it once the calendar plugin has seen it.
  const deadline = Date.now() + 15_000;
  let ics = '';
  while (!ics.includes('SUMMARY:Tuesday group') && Date.now() < deadline) {
    ics = await (await fetch(feed)).text();
    if (!ics.includes('SUMMARY:Tuesday group')) await new Promise((resolve) => setTimeout(resolve, 250));
  }
  assert.match(ics, /SUMMARY:Tuesday group/);

  // On the calendar, coloured as a group session; a click opens its page, at its own address.
  const event = await calendarEvent(page, 'Tuesday group');
  assert.match(await event.getAttribute('class'), /kind-group/);
  await screenshot(page, 'calendar-with-session-desktop');
  // From the keyboard: the session is a link to focus and open.
  await event.focus();
  await page.keyboard.press('Enter');
  await page.getByTestId('page-session').waitFor();
  assert.equal(await page.getByTestId('session-status').textContent(), 'Scheduled');
  assert.equal(new URL(page.url()).pathname, `/clinic/sessions/${encodeURIComponent(view.room_id)}`);
  // Tomorrow's session: a countdown to its join window, and no joining before it.
  assert.match(await page.getByTestId('session-countdown').textContent(), /^The call opens in \d+ (h|day)/);
  assert.equal(await page.getByTestId('session-join').isDisabled(), true);
  await page.getByTestId('session-back').click();
  await page.getByTestId('page-calendar').waitFor();

  // A second session at the same time: refused, and said at the start time.
  await page.getByTestId('new-session').click();
  await page.getByTestId('schedule-title').fill('Overlapping intake');
  await page.getByTestId('schedule-date').fill(tomorrow());
  await page.getByTestId('schedule-time').fill('10:30');
  await page.getByTestId('schedule-submit').click();
  const timeError = page.getByTestId('schedule-time-error');
  await timeError.waitFor();
  assert.equal(await timeError.textContent(), 'You already have "Tuesday group" at that time. Choose another time.');
  assert.equal(await page.getByTestId('schedule-time').getAttribute('aria-invalid'), 'true');
  await accessible(page, 'schedule dialog with an error');
  await screenshot(page, 'double-booking-desktop');

  assert.deepEqual(problems, []);
  await context.close();
});

test('on a phone the calendar is an agenda, and someone with no sessions who is not a verified therapist is told so', async () => {
  const phone = await open(PHONE);
  await signIn(phone.page, therapist, 'theo');
  await phone.page.getByTestId('page-calendar').waitFor();
  await phone.page.locator('.fc-list, .fc-list-empty').first().waitFor();
  await accessible(phone.page, 'calendar on a phone');
  await screenshot(phone.page, 'calendar-phone');
  const width = await phone.page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= PHONE.width, `the page is ${width} px wide on a ${PHONE.width} px screen`);
  // Signing out ends the session on the server too.
  await phone.page.getByTestId('sign-out').click();
  await phone.page.getByTestId('page-sign-in').waitFor();
  assert.deepEqual(phone.problems, []);
  await phone.context.close();

  const other = await open(PHONE);
  await signIn(other.page, stranger, 'sam');
  await other.page.getByTestId('page-sessions').waitFor();
  await other.page.getByTestId('no-upcoming').waitFor();
  assert.ok(await other.page.getByTestId('therapist-hint').isVisible());
  await accessible(other.page, 'no sessions, not a therapist');
  await screenshot(other.page, 'no-sessions-phone');
  assert.deepEqual(other.problems, []);
  await other.context.close();
});

test('a clinic admin verifies a therapist, who can then schedule, and checks the audit log', async () => {
  const { context, page, problems } = await open(DESKTOP);
  await signIn(page, admin, 'clinicadmin');
  await page.getByTestId('page-admin').waitFor();
  const row = page.locator('tr[data-user="@nina:localhost"]');
  await row.waitFor();
  assert.equal(await row.getByTestId('therapist-state').textContent(), 'Not verified');
  await accessible(page, 'administration');
  await screenshot(page, 'admin-desktop');

  await row.getByTestId('therapist-toggle').click();
  await row.getByTestId('therapist-state').filter({ hasText: /^Verified$/ }).waitFor();
  const standing = await server.api('GET', `/_limbic/admin/v1/therapists/${encodeURIComponent(nina.userId)}`, { token: admin.token });
  assert.equal(standing.verified, true);

  // The audit log, filtered to the verifications: Nina's is there; the chain checks out.
  await page.getByTestId('audit-action').fill('therapist_verified');
  await page.getByTestId('audit-user').fill(nina.userId);
  await page.getByTestId('audit-apply').click();
  const entries = page.getByTestId('audit-table').locator('tbody tr');
  await entries.first().waitFor();
  assert.equal(await entries.count(), 1);
  assert.match(await entries.first().textContent(), /therapist_verified.*@clinicadmin:localhost.*@nina:localhost/);
  await page.getByTestId('audit-verify').click();
  await page.getByTestId('audit-verification').filter({ hasText: 'The chain is intact' }).waitFor();
  await accessible(page, 'administration with results');
  await screenshot(page, 'admin-audit-desktop');
  assert.deepEqual(problems, []);
  await context.close();

  // Nina, now verified, gets the calendar and schedules.
  const therapistTab = await open(PHONE);
  await signIn(therapistTab.page, nina, 'nina');
  await therapistTab.page.getByTestId('page-calendar').waitFor();
  await therapistTab.page.getByTestId('new-session').click();
  await therapistTab.page.getByTestId('schedule-title').fill('First intake');
  await therapistTab.page.getByTestId('schedule-date').fill(tomorrow());
  await therapistTab.page.getByTestId('schedule-time').fill('14:00');
  await therapistTab.page.getByTestId('schedule-submit').click();
  await therapistTab.page.getByTestId('scheduled-dialog').waitFor();
  await screenshot(therapistTab.page, 'scheduled-phone');
  assert.deepEqual(therapistTab.problems, []);
  await therapistTab.context.close();

  // More users than one page: the rest come with "Show more users".
  for (let i = 0; i < 50; i += 1) await server.register(`member${String(i).padStart(2, '0')}`, false);
  const listing = await open(DESKTOP);
  await signIn(listing.page, admin, 'clinicadmin');
  await listing.page.getByTestId('users-more').waitFor();
  const rows = listing.page.getByTestId('users-table').locator('tbody tr');
  assert.equal(await rows.count(), 50);
  await listing.page.getByTestId('users-more').click();
  await listing.page.getByTestId('users-more').waitFor({ state: 'hidden' });
  const { total } = await server.api('GET', '/_synapse/admin/v2/users?limit=1', { token: admin.token });
  assert.ok(total > 50, `${total} users`);
  assert.equal(await rows.count(), total);
  assert.equal(new Set(await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.user))).size, total, 'no user twice');
  assert.deepEqual(listing.problems, []);
  await listing.context.close();

  const adminPhone = await open(PHONE);
  await signIn(adminPhone.page, admin, 'clinicadmin');
  await adminPhone.page.getByTestId('page-admin').waitFor();
  await adminPhone.page.getByTestId('users-term').fill('nina');
  await adminPhone.page.getByTestId('users-term').press('Enter');
  await adminPhone.page.locator('tr[data-user="@nina:localhost"]').waitFor();
  assert.equal(await adminPhone.page.getByTestId('users-table').locator('tbody tr').count(), 1, 'the search finds Nina alone');
  await accessible(adminPhone.page, 'administration on a phone');
  await screenshot(adminPhone.page, 'admin-phone');
  const width = await adminPhone.page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= PHONE.width, `the page is ${width} px wide on a ${PHONE.width} px screen`);
  assert.deepEqual(adminPhone.problems, []);
  await adminPhone.context.close();
});

test('a client sees a countdown, can join only inside the join window, and is asked for the passcode', async () => {
  const later = await scheduleSession(therapist, 'Check-in later', 2 * 3_600_000, { join_window_minutes: 15 });
  const soon = await scheduleSession(therapist, 'Check-in now', 5 * 60_000, { join_window_minutes: 15, passcode: '246810' });
  openSession = soon.room_id;
  laterSession = later.room_id;

  const { context, page, problems } = await open(PHONE);
  await signIn(page, client, 'casey');
  await page.getByTestId('page-sessions').waitFor();
  const item = (roomId) => page.locator(`li[data-room="${roomId}"]`);
  await item(later.room_id).waitFor();
  // Before the window: the button is disabled and the countdown says when it opens.
  assert.equal(await item(later.room_id).getByTestId('join-session').isDisabled(), true);
  assert.match(await item(later.room_id).getByTestId('countdown').textContent(), /^You can join in 1 h (4\d|5\d) min\.$/);
  // Inside the window: enabled.
  assert.equal(await item(soon.room_id).getByTestId('join-session').isEnabled(), true);
  assert.equal(await item(soon.room_id).getByTestId('countdown').textContent(), 'The join window is open: you can join now.');
  await accessible(page, "a client's sessions");
  await screenshot(page, 'client-sessions-phone');

  // Join: the join page takes over with the console's sign-in; the session asks for its passcode.
  await item(soon.room_id).getByTestId('join-session').click();
  await page.waitForURL(`${server.url}/join`);
  await page.getByTestId('page-passcode').waitFor();
  await accessible(page, 'passcode prompt');
  await screenshot(page, 'passcode-phone');
  await page.getByTestId('passcode-input').fill('000000');
  await page.getByTestId('passcode-submit').click();
  await page.getByTestId('passcode-wrong').waitFor();
  await page.getByTestId('passcode-input').fill('246810');
  await page.getByTestId('passcode-submit').click();
  await page.getByTestId('waiting-status').filter({ hasText: 'to let you in' }).waitFor();
  // The therapist sees the client waiting.
  const { waiting } = await server.api('GET', `/_limbic/client/v1/sessions/${encodeURIComponent(soon.room_id)}/waiting`, { token: therapist.token });
  assert.deepEqual(waiting.map((w) => w.user_id), [client.userId]);
  assert.deepEqual(problems, []);
  await context.close();
});

test("a therapist runs a session from its page: admits from the waiting room, writes notes, exports the transcript, completes it", async () => {
  const { context, page, problems } = await open(DESKTOP);
  page.on('dialog', (dialog) => dialog.accept());
  await page.goto(`${server.url}/clinic/sessions/${encodeURIComponent(openSession)}`);
  await signIn(page, therapist, 'theo');
  await page.getByTestId('page-session').waitFor();
  // The page shows before the session it loads: its title comes with the session.
  await page.getByTestId('session-title').filter({ hasText: /./ }).waitFor();
  assert.equal(await page.getByTestId('session-title').textContent(), 'Check-in now');

  // The client who entered the passcode waits; the therapist admits them.
  const waiting = page.getByTestId('waiting-list').locator(`li[data-user="${client.userId}"]`);
  await waiting.waitFor();
  await accessible(page, 'session page');
  await screenshot(page, 'session-desktop');
  await waiting.getByTestId('admit').click();
  await page.getByTestId('waiting-empty').waitFor();
  const { chunk } = await server.api('GET', `/_matrix/client/v3/rooms/${encodeURIComponent(openSession)}/members?membership=invite`, { token: therapist.token });
  assert.deepEqual(chunk.map((event) => event.state_key), [client.userId]);
  // The client comes in (with the passcode), so that the session bills their attendance.
  await server.api('POST', `/_matrix/client/v3/join/${encodeURIComponent(openSession)}`, { token: client.token, body: { 'org.limbic.passcode': '246810' } });

  // A sign-in link for the client (who has no Matrix app, say), to copy.
  const person = page.getByTestId('people-list').locator(`li[data-user="${client.userId}"]`);
  await person.getByTestId('make-link').click();
  const link = await person.getByTestId('client-link').textContent();
  assert.match(link, /\/join\?token=[\w-]+\.[\w-]+\.[\w-]+$/);

  // Notes: written, saved as typed, edited; the history keeps both versions with their author.
  await page.getByTestId('note-new').click();
  await page.getByTestId('note-body').fill('Client arrived on time.');
  await page.getByTestId('note-status').filter({ hasText: /^Saved at/ }).waitFor();
  await page.getByTestId('note-body').fill('Client arrived on time. Discussed sleep.');
  await page.getByTestId('note-history').locator('li').nth(1).waitFor();
  assert.match(await page.getByTestId('note-history').locator('li').first().textContent(), /by @theo:localhost/);
  const { notes } = await server.api('GET', `/_limbic/client/v1/sessions/${encodeURIComponent(openSession)}/notes`, { token: therapist.token });
  assert.equal(notes.length, 1);
  assert.deepEqual(notes[0].versions.map((v) => v.content.body), ['Client arrived on time. Discussed sleep.', 'Client arrived on time.']);
  const refused = await fetch(`${server.url}/_limbic/client/v1/sessions/${encodeURIComponent(openSession)}/notes`, { headers: { Authorization: `Bearer ${client.token}` } });
  assert.equal(refused.status, 403, 'a client never reads the notes');

  // The workflow: open, started, completed (a final step asks first).
  await page.getByRole('button', { name: 'Open the session' }).click();
  await page.getByTestId('session-status').filter({ hasText: 'Open' }).waitFor();
  await page.getByRole('button', { name: 'Mark as started' }).click();
  await page.getByTestId('session-status').filter({ hasText: 'In progress' }).waitFor();

  // The transcript, as Markdown: the session's title and its participants with their roles.
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByTestId('transcript-markdown').click()]);
  assert.match(download.suggestedFilename(), /^Check-in-now-transcript\.md$/);
  const transcript = readFileSync(await download.path(), 'utf8');
  assert.match(transcript, /Check-in now/);
  assert.match(transcript, /@casey:localhost/);

  await page.getByRole('button', { name: 'Complete the session' }).click();
  await page.getByTestId('session-status').filter({ hasText: 'Completed' }).waitFor();
  assert.equal(await page.getByTestId('session-actions').getByRole('button').count(), 0, 'nothing follows completed');
  // The billing plugin's invoice: an individual session at the example's rate, €90.
  const total = page.getByTestId('invoice-total');
  await total.waitFor();
  assert.match(await total.textContent(), /90\.00/);
  await accessible(page, 'a completed session with its invoice');
  await screenshot(page, 'session-completed-desktop');

  // Rescheduling the later session onto another one of the therapist's: said at the start time.
  await page.goto(`${server.url}/clinic/sessions/${encodeURIComponent(laterSession)}`);
  await page.getByTestId('page-session').waitFor();
  await page.locator('#session-edit-panel summary').click();
  const tuesday = new Date(`${tomorrow()}T10:30`);
  await page.getByTestId('edit-date').fill(tomorrow());
  await page.getByTestId('edit-time').fill('10:30');
  await page.locator('#edit-timezone').selectOption(await page.evaluate(() => Intl.DateTimeFormat().resolvedOptions().timeZone));
  await page.getByTestId('edit-save').click();
  await page.getByTestId('edit-time-error').filter({ hasText: 'You already have "Tuesday group" at that time' }).waitFor();
  assert.ok(tuesday.valueOf() > Date.now());
  await accessible(page, 'a refused reschedule');
  await screenshot(page, 'reschedule-refused-desktop');
  assert.deepEqual(problems, []);
  await context.close();
});

test('a client sees their invoice, and only their own line of it', async () => {
  const { context, page, problems } = await open(PHONE);
  await signIn(page, client, 'casey');
  await page.getByTestId('invoices').waitFor();
  const invoice = page.getByTestId('invoices-list').locator('li', { hasText: 'Check-in now' });
  await invoice.waitFor();
  assert.match(await invoice.getByTestId('invoice-total').textContent(), /90\.00/);
  assert.doesNotMatch(await invoice.textContent(), /@theo:localhost ·/, 'no line but the client\'s own');
  await accessible(page, "a client's invoices");
  await screenshot(page, 'client-invoices-phone');
  assert.deepEqual(problems, []);
  await context.close();
});

test('a therapist splits a group session into breakout rooms by dragging, moves someone from the list, and closes them', async () => {
  const group = await scheduleSession(therapist, 'Skills group', 4 * 3_600_000, {
    minutes: 60, kind: 'group', participants: [{ user_id: client.userId, role: 'client' }, { user_id: stranger.userId, role: 'client' }],
  });
  const breakouts = async () => (await server.api('GET', `/_limbic/client/v1/sessions/${encodeURIComponent(group.room_id)}/breakouts`, { token: therapist.token })).breakouts;

  const { context, page, problems } = await open(DESKTOP);
  await page.goto(`${server.url}/clinic/sessions/${encodeURIComponent(group.room_id)}`);
  await signIn(page, therapist, 'theo');
  await page.getByTestId('breakouts').waitFor();
  await page.getByTestId('breakout-name').fill('Pair A');
  await page.getByTestId('breakout-create').click();
  const pair = page.locator('[data-breakout]:not([data-breakout="main"])');
  await pair.waitFor();
  const [created] = await breakouts();

  // Dragged by the name from the main room into the breakout.
  await page.locator(`[data-breakout="main"] li[data-user="${client.userId}"] span`).dragTo(pair);
  await pair.locator(`li[data-user="${client.userId}"]`).waitFor();
  assert.ok((await breakouts())[0].members.includes(client.userId));
  // Moved with the list (the keyboard's way).
  await page.locator(`[data-breakout="main"] li[data-user="${stranger.userId}"] select`).selectOption(created.room_id);
  await pair.locator(`li[data-user="${stranger.userId}"]`).waitFor();
  assert.ok((await breakouts())[0].members.includes(stranger.userId));
  await accessible(page, 'breakout rooms');
  await screenshot(page, 'breakouts-desktop');

  // Closed: everyone is back in the main room.
  await pair.getByTestId('breakout-close').click();
  await page.getByTestId('breakouts-closed').filter({ hasText: 'Closed: Pair A.' }).waitFor();
  assert.equal((await breakouts())[0].closed, true);
  await page.locator(`[data-breakout="main"] li[data-user="${client.userId}"]`).waitFor();

  // Completed, the group gets its follow-up chat from the followup plugin.
  page.on('dialog', (dialog) => dialog.accept());
  await page.getByRole('button', { name: 'Open the session' }).click();
  await page.getByTestId('session-status').filter({ hasText: 'Open' }).waitFor();
  await page.getByRole('button', { name: 'Mark as started' }).click();
  await page.getByTestId('session-status').filter({ hasText: 'In progress' }).waitFor();
  await page.getByRole('button', { name: 'Complete the session' }).click();
  const followup = page.getByTestId('followup');
  await followup.waitFor();
  const { room_id: followupRoom } = await server.api('GET', `/_limbic/plugins/followup/rooms/${encodeURIComponent(group.room_id)}`, { token: therapist.token });
  assert.ok((await followup.textContent()).includes(followupRoom));
  assert.match(await followup.textContent(), /Skills group — follow-up/);
  assert.deepEqual(problems, []);
  await context.close();

  // The client finds it under the past session.
  const theirs = await open(PHONE);
  await signIn(theirs.page, client, 'casey');
  await theirs.page.getByTestId('past-sessions').locator(`li[data-room="${group.room_id}"]`).getByTestId('followup').waitFor();
  await accessible(theirs.page, "a client's past session with its follow-up chat");
  assert.deepEqual(theirs.problems, []);
  await theirs.context.close();
});

test("a therapist plays and downloads a session's recording from its page", async () => {
  const { context, page, problems } = await open(DESKTOP);
  await page.goto(`${server.url}/clinic/sessions/${encodeURIComponent(openSession)}`);
  await signIn(page, therapist, 'theo');
  await page.getByTestId('page-session').waitFor();
  assert.equal(await page.getByTestId('recordings-list').locator('li').count(), 0);

  // A second of sound, recorded by the browser itself, stored in the media repository and
  // announced in the session room as the server announces a recorded track.
  const announced = await page.evaluate(async ({ token, roomId, owner }) => {
    const audio = new AudioContext();
    const tone = audio.createOscillator();
    const sink = audio.createMediaStreamDestination();
    tone.connect(sink);
    tone.start();
    const recorder = new MediaRecorder(sink.stream, { mimeType: 'audio/webm;codecs=opus' });
    const chunks = [];
    recorder.ondataavailable = (event) => chunks.push(event.data);
    const stopped = new Promise((resolve) => { recorder.onstop = resolve; });
    recorder.start();
    await new Promise((resolve) => setTimeout(resolve, 1000));
    recorder.stop();
    await stopped;
    const file = new Blob(chunks, { type: 'audio/webm' });
    const auth = { Authorization: `Bearer ${token}` };
    const upload = await (await fetch('/_matrix/media/v3/upload?filename=recording.webm', { method: 'POST', headers: { ...auth, 'Content-Type': 'audio/webm' }, body: file })).json();
    const content = {
      msgtype: 'm.audio', body: 'recording.webm', filename: 'recording.webm', url: upload.content_uri,
      info: { mimetype: 'audio/webm', size: file.size, duration: 1000 }, 'org.limbic.recording_of': owner,
    };
    const sent = await fetch(`/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/send/m.room.message/rec1`, {
      method: 'PUT', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify(content),
    });
    return { status: sent.status, size: file.size };
  }, { token: therapist.token, roomId: openSession, owner: client.userId });
  assert.equal(announced.status, 200);
  assert.ok(announced.size > 0);

  await page.reload();
  await page.getByTestId('page-session').waitFor();
  const item = page.getByTestId('recordings-list').locator('li');
  await item.waitFor();
  assert.match(await item.textContent(), /Sound of @casey:localhost · 1 s/);
  await item.getByTestId('recording-play').click();
  const player = item.getByTestId('recording-audio');
  await player.waitFor();
  await page.waitForFunction(() => {
    const audio = document.querySelector('[data-testid="recording-audio"]');
    return audio && audio.readyState >= 1 && !audio.error;
  });
  assert.match(await player.getAttribute('src'), /^blob:/);
  const [download] = await Promise.all([page.waitForEvent('download'), item.getByRole('button', { name: /^Download/ }).click()]);
  assert.equal(download.suggestedFilename(), 'recording.webm');
  assert.equal(readFileSync(await download.path()).length, announced.size);
  await accessible(page, 'a session with a recording');
  await screenshot(page, 'recording-desktop');
  assert.deepEqual(problems, []);
  await context.close();
});

test("a session's page shows each participant's consent to recording and raised hands, and why recording cannot start", async () => {
  const live = await scheduleSession(therapist, 'Recorded check-in', 5 * 60_000, { recording_policy: 'with_consent' });
  const room = encodeURIComponent(live.room_id);
  const me = encodeURIComponent(client.userId);
  await server.api('POST', `/_matrix/client/v3/join/${room}`, { token: client.token, body: {} });
  await server.api('PUT', `/_matrix/client/v3/rooms/${room}/state/org.limbic.recording.consent/${me}`, { token: client.token, body: { consent: true } });
  await server.api('PUT', `/_matrix/client/v3/rooms/${room}/state/org.limbic.hand/${me}`, { token: client.token, body: { raised: true } });

  const { context, page, problems } = await open(DESKTOP);
  await page.goto(`${server.url}/clinic/sessions/${room}`);
  await signIn(page, therapist, 'theo');
  const person = page.getByTestId('live-people').locator(`li[data-user="${client.userId}"]`);
  await person.filter({ hasText: 'consents to recording' }).waitFor();
  await person.getByTestId('hand-raised').waitFor();
  assert.match(await page.getByTestId('recording-line').textContent(), /^Not recording/);

  // Nobody is in the call: the server says so, and the page passes it on.
  await page.getByTestId('recording-toggle').click();
  await page.getByTestId('recording-error').filter({ hasText: 'The recording could not start' }).waitFor();
  await accessible(page, 'recording, consent and hands');
  await screenshot(page, 'live-desktop');

  // The client withdraws consent and lowers their hand: the page follows.
  await server.api('PUT', `/_matrix/client/v3/rooms/${room}/state/org.limbic.recording.consent/${me}`, { token: client.token, body: { consent: false } });
  await server.api('PUT', `/_matrix/client/v3/rooms/${room}/state/org.limbic.hand/${me}`, { token: client.token, body: { raised: false } });
  await person.filter({ hasText: 'does not consent to recording' }).waitFor();
  assert.equal(await person.getByTestId('hand-raised').count(), 0);
  assert.deepEqual(problems, []);
  await context.close();
});

/** The local wall-clock time `minutes` from now, rounded up to a whole minute, for the form. */
function soon(minutes) {
  const at = new Date(Date.now() + minutes * 60_000);
  at.setSeconds(60, 0);
  const pad = (n) => String(n).padStart(2, '0');
  return { date: `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}`, time: `${pad(at.getHours())}:${pad(at.getMinutes())}` };
}

test("a therapist's day: schedule with a passcode, the client waits and is admitted, a call, a breakout, notes, recording with consent, completed, transcript and invoice", async () => {
  // The therapist schedules a group session a few minutes from now, with a passcode.
  const desk = await open(DESKTOP);
  desk.page.on('dialog', (dialog) => dialog.accept());
  await signIn(desk.page, uma, 'uma');
  await desk.page.getByTestId('page-calendar').waitFor();
  await desk.page.getByTestId('new-session').click();
  await desk.page.getByTestId('schedule-kind').selectOption('group');
  await desk.page.getByTestId('schedule-title').fill('Group day');
  await desk.page.getByTestId('client-search').fill('casey');
  await desk.page.getByTestId('client-results').getByRole('button', { name: /Casey Client/ }).click();
  const { date, time } = soon(4);
  await desk.page.getByTestId('schedule-date').fill(date);
  await desk.page.getByTestId('schedule-time').fill(time);
  await desk.page.getByTestId('schedule-recording').selectOption('with_consent');
  await desk.page.getByTestId('schedule-passcode').check();
  await desk.page.getByTestId('schedule-submit').click();
  await desk.page.getByTestId('scheduled-dialog').waitFor();
  const passcode = await desk.page.getByTestId('scheduled-passcode').textContent();
  await desk.page.getByTestId('scheduled-copy').click();
  const copied = await desk.page.evaluate(() => navigator.clipboard.readText());
  const link = copied.split('\n').find((line) => line.includes('/clinic/sessions/'));
  const roomId = decodeURIComponent(link.split('/clinic/sessions/')[1]);
  await desk.page.getByTestId('scheduled-close').click();

  // The client opens the link they were sent, signs in, joins: the passcode, then the waiting room.
  const phone = await open(PHONE);
  await phone.page.goto(link);
  await signIn(phone.page, client, 'casey');
  const item = phone.page.locator(`li[data-room="${roomId}"]`);
  await item.getByTestId('join-session').click();
  await phone.page.getByTestId('page-passcode').waitFor();
  await phone.page.getByTestId('passcode-input').fill(passcode);
  await phone.page.getByTestId('passcode-submit').click();
  await phone.page.getByTestId('waiting-status').filter({ hasText: 'to let you in' }).waitFor();

  // The therapist's session page: the client waits; admitted; then the call.
  await desk.page.goto(link);
  await desk.page.getByTestId('page-session').waitFor();
  await desk.page.getByTestId('waiting-list').locator(`li[data-user="${client.userId}"]`).getByTestId('admit').click();
  const callTab = await desk.context.newPage();
  callTab.setDefaultTimeout(STEP_TIMEOUT);
  callTab.on('pageerror', (error) => desk.problems.push(`page error: ${error.message}`));
  await callTab.goto(link);
  await signIn(callTab, uma, 'uma');
  await callTab.getByTestId('page-session').waitFor();
  await callTab.getByTestId('session-join').click();
  await callTab.getByTestId('page-lobby').waitFor();
  await callTab.getByTestId('join-call').click();
  await callTab.getByTestId('page-call').waitFor();
  await phone.page.getByTestId('page-call').waitFor();
  await expectVideoFrom(callTab, 'the therapist');
  await expectVideoFrom(phone.page, 'the client');

  // A breakout during the call, from the session page: the client goes in and comes back.
  await desk.page.reload();
  await desk.page.getByTestId('breakouts').waitFor();
  await desk.page.getByTestId('breakout-name').fill('Pairs');
  await desk.page.getByTestId('breakout-create').click();
  const pairs = desk.page.locator('[data-breakout]:not([data-breakout="main"])');
  await pairs.waitFor();
  await desk.page.locator(`[data-breakout="main"] li[data-user="${client.userId}"] span`).dragTo(pairs);
  await pairs.locator(`li[data-user="${client.userId}"]`).waitFor();
  await pairs.getByTestId('breakout-close').click();
  await desk.page.getByTestId('breakouts-closed').filter({ hasText: 'Pairs' }).waitFor();

  // Notes, written and edited.
  await desk.page.getByTestId('note-new').click();
  await desk.page.getByTestId('note-body').fill('Group settled in quickly.');
  await desk.page.getByTestId('note-status').filter({ hasText: /^Saved at/ }).waitFor();
  await desk.page.getByTestId('note-body').fill('Group settled in quickly. Casey led the check-in.');
  await desk.page.getByTestId('note-history').locator('li').nth(1).waitFor();

  // Recording with everyone's consent, in the call; its files come back to the session page.
  for (const page of [callTab, phone.page]) {
    await page.getByTestId('consent-prompt').waitFor();
    await page.getByTestId('consent-allow').click();
    await page.getByTestId('consent-prompt').waitFor({ state: 'hidden' });
  }
  await callTab.getByTestId('toggle-recording').click();
  await phone.page.getByTestId('recording-indicator').waitFor();
  await new Promise((resolve) => setTimeout(resolve, 2000));
  await callTab.getByTestId('toggle-recording').filter({ hasText: 'Stop recording' }).click();
  await phone.page.getByTestId('recording-indicator').waitFor({ state: 'hidden' });
  await desk.page.reload();
  await desk.page.getByTestId('recordings-list').locator('li').first().waitFor();
  assert.ok(await desk.page.getByTestId('recordings-list').locator('li', { hasText: `Sound of ${client.userId}` }).count() >= 1);

  // Completed: the call ends; the transcript and the invoice.
  await desk.page.getByRole('button', { name: 'Mark as started' }).click();
  await desk.page.getByTestId('session-status').filter({ hasText: 'In progress' }).waitFor();
  await desk.page.getByRole('button', { name: 'Complete the session' }).click();
  await desk.page.getByTestId('session-status').filter({ hasText: 'Completed' }).waitFor();
  const [download] = await Promise.all([desk.page.waitForEvent('download'), desk.page.getByTestId('transcript-text').click()]);
  const transcript = readFileSync(await download.path(), 'utf8');
  assert.match(transcript, /^Group day\n/);
  assert.match(transcript, new RegExp(`${client.userId} \\(client\\)`));
  assert.match(transcript, /session status: completed/);
  assert.doesNotMatch(transcript, new RegExp(passcode), 'the passcode is nowhere in the transcript');
  const total = desk.page.getByTestId('invoice-total');
  await total.waitFor();
  assert.match(await total.textContent(), /€/);
  await accessible(desk.page, 'the day, completed');
  await screenshot(desk.page, 'day-completed-desktop');
  assert.deepEqual(desk.problems, []);
  assert.deepEqual(phone.problems, []);
  await phone.context.close();
  await desk.context.close();
});

test('admitting someone to a full session says why it cannot be done', async () => {
  const full = await scheduleSession(nina, 'Full house', 10 * 60_000, { max_participants: 2 });
  const room = encodeURIComponent(full.room_id);
  await server.api('POST', `/_matrix/client/v3/join/${room}`, { token: client.token, body: {} });
  await server.api('POST', `/_matrix/client/v3/knock/${room}`, { token: stranger.token, body: {} });

  const { context, page, problems } = await open(DESKTOP);
  await page.goto(`${server.url}/clinic/sessions/${room}`);
  await signIn(page, nina, 'nina');
  const waiting = page.getByTestId('waiting-list').locator(`li[data-user="${stranger.userId}"]`);
  await waiting.waitFor();
  await waiting.getByTestId('admit').click();
  const error = page.getByTestId('waiting-error');
  await error.filter({ hasText: 'cannot be let in' }).waitFor();
  assert.equal(await error.textContent(), '@sam:localhost cannot be let in: the session is full (2 participants). Raise the participant limit, or wait until someone leaves.');
  assert.equal(await waiting.count(), 1, 'still in the waiting room');
  await accessible(page, 'a refused admission');
  await screenshot(page, 'full-session-desktop');
  assert.deepEqual(problems, []);
  await context.close();
});
